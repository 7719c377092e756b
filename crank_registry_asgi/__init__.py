"""crank_registry_asgi: the crank-registry controller as an ASGI application.

:func:`create_app` builds the Starlette application (mountable in any ASGI
server); :class:`ServiceConfig` holds its settings.
"""

from .app import create_app
from .config import ServiceConfig

__all__ = ["ServiceConfig", "create_app"]
