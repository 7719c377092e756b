"""The request path of ``POST /execute``: admit, validate, route, check the payload, call, answer.

Its answers are listed in :mod:`crank_registry_asgi.gateway`; the call itself (URL,
span, sending, reading, the errors' names) is :mod:`crank_registry_asgi.upstream`;
the calls in flight and the queues, :mod:`crank_registry_asgi.backpressure`; the
answers kept per ``Idempotency-Key``, the core's :class:`~crank_registry.AnswerStore`,
or with ``--redis`` the fleet's (:mod:`crank_registry_asgi.fleet_calls`, which
also holds the fleet-wide calls in flight).

The payload is checked against the ``input_schema`` of the worker chosen,
before its slot is taken (:mod:`crank_registry_asgi.payloads`): a refused
payload is 422 ``invalid_payload``, reaches no worker and is no call's
outcome; with an ``Idempotency-Key`` it is kept like any 4xx.

Outlier ejection: each call's outcome goes to the registry
(:meth:`~crank_registry.CapabilityRegistry.decide_outcome`; a failure is
:func:`crank_registry_asgi.upstream.failed`), which counts the worker's
failures in a row; the ejection it decides is written like any other change
(:meth:`~crank_registry_asgi.effects.Effects.commit`) before the call is
answered, so the next route on any controller passes the worker over.

Each request has an exit stack (``cleanup``) closed once its answer is sent
(streams included) or abandoned: what must happen then (freeing the
worker's slot, keeping or forgetting the answer of an idempotency key)
is pushed on it, so that it happens exactly once however the request ends.
"""

from __future__ import annotations

import contextlib
import functools
import json
import ssl
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import anyio
import attrs
import httpx
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from crank_registry import (
    NDJSON,
    AnswerStore,
    ExecuteRequest,
    KeptAnswer,
    Problem,
    RegistryError,
    Replay,
    Reused,
    RouteOptions,
    Run,
    Running,
    UnknownCapability,
    ValidationError,
    WorkerEndpoint,
    body_fingerprint,
    idempotency_key_problem,
    structure,
)
from crank_worker_client.payload import INVALID_PAYLOAD, refusal_message

from . import upstream
from .app import ControllerService
from .backpressure import CallerLeft, CallSlots, Slot, until_disconnect
from .config import GatewayConfig
from .effects import log_fields, logger
from .failover import next_worker
from .fleet_calls import POLL_FIRST, POLL_MAX, Claimed, FleetCalls
from .http import ApiError, error_response, read_json_body, registry_error_response
from .payloads import PayloadChecks
from .telemetry import annotate

__all__ = ["EXECUTE_PATH", "IDEMPOTENCY_HEADER", "REPLAYED_HEADER", "Gateway", "parse_execute"]

#: Where the gateway listens.
EXECUTE_PATH = "/execute"
#: The request header that makes a call idempotent, and the answer header of a replay.
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"

_WORKER_HEADER = "x-crank-worker-id"
_ATTEMPTS_HEADER = "x-crank-attempts"
_EXECUTE_FIELDS = frozenset(field.name for field in attrs.fields(ExecuteRequest))
# Fields of /route a body of /execute may not have, and what to do instead.
_NOT_HERE = {
    "idempotency_key": f"unknown field: /execute takes the key as the {IDEMPOTENCY_HEADER} "
    "header (it keeps the answer, not only the worker)",
    "requester_identity": "unknown field: /execute routes as its caller (the identity of "
    "the connection)",
    "explain": "unknown field: /execute answers with the worker's answer; ask POST /route "
    "with explain: true to see the choice",
}


@attrs.define
class _Pending:
    """A call with an idempotency key being answered; duplicates wait for ``done``."""

    #: The hash of its body; its claim in the fleet's store (``None``: the memory's).
    fingerprint: str
    claim: str | None = None
    done: anyio.Event = attrs.Factory(anyio.Event)
    #: The answer, for the duplicates (set before ``done``); ``None``: it ended without one.
    answer: KeptAnswer | None = None


