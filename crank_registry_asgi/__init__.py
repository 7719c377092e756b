"""crank_registry_asgi: the crank-registry controller as an ASGI application.

:func:`create_app` builds the Starlette application (mountable in any ASGI
server); :class:`ServiceConfig` holds its settings. :func:`create_gateway_app`
adds the gateway's ``POST /execute`` to it, configured by
:class:`GatewayConfig`. With worker identity checks on, call
:func:`crank_registry_asgi.tls.install` before hypercorn serves the app.
"""

from .app import create_app
from .config import GatewayConfig, ServiceConfig
from .gateway import create_gateway_app

__all__ = ["GatewayConfig", "ServiceConfig", "create_app", "create_gateway_app"]
