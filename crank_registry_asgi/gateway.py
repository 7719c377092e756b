"""The platform gateway: ``POST /execute`` routes through the registry and forwards.

A caller sends ``{"verb", "capability", "payload"}``; the gateway asks the
registry in the same process (the same registry object and clamped clock as
the controller's endpoints, no HTTP to itself) for a worker, forwards
``{"payload": ...}`` to that worker's invocation endpoint
(``POST {worker_url}/invoke/{verb}/{name}``, the core's
:func:`~crank_registry.invocation_path`) and answers with the worker's answer:
the JSON body as it came, or the NDJSON stream passed through line by line.
``X-Crank-Worker-Id`` names the worker that answered and
``X-Crank-Attempts`` how many workers were tried.

Failover is limited to what is safe to repeat. When the chosen worker
refuses the connection, fails the TLS handshake or does not accept it within
the connect timeout, nothing was sent, so the next routable worker is tried
(:func:`~crank_registry_asgi.failover.next_worker`), up to ``max_attempts``
workers in all (never the same one twice). Once the request may have reached
a worker (a read timeout, a dropped connection after sending, a 5xx), it is
never sent again: the worker may have acted.

Answers of the gateway itself::

    200                     the worker's answer (application/json or application/x-ndjson)
    4xx                     the worker's own JSON error, passed through (its status)
    400/413/415/422         the /execute body: invalid_json, request_too_large,
                            unsupported_media_type, invalid_request (with detail)
    502 worker_failed       the worker answered 5xx or something outside the
                            convention, dropped the connection, or every attempt
                            was refused (worker_id: the last worker tried)
    503 no_worker_available no routable worker (Retry-After: the heartbeat interval)
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
:mod:`crank_registry_asgi.failover`; the settings, :class:`GatewayConfig`
(:mod:`crank_registry_asgi.config`). This module assembles them into an app
and describes ``/execute`` in the OpenAPI document.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from crank_registry import NDJSON

from .app import ControllerService
from .config import GatewayConfig
from .execute import EXECUTE_PATH, Gateway
from .http import ServiceApp, internal_error
from .openapi import TEXT_SCHEMA, openapi_document
from .telemetry import TracingMiddleware

__all__ = [
    "EXECUTE_PATH",
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


def _schema_ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def gateway_openapi_document() -> dict[str, Any]:
    """The controller's OpenAPI document with ``POST /execute`` added."""
    document = openapi_document()
    text = {"type": "string", **TEXT_SCHEMA}
    error_body = {
        "type": "object",
        "required": ["error", "message"],
        "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
    }
    attempts = {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["worker_id", "error"],
            "properties": {"worker_id": {"type": "string"}, "error": {"type": "string"}},
        },
    }
    document["components"]["schemas"].update(
        {
            "ExecuteRequest": {
                "type": "object",
                "required": ["verb", "capability", "payload"],
                "additionalProperties": False,
                "properties": {
                    "verb": text,
                    "capability": text,
                    "payload": {"description": "any JSON value the capability accepts"},
                },
            },
            "WorkerFailed": {
                **error_body,
                "properties": {
                    "error": {"const": "worker_failed"},
                    "message": {"type": "string"},
                    "worker_id": {"type": "string"},
                    "worker_status": {"type": "integer"},
                    "worker_error": {},
                    "attempts": attempts,
                },
                "required": ["error", "message", "worker_id"],
            },
            "WorkerTimeout": {
                **error_body,
                "properties": {
                    "error": {"const": "worker_timeout"},
                    "message": {"type": "string"},
                    "worker_id": {"type": "string"},
                    "attempts": attempts,
                },
                "required": ["error", "message", "worker_id"],
            },
        }
    )
    worker_headers = {
        "X-Crank-Worker-Id": {
            "description": "the worker that answered",
            "schema": {"type": "string"},
        },
        "X-Crank-Attempts": {
            "description": "how many workers were tried",
            "schema": {"type": "integer", "minimum": 1},
        },
    }
    document["paths"][EXECUTE_PATH] = {
        "post": {
            "summary": "Route a call to a worker and forward it; answer with the worker's answer",
            "operationId": "execute",
            "requestBody": {
                "required": True,
                "content": _json_content(_schema_ref("ExecuteRequest")),
            },
            "responses": {
                "200": {
                    "description": "The worker's answer: JSON, or NDJSON when it streams.",
                    "headers": worker_headers,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["result"],
                                "properties": {"result": {}},
                            }
                        },
                        NDJSON: {"schema": {"type": "string"}},
                    },
                },
                "400": {
                    "description": "The body is not UTF-8 JSON, or is nested too deeply.",
                    "content": _json_content(_schema_ref("InvalidJson")),
                },
                "413": {
                    "description": "The body is larger than the limit.",
                    "content": _json_content(_schema_ref("RequestTooLarge")),
                },
                "415": {
                    "description": "The body is not sent as application/json.",
                    "content": _json_content(_schema_ref("UnsupportedMediaType")),
                },
                "422": {
                    "description": "The body is not {verb, capability, payload}, or the worker "
                    "refused the payload (its own error, passed through).",
                    "content": _json_content(error_body),
                },
                "4XX": {
                    "description": "The worker's own 4xx error, passed through.",
                    "headers": worker_headers,
                    "content": _json_content(error_body),
                },
                "502": {
                    "description": "The worker failed, or no worker could be reached.",
                    "content": _json_content(_schema_ref("WorkerFailed")),
                },
                "503": {
                    "description": "No routable worker.",
                    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                    "content": _json_content(_schema_ref("NoWorkerAvailable")),
                },
                "504": {
                    "description": "The worker stayed silent longer than the timeout.",
                    "content": _json_content(_schema_ref("WorkerTimeout")),
                },
            },
        }
    }
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
    is the controller's service, ``app.state.gateway`` the :class:`Gateway`.
    """
    service = getattr(controller.state, "service", None)
    if not isinstance(service, ControllerService):
        raise TypeError("create_gateway_app needs an app made by crank_registry_asgi.create_app")
    gateway = Gateway(service, config, tls=tls, transport=transport)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with controller.router.lifespan_context(controller), gateway.running():
            yield

    controller_id = service.config.controller_id
    traced: ASGIApp = TracingMiddleware(
        gateway, route_paths=(EXECUTE_PATH,), controller_id=controller_id
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
