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
the connect timeout, nothing was sent, so the next routable worker is tried,
up to ``max_attempts`` workers in all (never the same one twice). Once the
request may have reached a worker (a read timeout, a dropped connection
after sending, a 5xx), it is never sent again: the worker may have acted.

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
"""

from __future__ import annotations

import contextlib
import json
import math
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any

import attrs
import httpx
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from crank_registry import (
    NDJSON,
    ErrorAnswer,
    ExecuteRequest,
    FailedAttempt,
    InvocationAnswer,
    Problem,
    RegistryError,
    RouteRequest,
    ValidationError,
    WorkerEndpoint,
    invocation_path,
    structure,
)

from .app import ControllerService
from .config import _positive_int
from .http import (
    ApiError,
    ServiceApp,
    error_response,
    internal_error,
    read_json_body,
    registry_error_response,
)
from .openapi import (
    BODY_ERRORS,
    ERRORS,
    OPERATIONS,
    ErrorCode,
    Operation,
    build_document,
    json_answer,
    property_schemas,
    ref,
)
from .telemetry import TracingMiddleware, annotate, tracer

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

#: Where the gateway listens.
EXECUTE_PATH = "/execute"

_EXECUTE_FIELDS = ("verb", "capability", "payload")
_WORKER_HEADER = "x-crank-worker-id"
_ATTEMPTS_HEADER = "x-crank-attempts"


def _positive_number(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{attribute.name} must be a finite number > 0, got {value!r}")


@attrs.frozen
class GatewayConfig:
    """How the gateway forwards.

    ``max_attempts``: how many workers to try when connections are refused
    (1: no failover). ``timeout``: seconds a worker may stay silent while
    answering (between any two reads; also the write timeout).
    ``connect_timeout``: seconds to establish the connection, TLS included
    (capped at ``timeout``). ``max_response_bytes``: a larger JSON answer is
    a ``worker_failed`` (a stream is passed through without a limit).
    """

    max_attempts: int = attrs.field(default=3, validator=_positive_int)
    timeout: float = attrs.field(default=30.0, validator=_positive_number)
    connect_timeout: float = attrs.field(default=5.0, validator=_positive_number)
    max_response_bytes: int = attrs.field(default=16 * 1_048_576, validator=_positive_int)

    def httpx_timeout(self) -> httpx.Timeout:
        """The per-request httpx timeouts."""
        return httpx.Timeout(self.timeout, connect=min(self.connect_timeout, self.timeout))


def gateway_ssl_context(
    *, ca_certs: str | None, certfile: str | None, keyfile: str | None
) -> ssl.SSLContext:
    """A client context that verifies workers against ``ca_certs`` and presents ``certfile``."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_certs)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context


class _Refused(Exception):
    """Nothing reached the worker; the next one may be tried."""

    def __init__(self, endpoint: WorkerEndpoint, reason: str, *, timed_out: bool) -> None:
        super().__init__(reason)
        self.endpoint = endpoint
        self.reason = reason
        self.timed_out = timed_out


