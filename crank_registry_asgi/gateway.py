"""The platform gateway: ``POST /execute`` routes through the registry and forwards.

A caller sends ``{"verb", "capability", "payload"}`` and, optionally, the
routing options of ``POST /route`` (``version``, ``slo_constraints``,
``budget_tokens``, ``strategy``, ``affinity_key``, ``exclude``); the gateway asks the
registry in the same process (the same registry object and service clock as
the controller's endpoints, no HTTP to itself) for a worker, forwards
``{"payload": ...}`` to that worker's invocation endpoint
(``POST {worker_url}/invoke/{verb}/{name}``, the core's
:func:`~crank_registry.invocation_path`) and answers with the worker's answer:
the JSON body as it came, or the NDJSON stream passed through line by line.
``X-Crank-Worker-Id`` names the worker that answered and
``X-Crank-Attempts`` how many workers were tried.

The payload is checked against the ``input_schema`` of the worker chosen
(that worker's registration of the capability: its version's) with the
jsonschema library, before anything is reserved on it; a payload it
refuses is 422 ``invalid_payload`` and no worker is called
(:mod:`crank_registry_asgi.payloads`).

Failover is limited to what is safe to repeat. When the chosen worker
refuses the connection, fails the TLS handshake or does not accept it within
the connect timeout, nothing was sent, so the next routable worker is tried
(:func:`~crank_registry_asgi.failover.next_worker`), up to ``max_attempts``
workers in all (never the same one twice). Once the request may have reached
a worker (a read timeout, a dropped connection after sending, a 5xx), it is
never sent again: the worker may have acted. The workers tried are added
to the caller's ``exclude``; its other options hold for every attempt.

Back-pressure (:mod:`crank_registry_asgi.backpressure`): a worker with
``max_concurrency`` calls in flight from the gateway is passed over; when
every candidate is full the call waits in a FIFO per capability of at most
``queue_limit`` calls (``--gateway-queue``), and past it is 503
``overloaded``. With ``--redis`` the limit holds for the calls of every
controller on that Redis together (:mod:`crank_registry_asgi.fleet_calls`).

Idempotency: with an ``Idempotency-Key`` header the first answer (2xx or
4xx) is kept for the routing settings' ``idempotency_ttl``
(``--idempotency-ttl``) with a hash of the body; the same key and body get
it again with ``Idempotent-Replayed: true`` and no worker is called; a
duplicate sent while the first runs waits for its answer; the same key
with another body is 422 ``idempotency_key_reused``. Keys are per caller
identity (anonymous callers share one space). The rules and bounds are
the core's :class:`~crank_registry.AnswerStore`. With ``--redis`` the keys
are shared by every controller on that Redis (a duplicate on another
controller waits for the first call's answer too; one worker call in all),
and while Redis cannot be reached a call with a key is 503
``store_unavailable``.

Answers of the gateway itself::

    200                     the worker's answer (application/json or application/x-ndjson)
    4xx                     the worker's own JSON error, passed through (its status)
    400/413/415/422         the /execute body: invalid_json, request_too_large,
                            unsupported_media_type, invalid_request (with detail;
                            also an unusable Idempotency-Key header)
    422 invalid_payload     the payload does not match the input_schema of the worker
                            chosen (detail: every problem); no worker was called
    422 idempotency_key_reused  the Idempotency-Key was sent with another body
    502 worker_failed       the worker answered 5xx or something outside the
                            convention, dropped the connection, or every attempt
                            was refused (worker_id: the last worker tried)
    403 forbidden           the caller's identity was refused (a proxy header's
                            certificate that did not verify)
    403 policy_denied       the access policy does not let the caller route to the pair
    429 rate_limited        the caller is over --rate-limit (Retry-After: until its next token)
    404 unknown_capability  no registered worker in any state offers the pair
    503 no_worker_available no routable worker, or none meets the options
                            (Retry-After: the heartbeat interval)
    503 overloaded          every candidate is full and the queue too (Retry-After)
    503 store_unavailable   with --redis: an Idempotency-Key call while Redis cannot be
                            reached (Retry-After)
    504 worker_timeout      the worker stayed silent longer than the timeout

The gateway presents a client certificate to workers (the controller's,
when serving with ``--gateway``) and verifies theirs against the CA. Trace
context flows on: the ``POST /execute`` server span has the caller's
``traceparent`` as parent, each forward is a client span under it, and the
worker receives that span's ``traceparent``.

:func:`create_gateway_app` wraps a controller app made by
:func:`~crank_registry_asgi.create_app`: ``/execute`` is the gateway, every
other path is the controller, and the lifespan runs both.

Where each part lives: the request path is :class:`~crank_registry_asgi.execute.Gateway`
(:mod:`crank_registry_asgi.execute`); one call to a worker and the names of its
errors, :mod:`crank_registry_asgi.upstream`; the choice of the next worker,
:mod:`crank_registry_asgi.failover`; the payload check,
:mod:`crank_registry_asgi.payloads`; the settings, :class:`GatewayConfig`
(:mod:`crank_registry_asgi.config`). This module assembles them into an app
and describes ``/execute`` in the OpenAPI document.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from crank_registry import (
    MAX_IDEMPOTENCY_KEY_LENGTH,
    NDJSON,
    ErrorAnswer,
    ExecuteRequest,
    InvocationAnswer,
)

from .app import ControllerService
from .config import GatewayConfig
from .execute import EXECUTE_PATH, IDEMPOTENCY_HEADER, REPLAYED_HEADER, Gateway
from .fleet_calls import FleetCalls
from .http import ServiceApp, internal_error
from .metrics import RequestDurationMiddleware
from .openapi import (
    BODY_ERRORS,
    ERRORS,
    OPERATIONS,
    ErrorCode,
    Operation,
    build_document,
    component_name,
    json_answer,
    property_schemas,
    ref,
    retry_after,
)
from .telemetry import TracingMiddleware

__all__ = [
    "EXECUTE_PATH",
    "GATEWAY_ERRORS",
    "Gateway",
    "GatewayConfig",
    "create_gateway_app",
    "gateway_openapi_document",
    "gateway_ssl_context",
    "serve_with_gateway",
]


def gateway_ssl_context(
    *, ca_certs: str | None, certfile: str | None, keyfile: str | None
) -> ssl.SSLContext:
    """A client context that verifies workers against ``ca_certs`` and presents ``certfile``."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_certs)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context


