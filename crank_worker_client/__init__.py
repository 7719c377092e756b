"""crank_worker_client: what a worker (or a caller) imports to use the registry.

- :class:`WorkerAgent`: one ``async with`` keeps a worker registered:
  registration with retries at start-up, heartbeats in the background,
  re-registration when the controller forgot the worker, deregistration on
  exit. :func:`agent_lifespan` and :class:`AgentLifespanMiddleware` tie it to
  an ASGI application's lifespan.
- :class:`ControllerClient`: ``route`` a request to a worker, list
  capabilities and workers, read the controller's health.
- :class:`RegistryFollower`: a replica of the registry in this process,
  kept by the controller's change feed; routes answered without I/O.
- :class:`TLSConfig`: the CA bundle and, for mTLS, the client certificate.
  :data:`ControllerURLs`: one controller's URL or several sharing one
  registry (a list, or separated by commas, as in ``CONTROLLER_URL``).
- The errors, rooted at :class:`ClientError` (the tree is drawn in
  :mod:`crank_worker_client._exceptions`).

Depends on the core (``crank_registry``), httpx and anyio only. With the
``tracing`` extra (opentelemetry-api), every request carries the current W3C
trace context; without it, none does. Four public modules beside:

- :mod:`crank_worker_client.serving`, with the ``serving`` extra
  (jsonschema): serves capabilities on the invocation convention.
- :mod:`crank_worker_client.json_schema`, with the same extra: the rule a
  capability's JSON Schemas follow, shared by the serving module and the
  controller's ``/register``.
- :mod:`crank_worker_client.body`: the bounded request-body reader and the
  drain before an early answer, shared by the serving module and the
  controller's service.
- :mod:`crank_worker_client.certificates`: certificate files reloaded into
  a live TLS context when they are renewed, expiry warnings, and TLS file
  errors that name the file; shared with the controller.
"""

from ._agent import AgentState, AgentStatus, CallsInFlight, LoadSource, WorkerAgent
from ._client import (
    ControllerClient,
    ControllerHealth,
    HeartbeatAck,
    RegistrationAck,
    WorkerInfo,
)
from ._config import DEFAULT_CONTROLLER_URL, ControllerURLs, TLSConfig
from ._exceptions import (
    ClientCertificateRequired,
    ClientError,
    ConfigurationError,
    ControllerError,
    ControllerUnavailable,
    ForbiddenError,
    InvalidRequest,
    NoWorkerAvailable,
    PolicyDenied,
    RateLimited,
    RegistrationFailed,
    RevisionGone,
    UnexpectedResponse,
    UnknownCapability,
    WorkerNotRegisteredError,
)
from ._follower import RegistryFollower, lag_limit
from ._lifespan import AgentLifespanMiddleware, agent_lifespan
from ._load import LoadMeter
from ._schedule import (
    MAX_JITTER_FRACTION,
    RETRY_BASE_FRACTION,
    Outcome,
    next_heartbeat_delay,
    registration_backoff,
)
from ._tracing import TRACING_AVAILABLE

__all__ = [
    "DEFAULT_CONTROLLER_URL",
    "MAX_JITTER_FRACTION",
    "RETRY_BASE_FRACTION",
    "TRACING_AVAILABLE",
    "AgentLifespanMiddleware",
    "AgentState",
    "AgentStatus",
    "ClientCertificateRequired",
    "ClientError",
    "ConfigurationError",
    "ControllerClient",
    "ControllerError",
    "ControllerHealth",
    "ControllerURLs",
    "ControllerUnavailable",
    "ForbiddenError",
    "HeartbeatAck",
    "InvalidRequest",
    "LoadMeter",
    "CallsInFlight",
    "LoadSource",
    "NoWorkerAvailable",
    "Outcome",
    "RegistrationAck",
    "RegistrationFailed",
    "RegistryFollower",
    "RevisionGone",
    "TLSConfig",
    "UnexpectedResponse",
    "PolicyDenied",
    "RateLimited",
    "UnknownCapability",
    "WorkerAgent",
    "WorkerInfo",
    "WorkerNotRegisteredError",
    "agent_lifespan",
    "lag_limit",
    "next_heartbeat_delay",
    "registration_backoff",
]
