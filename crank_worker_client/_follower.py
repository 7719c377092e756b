"""``RegistryFollower``: a replica of the registry in the caller's process, for in-process routes.

The follower loads ``GET /snapshot`` into a core registry that routes by
state (:mod:`._feed`), then follows the long poll ``GET /watch`` from that
epoch and revision, applying each change with the core's one fold. A
route asks that replica: the same rules, options, answers and errors as
:meth:`ControllerClient.route <crank_worker_client.ControllerClient.route>`,
without I/O.

Followers keep no clock for health: a worker's state changes only by the
controller's events. The one time guard is the lag: every answer of the
controller (a change, or a long poll that timed out with none, its
bookmark) is "heard from". The lag limit is ``max(2 x heartbeat_interval,
2 x bookmark period)`` (the bookmark period is the long poll's timeout,
at most half the limit), so a controller that answers is never past it.
Past it, a route asks the controller's ``POST /route``; a controller that
does not answer within ``stale_route_timeout`` (or cannot be reached) gets
the local answer instead, and is not asked again until the client's
backoff has passed: a replica a few seconds stale beats no answer when the
controller is down, and the workers it names answer for themselves. Once
the feed catches up, routes are local again.

The follow loop reconnects with the client's backoff (:mod:`._schedule`);
a 410 (``revision_compacted``, ``revision_reset``), another epoch, a gap in
the revisions or a change the fold refuses loads the snapshot again. The
replica in use is swapped whole, so a route never sees half a reload;
what the old one counted locally (hand-outs, idempotency keys) starts
afresh, and a reserved call ends on the replica it started on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import ssl
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import httpx

from crank_registry import (
    DEFAULT_TRUST_DOMAIN,
    BuiltinPolicy,
    CapabilityRegistry,
    ErrorAnswer,
    PolicyRules,
    RegistryError,
    RouteExplanation,
    RouteOptions,
    RouteRequest,
    SnapshotAnswer,
    ValidationError,
    WatchAnswer,
    WorkerEndpoint,
    structure,
    unstructure,
)
from crank_registry import PolicyDenied as CorePolicyDenied
from crank_registry import UnknownCapability as CoreUnknownCapability

from ._client import ControllerClient, error_from_response
from ._config import TLSConfig, is_positive_seconds
from ._exceptions import (
    ClientError,
    ConfigurationError,
    ControllerError,
    ControllerUnavailable,
    RevisionGone,
)
from ._feed import changes_of, replica_of
from ._schedule import Outcome, next_heartbeat_delay
from .certificates import DEFAULT_EXPIRY_WARNING

__all__ = ["BOOKMARK_PERIOD", "RegistryFollower", "lag_limit"]

logger = logging.getLogger("crank_worker_client.follower")

#: The controller's SSE bookmark period at most (DESIGN, "Long poll and bookmarks").
BOOKMARK_PERIOD = 15.0
#: The longest long poll the controller takes (``crank_registry.MAX_WATCH_TIMEOUT``).
_MAX_POLL = 60.0
# What a route names itself as in its errors (the controller's say "POST /route").
_WHAT = "RegistryFollower.route"


def lag_limit(heartbeat_interval: float) -> float:
    """Seconds without hearing from the controller after which a follower asks it instead.

    ``max(2 x heartbeat_interval, 2 x bookmark period)``, where the
    bookmark period is ``min(15 s, heartbeat_interval / 2)``.
    """
    bookmark = min(BOOKMARK_PERIOD, heartbeat_interval / 2)
    return max(2 * heartbeat_interval, 2 * bookmark)


class RegistryFollower:
    """A replica of the controller's registry in this process; routes answered in-process.

    ``controller_url``, ``tls``, ``insecure``, ``transport``, ``timeout``
    and ``certificate_expiry_warning`` are :class:`ControllerClient`'s.
    ``identity`` is the SPIFFE ID this process routes as when a route
    names no ``requester_identity`` (the controller reads it from the
    client certificate; a follower is told), for the access policy that
    the snapshot and the feed carry (the controller's rules, and its trust
    domain); ``trust_domain`` is the controller's, used only with a
    controller whose policy does not travel (least privilege alone).
    ``trusted_gateway=True`` says that the controller lists ``identity``
    with ``--trusted-gateway``: only then may a route name a
    ``requester_identity`` (route for another identity), as the controller
    allows it only then. A route that goes to the controller (past the lag
    limit) waits at most ``stale_route_timeout`` seconds for it. ``clock`` (monotonic seconds;
    the event loop's by default) measures the lag; ``rng`` draws
    ``least_loaded``'s candidates.

    Use it as ``async with RegistryFollower(url) as follower:``; entering
    loads the snapshot (:class:`ControllerUnavailable` and the other client
    errors if it cannot), then the feed is followed in the background until
    the block ends. Works on asyncio and trio.
    """

    def __init__(
        self,
        controller_url: str | None = None,
        *,
        tls: TLSConfig | ssl.SSLContext | None = None,
        insecure: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
        certificate_expiry_warning: float = DEFAULT_EXPIRY_WARNING,
        identity: str | None = None,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        trusted_gateway: bool = False,
        stale_route_timeout: float = 1.0,
        clock: Callable[[], float] = anyio.current_time,
        rng: random.Random | None = None,
    ) -> None:
        if not is_positive_seconds(stale_route_timeout):
            raise ConfigurationError(
                f"stale_route_timeout must be a finite number > 0, got {stale_route_timeout!r}"
            )
        if trusted_gateway and identity is None:
            raise ConfigurationError(
                "trusted_gateway=True needs identity: the SPIFFE ID of this process's client "
                "certificate, as the controller's --trusted-gateway names it"
            )
        self._client = ControllerClient(
            controller_url,
            tls=tls,
            insecure=insecure,
            transport=transport,
            timeout=timeout,
            certificate_expiry_warning=certificate_expiry_warning,
        )
        self.controller_url = self._client.controller_url
        self._identity = identity
        self._trust_domain = trust_domain
        self._trusted_gateway = trusted_gateway
        # The options of a route that names none: only this process's identity, if any.
        self._plain = None if identity is None else RouteOptions(requester_identity=identity)
        self._stale_route_timeout = stale_route_timeout
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        # Calls in progress per worker (reserve()), told to each replica in use.
        self._calls: dict[str, int] = {}
        self._replica: CapabilityRegistry | None = None
        self._epoch = ""
        self._heard_at = -math.inf
        self._lag_limit = math.inf
        self._poll_timeout = _MAX_POLL
        self._retry_after = "1"
        # After the controller failed a route: when it may be asked again, and how often it failed.
        self._ask_controller_after = -math.inf
        self._controller_failures = 0
        self._task_group: anyio.abc.TaskGroup | None = None

    # -- the caller's API -------------------------------------------------

    @property
    def revision(self) -> int:
        """The revision of the last change applied (the snapshot's until one is)."""
        return 0 if self._replica is None else self._replica.revision

    @property
    def epoch(self) -> str:
        """The epoch (history) of the controller's registry that this replica follows."""
        return self._epoch

    @property
    def lag(self) -> float:
        """Seconds since the controller was last heard from (``inf`` before the snapshot)."""
        return self._clock() - self._heard_at

    @property
    def lag_limit(self) -> float:
        """The lag past which a route asks the controller (:func:`lag_limit` of its timings)."""
        return self._lag_limit

    @property
    def registry(self) -> CapabilityRegistry:
        """The replica routes are answered from (a core registry that routes by state).

        Read it, never change it: the follower applies the controller's
        changes to it, and swaps in a new one when it reloads the snapshot.
        """
        if self._replica is None:
            raise RuntimeError("the follower has no replica yet: use it in `async with`")
        return self._replica

    async def __aenter__(self) -> RegistryFollower:
        try:
            await self._load_snapshot()
        except BaseException:
            # No __aexit__ follows a failed entry: close the connections here.
            with anyio.CancelScope(shield=True):
                await self._client.aclose()
            raise
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        task_group.start_soon(self._follow, name=f"follower of {self.controller_url}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task_group, self._task_group = self._task_group, None
        try:
            if task_group is not None:
                task_group.cancel_scope.cancel()
                await task_group.__aexit__(None, None, None)
        finally:
            await self._client.aclose()

    async def route(
        self,
        verb: str,
        capability: str,
        *,
        version: str | None = None,
        exclude: Collection[str] | None = None,
        slo_constraints: Mapping[str, float] | None = None,
        budget_tokens: float | None = None,
        strategy: str | None = None,
        affinity_key: str | None = None,
        idempotency_key: str | None = None,
        requester_identity: str | None = None,
        explain: bool = False,
    ) -> WorkerEndpoint:
        """The worker to serve ``verb`` on ``capability``, as :meth:`ControllerClient.route` says.

        The same options, answer and errors: :class:`NoWorkerAvailable`
        when no routable worker meets them, :class:`UnknownCapability` when
        no worker offers the pair, :class:`PolicyDenied`,
        :class:`InvalidRequest` naming an invalid option. Answered from the
        replica without I/O while the lag is within its limit; past it,
        asked of the controller (module docstring). ``requester_identity``
        routes for that identity instead of this follower's ``identity``,
        and only for a follower made with ``trusted_gateway=True``: from any
        other it is :class:`ForbiddenError`, fresh or past the lag limit,
        as the controller's ``/route`` answers a caller that no
        ``--trusted-gateway`` names (a route must not work from the replica
        and fail once it asks the controller).
        A ``least_loaded`` route counts a hand-out that fades after one
        heartbeat interval; :meth:`reserve` counts a call until it ends.
        """
        replica = self._replica
        if replica is None:
            raise RuntimeError("the follower has no replica yet: use it in `async with`")
        if requester_identity is not None and not self._trusted_gateway:
            # The controller reads the request first (422), then refuses the field (403).
            _check_request(
                _route_body(
                    verb,
                    capability,
                    version=version,
                    exclude=exclude,
                    slo_constraints=slo_constraints,
                    budget_tokens=budget_tokens,
                    strategy=strategy,
                    affinity_key=affinity_key,
                    idempotency_key=idempotency_key,
                    requester_identity=requester_identity,
                )
            )
            raise self._requester_refused()
        now = self._clock()
        if now - self._heard_at > self._lag_limit and now >= self._ask_controller_after:
            answer = await self._route_through_controller(
                verb,
                capability,
                version=version,
                exclude=exclude,
                slo_constraints=slo_constraints,
                budget_tokens=budget_tokens,
                strategy=strategy,
                affinity_key=affinity_key,
                idempotency_key=idempotency_key,
                requester_identity=requester_identity,
                explain=explain,
            )
            if answer is not None:
                return answer
            replica, now = self.registry, self._clock()  # (reloaded meanwhile, perhaps)
        if (
            type(verb) is str
            and type(capability) is str
            and version is None
            and exclude is None
            and slo_constraints is None
            and budget_tokens is None
            and strategy is None
            and affinity_key is None
            and idempotency_key is None
            and requester_identity is None
            and not explain
        ):
            # The plain route, first: a known pair has valid names (a worker registered it).
            try:
                endpoint = replica.route(verb, capability, now=now, options=self._plain)
            except CoreUnknownCapability as unknown:
                _check_request({"verb": verb, "capability": capability})
                raise self._unknown(unknown) from None
            except CorePolicyDenied as denial:
                raise self._denied(denial) from None
            if endpoint is None:
                raise self._no_worker(verb, capability)
            return endpoint
        body = _route_body(
            verb,
            capability,
            version=version,
            exclude=exclude,
            slo_constraints=slo_constraints,
            budget_tokens=budget_tokens,
            strategy=strategy,
            affinity_key=affinity_key,
            idempotency_key=idempotency_key,
            requester_identity=requester_identity,
        )
        ask = _check_request(body)
        try:
            asked = RouteOptions.from_request(ask)
        except ValidationError as error:
            raise _invalid(error) from None
        # Whether the caller asked for options: this process's identity is not one.
        options = RouteOptions() if asked is None else asked
        if options.requester_identity is None and self._identity is not None:
            options = options.with_requester(self._identity)
        explanation = None
        try:
            if explain:
                endpoint, explanation = replica.explain_route(
                    verb, capability, now=now, options=options
                )
            else:
                endpoint = replica.route(verb, capability, now=now, options=options)
        except CoreUnknownCapability as unknown:
            raise self._unknown(unknown) from None
        except CorePolicyDenied as denial:
            raise self._denied(denial) from None
        if endpoint is None:
            raise self._no_worker(verb, capability, explain=explanation, optioned=asked is not None)
        return endpoint

    @contextlib.asynccontextmanager
    async def reserve(
        self, verb: str, capability: str, **options: Any
    ) -> AsyncIterator[WorkerEndpoint]:
        """``async with follower.reserve(verb, capability, **options) as endpoint:`` a counted call.

        :meth:`route` with ``options``, then the call to the worker counts
        toward its load for ``least_loaded`` from here until the block
        ends (in place of the route's fading hand-out).
        """
        endpoint = await self.route(verb, capability, **options)
        worker_id = endpoint.worker_id
        self._calls[worker_id] = self._calls.get(worker_id, 0) + 1
        self.registry.count_calls(worker_id, self._calls[worker_id])
        try:
            yield endpoint
        finally:
            left = self._calls.pop(worker_id) - 1
            if left:
                self._calls[worker_id] = left
            # The replica may have been replaced by a snapshot meanwhile: tell the one in use.
            self.registry.count_calls(worker_id, left)

    # -- following the feed -----------------------------------------------

    async def _load_snapshot(self) -> None:
        """Load ``/snapshot`` into a new replica and use it from now on."""
        answer = await self._client.snapshot()
        self._use_snapshot(answer)

    def _use_snapshot(self, answer: SnapshotAnswer) -> None:
        timings = answer.health_policy
        self._replica = replica_of(answer, rng=self._rng)
        for worker_id, calls in self._calls.items():
            self._replica.count_calls(worker_id, calls)
        if answer.access_policy is None:
            # The controller's policy does not travel (one set in-process, not
            # the built-in one): least privilege, which needs no rules, still holds.
            self._replica.set_access_policy(
                BuiltinPolicy(PolicyRules(), self._replica.required_targets, self._trust_domain)
            )
        self._epoch = answer.epoch
        self._lag_limit = lag_limit(timings.heartbeat_interval)
        self._poll_timeout = min(_MAX_POLL, self._lag_limit / 2)
        self._retry_after = str(max(1, math.ceil(timings.heartbeat_interval)))
        self._heard()
        logger.info(
            "follower of %s: loaded the snapshot at revision %d (epoch %s, %d workers)",
            self.controller_url,
            answer.revision,
            answer.epoch,
            len(answer.workers),
        )

    def _heard(self) -> None:
        self._heard_at = self._clock()
        self._controller_failures = 0
        self._ask_controller_after = -math.inf

    async def _follow(self) -> None:
        """Follow ``/watch`` for ever; reload the snapshot when the feed says to."""
        failures = 0
        reload = False
        while True:
            try:
                if reload:
                    await self._load_snapshot()
                    reload = False
                replica = self.registry
                answer = await self._client.watch(
                    since=replica.revision, epoch=self._epoch, timeout=self._poll_timeout
                )
                reload = not self._apply(answer)
                failures = 0
            except RevisionGone as gone:
                logger.info("follower of %s: %s; loading the snapshot", self.controller_url, gone)
                reload = True
            except (ClientError, RegistryError) as error:
                # RegistryError: a snapshot the core cannot hold. Routes go on
                # from the replica held, and the snapshot is asked for again.
                failures += 1
                interval = self.registry.policy.heartbeat_interval
                delay = next_heartbeat_delay(interval, Outcome.FAILED, failures, self._rng)
                logger.warning(
                    "follower of %s: %s; trying again in %.2f s", self.controller_url, error, delay
                )
                await anyio.sleep(delay)

    def _apply(self, answer: WatchAnswer) -> bool:
        """Apply a ``/watch`` answer with the one fold; ``False``: the snapshot must be loaded."""
        replica = self.registry
        if answer.epoch != self._epoch:
            logger.info(
                "follower of %s: the registry's epoch is %s, not %s; loading the snapshot",
                self.controller_url,
                answer.epoch,
                self._epoch,
            )
            return False
        try:
            changes = changes_of(answer)
            for change in changes:
                if change.revision <= replica.revision:
                    continue  # already held
                if change.revision != replica.revision + 1:
                    raise ValidationError.single(
                        "revision",
                        f"{change.revision} follows {replica.revision}: changes are missing",
                    )
                replica.apply(change)
        except RegistryError as error:
            logger.warning(
                "follower of %s: the feed cannot be applied at revision %d (%s); "
                "loading the snapshot",
                self.controller_url,
                replica.revision,
                error,
            )
            return False
        if answer.revision > replica.revision and not changes:
            return False  # a bookmark beyond what it sent: another history
        self._heard()
        return True

    # -- answers ----------------------------------------------------------

    async def _route_through_controller(
        self, verb: str, capability: str, **options: Any
    ) -> WorkerEndpoint | None:
        """The controller's answer; ``None`` (answer locally) when it gave none in time."""
        try:
            with anyio.fail_after(self._stale_route_timeout):
                return await self._client.route(verb, capability, **options)
        except (TimeoutError, ControllerUnavailable) as error:
            self._controller_failures += 1
            interval = self.registry.policy.heartbeat_interval
            delay = next_heartbeat_delay(
                interval, Outcome.FAILED, self._controller_failures, self._rng
            )
            self._ask_controller_after = self._clock() + delay
            logger.warning(
                "follower of %s: %.1f s behind and the controller did not answer a route "
                "(%s); answering from the replica, asking the controller again in %.2f s",
                self.controller_url,
                self.lag,
                str(error) or f"no answer in {self._stale_route_timeout:g} s",
                delay,
            )
            return None

    def _no_worker(
        self,
        verb: str,
        capability: str,
        *,
        explain: RouteExplanation | None = None,
        optioned: bool = False,
    ) -> ControllerError:
        """:class:`NoWorkerAvailable`, as the controller's 503 makes it."""
        message = f"no healthy worker for {verb!r} on {capability!r}"
        if optioned:
            message += " meets the route's options"
            if explain is None:
                message += " (ask with explain: true to see why)"
        body = ErrorAnswer(
            error="no_worker_available",
            message=message,
            verb=verb,
            capability=capability,
            explain=explain,
        )
        return _as_client_error(503, unstructure(body), {"Retry-After": self._retry_after})

    def _unknown(self, unknown: CoreUnknownCapability) -> ControllerError:
        """:class:`UnknownCapability`, as the controller's 404 makes it."""
        body = ErrorAnswer(
            error=unknown.code,
            message=str(unknown),
            verb=unknown.verb,
            capability=unknown.capability,
        )
        return _as_client_error(404, unstructure(body), {})

    def _requester_refused(self) -> ControllerError:
        """:class:`ForbiddenError`: the controller's 403 to an untrusted requester_identity."""
        who = "an anonymous follower" if self._identity is None else f"follower {self._identity!r}"
        body = ErrorAnswer(
            error="forbidden",
            message=(
                "requester_identity is accepted only from an identity named by the "
                f"controller's --trusted-gateway, and {who} is not made with "
                "trusted_gateway=True; drop the field to route as yourself"
            ),
        )
        return _as_client_error(403, unstructure(body), {})

    def _denied(self, denial: CorePolicyDenied) -> ControllerError:
        """:class:`PolicyDenied`, as the controller's 403 makes it."""
        body = ErrorAnswer(
            error=denial.code,
            message=str(denial),
            verb=denial.verb,
            capability=denial.capability,
            reason=denial.reason,
            explain=denial.explain,
        )
        return _as_client_error(403, unstructure(body), {})


def _as_client_error(
    status: int, body: dict[str, Any], headers: Mapping[str, str]
) -> ControllerError:
    """The client's error for an answer the controller would give: the same class and text."""
    response = httpx.Response(status, json=body, headers=headers)
    error = error_from_response(response, _WHAT)
    assert isinstance(error, ControllerError)  # only 4xx and 503 answers are made here
    return error


def _invalid(error: ValidationError) -> ControllerError:
    body = ErrorAnswer(error="invalid_request", message=str(error), detail=error.problems)
    return _as_client_error(422, unstructure(body), {})


def _check_request(body: Mapping[str, Any]) -> RouteRequest:
    """The route's request as the controller reads it; :class:`InvalidRequest` naming problems."""
    try:
        return structure(body, RouteRequest)
    except ValidationError as error:
        raise _invalid(error) from None


def _route_body(verb: str, capability: str, **options: Any) -> dict[str, Any]:
    """A ``POST /route`` body: the pair and the options given, in their JSON form.

    As :meth:`ControllerClient.route` sends them: options that are ``None``
    are left out.
    """
    if isinstance(options.get("exclude"), str):
        raise TypeError("exclude: a collection of worker ids, not one string")
    body = {name: value for name, value in options.items() if value is not None}
    if "exclude" in body:
        body["exclude"] = list(body["exclude"])
    if "slo_constraints" in body:
        body["slo_constraints"] = dict(body["slo_constraints"])
    return {"verb": verb, "capability": capability, **body}
