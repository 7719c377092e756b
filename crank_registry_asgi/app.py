"""The controller as a Starlette application: :func:`create_app`.

Each endpoint does four things: structure the body with the core's
converter, call the registry with ``now``, hand the returned events to
:class:`~crank_registry_asgi.effects.Effects`, answer with one of the core's
answer models (rendered by the converter, see :func:`answer`). Every rule
(health, routing, who may act on which record) is the core's.

The lifespan reads the journal, replays it into the registry (the core's
fold), then serves, running the :class:`Sweeper` in a task group until
shutdown.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from crank_registry import (
    CapabilitiesAnswer,
    CapabilityRegistry,
    DeregisterAnswer,
    DeregisterRequest,
    Event,
    HealthAnswer,
    HeartbeatAnswer,
    HeartbeatRequest,
    NewerJournalFormat,
    RegisterAnswer,
    Registration,
    RegistryError,
    RouteExplanation,
    RouteOptions,
    RouteRequest,
    UnknownCapability,
    ValidationError,
    WorkerEntry,
    WorkersAnswer,
    authorize_worker,
    capability_label,
    iso_utc,
    replay_bytes,
    structure,
    unstructure,
)

from .config import ServiceConfig
from .effects import Effects, RegistrySnapshots, log_fields, logger
from .http import (
    ApiError,
    ServiceApp,
    error_response,
    internal_error,
    read_json_body,
    registry_error_response,
)
from .identity import caller_identity
from .journal import Journal, JournalError
from .metrics import Metrics, RequestDurationMiddleware, metrics_response
from .openapi import ROUTE_PATHS, openapi_document
from .telemetry import TracingMiddleware, annotate, tracer

__all__ = ["ClampedClock", "ControllerService", "Sweeper", "answer", "create_app"]

# How long after a deadline the sweeper wakes. The core changes state only
# for a `now` strictly after it; waking a little later also lets one sweep
# take every deadline of that window instead of waking once per worker (the
# registry's answers never wait for a sweep, so only evictions are late).
_SWEEP_SLACK = 0.1
# The most skipped journal lines logged one by one at start.
_LOGGED_SKIPS = 20


def answer(model: Any) -> JSONResponse:
    """A 200 answer: ``model`` (one of the core's answer models) as JSON."""
    return JSONResponse(unstructure(model))


def _route_request(data: Any) -> RouteRequest:
    """Structure a route body; the same result as ``structure(data, RouteRequest)``.

    The common body, exactly ``{"verb": str, "capability": str}``, is built
    directly (its validators still run): the generic converter costs as
    much as the rest of a route. Anything else, and any invalid value, goes
    through the converter, which reports every problem.
    """
    if type(data) is dict and len(data) == 2:
        verb = data.get("verb")
        capability = data.get("capability")
        if type(verb) is str and type(capability) is str:
            try:
                return RouteRequest(verb, capability)
            except ValidationError:
                pass
    return structure(data, RouteRequest)


class ClampedClock:
    """Wall-clock seconds that never go backwards (the last value is kept)."""

    def __init__(self, source: Callable[[], float]) -> None:
        self._source = source
        self._last = -math.inf

    def __call__(self) -> float:
        """The source's time, or the last time handed out if that is later."""
        self._last = max(self._last, float(self._source()))
        return self._last


class Sweeper:
    """Runs the core's sweep, waking just after the registry's next deadline.

    :meth:`sweep` is one pass (tests call it directly after moving a fake
    clock); :meth:`run` loops until cancelled. Its sleep is capped at one
    heartbeat interval, which is also what keeps it on time without being
    woken: a registration's first deadline is ``unhealthy_after`` (at least
    one interval) away, so it is never earlier than the planned wake-up.
    """

    def __init__(
        self, registry: CapabilityRegistry, clock: Callable[[], float], effects: Effects
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.effects = effects

    def delay(self) -> float:
        """Seconds until the next sweep: just after the next deadline, at most an interval."""
        interval = self.registry.policy.heartbeat_interval
        deadline = self.registry.next_deadline()
        if deadline is None:
            return interval
        return min(max(deadline - self.clock(), 0.0) + _SWEEP_SLACK, interval)

    async def sweep(self) -> tuple[Event, ...]:
        """One sweep at the current time; returns its ``unhealthy`` and ``evicted`` events."""
        events = self.registry.cleanup_stale(now=self.clock())
        if events:
            with tracer().start_as_current_span(
                "crank.sweep", kind=SpanKind.INTERNAL, attributes={"crank.changes": len(events)}
            ):
                try:
                    await self.effects.apply(events)
                except ApiError as error:
                    # The changes happened in memory; a journal that missed
                    # them is corrected after a restart by the next sweep.
                    logger.warning("sweep not journaled %s", log_fields(error=error.message))
        return events

    async def run(self) -> None:
        """Sweep at every deadline until cancelled."""
        while True:
            await anyio.sleep(self.delay())
            try:
                await self.sweep()
            except Exception:
                logger.exception("sweep failed")


class ControllerService:
    """The endpoints and the state behind them (``app.state.service``)."""

    def __init__(
        self,
        registry: CapabilityRegistry,
        config: ServiceConfig,
        clock: Callable[[], float],
    ) -> None:
        self.registry = registry
        self.config = config
        self.policy = registry.policy
        self.clock = ClampedClock(clock)
        self.metrics = Metrics()
        self.metrics.watch(registry, self.clock)
        self.effects = Effects(
            metrics=self.metrics,
            journal_expected=config.state_dir is not None,
            heartbeat_line_every=self.policy.unhealthy_after / 2,
        )
        self.sweeper = Sweeper(registry, self.clock, self.effects)
        self.retry_after = str(max(1, math.ceil(self.policy.heartbeat_interval)))
        # Rendered once: the document does not change while the app runs.
        self._document_body = JSONResponse(openapi_document()).body

    async def sweep(self) -> tuple[Event, ...]:
        """One eviction pass at the current time (what the background loop runs)."""
        return await self.sweeper.sweep()

    # ----------------------------------------------------------------- helpers

    async def _body(self, request: Request) -> Any:
        return await read_json_body(
            request,
            max_bytes=self.config.max_body_bytes,
            max_depth=self.config.max_json_depth,
        )

    def _authorize(self, request: Request, worker_id: str) -> None:
        identity = caller_identity(request.scope, request.headers, self.config.proxy_cert_header)
        authorize_worker(identity, worker_id, required=self.config.require_identity)

    # --------------------------------------------------------------- endpoints

    async def health(self, request: Request) -> Response:
        """GET /health: liveness and worker counts."""
        total, routable = self.registry.counts(now=self.clock())
        return answer(HealthAnswer(total_workers=total, healthy_workers=routable))

    async def register(self, request: Request) -> Response:
        """POST /register: add or replace a worker."""
        registration = structure(await self._body(request), Registration)
        annotate(worker_id=registration.worker_id)
        self._authorize(request, registration.worker_id)
        self.effects.check_writable()
        events = self.registry.register(
            registration.worker_id,
            registration.worker_url,
            registration.capabilities,
            now=self.clock(),
        )
        await self.effects.apply(events)
        return answer(
            RegisterAnswer(
                worker_id=registration.worker_id,
                heartbeat_interval_s=self.policy.heartbeat_interval,
            )
        )

    async def heartbeat(self, request: Request) -> Response:
        """POST /heartbeat: a worker proves it is alive."""
        beat = structure(await self._body(request), HeartbeatRequest)
        annotate(worker_id=beat.worker_id)
        self._authorize(request, beat.worker_id)
        self.effects.check_writable()
        now = self.clock()
        events = self.registry.heartbeat(beat.worker_id, now=now)
        await self.effects.apply(events)
        return answer(
            HeartbeatAnswer(
                timestamp=iso_utc(now), heartbeat_interval_s=self.policy.heartbeat_interval
            )
        )

    def no_worker_available(
        self,
        verb: str,
        capability: str,
        *,
        explain: RouteExplanation | None = None,
        optioned: bool = False,
    ) -> ApiError:
        """Count a request no worker could take; the 503 to answer it with.

        ``explain``: the route's explanation, when it asked for one;
        ``optioned``: the route had options (the workers may be healthy).
        """
        self.effects.no_worker()
        message = f"no healthy worker for {verb!r} on {capability!r}"
        if optioned:
            message = f"no healthy worker for {verb!r} on {capability!r} meets the route's options"
            if explain is None:
                message += " (ask with explain: true to see why)"
        return ApiError(
            503,
            "no_worker_available",
            message,
            headers={"Retry-After": self.retry_after},
            verb=verb,
            capability=capability,
            explain=explain,
        )

    async def deregister(self, request: Request) -> Response:
        """POST /deregister: a worker leaves."""
        leaving = structure(await self._body(request), DeregisterRequest)
        annotate(worker_id=leaving.worker_id)
        self._authorize(request, leaving.worker_id)
        self.effects.check_writable()
        events = self.registry.deregister(leaving.worker_id, now=self.clock())
        await self.effects.apply(events)
        return answer(DeregisterAnswer(worker_id=leaving.worker_id))

    async def route(self, request: Request) -> Response:
        """POST /route: the next worker for a verb and capability, under the request's options."""
        ask = _route_request(await self._body(request))
        annotate(verb=ask.verb, capability=ask.capability)
        options = RouteOptions.from_request(ask)
        explanation: RouteExplanation | None = None
        try:
            if ask.explain:
                endpoint, explanation = self.registry.explain_route(
                    ask.verb, ask.capability, now=self.clock(), options=options
                )
            else:
                endpoint = self.registry.route(
                    ask.verb, ask.capability, now=self.clock(), options=options
                )
        except UnknownCapability:
            self.effects.unknown_capability()
            raise
        if endpoint is None:
            raise self.no_worker_available(
                ask.verb, ask.capability, explain=explanation, optioned=options is not None
            )
        self.effects.routed()
        annotate(worker_id=endpoint.worker_id)
        return answer(endpoint)

    async def capabilities(self, request: Request) -> Response:
        """GET /capabilities: one entry per (verb, capability, version)."""
        now = self.clock()
        views = self.registry.get_all_capabilities(now=now)
        total, routable = self.registry.counts(now=now)
        return answer(
            CapabilitiesAnswer(
                capabilities=tuple(views), total_workers=total, healthy_workers=routable
            )
        )

    async def workers(self, request: Request) -> Response:
        """GET /workers: every worker with its health at this moment."""
        entries = tuple(
            WorkerEntry(
                worker_id=view.worker_id,
                worker_url=view.worker_url,
                last_heartbeat=iso_utc(view.last_heartbeat),
                is_healthy=view.is_healthy,
                state=view.state,
                capabilities=tuple(capability_label(c.key) for c in view.capabilities),
            )
            for view in self.registry.workers(now=self.clock())
        )
        return answer(WorkersAnswer(workers=entries))

    async def exposition(self, request: Request) -> Response:
        """GET /metrics: the Prometheus text exposition of the app's metrics."""
        return metrics_response(self.metrics.registry)

    async def openapi(self, request: Request) -> Response:
        """GET /openapi.json: the OpenAPI 3.1 document of this API."""
        return Response(self._document_body, media_type="application/json")

    # ------------------------------------------------------------------ wiring

    def routes(self) -> list[Route]:
        """The route table."""
        # The router tries routes in order: the hot paths come first.
        endpoints: dict[str, tuple[Callable[[Request], Any], str]] = {
            "/route": (self.route, "POST"),
            "/heartbeat": (self.heartbeat, "POST"),
            "/register": (self.register, "POST"),
            "/deregister": (self.deregister, "POST"),
            "/health": (self.health, "GET"),
            "/capabilities": (self.capabilities, "GET"),
            "/workers": (self.workers, "GET"),
            "/metrics": (self.exposition, "GET"),
            "/openapi.json": (self.openapi, "GET"),
        }
        assert set(endpoints) == set(ROUTE_PATHS), "the document and the routes disagree"
        return [
            Route(path, endpoint, methods=[method])
            for path, (endpoint, method) in endpoints.items()
        ]

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Open and replay the journal, run the sweeper, close both on shutdown."""
        checks = "on" if self.config.require_identity else "off"
        extra = ""
        if self.config.proxy_cert_header is not None:
            extra = " " + log_fields(proxy_cert_header=self.config.proxy_cert_header)
        logger.info("mTLS: worker identity checks %s%s", checks, extra)
        policy = self.policy
        logger.info(
            "controller starting %s",
            log_fields(
                controller_id=self.config.controller_id,
                state_dir=self.config.state_dir if self.config.state_dir is not None else "none",
                heartbeat_interval_s=policy.heartbeat_interval,
                unhealthy_after_s=policy.unhealthy_after,
                evict_after_s=policy.evict_after,
            ),
        )
        async with contextlib.AsyncExitStack() as stack:
            if self.config.state_dir is not None:
                await self._open_journal(stack)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self.sweeper.run)
                try:
                    yield
                finally:
                    tasks.cancel_scope.cancel()

    async def _open_journal(self, stack: contextlib.AsyncExitStack) -> None:
        """Open the journal, replay it into the registry, and attach it to effects.

        Replayed workers are ``unverified``: this controller has not heard
        from them since it started. :class:`~crank_registry_asgi.journal.JournalError`
        (the directory is locked by another controller, unreadable...)
        propagates: the application must not start without its journal.
        """
        assert self.config.state_dir is not None
        journal = Journal.open(
            self.config.state_dir,
            snapshots=RegistrySnapshots(self.registry),
            compact_min_bytes=self.config.journal_compact_min_bytes,
            timings=self.metrics,
        )
        stack.push_async_callback(journal.aclose)
        started = time.perf_counter()
        with _gc_paused(self.config.pause_gc_during_recovery):
            try:
                result = replay_bytes(journal.read(), self.registry)
            except NewerJournalFormat as error:
                raise JournalError(f"the journal {journal.path} was {error}") from None
            self.registry.restart()
        seconds = time.perf_counter() - started
        for skipped in result.skipped[:_LOGGED_SKIPS]:
            logger.warning(
                "journal line skipped %s",
                log_fields(path=journal.path, line=skipped.line_number, reason=skipped.reason),
            )
        if result.lines_skipped > _LOGGED_SKIPS:
            logger.warning(
                "journal lines skipped %s",
                log_fields(path=journal.path, more=result.lines_skipped - _LOGGED_SKIPS),
            )
        if result.workers_dropped:
            logger.warning(
                "journal workers dropped: their capabilities were on a skipped line"
                " (they register again at their next heartbeat) %s",
                log_fields(path=journal.path, workers_dropped=result.workers_dropped),
            )
        logger.info(
            "journal recovered %s",
            log_fields(
                path=journal.path,
                workers_restored=len(self.registry),
                revision=self.registry.revision,
                lines_read=result.lines_read,
                lines_skipped=result.lines_skipped,
                workers_dropped=result.workers_dropped,
                seconds=f"{seconds:.3f}",
            ),
        )
        self.effects.journal = journal
        # Detached before it is closed: a write after shutdown is refused.
        stack.callback(setattr, self.effects, "journal", None)


@contextlib.contextmanager
def _gc_paused(paused: bool) -> Iterator[None]:
    """Keep the cyclic collector from running inside the block (when ``paused``)."""
    was_enabled = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused and was_enabled:
            gc.enable()


# ------------------------------------------------------------------ errors


# Handlers are async: Starlette runs a plain function in its thread pool,
# a thread hop for every error answer.
async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _registry_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RegistryError)
    return registry_error_response(exc)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        message = f"no such path: {request.url.path}"
        if request.url.path == "/execute":  # the gateway's, served only with --gateway
            message += "; start the controller with --gateway to serve /execute"
        return error_response(404, "not_found", message)
    if exc.status_code == 405:
        allowed = headers.get("Allow", "")
        return error_response(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})",
            headers=headers,
        )
    # Starlette raises only 404 and 405 here; any other status keeps one
    # stable code rather than one made from free text.
    return error_response(exc.status_code, "http_error", exc.detail, headers=headers)


async def _client_disconnect(request: Request, exc: Exception) -> Response:
    # Nobody reads this answer; it only ends the request without a 500.
    return error_response(400, "client_disconnected", "the client went away mid-request")


def create_app(
    registry: CapabilityRegistry | None = None,
    *,
    config: ServiceConfig = ServiceConfig(),  # noqa: B008 (frozen, so safe to share)
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The controller as an ASGI application.

    ``registry`` defaults to an empty one with ``config.policy`` (a registry
    passed in keeps its own policy, which the service then uses); ``clock``
    is the wall clock (seconds since the epoch), clamped so that it never
    goes backwards. ``app.state.service`` is the :class:`ControllerService`;
    ``app.state.metrics_registry`` the app's own Prometheus registry.
    """
    if registry is None:
        registry = CapabilityRegistry(config.policy)
    service = ControllerService(registry, config, clock)
    app = ServiceApp(
        routes=service.routes(),
        middleware=[
            Middleware(RequestDurationMiddleware, metrics=service.metrics),
            Middleware(
                TracingMiddleware, route_paths=ROUTE_PATHS, controller_id=config.controller_id
            ),
        ],
        exception_handlers={
            ApiError: _api_error,
            RegistryError: _registry_error,
            HTTPException: _http_exception,
            ClientDisconnect: _client_disconnect,
            Exception: internal_error,
        },
        lifespan=service.lifespan,
    )
    app.state.service = service
    # Another collector joins /metrics with app.state.metrics_registry.register(...).
    app.state.metrics_registry = service.metrics.registry
    return app