#: The gateway's own error codes (the controller's are :data:`.openapi.ERRORS`).
GATEWAY_ERRORS: Mapping[str, ErrorCode] = {
    "worker_failed": ErrorCode(
        502,
        "The worker failed, or no worker could be reached.",
        ("worker_id",),
        ("worker_status", "worker_error", "attempts"),
    ),
    "worker_timeout": ErrorCode(
        504, "The worker stayed silent longer than the timeout.", ("worker_id",), ("attempts",)
    ),
    "overloaded": ErrorCode(
        503,
        "Every worker that could take the call has max_concurrency calls in flight from the "
        "gateway (with --redis, from every controller on that Redis together), and "
        "--gateway-queue calls already wait for one.",
        ("verb", "capability"),
        headers=retry_after("The heartbeat interval in whole seconds."),
    ),
    "invalid_payload": ErrorCode(
        422,
        "The payload does not match the input_schema of the capability as the worker chosen "
        "registered it (its version's); no worker was called. Every problem listed, its path "
        "from payload (payload.items[2].name): fix the payload. The same answer a worker "
        "using crank_worker_client.serving gives.",
        ("detail",),
    ),
    "idempotency_key_reused": ErrorCode(
        422,
        "The Idempotency-Key was sent before with another body (kept, or being answered); "
        "a new request needs a new key.",
    ),
}

_EXECUTE = Operation(
    "POST",
    EXECUTE_PATH,
    "execute",
    "Route a call to a worker and forward it; answer with the worker's answer",
    InvocationAnswer,
    "The worker's answer: JSON, or NDJSON when it streams.",
    ExecuteRequest,
    (
        *BODY_ERRORS,
        "forbidden",
        "policy_denied",
        "unknown_capability",
        "no_worker_available",
        "rate_limited",
        "store_unavailable",
        *GATEWAY_ERRORS,
    ),
)

_REPLAYED = {
    REPLAYED_HEADER: {
        "description": "true: the answer kept for this Idempotency-Key, sent again; "
        "no worker was called",
        "schema": {"type": "string", "enum": ["true"]},
    }
}
_IDEMPOTENCY_PARAMETER = {
    "name": IDEMPOTENCY_HEADER,
    "in": "header",
    "required": False,
    "description": "Makes the call idempotent: its first answer (2xx or 4xx) is kept for "
    "--idempotency-ttl seconds and sent again for the same key and body without calling a "
    "worker; a duplicate sent while the first runs waits for its answer.",
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH,
        "pattern": "^[!-~]+$",
    },
}

_WORKER_HEADERS = {
    "X-Crank-Worker-Id": {"description": "the worker that answered", "schema": {"type": "string"}},
    "X-Crank-Attempts": {
        "description": "how many workers were tried",
        "schema": {"type": "integer", "minimum": 1},
    },
}


