"""The request path of ``POST /execute``: validate, route, call the worker, pass its answer on.

Its answers are listed in :mod:`crank_registry_asgi.gateway`; the call itself (URL,
span, sending, reading, the errors' names) is :mod:`crank_registry_asgi.upstream`.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from crank_registry import (
    NDJSON,
    Problem,
    RegistryError,
    RouteRequest,
    UnknownCapability,
    ValidationError,
    WorkerEndpoint,
    structure,
)

from . import upstream
from .app import ControllerService
from .config import GatewayConfig
from .failover import next_worker
from .http import ApiError, error_response, read_json_body, registry_error_response
from .telemetry import annotate

__all__ = ["EXECUTE_PATH", "Gateway", "parse_execute"]

#: Where the gateway listens.
EXECUTE_PATH = "/execute"

_EXECUTE_FIELDS = ("verb", "capability", "payload")
_WORKER_HEADER = "x-crank-worker-id"
_ATTEMPTS_HEADER = "x-crank-attempts"


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
        config: GatewayConfig = GatewayConfig(),  # noqa: B008 (frozen, so safe to share)
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
        """Route, forward, answer (every outcome: :mod:`crank_registry_asgi.gateway`)."""
        self.service.admit(request, EXECUTE_PATH, self.service.caller(request))
        body = await read_json_body(
            request,
            max_bytes=self.service.config.max_body_bytes,
            max_depth=self.service.config.max_json_depth,
            read_timeout=self.service.config.request_read_timeout,
        )
        verb, capability, payload = parse_execute(body)
        annotate(verb=verb, capability=capability)
        # The gateway routes as its caller: the access policy applies to them.
        requester = self.service.requester(request, None)
        content = json.dumps({"payload": payload}, allow_nan=False).encode()
        refusals: list[upstream.Refused] = []
        tried: set[str] = set()
        for _ in range(self.config.max_attempts):
            now = self.service.clock()
            try:
                endpoint = next_worker(
                    self.service.registry,
                    verb,
                    capability,
                    tried=tried,
                    now=now,
                    requester=requester,
                )
            except UnknownCapability:
                self.service.effects.unknown_capability()
                raise
            if endpoint is None:
                break
            tried.add(endpoint.worker_id)
            self.service.effects.routed()
            annotate(worker_id=endpoint.worker_id)
            try:
                return await self._forward(endpoint, verb, capability, content, len(tried))
            except upstream.Refused as refused:
                refusals.append(refused)
        if not refusals:
            raise self.service.no_worker_available(verb, capability)
        raise upstream.unreachable(verb, capability, refusals)

    async def _forward(
        self, endpoint: WorkerEndpoint, verb: str, capability: str, content: bytes, attempt: int
    ) -> Response:
        try:
            url = upstream.invocation_url(endpoint.worker_url, verb, capability)
        except (httpx.InvalidURL, ValueError) as error:
            raise upstream.unusable_url(endpoint, error) from None
        span = upstream.client_span(url, endpoint, verb, capability, attempt)
        worker = endpoint.worker_id
        headers = {_WORKER_HEADER: worker, _ATTEMPTS_HEADER: str(attempt)}
        with upstream.ending_on_failure(span):
            response = await upstream.send(self._http(), endpoint, url, content, span)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code == 200 and upstream.media_type(response) == NDJSON:
                return upstream.stream_through(response, span, worker, headers)
            try:
                body = await upstream.read_answer(response, worker, self.config.max_response_bytes)
            finally:
                await response.aclose()
            answer = upstream.whole_answer(response, body, worker, headers)
        span.end()
        return answer


def parse_execute(body: Any) -> tuple[str, str, Any]:
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
