"""``WorkerAgent``: join the registry for the duration of an ``async with``.

On enter the agent registers (retrying while the controller is unreachable,
up to a deadline); while open, a background task heartbeats on the schedule
of :mod:`crank_worker_client._schedule` and repairs the registration when
the controller has forgotten the worker; on exit it deregisters within a
bounded time, whatever ended the block. Nothing the controller does, short
of refusing the first registration, raises into the worker: failures are
retried, logged once per outage and shown in :attr:`WorkerAgent.status`.

Given several controllers that share one registry, each exchange goes to
the one that answered last and, when it fails, on to the next at once
(:class:`~crank_worker_client.ControllerClient` does the trying): the
heartbeat that was due reaches another controller at its jittered time,
within one interval, and as a heartbeat, since the next controller knows
the worker; only ``worker_not_registered`` makes the agent register again.

Graceful shutdown (:meth:`WorkerAgent.drain`, and on exit): the agent
asks the controller to drain the worker, so that no new call is routed to
it, keeps heartbeating while the calls in flight finish (bounded by
``drain_timeout``; a drain request that found the controller unavailable
is repeated with backoff meanwhile), then deregisters. A controller whose registration
answer does not list ``drain`` (an older one) is not asked; the agent then
deregisters as before.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import httpx

from crank_registry import CapabilitySchema, LoadReport, Registration, ValidationError, iso_utc

from ._client import ControllerClient
from ._config import ControllerURLs, TLSConfig, is_positive_seconds
from ._exceptions import (
    ClientCertificateRequired,
    ClientError,
    ConfigurationError,
    ControllerError,
    ControllerUnavailable,
    InvalidRequest,
    RegistrationFailed,
    WorkerNotRegisteredError,
)
from ._schedule import Outcome, next_heartbeat_delay, registration_backoff
from .certificates import DEFAULT_EXPIRY_WARNING, DEFAULT_WATCH_INTERVAL, CertificateFiles

__all__ = ["AgentState", "AgentStatus", "CallsInFlight", "LoadSource", "WorkerAgent"]

logger = logging.getLogger("crank_worker_client")

#: What the agent asks for the worker's load before each heartbeat: a
#: :class:`~crank_registry.LoadReport`, or ``None`` for nothing to report.
LoadSource = Callable[[], LoadReport | None]

#: The controller feature that lets a heartbeat carry ``load``.
_LOAD_REPORTS = "load_reports"
#: The controller feature of ``POST /workers/{worker_id}/drain``.
_DRAIN = "drain"
#: How often the agent looks whether the calls in flight are over, while draining.
_CALLS_POLL = 0.02

#: What the agent asks for the number of calls the worker is serving, while it drains.
CallsInFlight = Callable[[], int]


class AgentState(enum.Enum):
    """Where the agent stands with the controller."""

    #: Not running (before ``async with`` and after it).
    STOPPED = "stopped"
    #: Registering at start-up.
    REGISTERING = "registering"
    #: Registered; the last heartbeat (or registration) was acknowledged.
    REGISTERED = "registered"
    #: The controller forgot the worker (restart, eviction); registering again.
    RE_REGISTERING = "re_registering"
    #: The controller is unreachable or failing (network error, timeout, 5xx).
    UNREACHABLE = "unreachable"
    #: The controller refuses the heartbeat or registration (403, 422, ...).
    REFUSED = "refused"
    #: Leaving: deregistering on exit.
    DEREGISTERING = "deregistering"


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else iso_utc(timestamp)


@dataclass(frozen=True)
class AgentStatus:
    """A snapshot of the agent, for the worker's own health endpoint.

    Times are wall-clock seconds (the agent's ``clock``). ``unreachable_since``
    is the first failure of the current outage (``None`` when the last
    exchange succeeded); ``last_heartbeat_at`` is the last acknowledged
    heartbeat or registration.
    """

    state: AgentState
    worker_id: str
    controller_url: str
    heartbeat_interval: float | None
    registered_at: float | None
    last_heartbeat_at: float | None
    unreachable_since: float | None
    consecutive_failures: int
    last_error: str | None
    registrations: int
    #: Shutting down: the controller was asked to route no new calls here.
    draining: bool = False

    @property
    def registered(self) -> bool:
        """True when the controller currently acknowledges this worker."""
        return self.state is AgentState.REGISTERED

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form; times as ISO 8601 UTC."""
        return {
            "state": self.state.value,
            "registered": self.registered,
            "worker_id": self.worker_id,
            "controller_url": self.controller_url,
            "heartbeat_interval_s": self.heartbeat_interval,
            "registered_at": _iso(self.registered_at),
            "last_heartbeat_at": _iso(self.last_heartbeat_at),
            "unreachable_since": _iso(self.unreachable_since),
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "registrations": self.registrations,
            "draining": self.draining,
        }


def _registration(
    worker_id: str, worker_url: str, capabilities: Iterable[CapabilitySchema]
) -> Registration:
    try:
        return Registration(worker_id, worker_url, tuple(capabilities))
    except ValidationError as error:
        raise ConfigurationError(f"invalid worker registration: {error}") from error


def _check_duration(name: str, value: float | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not is_positive_seconds(value):
        raise ConfigurationError(f"{name} must be a finite number of seconds > 0, got {value!r}")


class WorkerAgent:
    """Keeps one worker registered with the controller while an ``async with`` is open.

    ::

        async with WorkerAgent(None, "resnet-1", "https://10.0.0.7:8443", capabilities):
            await serve_forever()

    ``controller_url`` is one URL, several separated by commas, or a list of
    URLs of controllers that share one registry; ``None`` reads
    ``CONTROLLER_URL`` (default ``https://localhost:9000``), which may list
    several too; ``tls`` and ``insecure`` are as for
    :class:`ControllerClient`. An exchange that fails on one controller
    (network error, timeout, a 5xx other than ``store_unavailable`` or
    ``journal_unavailable``) goes on to the next at once, without
    re-registering; each controller tried gets an equal share of the
    exchange's time.

    On enter, registration is retried with capped exponential backoff and
    full jitter (``registration_backoff_base``, ``registration_backoff_cap``)
    for up to ``registration_deadline`` seconds
    (``None``: without limit), then :class:`RegistrationFailed` is raised; a
    refusal (403, 422) raises it at once. While open, heartbeats follow the
    controller's interval (jitter at most 10% of it); failures are retried
    with backoff from ``heartbeat_retry_base`` (default 1/16 of the interval)
    capped at one interval; ``worker_not_registered`` re-registers at once.
    On exit the worker drains first (:meth:`drain`, unless it was called
    already), then deregisters within ``deregister_timeout`` seconds, even
    when the block raised or was cancelled.

    ``calls_in_flight`` is called while draining for the number of calls
    the worker still serves (:data:`CallsInFlight`); the agent waits until
    it is 0, at most ``drain_timeout`` seconds (30) for the whole drain. An
    :func:`~crank_worker_client.serving.invocation_app` given this agent
    sets it to its meter's count when it is ``None``; without one, nothing
    is waited for.

    No heartbeat or re-registration waits longer than ``request_timeout``
    or one interval, whichever is shorter, for all the controllers it tries;
    the deregistration on exit, ``deregister_timeout``, tries each once.

    With a :class:`TLSConfig`, the certificate, key and CA files are
    checked every ``certificate_watch_interval`` seconds while the agent
    runs; renewed files are used for new connections, without a restart
    (:mod:`crank_worker_client.certificates`). A warning is logged when the
    worker's certificate expires within ``certificate_expiry_warning``
    seconds (7 days).

    ``load`` is called before each heartbeat for the worker's load
    (:data:`LoadSource`), which the heartbeat carries to a controller whose
    registration answer lists ``load_reports`` (never to an older one). An
    :func:`~crank_worker_client.serving.invocation_app` given this agent
    sets it to its own meter when it is ``None``; a source that raises or
    returns something else is logged, and the heartbeat goes without load.

    ``rng`` drives every jitter (default: a fresh ``random.Random()``);
    ``clock`` gives the wall-clock times shown in :attr:`status`;
    ``transport`` replaces httpx's network transport. Works under asyncio
    and trio. An agent may be entered again after it exited, not twice at once.
    """

    def __init__(
        self,
        controller_url: ControllerURLs,
        worker_id: str,
        worker_url: str,
        capabilities: Iterable[CapabilitySchema],
        *,
        tls: TLSConfig | ssl.SSLContext | None = None,
        insecure: bool = False,
        registration_deadline: float | None = 60.0,
        registration_backoff_base: float = 0.2,
        registration_backoff_cap: float = 5.0,
        heartbeat_retry_base: float | None = None,
        deregister_timeout: float = 5.0,
        request_timeout: float = 10.0,
        certificate_watch_interval: float = DEFAULT_WATCH_INTERVAL,
        certificate_expiry_warning: float = DEFAULT_EXPIRY_WARNING,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        load: LoadSource | None = None,
        drain_timeout: float = 30.0,
        calls_in_flight: CallsInFlight | None = None,
    ) -> None:
        _check_duration("registration_deadline", registration_deadline, optional=True)
        _check_duration("registration_backoff_base", registration_backoff_base)
        _check_duration("registration_backoff_cap", registration_backoff_cap)
        _check_duration("heartbeat_retry_base", heartbeat_retry_base, optional=True)
        _check_duration("deregister_timeout", deregister_timeout)
        _check_duration("request_timeout", request_timeout)
        _check_duration("certificate_watch_interval", certificate_watch_interval)
        _check_duration("drain_timeout", drain_timeout)
        self._registration = _registration(worker_id, worker_url, capabilities)
        self._client = ControllerClient(
            controller_url,
            tls=tls,
            insecure=insecure,
            transport=transport,
            timeout=request_timeout,
            certificate_expiry_warning=certificate_expiry_warning,
        )
        self._certificate_watch_interval = certificate_watch_interval
        self._registration_deadline = registration_deadline
        self._registration_backoff_base = registration_backoff_base
        self._registration_backoff_cap = registration_backoff_cap
        self._heartbeat_retry_base = heartbeat_retry_base
        self._deregister_timeout = deregister_timeout
        self._request_timeout = request_timeout
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        #: Where the heartbeats' load comes from (``None``: they carry none).
        self.load = load
        self._drain_timeout = drain_timeout
        #: How many calls the worker serves, waited for while draining (``None``: none).
        self.calls_in_flight = calls_in_flight
        self._task_group: anyio.abc.TaskGroup | None = None
        self._running = False
        self._reset()

    def _reset(self) -> None:
        self._state = AgentState.STOPPED
        self._interval: float | None = None
        self._features: frozenset[str] = frozenset()
        self._load_failing = False
        self._needs_registration = False
        self._registered_at: float | None = None
        self._last_ack_at: float | None = None
        self._unreachable_since: float | None = None
        self._outage_started = 0.0
        self._outage_kind: AgentState | None = None
        self._failures = 0
        self._last_error: str | None = None
        self._registrations = 0
        self._draining = False
        self._drained = False

    # -- what the worker sees --------------------------------------------

    @property
    def worker_id(self) -> str:
        """The worker's id, as registered."""
        return self._registration.worker_id

    @property
    def worker_url(self) -> str:
        """Where the worker listens, as registered."""
        return self._registration.worker_url

    @property
    def capabilities(self) -> tuple[CapabilitySchema, ...]:
        """The capabilities the agent registers (the current ones)."""
        return self._registration.capabilities

    @property
    def certificates(self) -> CertificateFiles | None:
        """The TLS files in use and their live context (``None`` without a :class:`TLSConfig`)."""
        return self._client.certificates

    @property
    def controller_url(self) -> str:
        """The current controller's base URL: the one that answered last."""
        return self._client.controller_url

    @property
    def controller_urls(self) -> tuple[str, ...]:
        """Every controller's base URL, in the order given."""
        return self._client.controller_urls

    @property
    def status(self) -> AgentStatus:
        """A snapshot of the agent's state, for the worker's health endpoint."""
        return AgentStatus(
            state=self._state,
            worker_id=self.worker_id,
            controller_url=self.controller_url,
            heartbeat_interval=self._interval,
            registered_at=self._registered_at,
            last_heartbeat_at=self._last_ack_at,
            unreachable_since=self._unreachable_since,
            consecutive_failures=self._failures,
            last_error=self._last_error,
            registrations=self._registrations,
            draining=self._draining,
        )

    async def update_capabilities(self, capabilities: Iterable[CapabilitySchema]) -> None:
        """Replace the capabilities and, while running, register them now.

        The controller replaces the worker's capabilities atomically. If the
        controller cannot be told now, the error is raised and the heartbeat
        task keeps retrying the registration on its schedule.
        """
        self._registration = _registration(self.worker_id, self.worker_url, capabilities)
        if not self._running:
            return
        try:
            await self._register_once()
        except ClientError:
            self._needs_registration = True
            raise

    # -- the context manager ---------------------------------------------

    async def __aenter__(self) -> WorkerAgent:
        if self._running:
            raise RuntimeError(f"WorkerAgent {self.worker_id!r} is already running")
        self._running = True
        self._reset()
        try:
            await self._register_at_startup()
            task_group = anyio.create_task_group()
            await task_group.__aenter__()
        except BaseException:
            self._state = AgentState.STOPPED
            self._running = False
            with anyio.CancelScope(shield=True):
                await self._client.aclose()
            raise
        self._task_group = task_group
        task_group.start_soon(self._heartbeat_loop, name=f"heartbeats of {self.worker_id}")
        certificates = self.certificates
        if certificates is not None:
            task_group.start_soon(
                certificates.watch,
                self._certificate_watch_interval,
                name=f"certificate files of {self.worker_id}",
            )
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
                if not self._drained:
                    # Heartbeats go on while the calls finish; a cancelled block
                    # drains too, never for longer than drain_timeout.
                    with anyio.CancelScope(shield=True):
                        await self.drain()
                task_group.cancel_scope.cancel()
                # The block's own exception is not handed to the task group:
                # it would come out wrapped in an ExceptionGroup. Returning
                # None lets it propagate unchanged.
                await task_group.__aexit__(None, None, None)
        finally:
            try:
                await self._leave()
            finally:
                self._running = False

    # -- graceful shutdown ------------------------------------------------

    async def drain(self) -> bool:
        """Stop new calls coming, and wait for the calls in flight: the first half of a shutdown.

        Asks the controller to drain the worker (when it lists the ``drain``
        feature), then waits until :attr:`calls_in_flight` says 0, all of
        it within ``drain_timeout``; heartbeats go on meanwhile, and a
        re-registration (the controller forgot the worker) drains it again,
        and a controller that was unavailable (network error, 5xx) is asked
        again with the heartbeats' backoff until it answers or the calls end.
        Returns whether the calls finished in time. Errors are logged, never
        raised: the worker leaves either way. Call it when the worker is
        told to stop, before its server stops taking requests; the exit of
        the ``async with`` calls it if it was not called.
        """
        self._draining = True
        finished = False
        with anyio.move_on_after(self._drain_timeout):
            if await self._ask_to_drain():
                await self._calls_finished()
            else:
                # Until the controller hears of the drain it routes new calls here:
                # ask again while the calls finish, but leave once they are over.
                async with anyio.create_task_group() as retries:
                    retries.start_soon(self._ask_to_drain_again)
                    await self._calls_finished()
                    retries.cancel_scope.cancel()
            finished = True
        self._drained = True
        if not finished:
            logger.warning(
                "worker %s: calls still in flight after draining for %g s; leaving anyway",
                self.worker_id,
                self._drain_timeout,
            )
        return finished

    async def _ask_to_drain(self, *, retry: int = 0) -> bool:
        """Ask the controller to route no new calls here (if it knows how); log a failure.

        Returns ``False`` when the controller was unavailable (worth asking
        again), ``True`` otherwise. ``retry`` counts the earlier failed
        requests: only the first failure is logged as a warning.
        """
        if _DRAIN not in self._features:
            return True  # an older controller: it routes here until the deregistration
        try:
            await self._client.drain(self.worker_id, timeout=self._attempt_timeout())
        except WorkerNotRegisteredError:
            # Forgotten (restarted): the heartbeats register it again, and drain it then.
            logger.info("worker %s: not registered while draining", self.worker_id)
        except ControllerUnavailable as error:
            logger.log(
                logging.DEBUG if retry else logging.WARNING,
                "worker %s could not drain at %s: %s; asking again with backoff while it "
                "waits for its calls",
                self.worker_id,
                self.controller_url,
                error,
            )
            return False
        except Exception as error:
            # An answer the controller meant: asking again would get it again.
            logger.warning(
                "worker %s could not drain at %s: %s; it waits for its calls all the same",
                self.worker_id,
                self.controller_url,
                error,
            )
        else:
            logger.info("worker %s draining at %s", self.worker_id, self.controller_url)
        return True

    async def _ask_to_drain_again(self) -> None:
        """Ask until the controller answers, with the heartbeats' backoff after a failure."""
        assert self._interval is not None  # the controller listed drain: registered
        failures = 1
        while True:
            delay = next_heartbeat_delay(
                self._interval,
                Outcome.FAILED,
                failures,
                self._rng,
                retry_base=self._heartbeat_retry_base,
            )
            await anyio.sleep(delay)
            if await self._ask_to_drain(retry=failures):
                return
            failures += 1

    async def _calls_finished(self) -> None:
        """Return once the worker serves no call (at once without a count)."""
        source = self.calls_in_flight
        if source is None:
            return
        while True:
            try:
                if source() <= 0:
                    return
            except Exception as error:
                logger.warning(
                    "worker %s: calls_in_flight failed (%s); not waiting for calls",
                    self.worker_id,
                    error,
                )
                return
            await anyio.sleep(_CALLS_POLL)

    # -- start-up ---------------------------------------------------------

    async def _register_at_startup(self) -> None:
        self._state = AgentState.REGISTERING
        limit = self._registration_deadline
        deadline = math.inf if limit is None else anyio.current_time() + limit
        failures = 0
        last_error: ControllerUnavailable | None = None
        while True:
            with anyio.move_on_after(deadline - anyio.current_time()):
                try:
                    await self._register_once()
                except ControllerUnavailable as error:
                    last_error = error
                except (ControllerError, ClientCertificateRequired) as error:
                    raise RegistrationFailed(
                        f"the controller at {self.controller_url} refused to register "
                        f"worker {self.worker_id!r}: {error}"
                    ) from error
                else:
                    if failures:
                        logger.info(
                            "worker %s registered with %s after %d failed attempts",
                            self.worker_id,
                            self.controller_url,
                            failures,
                        )
                    return
            failures += 1
            self._note_failure(
                last_error or ControllerUnavailable("the registration timed out"),
                AgentState.REGISTERING,
            )
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                raise RegistrationFailed(
                    f"could not register worker {self.worker_id!r} with "
                    f"{self._controllers_named()} within {limit:g} s ({failures} attempts); "
                    f"last error: {last_error or 'the registration timed out'}"
                ) from last_error
            delay = registration_backoff(
                failures,
                self._rng,
                base=self._registration_backoff_base,
                cap=self._registration_backoff_cap,
            )
            await anyio.sleep(min(delay, remaining))

    def _controllers_named(self) -> str:
        """``the controller at URL``, or ``any of the controllers at URL, URL...``."""
        urls = self.controller_urls
        if len(urls) == 1:
            return f"the controller at {urls[0]}"
        return f"any of the controllers at {', '.join(urls)}"

    # -- while open -------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        outcome = Outcome.ACKNOWLEDGED
        while True:
            assert self._interval is not None  # set by the registration
            delay = next_heartbeat_delay(
                self._interval,
                outcome,
                self._failures,
                self._rng,
                retry_base=self._heartbeat_retry_base,
            )
            await anyio.sleep(delay)
            outcome = await self._exchange()

    async def _exchange(self) -> Outcome:
        """One heartbeat (or registration, when one is owed) and what came of it."""
        registering = self._needs_registration
        try:
            # The client bounds each try (_attempt_timeout), so the exchange too.
            if registering:
                await self._register_once()
            else:
                await self._heartbeat_once()
        except WorkerNotRegisteredError as error:
            if registering:
                # Not an answer a registration should get; retry on the
                # backoff schedule instead of spinning.
                self._note_failure(error, AgentState.REFUSED)
                return Outcome.FAILED
            logger.info(
                "controller %s does not know worker %s (restarted or evicted); re-registering",
                self.controller_url,
                self.worker_id,
            )
            self._needs_registration = True
            self._state = AgentState.RE_REGISTERING
            return Outcome.NOT_REGISTERED
        except ControllerUnavailable as error:
            self._note_failure(error, AgentState.UNREACHABLE)
            return Outcome.FAILED
        except (ControllerError, ClientCertificateRequired) as error:
            self._note_failure(error, AgentState.REFUSED)
            return Outcome.FAILED
        except Exception as error:
            # Whatever goes wrong, the worker keeps running and the agent retries.
            logger.exception("unexpected error talking to the controller %s", self.controller_url)
            self._note_failure(error, AgentState.UNREACHABLE)
            return Outcome.FAILED
        return Outcome.ACKNOWLEDGED

    def _attempt_timeout(self) -> float:
        """How long one controller is given in an exchange: its share of the exchange's time.

        A heartbeat that hangs longer than an interval would delay the next
        one past it; once the interval is known, no exchange waits longer,
        whichever controllers it tries.
        """
        exchange = self._request_timeout
        if self._interval is not None:
            exchange = min(exchange, self._interval)
        return exchange / len(self.controller_urls)

    async def _register_once(self) -> None:
        ack = await self._client.register(self._registration, timeout=self._attempt_timeout())
        now = self._clock()
        self._interval = ack.heartbeat_interval
        self._features = frozenset(ack.features)
        self._registered_at = now
        self._registrations += 1
        self._needs_registration = False
        self._acknowledged(now)
        if self._draining:
            # A registration ends a drain (the controller sees a new process): drain again.
            await self._ask_to_drain()

    async def _heartbeat_once(self) -> None:
        load = self._load_report()
        try:
            ack = await self._client.heartbeat(
                self.worker_id, timeout=self._attempt_timeout(), load=load
            )
        except InvalidRequest as error:
            if load is None or not any(p.path.startswith("load") for p in error.problems):
                raise
            # A controller that listed the feature and refuses the field (an
            # older one took its place): no more load until it lists it again.
            logger.warning(
                "worker %s: controller %s refuses load reports (%s); heartbeats go without "
                "load until a registration lists load_reports again",
                self.worker_id,
                self.controller_url,
                error,
            )
            self._features = self._features - {_LOAD_REPORTS}
            ack = await self._client.heartbeat(self.worker_id, timeout=self._attempt_timeout())
        self._interval = ack.heartbeat_interval
        self._acknowledged(self._clock())

    def _load_report(self) -> LoadReport | None:
        """The load to send: ``None`` without a source or the controller's feature."""
        source = self.load
        if source is None or _LOAD_REPORTS not in self._features:
            return None
        try:
            report = source()
            if report is not None and not isinstance(report, LoadReport):
                raise TypeError(f"returned {type(report).__name__}, not a LoadReport")
        except Exception as error:
            # The worker keeps its heartbeats; the failure is logged once until it recovers.
            if not self._load_failing:
                logger.warning(
                    "worker %s: the load source failed (%s); heartbeats go without load",
                    self.worker_id,
                    error,
                )
            self._load_failing = True
            return None
        self._load_failing = False
        return report

    def _acknowledged(self, now: float) -> None:
        if self._failures:
            logger.info(
                "controller %s answers again for worker %s after %.1f s (%d failed attempts)",
                self.controller_url,
                self.worker_id,
                anyio.current_time() - self._outage_started,
                self._failures,
            )
        self._last_ack_at = now
        self._state = AgentState.REGISTERED
        self._failures = 0
        self._unreachable_since = None
        self._outage_kind = None
        self._last_error = None

    def _note_failure(self, error: BaseException, state: AgentState) -> None:
        """Record a failed exchange; log it once per outage (and when its kind changes)."""
        if self._failures == 0:
            self._unreachable_since = self._clock()
            self._outage_started = anyio.current_time()
        self._failures += 1
        self._last_error = str(error)
        self._state = state
        if self._outage_kind is not state:
            self._outage_kind = state
            logger.warning(
                "worker %s: controller %s %s: %s; retrying with backoff (logged once per outage)",
                self.worker_id,
                self.controller_url,
                "refuses" if state is AgentState.REFUSED else "is unreachable",
                error,
            )
        else:
            logger.debug("worker %s: attempt %d failed: %s", self.worker_id, self._failures, error)

    # -- exit ---------------------------------------------------------------

    async def _leave(self) -> None:
        self._state = AgentState.DEREGISTERING
        # Shielded: a cancelled worker still leaves, but never for longer than
        # deregister_timeout, shared among the controllers (each tried once).
        with anyio.CancelScope(shield=True):
            try:
                await self._client.deregister(
                    self.worker_id,
                    timeout=self._deregister_timeout / len(self.controller_urls),
                )
            except WorkerNotRegisteredError:
                logger.info("worker %s was not registered any more", self.worker_id)
            except Exception as error:
                logger.warning(
                    "worker %s could not deregister from %s: %s",
                    self.worker_id,
                    self.controller_url,
                    error,
                )
            else:
                logger.info("worker %s deregistered from %s", self.worker_id, self.controller_url)
        with anyio.CancelScope(shield=True):
            await self._client.aclose()
        self._state = AgentState.STOPPED