class Gateway:
    """The ``/execute`` endpoint (an ASGI app) over a controller's registry.

    ``service`` is the controller's :class:`ControllerService`
    (``app.state.service``): its registry and clock are used directly.
    ``tls`` is the client context for HTTPS workers; ``transport`` replaces
    httpx's network transport (tests).
    """

    def __init__(
        self,
        service: ControllerService,
        config: GatewayConfig = GatewayConfig(),
        *,
        tls: ssl.SSLContext | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.service = service
        self.config = config
        self._tls = tls
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                verify=self._tls if self._tls is not None else True,
                transport=self._transport,
                timeout=self.config.httpx_timeout(),
                follow_redirects=False,
                trust_env=False,
            )
        return self._client

    async def aclose(self) -> None:
        """Close the connections to workers."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        """The gateway's lifetime: connections are closed on exit."""
        try:
            yield self
        finally:
            await self.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request to ``/execute``."""
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        try:
            if request.method != "POST":
                raise ApiError(
                    405,
                    "method_not_allowed",
                    f"{request.method} is not allowed on {EXECUTE_PATH} (allowed: POST)",
                    headers={"Allow": "POST"},
                )
            response = await self.execute(request)
        except ApiError as error:
            response = error.response()
        except RegistryError as error:
            response = registry_error_response(error)
        except Exception:
            # Never a traceback to the caller; the server span records it.
            trace.get_current_span().set_status(Status(StatusCode.ERROR))
            response = error_response(
                500, "internal_error", "the gateway failed to answer this request"
            )
        await response(scope, receive, send)

    async def execute(self, request: Request) -> Response:
        """Route, forward, answer; see the module docstring for every outcome."""
        body = await read_json_body(
            request,
            max_bytes=self.service.config.max_body_bytes,
            max_depth=self.service.config.max_json_depth,
        )
        verb, capability, payload = _parse_execute(body)
        annotate(verb=verb, capability=capability)
        content = json.dumps({"payload": payload}, allow_nan=False).encode()
        refusals: list[_Refused] = []
        tried: set[str] = set()
        for _ in range(self.config.max_attempts):
            endpoint = self.service.registry.route(verb, capability, now=self.service.clock())
            if endpoint is None or endpoint.worker_id in tried:
                break  # nobody left, or the rotation came round to a worker already tried
            tried.add(endpoint.worker_id)
            self.service.effects.routed()
            annotate(worker_id=endpoint.worker_id)
            try:
                return await self._forward(endpoint, verb, capability, content, len(tried))
            except _Refused as refused:
                refusals.append(refused)
        if not refusals:
            raise self.service.no_worker_available(verb, capability)
        last = refusals[-1]
        attempts = tuple(
            FailedAttempt(worker_id=r.endpoint.worker_id, error=r.reason) for r in refusals
        )
        if last.timed_out:
            raise ApiError(
                504,
                "worker_timeout",
                f"worker {last.endpoint.worker_id!r} did not accept the connection in time",
                worker_id=last.endpoint.worker_id,
                attempts=attempts,
            )
        raise ApiError(
            502,
            "worker_failed",
            f"no worker for {verb!r} on {capability!r} could be reached ({len(refusals)} tried)",
            worker_id=last.endpoint.worker_id,
            attempts=attempts,
        )

    async def _forward(
        self,
        endpoint: WorkerEndpoint,
        verb: str,
        capability: str,
        content: bytes,
        attempt: int,
    ) -> Response:
        try:
            url = _invocation_url(endpoint.worker_url, verb, capability)
        except (httpx.InvalidURL, ValueError) as error:
            raise _unusable_url(endpoint, error) from None
        span = tracer().start_span(
            f"POST {verb} {capability}",
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": "POST",
                "url.full": str(url),
                "crank.worker_id": endpoint.worker_id,
                "crank.verb": verb,
                "crank.capability": capability,
                "crank.attempt": attempt,
            },
        )
        headers = {
            "content-type": "application/json",
            "accept": f"application/json, {NDJSON}",
        }
        with trace.use_span(span, end_on_exit=False):
            propagate.inject(headers)
        worker = endpoint.worker_id
        try:
            try:
                request = self._http().build_request("POST", url, content=content, headers=headers)
            except (httpx.InvalidURL, ValueError) as error:
                _fail(span, "invalid_url")
                span.end()
                raise _unusable_url(endpoint, error) from None
            try:
                upstream = await self._http().send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
                # Nothing was sent: safe to try another worker.
                _fail(span, f"connect: {type(error).__name__}")
                span.end()
                raise _Refused(
                    endpoint,
                    _describe(error),
                    timed_out=not isinstance(error, httpx.ConnectError),
                ) from None
            except httpx.TimeoutException as error:
                raise _worker_timeout(worker, error) from None
            except httpx.TransportError as error:
                raise _worker_failed(worker, f"the connection failed: {_describe(error)}") from None
            span.set_attribute("http.response.status_code", upstream.status_code)
            if upstream.status_code == 200 and _media_type(upstream) == NDJSON:
                return self._stream(upstream, span, worker, attempt)
            try:
                answer = await self._answer(upstream, worker, attempt)
            finally:
                await upstream.aclose()
            span.end()
            return answer
        except _Refused:
            raise  # its span has ended already
        except ApiError as error:
            _fail(span, error.code)
            span.end()
            raise
        except BaseException:
            span.end()
            raise

    async def _answer(self, upstream: httpx.Response, worker: str, attempt: int) -> Response:
        """A whole JSON answer: read it (bounded), then pass it on or map it to an error."""
        try:
            body = await _read_bounded(upstream, self.config.max_response_bytes)
        except httpx.TimeoutException as error:
            raise _worker_timeout(worker, error) from None
        except httpx.TransportError as error:
            raise _worker_failed(worker, f"the answer was cut off: {_describe(error)}") from None
        status = upstream.status_code
        if body is None:
            raise _worker_failed(
                worker, f"the answer is larger than {self.config.max_response_bytes} bytes"
            )
        is_json = _media_type(upstream) == "application/json" and _is_json(body)
        if status >= 500:
            fields: dict[str, Any] = {"worker_status": status}
            if is_json:
                fields["worker_error"] = json.loads(body)
            raise _worker_failed(worker, f"the worker answered {status}", **fields)
        if not is_json or status not in (200, *range(400, 500)):
            raise _worker_failed(
                worker,
                f"the worker answered {status} {_media_type(upstream) or 'without a type'}, "
                "outside the invocation convention",
                worker_status=status,
            )
        return Response(
            body,
            status_code=status,
            media_type="application/json",
            headers={_WORKER_HEADER: worker, _ATTEMPTS_HEADER: str(attempt)},
        )

    def _stream(
        self, upstream: httpx.Response, span: trace.Span, worker: str, attempt: int
    ) -> Response:
        """Pass an NDJSON answer through as it arrives; the client span ends with it."""

        async def lines() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            except httpx.TimeoutException:
                # The status is sent already: the stream's last line says what happened.
                _fail(span, "worker_timeout")
                yield _error_line("worker_timeout", f"worker {worker!r} went silent mid-stream")
            except httpx.TransportError as error:
                _fail(span, "worker_failed")
                yield _error_line("worker_failed", f"the stream was cut off: {_describe(error)}")
            finally:
                await upstream.aclose()
                span.end()

        return StreamingResponse(
            lines(),
            media_type=NDJSON,
            headers={_WORKER_HEADER: worker, _ATTEMPTS_HEADER: str(attempt)},
        )


def _invocation_url(worker_url: str, verb: str, capability: str) -> httpx.URL:
    """Where ``(verb, capability)`` is served by the worker registered at ``worker_url``.

    The convention's path goes after the URL's own path; a query stays after
    it (appending to the text would put the path inside the query or the
    fragment), and the fragment, which is never sent, is dropped.
    """
    base = httpx.URL(worker_url)
    path, _, query = base.raw_path.partition(b"?")
    raw_path = path.rstrip(b"/") + invocation_path(verb, capability).encode("ascii")
    if query:
        raw_path += b"?" + query
    return base.copy_with(raw_path=raw_path, fragment=None)


def _unusable_url(endpoint: WorkerEndpoint, error: Exception) -> _Refused:
    # A URL the registry accepts but httpx cannot use (an IDNA-invalid host
    # name, a control character): nothing was sent, so the next worker may be tried.
    return _Refused(endpoint, f"unusable worker URL: {_describe(error)}", timed_out=False)


def _parse_execute(body: Any) -> tuple[str, str, Any]:
    """An /execute body's verb, capability and payload.

    Verb and capability follow the core's rules for a route (``RouteRequest``);
    the other fields of a route request have no place here and are unknown.
    Raises :class:`ValidationError` listing every problem.
    """
    if not isinstance(body, dict):
        raise ApiError(
            422,
            "invalid_request",
            'the body must be an object {"verb", "capability", "payload"}',
            detail=(Problem("", "must be an object"),),
        )
    problems: list[Problem] = []
    try:
        ask = structure({k: body[k] for k in ("verb", "capability") if k in body}, RouteRequest)
    except ValidationError as error:
        problems.extend(error.problems)
    if "payload" not in body:
        problems.append(Problem("payload", "is required"))
    problems.extend(Problem(str(k), "unknown field") for k in body if k not in _EXECUTE_FIELDS)
    if problems:
        raise ValidationError(problems)
    return ask.verb, ask.capability, body["payload"]


async def _read_bounded(response: httpx.Response, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(response: httpx.Response) -> str:
    content_type: str = response.headers.get("content-type", "")
    return content_type.partition(";")[0].strip().lower()


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _describe(error: Exception) -> str:
    detail = str(error)
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def _fail(span: trace.Span, reason: str) -> None:
    span.set_status(Status(StatusCode.ERROR, reason))
    span.set_attribute("error.type", reason)


def _worker_timeout(worker: str, error: Exception) -> ApiError:
    return ApiError(
        504,
        "worker_timeout",
        f"worker {worker!r} did not answer in time ({type(error).__name__})",
        worker_id=worker,
    )


def _worker_failed(worker: str, message: str, **fields: Any) -> ApiError:
    return ApiError(502, "worker_failed", message, worker_id=worker, **fields)


def _error_line(code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message}).encode() + b"\n"


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
}

_EXECUTE = Operation(
    "POST",
    EXECUTE_PATH,
    "execute",
    "Route a call to a worker and forward it; answer with the worker's answer",
    InvocationAnswer,
    "The worker's answer: JSON, or NDJSON when it streams.",
    ExecuteRequest,
    (*BODY_ERRORS, "no_worker_available", *GATEWAY_ERRORS),
)

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
    responses = document["paths"][EXECUTE_PATH]["post"]["responses"]
    responses["200"]["headers"] = _WORKER_HEADERS
    responses["200"]["content"][NDJSON] = {"schema": {"type": "string"}}
    refused = responses["422"]
    refused["description"] += " Or the worker refused the payload (its own error, passed on)."
    refused["content"]["application/json"]["schema"] = {
        "anyOf": [ref("InvalidRequest"), ref("WorkerError")]
    }
    responses["4XX"] = json_answer(
        "The worker's own 4xx error, passed on.", ref("WorkerError"), headers=_WORKER_HEADERS
    )
    return document


def create_gateway_app(
    controller: Starlette,
    config: GatewayConfig = GatewayConfig(),
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