def gateway_openapi_document() -> dict[str, Any]:
    """The controller's OpenAPI document with ``POST /execute`` added."""
    document = build_document((*OPERATIONS, _EXECUTE), {**ERRORS, **GATEWAY_ERRORS})
    schemas = document["components"]["schemas"]
    # A worker's own error, passed on: a code and a message, and whatever
    # else that worker sends.
    schemas["WorkerError"] = {
        "type": "object",
        "description": "The worker's own error, passed on with its status.",
        "properties": property_schemas(ErrorAnswer, schemas, ("error", "message")),
        "required": ["error", "message"],
    }
    execute = document["paths"][EXECUTE_PATH]["post"]
    execute["parameters"] = [_IDEMPOTENCY_PARAMETER]
    responses = execute["responses"]
    responses["200"]["headers"] = {**_WORKER_HEADERS, **_REPLAYED}
    responses["200"]["content"][NDJSON] = {"schema": {"type": "string"}}
    refused = responses["422"]
    refused["description"] += " Or the worker's own 422, passed on."
    refused["content"]["application/json"]["schema"]["anyOf"].append(ref("WorkerError"))
    unknown = responses["404"]
    unknown["description"] += " Or the worker's own 404, passed on (then with X-Crank-Worker-Id)."
    unknown["content"]["application/json"]["schema"] = {
        "anyOf": [ref(component_name("unknown_capability")), ref("WorkerError")]
    }
    responses["4XX"] = json_answer(
        "The worker's own 4xx error, passed on.",
        ref("WorkerError"),
        headers={**_WORKER_HEADERS, **_REPLAYED},
    )
    for status, answer in responses.items():
        # A kept answer (2xx or 4xx) may be a replay.
        if status.startswith("4") and status != "4XX":
            answer["headers"] = {**answer.get("headers", {}), **_REPLAYED}
    return document


def create_gateway_app(
    controller: Starlette,
    config: GatewayConfig = GatewayConfig(),  # noqa: B008 (frozen, so safe to share)
    *,
    tls: ssl.SSLContext | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Starlette:
    """``controller`` (from :func:`~crank_registry_asgi.create_app`) with ``POST /execute``.

    The result serves ``/execute`` itself and every other path through
    ``controller``; its lifespan runs the controller's (journal, sweeper)
    and closes the gateway's connections on shutdown. ``app.state.service``
    is the controller's service, ``app.state.gateway`` the :class:`Gateway`,
    ``app.state.metrics_registry`` the controller's Prometheus registry.
    A controller of a shared registry (``redis_url``) shares the calls in
    flight and the idempotency keys with the others on its Redis.
    """
    service = getattr(controller.state, "service", None)
    if not isinstance(service, ControllerService):
        raise TypeError("create_gateway_app needs an app made by crank_registry_asgi.create_app")
    settings = service.config
    fleet = None
    if settings.redis_url is not None:
        assert service.liveness is not None  # made with --redis
        fleet = FleetCalls(
            url=settings.redis_url,
            prefix=settings.redis_prefix,
            liveness=service.liveness,
            controller_id=settings.controller_id,
            answer_ttl=settings.routing.idempotency_ttl,
            max_answer_bytes=config.idempotency_bytes,
            retry_after=service.retry_after,
        )
    gateway = Gateway(service, config, tls=tls, transport=transport, fleet=fleet)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with controller.router.lifespan_context(controller), gateway.running():
            yield

    controller_id = service.config.controller_id
    # The controller's middleware times only the paths mounted below: /execute
    # joins its request histogram here.
    traced: ASGIApp = RequestDurationMiddleware(
        TracingMiddleware(gateway, route_paths=(EXECUTE_PATH,), controller_id=controller_id),
        metrics=service.metrics,
    )
    # The document is rendered once; a response object is a reusable ASGI app.
    document: ASGIApp = TracingMiddleware(
        JSONResponse(gateway_openapi_document()),
        route_paths=("/openapi.json",),
        controller_id=controller_id,
    )
    app = ServiceApp(
        routes=[
            Route(EXECUTE_PATH, endpoint=traced),
            Route("/openapi.json", endpoint=document, methods=["GET"]),
            Mount("", app=controller),
        ],
        lifespan=lifespan,
        exception_handlers={Exception: internal_error},
    )
    app.state.service = service
    app.state.gateway = gateway
    app.state.metrics_registry = service.metrics.registry
    return app


def serve_with_gateway(
    controller: Starlette,
    config: GatewayConfig,
    *,
    certfile: str | None,
    keyfile: str | None,
    ca_certs: str | None,
) -> Starlette:
    """What ``crank-registry serve --gateway`` serves: ``controller`` plus ``/execute``.

    The gateway presents the controller's certificate (``certfile``,
    ``keyfile``) to workers and verifies theirs against ``ca_certs`` (without
    it, against the system's trust store).
    """
    tls = gateway_ssl_context(ca_certs=ca_certs, certfile=certfile, keyfile=keyfile)
    return create_gateway_app(controller, config, tls=tls)