class Gateway:
    """The ``/execute`` endpoint (an ASGI app) over a controller's registry.

    ``service`` is the controller's :class:`ControllerService`
    (``app.state.service``): its registry and clock are used directly, and
    its routing settings' ``idempotency_ttl`` is how long an answer is kept.
    ``tls`` is the client context for HTTPS workers; ``transport`` replaces
    httpx's network transport (tests). ``slots`` are the calls in flight and
    the queues; ``answers`` the answers kept per idempotency key.
    ``fleet``: with a shared registry, the calls in flight and the
    idempotency keys of every controller on its Redis (then ``answers``
    is not used). ``payloads`` checks each call's payload against its
    worker's ``input_schema``.
    """

    def __init__(
        self,
        service: ControllerService,
        config: GatewayConfig = GatewayConfig(),  # noqa: B008 (frozen, so safe to share)
        *,
        tls: ssl.SSLContext | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        fleet: FleetCalls | None = None,
    ) -> None:
        self.service = service
        self.config = config
        self.fleet = fleet
        self._tls = tls
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self.slots = CallSlots(
            service.registry,
            queue_limit=config.queue_limit,
            recheck=service.policy.heartbeat_interval,
            overloaded=self._overloaded,
            fleet=fleet,
        )
        self.answers = AnswerStore(
            ttl=service.config.routing.idempotency_ttl,
            max_answers=config.idempotency_answers,
            max_bytes=config.idempotency_bytes,
        )
        self._pending: dict[tuple[str, str], _Pending] = {}
        self.payloads = PayloadChecks()

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
        """The gateway's lifetime: the fleet joined and left, connections closed on exit."""
        try:
            if self.fleet is None:
                yield self
                return
            await self.fleet.open()
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self.fleet.run)
                try:
                    yield self
                finally:
                    tasks.cancel_scope.cancel()
        finally:
            if self.fleet is not None:
                await self.fleet.aclose()
            await self.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request to ``/execute``."""
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        with contextlib.ExitStack() as cleanup:
            try:
                if request.method != "POST":
                    raise ApiError(
                        405,
                        "method_not_allowed",
                        f"{request.method} is not allowed on {EXECUTE_PATH} (allowed: POST)",
                        headers={"Allow": "POST"},
                    )
                response = await self.execute(request, cleanup)
            except CallerLeft:
                return  # nobody to answer
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

    async def execute(self, request: Request, cleanup: contextlib.ExitStack) -> Response:
        """Admit, route, forward, answer (every outcome: :mod:`crank_registry_asgi.gateway`).

        ``cleanup`` is closed by the caller once the answer is sent (or
        abandoned): it frees the worker's slot and settles an idempotency key.
        """
        # The gateway routes as its caller: the access policy applies to them.
        requester = self.service.caller(request)
        await self.service.admit(request, EXECUTE_PATH, requester)
        body = await read_json_body(
            request,
            max_bytes=self.service.config.max_body_bytes,
            max_depth=self.service.config.max_json_depth,
            read_timeout=self.service.config.request_read_timeout,
        )
        ask = parse_execute(body)
        annotate(verb=ask.verb, capability=ask.capability)
        key = idempotency_key(request)
        if key is None:
            return await self._call(ask, requester, request.receive, cleanup)
        scoped = (requester or "", key)
        return await self._once(
            scoped,
            fingerprint=body_fingerprint(body),
            ask=ask,
            requester=requester,
            request=request,
            cleanup=cleanup,
        )

    async def _once(
        self,
        key: tuple[str, str],
        *,
        fingerprint: str,
        ask: ExecuteRequest,
        requester: str | None,
        request: Request,
        cleanup: contextlib.ExitStack,
    ) -> Response:
        """The call of an idempotency key: made once, its answer kept and replayed."""
        claimed = await self._claim(key, fingerprint, request.receive)
        if isinstance(claimed, KeptAnswer):
            return _replay(claimed)
        pending = claimed
        # Whatever happens next, the key is finished exactly once, and its waiters woken.
        cleanup.callback(self._finish, key, pending, None)
        try:
            response = await self._call(ask, requester, request.receive, cleanup)
        except ApiError as error:
            response = error.response()
        except RegistryError as error:
            response = registry_error_response(error)
        if isinstance(response, upstream.PassedStream):
            _keep_when_whole(
                response,
                self.answers.max_bytes,
                lambda answer: self._finish(key, pending, answer),
            )
        else:
            self._finish(key, pending, _kept(response, bytes(response.body)))
        return response

    async def _claim(
        self, key: tuple[str, str], fingerprint: str, receive: Receive
    ) -> KeptAnswer | _Pending:
        """The answer to replay for ``key``, or the key claimed for this call to run.

        Waits while the same call is being answered: here, for its end;
        on another controller (``fleet``), asking again with a backoff.
        Raises 422 ``idempotency_key_reused`` for another body.
        """
        delay = POLL_FIRST
        while True:
            here = self._pending.get(key)
            decision: Claimed | Run | Replay | Running | Reused
            if self.fleet is None:
                decision = self.answers.begin(key, fingerprint, self.service.clock())
            elif here is not None:
                # Claimed by a call here: its duplicates here wait for it here.
                decision = Running() if here.fingerprint == fingerprint else Reused()
            else:
                decision = await self.fleet.begin(key, fingerprint)
            if isinstance(decision, Replay):
                return decision.answer
            if isinstance(decision, Reused):
                raise ApiError(
                    422,
                    "idempotency_key_reused",
                    f"this {IDEMPOTENCY_HEADER} was used for another body; a new request "
                    "needs a new key",
                )
            if isinstance(decision, Running):
                if here is not None:
                    await until_disconnect(receive, here.done.wait)
                    if here.answer is not None:
                        return here.answer
                    # It ended without one (its caller left): ask again, perhaps to run it.
                else:
                    # Being answered by another controller (the memory's keys run
                    # here): ask again a little later.
                    await until_disconnect(receive, functools.partial(anyio.sleep, delay))
                    delay = min(delay * 2, POLL_MAX)
                continue
            claim = decision.token if isinstance(decision, Claimed) else None
            pending = self._pending[key] = _Pending(fingerprint, claim)
            return pending

    def _finish(self, key: tuple[str, str], pending: _Pending, answer: KeptAnswer | None) -> None:
        if pending.done.is_set():
            return
        if pending.claim is not None and self.fleet is not None:
            self.fleet.finish(key, pending.claim, answer)
        else:
            self.answers.finish(key, answer, self.service.clock())
        pending.answer = answer
        pending.done.set()
        if self._pending.get(key) is pending:
            del self._pending[key]

    async def _call(
        self,
        ask: ExecuteRequest,
        requester: str | None,
        receive: Receive,
        cleanup: contextlib.ExitStack,
    ) -> Response:
        """Route and forward, failing over while nothing reached a worker."""
        verb, capability = ask.verb, ask.capability
        asked = RouteOptions.from_request(ask)
        # Whether the caller asked for options: the requester added here is not one.
        optioned = asked is not None
        options = (
            asked if requester is None else (asked or RouteOptions()).with_requester(requester)
        )
        content = json.dumps({"payload": ask.payload}, allow_nan=False).encode()
        refusals: list[upstream.Refused] = []
        tried: set[str] = set()

        def route(busy: Collection[str]) -> WorkerEndpoint | None:
            return next_worker(
                self.service.registry,
                verb,
                capability,
                options=options,
                tried=tried,
                busy=busy,
                now=self.service.clock(),
            )

        # The payload against the schema of each worker chosen, before its slot is taken.
        check = functools.partial(self._check_payload, ask)
        for _ in range(self.config.max_attempts):
            try:
                slot = await self.slots.acquire(
                    verb, capability, route, check=check, receive=receive
                )
            except UnknownCapability:
                self.service.effects.unknown_capability()
                raise
            if slot is None:
                break
            cleanup.callback(slot.release)
            tried.add(slot.endpoint.worker_id)
            self.service.effects.routed()
            annotate(worker_id=slot.endpoint.worker_id)
            try:
                return await self._forward(slot, verb, capability, content, len(tried))
            except upstream.Refused as refused:
                refusals.append(refused)
        if not refusals:
            raise self.service.no_worker_available(verb, capability, optioned=optioned)
        raise upstream.unreachable(verb, capability, refusals)

    def _check_payload(self, ask: ExecuteRequest, endpoint: WorkerEndpoint) -> None:
        """422 ``invalid_payload`` when ``endpoint``'s ``input_schema`` refuses ``ask``'s payload.

        The schema of the worker's own registration of the pair: its
        version's, which may differ from another worker's.
        """
        offered = self.service.registry.capability_of(endpoint.worker_id, ask.verb, ask.capability)
        if offered is None:
            return  # gone since its route (no await between them, so never in practice)
        problems = self.payloads.problems(
            offered.input_schema,
            ask.payload,
            where=f"{endpoint.worker_id} {ask.verb}:{ask.capability} {offered.version}",
        )
        if problems:
            raise ApiError(422, INVALID_PAYLOAD, refusal_message(problems), detail=tuple(problems))

    async def _forward(
        self, slot: Slot, verb: str, capability: str, content: bytes, attempt: int
    ) -> Response:
        """One call to ``slot``'s worker; the slot is freed when its answer has ended."""
        endpoint = slot.endpoint
        try:
            url = upstream.invocation_url(endpoint.worker_url, verb, capability)
        except (httpx.InvalidURL, ValueError) as error:
            slot.release()
            raise upstream.unusable_url(endpoint, error) from None
        span = upstream.client_span(url, endpoint, verb, capability, attempt)
        worker = endpoint.worker_id
        headers = {_WORKER_HEADER: worker, _ATTEMPTS_HEADER: str(attempt)}

        async def outcome(ok: bool) -> None:
            await self._report(worker, verb, capability, ok=ok)

        try:
            with upstream.ending_on_failure(span):
                response = await upstream.send(self._http(), endpoint, url, content, span)
                span.set_attribute("http.response.status_code", response.status_code)
                if response.status_code == 200 and upstream.media_type(response) == NDJSON:
                    # The slot is freed when the stream ends (or by the request's cleanup).
                    return upstream.stream_through(
                        response, span, worker, headers, on_end=slot.release, on_outcome=outcome
                    )
                try:
                    body = await upstream.read_answer(
                        response, worker, self.config.max_response_bytes
                    )
                finally:
                    await response.aclose()
                answer = upstream.whole_answer(response, body, worker, headers)
        except Exception as error:
            slot.release()
            await outcome(not upstream.failed(error))
            raise
        except BaseException:
            slot.release()
            raise
        slot.release()
        span.end()
        await outcome(True)
        return answer

    async def _report(self, worker_id: str, verb: str, capability: str, *, ok: bool) -> None:
        """Tell the registry how a call to ``worker_id`` ended; write the ejection it decides.

        A failure is not counted while no change can be written (a store
        outage): its ejection could not be. An ejection the store refuses
        is logged; the call's answer is the caller's either way.
        """
        service = self.service
        if not ok:
            try:
                service.effects.check_writable()
            except ApiError:
                return
        events = service.registry.decide_outcome(
            worker_id, verb, capability, ok=ok, now=service.clock()
        )
        if not events:
            return
        try:
            await service.effects.commit(events)
        except ApiError as error:
            logger.warning(
                "worker ejection not written %s",
                log_fields(worker_id=worker_id, error=error.code, reason=error.message),
            )

    def _overloaded(self, verb: str, capability: str) -> ApiError:
        """503 ``overloaded``: every worker is full and ``--gateway-queue`` calls already wait.

        Not a route's outcome (``crank_routes_total``): the request histogram
        counts it as a 503 of /execute.
        """
        return ApiError(
            503,
            "overloaded",
            f"every worker for {verb!r} on {capability!r} has max_concurrency calls in "
            f"flight and {self.config.queue_limit} calls already wait; retry later",
            headers={"Retry-After": self.service.retry_after},
            verb=verb,
            capability=capability,
        )


