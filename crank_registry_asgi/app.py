"""The controller as a Starlette application: :func:`create_app`.

Each endpoint does four things: structure the body with the core's
converter, call the registry with ``now``, hand the returned events to
:class:`~crank_registry_asgi.effects.Effects`, answer with one of the core's
answer models (rendered by the converter, see :func:`answer`). Every rule
(health, routing, who may act on which record) is the core's. A write has
the registry decide its change, and :meth:`Effects.commit
<crank_registry_asgi.effects.Effects.commit>` applies it once the journal
made it durable (a write answered 503 changes nothing).

The lifespan reads the SLO files and the journal, replays the journal into
the registry (the core's fold), puts the SLO files and the access policy
in effect (each a change of the registry when it differs from what the
journal restored), then serves, running the :class:`Sweeper`, the
:class:`~crank_registry_asgi.slos.SloWatcher` and the policy file's
watcher in a task group until shutdown. Without a state directory there
is nothing to replay: the access policy is in effect from the start. On a
shared registry (Redis) the lease holder publishes its SLO files and
access policy, and the other controllers compare theirs
(:mod:`~crank_registry_asgi.shared_settings`).
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import attrs
from opentelemetry.trace import SpanKind
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from crank_registry import (
    PROTOCOL_FEATURES,
    AccessRules,
    CapabilityRegistry,
    Change,
    DeregisterAnswer,
    DeregisterRequest,
    DrainAnswer,
    Event,
    Forbidden,
    HealthAnswer,
    HeartbeatAnswer,
    HeartbeatRequest,
    ListingQuery,
    NewerJournalFormat,
    PolicyRules,
    Problem,
    RateLimitState,
    ReadyAnswer,
    RegisterAnswer,
    Registration,
    RegistryError,
    RouteExplanation,
    RouteOptions,
    RouteRequest,
    SloFile,
    SlosAnswer,
    TokenBuckets,
    UnknownCapability,
    ValidationError,
    WatchQuery,
    WorkerNotRegistered,
    authorize_drain,
    authorize_worker,
    encode_epoch,
    is_worker_id,
    iso_utc,
    replay_bytes,
    retry_after_seconds,
    structure,
    unstructure,
)

from . import feed, listings
from .clock import AnchoredClock
from .config import ServiceConfig
from .dashboard import ASSETS, Dashboard
from .effects import Effects, RegistrySnapshots, log_fields, logger
from .feed import Broadcast
from .fleet_limits import ControllerLiveness, SharedTokenBuckets, fleet_client
from .http import (
    ApiError,
    ServiceApp,
    error_response,
    internal_error,
    read_json_body,
    registry_error_response,
)
from .identity import IdentityRefused, ProxyCertificateHeader, caller_identity
from .journal import Journal, JournalError
from .metrics import Metrics, RequestDurationMiddleware, metrics_response
from .openapi import ROUTE_PATHS, openapi_document
from .policy_file import PolicyFileWatcher
from .redis_store import RedisStore
from .schemas import capability_schema_problems, refuse_invalid_schemas
from .shared_settings import SharedSettings
from .slos import SloWatcher, slo_directory
from .telemetry import TracingMiddleware, annotate, tracer

__all__ = [
    "ControllerService",
    "Sweeper",
    "answer",
    "create_app",
    "identity_checks_off_warning",
]

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


def refuse_query(request: Request) -> None:
    """422 ``invalid_request`` naming each query parameter: the endpoint takes none.

    As the listings refuse a parameter they do not know (a typo must not
    pass silently), a JSON endpoint documented without parameters refuses
    any rather than answer as if it were not there. (``/metrics``,
    ``/openapi.json`` and the dashboard's files are not refused: scrapers
    and browsers add parameters of their own.)
    """
    if request.query_params:
        path = request.url.path
        raise ValidationError(
            Problem(name, f"unknown query parameter: {path} takes none")
            for name in dict.fromkeys(request.query_params.keys())
        )


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


class Sweeper:
    """Runs the core's sweep, waking just after the registry's next deadline.

    :meth:`sweep` is one pass (tests call it directly after moving a fake
    clock); :meth:`run` loops until cancelled. Its sleep is capped at one
    heartbeat interval, which is also what keeps it on time without being
    woken: a registration's first deadline is ``unhealthy_after`` (at least
    one interval) away, so it is never earlier than the planned wake-up. An
    ejection's end may be (30 s, under a longer interval): :meth:`changed`
    wakes it then.
    """

    def __init__(
        self, registry: CapabilityRegistry, clock: Callable[[], float], effects: Effects
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.effects = effects
        # The last sweep's changes could not be journaled: retry after an interval.
        self._failed = False
        self._woken = anyio.Event()
        # When the running loop plans to sweep next (service time).
        self._planned = math.inf

    def wake(self) -> None:
        """Sweep now rather than at the planned time (this controller just took the lease)."""
        self._woken.set()

    def changed(self) -> None:
        """Changes were applied: wake to plan again if a deadline now comes before the plan."""
        deadline = self.registry.next_deadline()
        if deadline is not None and deadline + _SWEEP_SLACK < self._planned:
            self._woken.set()

    def delay(self) -> float:
        """Seconds until the next sweep: just after the next deadline, at most an interval.

        After a sweep the journal could not take, one interval (its
        changes are still due, and would wake it at once).
        """
        interval = self.registry.policy.heartbeat_interval
        deadline = self.registry.next_deadline()
        if deadline is None or self._failed:
            return interval
        return min(max(deadline - self.clock(), 0.0) + _SWEEP_SLACK, interval)

    async def sweep(self) -> tuple[Event, ...]:
        """One sweep at the current time; returns the changes it made.

        ``unhealthy`` and ``evicted``, and ``self_preservation`` when it
        begins or ends (the core decides it in the sweep).

        Decided, made durable, then applied: when the journal cannot take
        them, none is applied and the next sweep decides them again
        (returns no event then).
        """
        try:
            self.effects.check_writable()
        except ApiError as error:
            logger.warning("sweep skipped %s", log_fields(error=error.message))
            return ()
        if not self.effects.may_sweep():
            return ()  # another controller holds the sweeper lease, or the store is out
        events = self.registry.decide_sweep(now=self.clock())
        if events:
            with tracer().start_as_current_span(
                "crank.sweep", kind=SpanKind.INTERNAL, attributes={"crank.changes": len(events)}
            ):
                try:
                    events = await self.effects.commit(events)
                except ApiError as error:
                    self._failed = True
                    logger.warning(
                        "sweep not journaled, nothing changed; retried at the next sweep %s",
                        log_fields(changes=len(events), error=error.message),
                    )
                    return ()
        self._failed = False
        return events

    async def run(self) -> None:
        """Sweep at every deadline until cancelled."""
        while True:
            delay = self.delay()
            self._planned = self.clock() + delay
            with anyio.move_on_after(delay):
                await self._woken.wait()
            self._woken = anyio.Event()
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
        self.clock = clock
        #: When the service started (its uptime is counted from here).
        self.started_at = clock()
        self.metrics = Metrics(
            multiprocess_directory=config.metrics_directory,
            replication=config.redis_url is not None,
        )
        self.metrics.watch(registry, self.clock)
        self.retry_after = str(max(1, math.ceil(self.policy.heartbeat_interval)))
        self.effects = Effects(
            registry,
            metrics=self.metrics,
            journal_expected=config.state_dir is not None and config.redis_url is None,
            heartbeat_line_every=self.policy.unhealthy_after / 2,
            retry_after=self.retry_after,
        )
        self.sweeper = Sweeper(registry, self.clock, self.effects)
        #: The name of this registry's history (DESIGN, "Epochs"): made here for
        #: a registry in memory or a new journal, read back from a journal.
        self.epoch = secrets.token_hex(8)
        # Wakes the long polls of /watch once changes are applied.
        self.broadcast = Broadcast(registry)
        self.effects.applied = self._applied
        #: The shared registry's store (``config.redis_url``), else ``None``: the journal.
        self.store: RedisStore | None = None
        if config.redis_url is not None:
            self.store = RedisStore(
                registry,
                url=config.redis_url,
                prefix=config.redis_prefix,
                controller_id=config.controller_id,
                clock=self.clock,
                retry_after=self.retry_after,
                lease_period=config.redis_lease_period,
                snapshot_every=config.redis_snapshot_every,
            )
            self.store.applied = self._applied_from_store
            self.store.epoch_changed = self._follow_epoch
            self.store.lease_taken = self._lease_taken
            if self.metrics.replication_lag is not None:
                self.store.replicated = self.metrics.replication_lag.observe
            self.effects.store = self.store
        # The SLO files of the state directory (none without one).
        self.slo_watcher = (
            None
            if config.state_dir is None
            else SloWatcher(
                slo_directory(config.state_dir),
                registry,
                put=self.put_slos,
                interval=config.slo_poll_interval,
            )
        )
        self.proxy_header = (
            None
            if config.proxy_cert_header is None
            else ProxyCertificateHeader(
                config.proxy_cert_header, config.proxy_cert_authorities, config.trusted_proxies
            )
        )
        # The access policy: the --policy file's rules (re-read while serving), or none.
        self.policy_watcher = (
            None
            if config.policy_file is None
            else PolicyFileWatcher(
                config.policy_file, self.put_access_rules, interval=config.policy_watch_interval
            )
        )
        #: The access policy of this controller's flags (the built-in one:
        #: least privilege, then the --policy file's rules), which it routes
        #: under; on a shared registry, the one it publishes while it holds
        #: the sweeper lease (it routes under the registry's).
        self.access_rules = AccessRules.of(
            PolicyRules() if self.policy_watcher is None else self.policy_watcher.start(),
            config.trust_domain,
        )
        #: The shared registry's settings, published by the lease holder (``None``: no store).
        self.shared: SharedSettings | None = None
        if self.store is not None:
            self.shared = SharedSettings(
                registry,
                access_rules=self.access_rules,
                holds_lease=self.store.holds_lease,
                publish_slos=self.publish_slos,
                publish_access_rules=self.publish_access_rules,
                slo_directory=None if self.slo_watcher is None else self.slo_watcher.directory,
                policy_file=config.policy_file,
            )
        # GET /ui and its files, read from the package once.
        self.dashboard = Dashboard()
        #: This process' liveness key in Redis (``config.redis_url``), else ``None``.
        self.liveness: ControllerLiveness | None = None
        #: The callers' token buckets in Redis, shared by the fleet, under
        #: ``--rate-limit`` with ``--redis`` (``None`` otherwise).
        self.shared_admission: SharedTokenBuckets | None = None
        if config.redis_url is not None:
            self.liveness = ControllerLiveness(
                fleet_client(config.redis_url),
                prefix=config.redis_prefix,
                controller_id=config.controller_id,
            )
            if config.rate_limit is not None:
                self.shared_admission = SharedTokenBuckets(
                    config.rate_limit, self.liveness, clock, prefix=config.redis_prefix
                )
        #: The callers' token buckets in this process under ``--rate-limit``
        #: without ``--redis`` (``None``: no limit, or a shared one).
        self.admission = (
            None
            if config.rate_limit is None or self.shared_admission is not None
            else TokenBuckets(config.rate_limit)
        )
        # Readiness (GET /ready): the journal is replayed or the shared
        # registry loaded (nothing to load without either), and the lifespan
        # is not shutting down.
        self._replayed = config.state_dir is None and self.store is None
        self._stopping = False
        if self._replayed:
            # Nothing to replay nor make durable: in effect at once (with a
            # journal, once it is replayed: the lifespan's _put_settings).
            self.effects.observe(registry.set_access_rules(self.access_rules, now=clock()))
        # Rendered once: the document does not change while the app runs.
        self._document_body = JSONResponse(openapi_document()).body

    def _applied(self) -> None:
        """Changes were applied: wake the long polls of /watch, and the sweeper if it must."""
        self.broadcast.moved()
        self.sweeper.changed()

    def _follow_epoch(self, epoch: str) -> None:
        """The shared registry's history is ``epoch`` (loaded, or started anew)."""
        self.epoch = epoch

    def _applied_from_store(self) -> None:
        """The shared registry's reader applied entries: wake the feed, the sweeper, compare."""
        self._applied()
        if self.shared is not None:
            self.shared.compare()

    def _lease_taken(self) -> None:
        """The sweeper lease was just taken: sweep, and publish the settings."""
        self.sweeper.wake()
        if self.shared is not None:
            self.shared.wake()

    async def put_access_rules(self, rules: PolicyRules) -> None:
        """The ``--policy`` file's ``rules`` (as read at start, or changed since) are in effect.

        On a journal, a ``policy_changed`` change, made durable; on a shared
        registry, published when this controller holds the sweeper lease,
        else compared with the registry's (:mod:`.shared_settings`). Raises
        :class:`ApiError` ``journal_unavailable`` (``store_unavailable``)
        when the store cannot take it (nothing changed then).
        """
        self.access_rules = AccessRules.of(rules, self.config.trust_domain)
        if self.shared is not None:
            await self.shared.put_access_rules(self.access_rules)
        else:
            await self.publish_access_rules(self.access_rules)

    async def publish_access_rules(self, rules: AccessRules) -> None:
        """Route under ``rules`` from now on: a ``policy_changed`` change, made durable."""
        self.effects.check_writable()
        await self.effects.commit(self.registry.decide_access_rules(rules, now=self.clock()))

    def caller(self, request: Request) -> str | None:
        """The caller's identity, ``None`` for an anonymous caller; 403 ``forbidden`` if refused."""
        try:
            return caller_identity(
                request.scope, request.headers, self.proxy_header, now=self.clock()
            )
        except IdentityRefused as refusal:
            raise ApiError(403, "forbidden", str(refusal)) from None

    async def put_slos(self, files: tuple[SloFile, ...]) -> None:
        """The SLO files read (at start, or changed since) are ``files``.

        On a journal they are put in effect (:meth:`publish_slos`); on a
        shared registry they are published or compared like the access
        policy (:meth:`put_access_rules`). Raises alike.
        """
        if self.shared is not None:
            await self.shared.put_slos(files)
        else:
            await self.publish_slos(files)

    async def publish_slos(self, files: tuple[SloFile, ...]) -> None:
        """Put ``files`` in effect: a ``slos_changed`` change, made durable; raises alike."""
        self.effects.check_writable()
        await self.effects.commit(self.registry.decide_slos(files, now=self.clock()))

    def requester_of(self, identity: str | None, asked: str | None) -> str | None:
        """Whom a route is for: the caller's ``identity`` (:meth:`caller`), or ``asked``.

        ``None``: an anonymous caller. ``asked`` (a body ``requester_identity``)
        from any caller not listed by ``--trusted-gateway`` is 403 ``forbidden``.
        """
        if asked is None:
            return identity
        if identity is None or identity not in self.config.trusted_gateways:
            caller = "an anonymous caller" if identity is None else f"caller {identity!r}"
            raise ApiError(
                403,
                "forbidden",
                f"requester_identity is accepted only from an identity named by "
                f"--trusted-gateway, and {caller} is not one; drop the field to route as "
                "yourself",
            )
        return asked

    async def admit(self, request: Request, path: str, identity: str | None) -> None:
        """Take a token of the caller's rate limit (``--rate-limit``), or refuse with 429.

        The key is ``identity`` (the caller's, :meth:`caller`; for a
        trusted gateway, the identity it routes for), else the caller's
        address (callers whose address is unknown share one bucket). The
        bucket is this process' own, or with ``--redis`` the fleet's
        (:class:`~crank_registry_asgi.fleet_limits.SharedTokenBuckets`).
        ``path``: ``/route`` or ``/execute``, the refusals' metric label.
        Raises :class:`ApiError` 429 ``rate_limited`` with ``Retry-After``,
        the seconds until the caller's next token, rounded up.
        """
        shared = self.shared_admission
        buckets = self.admission
        if shared is None and buckets is None:
            return
        if identity is not None:
            key = who = identity
        else:
            client = request.scope.get("client")
            key = client[0] if client else ""
            who = f"address {key}" if key else "callers of unknown address"
        if shared is not None:
            wait = await shared.admit(key)
        else:
            assert buckets is not None
            wait = buckets.admit(key, now=self.clock())
        if wait:
            self.metrics.rate_limited[path].inc()
            retry_after = retry_after_seconds(wait)
            if shared is not None:
                limit_text = shared.describe()
            else:
                assert buckets is not None
                limit = buckets.limit
                limit_text = f"{limit.rate:g} requests per second in bursts of {limit.burst}"
            raise ApiError(
                429,
                "rate_limited",
                f"over the rate limit of {limit_text} for {who}; retry in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )

    def rate_limit_state(self) -> RateLimitState | None:
        """The rate limit in effect (``GET /ready``), ``None`` without ``--rate-limit``."""
        if self.shared_admission is not None:
            return self.shared_admission.state()
        limit = self.config.rate_limit
        if limit is None:
            return None
        return RateLimitState(mode="local", rate=limit.rate, burst=limit.burst)

    async def sweep(self) -> tuple[Event, ...]:
        """One eviction pass at the current time (what the background loop runs)."""
        return await self.sweeper.sweep()

    # ----------------------------------------------------------------- helpers

    async def _body(self, request: Request) -> Any:
        return await read_json_body(
            request,
            max_bytes=self.config.max_body_bytes,
            max_depth=self.config.max_json_depth,
            read_timeout=self.config.request_read_timeout,
        )

    def _authorize(self, request: Request, worker_id: str) -> None:
        try:
            identity = caller_identity(
                request.scope, request.headers, self.proxy_header, now=self.clock()
            )
        except IdentityRefused as refusal:
            raise Forbidden(None, worker_id, reason=str(refusal)) from None
        authorize_worker(
            identity,
            worker_id,
            trust_domain=self.config.trust_domain,
            required=self.config.require_identity,
        )

    # --------------------------------------------------------------- endpoints

    async def health(self, request: Request) -> Response:
        """GET /health: liveness, worker counts (counted in slices) and the status strip's figures.

        The revision is read before the counting yields: a follower that
        starts its feed from it sees every change the counts may miss.
        """
        refuse_query(request)
        now = self.clock()
        revision = self.registry.revision
        counted = await listings.counts(self.registry, now=now)
        interval = self.policy.heartbeat_interval
        return answer(
            HealthAnswer(
                total_workers=counted.total,
                healthy_workers=counted.routable,
                self_preservation=self.registry.self_preservation is not None,
                epoch=self.epoch,
                revision=revision,
                timestamp=iso_utc(now),
                uptime_s=round(max(now - self.started_at, 0.0), 3),
                heartbeat_interval_s=interval,
                heartbeats_last_minute=self.metrics.recent_heartbeats.count(now),
                expected_heartbeats_per_minute=round(counted.total * 60 / interval, 3),
                controller_id=self.config.controller_id,
            )
        )

    def not_ready(self) -> str | None:
        """Why the controller cannot route now (``GET /ready``'s ``reason``), or ``None``."""
        if self._stopping:
            return "the controller is shutting down"
        if not self._replayed:
            if self.store is not None:
                return (
                    "the shared registry is not loaded from Redis yet (the application's "
                    "lifespan has not started, or is loading it)"
                )
            return "the journal is not replayed yet (the application's lifespan has not started)"
        return None

    async def ready(self, request: Request) -> Response:
        """GET /ready: readiness; 503 ``not_ready`` until the journal is replayed (or Redis loaded).

        Once ready, a store outage and self-preservation are reported, not
        failed on: the controller routes through both.
        """
        refuse_query(request)
        reason = self.not_ready()
        if reason is not None:
            raise ApiError(503, "not_ready", reason, headers={"Retry-After": "1"}, reason=reason)
        return answer(
            ReadyAnswer(
                store="ok" if self.effects.store_available() else "unavailable",
                self_preservation=self.registry.self_preservation is not None,
                rate_limit=self.rate_limit_state(),
            )
        )

    async def register(self, request: Request) -> Response:
        """POST /register: add or replace a worker."""
        registration = structure(await self._body(request), Registration)
        refuse_invalid_schemas(registration.capabilities)
        annotate(worker_id=registration.worker_id)
        self._authorize(request, registration.worker_id)
        self.effects.check_writable()
        events = self.registry.decide_register(
            registration.worker_id,
            registration.worker_url,
            registration.capabilities,
            now=self.clock(),
        )
        await self.effects.commit(events)
        return answer(
            RegisterAnswer(
                worker_id=registration.worker_id,
                heartbeat_interval_s=self.policy.heartbeat_interval,
                features=PROTOCOL_FEATURES,
            )
        )

    async def heartbeat(self, request: Request) -> Response:
        """POST /heartbeat: a worker proves it is alive, and may report its load."""
        beat = structure(await self._body(request), HeartbeatRequest)
        annotate(worker_id=beat.worker_id)
        self._authorize(request, beat.worker_id)
        self.effects.check_writable()
        now = self.clock()
        events = self.registry.decide_heartbeat(beat.worker_id, now=now, load=beat.load)
        try:
            await self.effects.commit(events)
        except ApiError as error:
            # A journal outage does not fail heartbeats (DESIGN, "Codes for a
            # store outage"): the heartbeat is held; its change (healthy
            # again) is not, and the worker's next heartbeat decides it again.
            logger.warning(
                "heartbeat's change not journaled %s",
                log_fields(worker_id=beat.worker_id, error=error.message),
            )
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
        events = self.registry.decide_deregister(leaving.worker_id, now=self.clock())
        await self.effects.commit(events)
        return answer(DeregisterAnswer(worker_id=leaving.worker_id))

    async def drain(self, request: Request) -> Response:
        """POST /workers/{worker_id}/drain: the worker takes no new routes from now on."""
        return await self._drain(request, draining=True)

    async def undrain(self, request: Request) -> Response:
        """POST /workers/{worker_id}/undrain: the worker takes routes again as its health allows."""
        return await self._drain(request, draining=False)

    async def _drain(self, request: Request, *, draining: bool) -> Response:
        """Drain or undrain the worker of the path (no body: whatever is sent is not read).

        The worker itself may, and so may an identity matching ``--operator``
        (:func:`~crank_registry.authorize_drain`); 404 ``worker_not_registered``
        for a worker not held. Draining a draining worker changes nothing.
        """
        worker_id = request.path_params["worker_id"]
        if not is_worker_id(worker_id):
            raise ValidationError.single(
                "worker_id", "must be 1 to 128 letters, digits, '.', '_' and '-'"
            )
        annotate(worker_id=worker_id)
        try:
            identity = caller_identity(
                request.scope, request.headers, self.proxy_header, now=self.clock()
            )
        except IdentityRefused as refusal:
            raise Forbidden(None, worker_id, reason=str(refusal)) from None
        authorize_drain(
            identity,
            worker_id,
            trust_domain=self.config.trust_domain,
            required=self.config.require_identity,
            operators=self.config.operators,
        )
        self.effects.check_writable()
        decide = self.registry.decide_drain if draining else self.registry.decide_undrain
        written = await self.effects.commit(decide(worker_id, now=self.clock()))
        changed = any(isinstance(event, Change) for event in written)
        return answer(DrainAnswer(worker_id=worker_id, draining=draining, changed=changed))

    async def route(self, request: Request) -> Response:
        """POST /route: the next worker for a verb and capability, under the request's options."""
        identity = self.caller(request)
        # A trusted gateway's routes count against whom they are for (the body
        # says); any other caller's before the body is read, the cheapest refusal.
        for_others = self.config.rate_limit is not None and identity in self.config.trusted_gateways
        if not for_others:
            await self.admit(request, "/route", identity)
        ask = _route_request(await self._body(request))
        annotate(verb=ask.verb, capability=ask.capability)
        requester = self.requester_of(identity, ask.requester_identity)
        if for_others:
            await self.admit(request, "/route", requester)
        options = RouteOptions.from_request(ask)
        # Whether the caller asked for options: the requester added below is not one.
        optioned = options is not None
        if requester is not None:
            options = (options or RouteOptions()).with_requester(requester)
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
                ask.verb, ask.capability, explain=explanation, optioned=optioned
            )
        self.effects.routed()
        annotate(worker_id=endpoint.worker_id)
        return answer(endpoint)

    async def slos(self, request: Request) -> Response:
        """GET /slos: the SLO files in effect."""
        refuse_query(request)
        return answer(SlosAnswer(slos=self.registry.slos))

    async def capabilities(self, request: Request) -> Response:
        """GET /capabilities: a page of (verb, capability, version) entries."""
        query = ListingQuery.parse(request.query_params.multi_items())
        body = await listings.capabilities_body(self.registry, query, now=self.clock())
        return Response(body, media_type="application/json")

    async def workers(self, request: Request) -> Response:
        """GET /workers: a page of workers with their health at this moment."""
        query = ListingQuery.parse(request.query_params.multi_items())
        body = await listings.workers_body(self.registry, query, now=self.clock())
        return Response(body, media_type="application/json")

    async def worker(self, request: Request) -> Response:
        """GET /workers/{worker_id}: one worker as /workers lists it; 404 if not registered."""
        worker_id = request.path_params["worker_id"]
        if not is_worker_id(worker_id):
            raise ValidationError.single("worker_id", "not a valid worker id (the path's)")
        refuse_query(request)
        view = self.registry.get_worker(worker_id, now=self.clock())
        if view is None:
            raise WorkerNotRegistered(worker_id)
        return answer(listings.entry(view))

    async def snapshot(self, request: Request) -> Response:
        """GET /snapshot: the whole registry at its revision, streamed in slices."""
        refuse_query(request)
        body = feed.snapshot_body(self.registry.snapshot_copy(), self.epoch, self.policy)
        return StreamingResponse(body, media_type="application/json")

    async def watch(self, request: Request) -> Response:
        """GET /watch: the changes after ``since``: a long poll, or a stream of events.

        The start is ``Last-Event-ID`` (``EPOCH:REVISION``) when sent, else
        ``since`` and ``epoch``. With ``Accept: text/event-stream``, Server-Sent
        Events until the client leaves, the server shuts down, or ``timeout``
        when given; otherwise JSON, waiting up to ``timeout`` for a change.
        """
        query = WatchQuery.parse(request.query_params.multi_items())
        last_event_id = request.headers.get("last-event-id")
        if last_event_id is not None:
            epoch, since = feed.parse_event_id(last_event_id)
            query = attrs.evolve(query, epoch=epoch, since=since)
        if not feed.wants_stream(request.headers.get("accept")):
            with self.metrics.long_polls.track_inprogress():
                body = await feed.watch(self.registry, self.broadcast, self.epoch, query)
            return Response(body, media_type="application/json")
        feed.check_start(self.registry, self.epoch, query.epoch, query.since)
        ends_at = None
        if "timeout" in request.query_params:
            ends_at = anyio.current_time() + query.timeout
        events = feed.stream(
            self.registry,
            self.broadcast,
            self.epoch,
            query.since,
            ends_at=ends_at,
        )
        # No comment pings: the bookmarks keep the connection alive.
        return EventSourceResponse(feed.counted(events, self.metrics.streams), ping=0)

    def end_streams(self) -> None:
        """End the /watch streams and answer the long polls now: the server is shutting down.

        ``serve`` calls it when the shutdown starts, before the server waits
        for open connections (the lifespan's shutdown comes only after them);
        an application serving the app under another server calls it the same way.
        """
        self.broadcast.close()

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
            "/workers/{worker_id}/drain": (self.drain, "POST"),
            "/workers/{worker_id}/undrain": (self.undrain, "POST"),
            "/health": (self.health, "GET"),
            "/ready": (self.ready, "GET"),
            "/capabilities": (self.capabilities, "GET"),
            "/workers": (self.workers, "GET"),
            "/workers/{worker_id}": (self.worker, "GET"),
            "/slos": (self.slos, "GET"),
            "/snapshot": (self.snapshot, "GET"),
            "/watch": (self.watch, "GET"),
            "/metrics": (self.exposition, "GET"),
            "/openapi.json": (self.openapi, "GET"),
            **{path: (self.dashboard.endpoint(path), "GET") for path in ASSETS},
        }
        assert set(endpoints) == set(ROUTE_PATHS), "the document and the routes disagree"
        return [
            Route(path, endpoint, methods=[method])
            for path, (endpoint, method) in endpoints.items()
        ]

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Check where identities come from, read the SLO files, open and replay the journal.

        Raises :class:`~crank_registry_asgi.tls.CaptureNotInstalled` before
        serving when identity checks are on and no certificate can reach
        the app, :class:`~crank_registry_asgi.slos.SloFileError` when an SLO
        file is invalid; runs the sweeper and the SLO watcher while serving,
        closes the journal and stops both on shutdown.
        """
        self._check_identity_source()
        if self.proxy_header is not None:
            self._log_proxy_header(self.proxy_header)
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
        # Before the journal: an invalid file refuses the start without a long replay first.
        slos = None if self.slo_watcher is None else self.slo_watcher.load()
        self._stopping = False
        async with contextlib.AsyncExitStack() as stack:
            if self.store is not None:
                stack.push_async_callback(self.store.aclose)
                # Loading the shared registry (its snapshot key, then the stream)
                # is a recovery too.
                with _gc_paused(self.config.pause_gc_during_recovery):
                    await self.store.open()
                    if self.config.freeze_gc_after_recovery:
                        gc.freeze()  # as after the journal's replay
            elif self.config.state_dir is not None:
                await self._open_journal(stack)
            if self.liveness is not None:
                stack.push_async_callback(self.liveness.aclose)
                # Counted among the live controllers before the first request.
                await self.liveness.renew()
            if not self._replayed and self.shared is None:
                # Decided on the registry the journal restored: a change
                # only where they differ.
                await self.publish_access_rules(self.access_rules)
                if slos is not None:
                    await self.publish_slos(slos)
                self._replayed = True
            async with anyio.create_task_group() as tasks:
                if self.store is not None:
                    # The reader first: a write waits until it applied the write.
                    tasks.start_soon(self.store.run)
                if self.store is not None and self.shared is not None:
                    if not self._replayed:
                        # The lease tried once now, so that a first controller
                        # publishes its settings before it is ready.
                        await self.store.renew_lease()
                        await self.shared.start(slos)
                        self._replayed = True
                    tasks.start_soon(self.shared.run)
                if self.liveness is not None:
                    tasks.start_soon(self.liveness.run)
                tasks.start_soon(self.sweeper.run)
                # The /watch streams' bookmarks.
                tasks.start_soon(feed.tick_every, self.broadcast, feed.bookmark_period(self.policy))
                if self.slo_watcher is not None:
                    tasks.start_soon(self.slo_watcher.run)
                if self.policy_watcher is not None:
                    tasks.start_soon(self.policy_watcher.run)
                try:
                    yield
                finally:
                    # Not ready from the start of shutdown (the journal closes next).
                    self._stopping = True
                    tasks.cancel_scope.cancel()

    def _log_proxy_header(self, proxy_header: ProxyCertificateHeader) -> None:
        """Say loudly that a header sets identities, and who may send it."""
        fields = log_fields(
            header=proxy_header.header,
            ca_certificates=len(self.config.proxy_cert_authorities),
            trusted_proxies=proxy_header.describe_proxies(),
        )
        if proxy_header.proxies:
            logger.warning(
                "identities are taken from the client certificate header %s, verified against "
                "the CA certificates, when sent by a trusted proxy %s",
                proxy_header.header,
                fields,
            )
        else:
            logger.warning(
                "identities are taken from the client certificate header %s sent by ANY peer: "
                "a caller that reaches the controller directly can send another worker's "
                "(public) certificate in it; give --trusted-proxy CIDR %s",
                proxy_header.header,
                fields,
            )

    def _check_identity_source(self) -> None:
        """Log whether identities are checked; refuse to start when they cannot be.

        The start is the earliest point that can tell, and a reliable one:
        hypercorn hands no certificate unless the capture was installed
        before it served (``serve`` installs it; an embedding program must),
        whereas a first request without one comes only once the server is
        up, and could as well be a caller that presented none.
        """
        config = self.config
        if not config.require_identity:
            logger.warning("%s", identity_checks_off_warning())
            return
        if config.proxy_cert_header is None:
            from . import tls  # hypercorn's internals, needed only here

            tls.require_installed()
        logger.info(
            "mTLS: worker identity checks on %s", log_fields(trust_domain=config.trust_domain)
        )

    async def _open_journal(self, stack: contextlib.AsyncExitStack) -> None:
        """Open the journal, replay it into the registry, and attach it to effects.

        Replayed workers are ``unverified``: this controller has not heard
        from them since it started. :class:`~crank_registry_asgi.journal.JournalError`
        (the directory is locked by another controller, unreadable...)
        propagates: the application must not start without its journal.
        """
        assert self.config.state_dir is not None
        snapshots = RegistrySnapshots(self.registry, self.epoch)
        journal = Journal.open(
            self.config.state_dir,
            snapshots=snapshots,
            compact_min_bytes=self.config.journal_compact_min_bytes,
            timings=self.metrics,
        )
        stack.push_async_callback(journal.aclose)
        started = time.perf_counter()
        with _gc_paused(self.config.pause_gc_during_recovery):
            try:
                result = replay_bytes(
                    journal.read(), self.registry, capability_check=capability_schema_problems
                )
            except NewerJournalFormat as error:
                raise JournalError(f"the journal {journal.path} was {error}") from None
            # The journal's times are wall-clock times of the previous run,
            # compared with this run's anchored clock.
            self.registry.restart(now=self.clock())
            if self.config.freeze_gc_after_recovery:
                # Not collected first: that would be the very pause (0.14-0.23 s
                # at 100 000 workers); recovery leaves some 100 objects of
                # garbage whatever the fleet, kept for good.
                gc.freeze()
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
        for refused in result.refused[:_LOGGED_SKIPS]:
            logger.warning(
                "journal capability refused: its workers are left out %s",
                log_fields(path=journal.path, line=refused.line_number, reason=refused.reason),
            )
        if result.workers_dropped:
            logger.warning(
                "journal workers dropped: their capabilities were on a skipped line or refused"
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
                epoch=result.epoch if result.epoch is not None else f"{self.epoch} (new)",
                seconds=f"{seconds:.3f}",
            ),
        )
        if result.epoch is not None:
            self.epoch = snapshots.epoch = result.epoch
        else:
            # A new journal, or one written before epochs: its history starts here.
            await journal.append([encode_epoch(self.epoch)], durable=True)
        self.effects.journal = journal
        # Detached before it is closed: a write after shutdown is refused.
        stack.callback(setattr, self.effects, "journal", None)


def identity_checks_off_warning() -> str:
    """What the controller warns at start when it does not check worker identities.

    Logged by the lifespan, so ``crank-registry serve`` and an application
    embedding :func:`create_app` say the same.
    """
    return (
        "mTLS: worker identity checks off: any caller may register any worker, and heartbeat "
        "or deregister it (serve: --ca-certs, or --trust-proxy-cert-header behind a "
        "TLS-terminating proxy; embedded: ServiceConfig(require_identity=True))"
    )


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
    clock: Callable[[], float] | None = None,
) -> Starlette:
    """The controller as an ASGI application.

    ``registry`` defaults to an empty one with ``config.policy``,
    ``config.routing``, ``config.feed_window``,
    ``config.self_preservation`` and ``config.ejection`` (a registry passed in keeps its own,
    which the service then uses). ``clock``
    gives ``now`` in seconds since the epoch for every health decision; by
    default an :class:`~crank_registry_asgi.clock.AnchoredClock` (the wall
    clock at start, advanced by the monotonic clock, so that a step of the
    system clock changes no decision); with ``config.redis_url`` it is set
    to Redis' time when the store first connects, so that controllers on
    several hosts share one clock. A clock passed in is used as it is
    (tests pass a fake one). ``app.state.service`` is the
    :class:`ControllerService`;
    ``app.state.metrics_registry`` the app's own Prometheus registry.

    With ``config.require_identity`` and no ``config.proxy_cert_header``,
    identities come from client certificates, which reach the app only under
    hypercorn with :func:`crank_registry_asgi.tls.install` called first: the
    lifespan refuses to start otherwise. Without identity checks it warns.
    """
    own_clock: AnchoredClock | None = None
    if clock is None:
        clock = own_clock = AnchoredClock()
    if registry is None:
        # least_loaded's draws: seeded by the OS, unlike the core's default.
        registry = CapabilityRegistry(
            config.policy,
            config.routing,
            rng=random.Random(),
            feed_window=config.feed_window,
            self_preservation=config.self_preservation,
            ejection=config.ejection,
            # Every history starts under the default rules: a --policy file or
            # another --trust-domain is a policy_changed at the first start.
            access_rules=AccessRules(),
        )
    service = ControllerService(registry, config, clock)
    if service.store is not None and own_clock is not None:
        # Controllers on several hosts compare times on Redis' clock.
        service.store.align_clock = own_clock.align
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