def idempotency_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` (``None``: none); 422 ``invalid_request`` if unusable."""
    values = request.headers.getlist(IDEMPOTENCY_HEADER)
    if not values:
        return None
    problem = "must be sent once" if len(values) > 1 else idempotency_key_problem(values[0])
    if problem is not None:
        raise ValidationError([Problem(IDEMPOTENCY_HEADER, f"header {problem}")])
    return values[0]


def _kept(response: Response, body: bytes) -> KeptAnswer:
    """``response`` as the idempotency store keeps it (its length is made again on replay)."""
    headers = tuple(
        (name, value) for name, value in response.headers.items() if name != "content-length"
    )
    return KeptAnswer(response.status_code, response.media_type or "", body, headers)


def _replay(answer: KeptAnswer) -> Response:
    """A kept answer, sent again (no worker is called)."""
    response = Response(answer.body, status_code=answer.status, media_type=answer.media_type)
    for name, value in answer.headers:
        response.headers[name] = value
    response.headers[REPLAYED_HEADER] = "true"
    return response


def _keep_when_whole(
    response: upstream.PassedStream, limit: int, finish: Callable[[KeptAnswer | None], None]
) -> None:
    """Record a stream as it is sent; ``finish`` with it whole once it has ended.

    A stream that broke off (it ends with the gateway's error line) is a
    failure, as its 502 would have been, and one larger than ``limit``
    bytes cannot be kept: ``finish(None)`` then. A stream never sent to
    its end is finished by the request's cleanup.
    """
    chunks: list[bytes] = []
    size = 0
    lines = response.body_iterator

    async def recorded() -> AsyncIterator[bytes]:
        nonlocal size
        async for chunk in lines:
            data = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
            size += len(data)
            if size <= limit:
                chunks.append(data)
            yield data
        whole = size <= limit and not response.broke
        finish(_kept(response, b"".join(chunks)) if whole else None)

    response.body_iterator = recorded()


def parse_execute(body: Any) -> ExecuteRequest:
    """An /execute body: verb, capability, payload and the routing options.

    The same rules as :class:`~crank_registry.RouteRequest`'s for the fields
    they share. Raises :class:`ValidationError` listing every problem (a
    field of /route that has no place here says where it went instead).
    """
    if not isinstance(body, dict):
        raise ApiError(
            422,
            "invalid_request",
            'the body must be an object {"verb", "capability", "payload", ...routing options}',
            detail=(Problem("", "must be an object"),),
        )
    problems: list[Problem] = []
    known = {name: value for name, value in body.items() if name in _EXECUTE_FIELDS}
    try:
        ask = structure(known, ExecuteRequest)
    except ValidationError as error:
        problems.extend(error.problems)
    problems.extend(
        Problem(str(name), _NOT_HERE.get(str(name), "unknown field"))
        for name in body
        if name not in _EXECUTE_FIELDS
    )
    if problems:
        raise ValidationError(problems)
    return ask
