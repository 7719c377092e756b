"""The registry: who can do what, who is healthy, who gets the next request.

Every call that depends on time takes ``now`` (seconds since the epoch);
nothing here reads a clock, sleeps, logs or does I/O.

A mutator first *decides*: it asks the state table
(:mod:`._health`) what its input does to the worker's state at ``now``
and builds the events that the table says it emits, numbered with the
next revisions. Then it *applies* them with :meth:`CapabilityRegistry.apply`,
the one fold, which a journal replay and a replica use too. So every
change of state is made in one place, from an event.

Deciding and applying are separate for a service with a store
(``decide_register``, ``decide_heartbeat``, ``decide_deregister``,
``decide_sweep``, then :meth:`~CapabilityRegistry.confirm` or
:meth:`~CapabilityRegistry.discard_pending`): a change is applied only
once the store has made it durable, so a write the store refused changes
nothing. Between the two the change is *pending*:

* a decision reserves its revisions (the next after the last decided), so
  concurrent decisions never share one;
* a decision sees the changes decided before it: each worker with a
  pending change has a :class:`_Pending` entry (its state, last heartbeat
  and deadline as the pending changes leave them), which the next decision
  about that worker starts from; the sweep leaves such a worker for a
  later pass;
* the store makes changes durable in revision order, so
  :meth:`~CapabilityRegistry.confirm` applies the pending changes up to a
  revision, in order; when a write fails the store fails every write
  queued behind it too (they were decided on its outcome), so
  :meth:`~CapabilityRegistry.discard_pending` drops every pending change.

Heartbeats are not changes: a heartbeat is applied when it is decided
(nothing waits for it to be durable; a heartbeat of a worker whose
registration is still pending changes nothing, as the worker is not held
yet). The in-memory mutators (``register``...) decide and confirm at once.

Where things are kept, so that no hot path scans the registry:

* ``_workers``: worker id -> :class:`~._records.Worker`, in registration order;
* ``_rotations``: ``(verb, name)`` -> :class:`~._rotation.Rotation`, the
  round-robin ring of that capability's members;
* ``_values``: ``(verb, name)`` -> the distinct capability values its
  workers registered, each stored once (:class:`~._records.CapabilityValues`);
* ``_everyone``: every worker's registration order (:class:`~._listing.OrderIndex`),
  and ``_by_capability``: the same per ``(verb, name)``, with ``_keys``
  those pairs sorted: listings page from them without a scan;
* ``_deadlines``: a heap of ``(deadline, n, worker)``. An entry that
  surfaces before its worker's current deadline (a heartbeat moved it) is
  pushed again, so a sweep costs what it changes plus, amortised, one push
  per worker per ``evict_after``;
* ``_watch``: self-preservation's windows and the workers it holds out of
  the heap (:mod:`._preservation`); ``_routable_count``, the workers held
  in a routable state (a window's count, kept by the fold, never counted
  by a scan);
* ``_ejections``: a heap of ``(until, n, worker id)``, the deadlines of the
  ejections (:mod:`._ejection`) the sweep ends with ``restored``; an entry
  whose worker is no longer ejected until then is skipped. ``_outcomes``:
  the failures in a row of this process' calls, per worker (not registry
  state).
"""

from __future__ import annotations

import bisect
import collections
import heapq
import itertools
import math
import operator
import random
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import attrs

from . import _health as health
from ._converter import structure, unstructure
from ._ejection import EjectionSettings, Outcomes, ejection_seconds, streak_before, within_cap
from ._errors import PolicyDenied, UnknownCapability, ValidationError, WorkerNotRegistered
from ._events import (
    ENTERED,
    Change,
    Event,
    HeartbeatReceived,
    PolicyChanged,
    RegistryChange,
    Reinstatement,
    SelfPreservationChanged,
    SlosChanged,
    Snapshot,
    WorkerChange,
    WorkerDeregistered,
    WorkerDraining,
    WorkerEjected,
    WorkerEvicted,
    WorkerHealthy,
    WorkerImported,
    WorkerRegistered,
    WorkerRestored,
    WorkerUndrained,
    WorkerUnhealthy,
    heartbeat_received,
)
from ._feed import DEFAULT_FEED_WINDOW, MAX_FEED_PAGE, ChangeLog, SnapshotCopy
from ._health import Health, HealthInput, Refusal
from ._listing import (
    CapabilitiesPage,
    CapabilitiesPager,
    CapabilityPosition,
    Counts,
    OrderIndex,
    WorkerCounter,
    WorkersPage,
    WorkersPager,
)
from ._models import (
    CapabilityKey,
    CapabilitySchema,
    CapabilityView,
    HealthPolicy,
    HealthState,
    LoadReport,
    Registration,
    RouteExplanation,
    WorkerEndpoint,
    WorkerRecord,
    WorkerState,
    WorkerView,
    parse_capability_label,
)
from ._policy import AccessRules, BuiltinPolicy, Policy
from ._preservation import SelfPreservationSettings, Watch, returns_to, still_silenced
from ._records import CapabilityValues, Load, Member, Worker
from ._rotation import Rotation
from ._routing import (
    NO_SLOS,
    IdempotencyMemory,
    RouteOptions,
    RoutingSettings,
    choose,
    policy_explanation,
)
from ._slos import ServiceLevels, SloFile

__all__ = ["STATE_FORMAT_VERSION", "CapabilityRegistry"]

_Setting = TypeVar("_Setting", bound=RegistryChange)

_HEARTBEAT_ONLY = (HeartbeatReceived,)

# Every option but the requester: a route asking none of them stays on the O(1) path.
_FILTER_OPTIONS = tuple(
    field.name for field in attrs.fields(RouteOptions) if field.name != "requester_identity"
)


def _only_requester(options: RouteOptions) -> bool:
    """Whether ``options`` asks nothing but the access policy's requester."""
    return all(getattr(options, name) is None for name in _FILTER_OPTIONS)


#: The version of the snapshot written by :meth:`CapabilityRegistry.export_state`.
STATE_FORMAT_VERSION = 1


class _Pending:
    """A worker as the changes decided for it, not yet applied, leave it.

    ``health`` is ``None`` when they remove it; ``revision`` is the last of them.
    """

    __slots__ = ("deadline", "health", "last_heartbeat", "revision")

    def __init__(
        self, state: Health | None, last_heartbeat: float, revision: int, policy: HealthPolicy
    ) -> None:
        self.health = state
        self.last_heartbeat = last_heartbeat
        self.revision = revision
        self.deadline = (
            math.inf if state is None else health.deadline(state, last_heartbeat, policy)
        )


class CapabilityRegistry:
    """The registry of workers and their capabilities.

    Example, with explicit time::

        registry = CapabilityRegistry()
        now = 1_700_000_000.0
        registry.register("w1", "https://w1:8443", [capability], now=now)
        registry.route("classify", "image.classify", now=now)

    ``routes_by_state=True`` makes a replica that a change feed keeps (a
    follower): it hears no heartbeats, so its workers' states change only
    by the events it applies, never by time; a worker is routable while
    its state is (``healthy`` or ``unverified``), whatever ``now`` is.

    ``access_rules``: the built-in policy's rules the registry's history
    starts under, not a change (a service starts every history under the
    same default rules, so that a replay, which starts there too, agrees;
    other rules are then a :class:`PolicyChanged`). ``None``: no policy.

    ``ejection``: when this process' reports of failed calls
    (:meth:`report_outcome`) eject a worker (:mod:`._ejection`).
    """

    def __init__(
        self,
        policy: HealthPolicy | None = None,
        routing: RoutingSettings | None = None,
        *,
        rng: random.Random | None = None,
        feed_window: int = DEFAULT_FEED_WINDOW,
        routes_by_state: bool = False,
        self_preservation: SelfPreservationSettings | None = None,
        access_rules: AccessRules | None = None,
        ejection: EjectionSettings | None = None,
    ) -> None:
        # A replica fed by the change feed hears no heartbeats, so time must
        # not change its states, only events: its states have no deadline.
        self._routes_by_state = routes_by_state
        self._deadline = health.no_deadline if routes_by_state else health.deadline
        # The last feed_window changes, for the change feed (every change the fold applies).
        self._feed = ChangeLog(feed_window)
        self._policy = policy if policy is not None else HealthPolicy()
        self._routing = routing if routing is not None else RoutingSettings()
        # least_loaded's draws. The core seeds nothing from the system: a
        # service passes a Random seeded by the OS, a test a seeded one.
        self._rng = rng if rng is not None else random.Random(0)
        # What idempotency keys were given (routing options); not registry state.
        self._idempotency = IdempotencyMemory(self._routing)
        # The operator's SLO files (set_slos: a change).
        self._slos = NO_SLOS
        # The built-in policy's rules (set_access_rules: a change), or None. A
        # history may start under rules (access_rules): then only a change from
        # them is an event.
        self._access_rules = access_rules
        # Asked before every route when set: the built-in policy of _access_rules,
        # or a custom one (set_access_policy); _anonymous_access, the policy a
        # plain route asks (_use_access).
        self._access: Policy | None = None
        self._anonymous_access: Policy | None = None
        self._use_access(
            None if access_rules is None else access_rules.policy(self.required_targets)
        )
        # Self-preservation (._preservation): when it began, as applied (None: not
        # in it), and the sweep's bookkeeping of windows and held workers.
        self._preserving_since: float | None = None
        self._watch = Watch(
            self_preservation if self_preservation is not None else SelfPreservationSettings(),
            self._policy.evict_after,
        )
        # How many workers are held in a routable state (a window's watched count).
        self._routable_count = 0
        # Outlier ejection (._ejection): the settings this process decides with, its
        # calls' failures in a row, the ejections' deadlines and how many are ejected.
        self._ejection = ejection if ejection is not None else EjectionSettings()
        self._outcomes = Outcomes()
        self._ejections: list[tuple[float, int, str]] = []
        self._ejected_count = 0
        self._revision = 0
        self._workers: dict[str, Worker] = {}
        self._rotations: dict[CapabilityKey, Rotation] = {}
        self._values: dict[CapabilityKey, CapabilityValues] = {}
        self._deadlines: list[tuple[float, int, Worker]] = []
        self._everyone = OrderIndex()
        self._by_capability: dict[CapabilityKey, OrderIndex] = {}
        self._keys: list[CapabilityKey] = []
        # Ties in the heap go by registration order (never by comparing
        # workers), so that equal registries sweep in the same order.
        self._registrations = itertools.count()
        # Deregistrations remembered so that an import cannot resurrect the
        # worker; kept for evict_after (older remote records are expired).
        self._tombstones: dict[str, float] = {}
        self._tombstone_expiry: collections.deque[tuple[float, str, float]] = collections.deque()
        # Changes decided, not yet applied (module docstring), in revision order.
        self._decided = 0
        self._pending: collections.deque[Change] = collections.deque()
        self._pending_workers: dict[str, _Pending] = {}

    @property
    def policy(self) -> HealthPolicy:
        """The timings this registry applies."""
        return self._policy

    @property
    def routes_by_state(self) -> bool:
        """Whether routability is the state alone (a replica), not the state and the time."""
        return self._routes_by_state

    @property
    def routing(self) -> RoutingSettings:
        """The routing settings this registry applies (idempotency TTL and memory bound)."""
        return self._routing

    @property
    def slos(self) -> tuple[SloFile, ...]:
        """The SLO files in effect (:meth:`set_slos`), in the order of their names."""
        return self._slos.files

    def set_slos(self, files: Iterable[SloFile], *, now: float) -> tuple[Event, ...]:
        """Put these SLO files in effect, replacing all the previous ones at once: a change.

        Returns the :class:`SlosChanged` it applied, or nothing when the
        files are those in effect already. Routes with ``slo_constraints``
        check them from the next call (:func:`~crank_registry.effective_slo`).
        Raises :class:`ValidationError` naming the file when two files
        state the SLO of the same capability for the same versions; the
        previous files stay in effect then.
        """
        return self._commit(self.decide_slos(files, now=now))

    def decide_slos(self, files: Iterable[SloFile], *, now: float) -> tuple[Event, ...]:
        """The change :meth:`set_slos` makes, pending until :meth:`confirm`; raises alike."""
        _check_now(now)
        levels = ServiceLevels(files)
        pending = self._last_pending(SlosChanged)
        if levels.files == (self._slos.files if pending is None else pending.slos):
            return ()
        return self._hold(SlosChanged(now, levels.files, revision=self._decided + 1))

    @property
    def access_rules(self) -> AccessRules | None:
        """The built-in policy's rules in effect (:meth:`set_access_rules`); ``None``: none.

        ``None`` also while a custom policy is asked (:meth:`set_access_policy`).
        """
        return self._access_rules

    def set_access_rules(self, rules: AccessRules, *, now: float) -> tuple[Event, ...]:
        """Route under the built-in policy with ``rules`` from now on: a change.

        Returns the :class:`PolicyChanged` it applied, or nothing when these
        rules are in effect already. Unlike a custom policy, the built-in
        one travels: it is journalled, in the change feed and in snapshots.
        """
        return self._commit(self.decide_access_rules(rules, now=now))

    def decide_access_rules(self, rules: AccessRules, *, now: float) -> tuple[Event, ...]:
        """The change :meth:`set_access_rules` makes, pending until :meth:`confirm`."""
        _check_now(now)
        if not isinstance(rules, AccessRules):
            raise ValidationError.single("rules", f"expected AccessRules, got {rules!r}")
        pending = self._last_pending(PolicyChanged)
        if rules == (self._access_rules if pending is None else pending.access_policy):
            return ()
        return self._hold(PolicyChanged(now, rules, revision=self._decided + 1))

    @property
    def access_policy(self) -> Policy | None:
        """The access policy asked before every route; ``None``: everyone may route anywhere."""
        return self._access

    def set_access_policy(self, policy: Policy | None) -> None:
        """Ask ``policy`` (code of this process) before every route from now on (``None``: none).

        For a custom policy. Not a change: code cannot be journalled nor
        sent to a follower, so it is this registry's alone, and
        :attr:`access_rules` is ``None`` from now on (a snapshot then holds
        no access policy, and a follower routes without one). The built-in
        policy travels: use :meth:`set_access_rules`.
        """
        self._use_access(policy)
        self._access_rules = None

    def _use_access(self, policy: Policy | None) -> None:
        """Ask ``policy`` before every route from now on.

        A plain route (anonymous, no option) does not ask the built-in
        policy when it allows every anonymous route (no ``--policy`` file):
        the answer is known, and asking was half of a plain route's time.
        """
        self._access = policy
        anonymous_allowed = isinstance(policy, BuiltinPolicy) and policy.allows_anonymous
        self._anonymous_access = None if anonymous_allowed else policy

    def required_targets(self, worker_id: str) -> frozenset[str] | None:
        """The ``verb:name`` labels a registered worker declared it needs, for least privilege.

        The union of ``required_capabilities`` over its capabilities;
        ``None`` when it is not registered or declared them on none.
        """
        worker = self._workers.get(worker_id)
        if worker is None:
            return None
        declared = [
            capability.required_capabilities
            for capability in worker.capabilities
            if capability.required_capabilities is not None
        ]
        if not declared:
            return None
        return frozenset(label for labels in declared for label in labels)

    @property
    def self_preservation(self) -> float | None:
        """When self-preservation began (:mod:`._preservation`); ``None``: not in it."""
        return self._preserving_since

    @property
    def ejection_settings(self) -> EjectionSettings:
        """When this process' reports of failed calls eject a worker (:meth:`report_outcome`)."""
        return self._ejection

    @property
    def ejected_count(self) -> int:
        """How many workers are ejected now (outlier ejection)."""
        return self._ejected_count

    def ejected_until(self, worker_id: str) -> float | None:
        """Until when ``worker_id`` is ejected; ``None``: it is not (or is not registered)."""
        worker = self._workers.get(worker_id)
        return None if worker is None else worker.ejected_until

    @property
    def self_preservation_settings(self) -> SelfPreservationSettings:
        """When self-preservation starts and how long it lasts at most."""
        return self._watch.settings

    @property
    def revision(self) -> int:
        """The revision of the last change applied (0: none yet)."""
        return self._revision

    @property
    def feed(self) -> ChangeLog:
        """The window of recent changes (:mod:`._feed`) the change feed answers from."""
        return self._feed

    def changes_since(
        self, revision: int, limit: int = MAX_FEED_PAGE
    ) -> tuple[tuple[Change, ...], int]:
        """The changes after ``revision`` and the latest revision (:meth:`ChangeLog.since`)."""
        return self._feed.since(revision, limit)

    @property
    def pending(self) -> tuple[Change, ...]:
        """The changes decided and not yet confirmed nor discarded, in revision order."""
        return tuple(self._pending)

    # ------------------------------------------------------------------ writes

    def register(
        self,
        worker_id: str,
        worker_url: str,
        capabilities: Iterable[CapabilitySchema],
        *,
        now: float,
    ) -> tuple[Event, ...]:
        """Register a worker, or replace a known one's URL and capabilities atomically.

        Raises :class:`ValidationError` (nothing changes) for an invalid
        worker id or URL, an empty capability list or a ``(verb, name)``
        given twice.
        """
        return self._commit(self.decide_register(worker_id, worker_url, capabilities, now=now))

    def heartbeat(
        self, worker_id: str, *, now: float, load: LoadReport | None = None
    ) -> tuple[Event, ...]:
        """Record that a worker is alive, and its ``load`` if the heartbeat reports it.

        The load is kept with ``now`` (not an event, not journalled); a
        heartbeat without one leaves the previous report as it was.

        Raises :class:`WorkerNotRegistered` for a worker that is unknown,
        restored but not re-registered (``unverified``), or silent for more
        than ``evict_after``: each of them must register again.
        """
        return self._commit(self.decide_heartbeat(worker_id, now=now, load=load))

    def deregister(self, worker_id: str, *, now: float) -> tuple[Event, ...]:
        """Remove a worker that is leaving; raises :class:`WorkerNotRegistered` if unknown."""
        return self._commit(self.decide_deregister(worker_id, now=now))

    def drain(self, worker_id: str, *, now: float) -> tuple[Event, ...]:
        """Send a worker no new routes from now on; it keeps its registration: ``draining``.

        Returns the :class:`WorkerDraining` it applied, or nothing when the
        worker is draining already. The worker goes on heartbeating while
        its calls in flight finish (then it deregisters);
        :meth:`undrain` returns it, and so does its next registration (a
        new worker process; not the one of a worker held ``unverified``,
        which repairs a restart). Health goes on as before: a draining worker
        still falls silent and is evicted. Raises
        :class:`WorkerNotRegistered` for a worker not held.
        """
        return self._commit(self.decide_drain(worker_id, now=now))

    def undrain(self, worker_id: str, *, now: float) -> tuple[Event, ...]:
        """End a worker's drain: :class:`WorkerUndrained`, or nothing when it is not draining.

        Raises :class:`WorkerNotRegistered` for a worker not held.
        """
        return self._commit(self.decide_undrain(worker_id, now=now))

    def report_outcome(
        self, worker_id: str, verb: str, capability: str, *, ok: bool, now: float
    ) -> tuple[Event, ...]:
        """Tell how a call this process sent ``worker_id`` for ``(verb, capability)`` ended.

        ``ok``: any answer but a 5xx; a failure is a refused or reset
        connection, a timeout or a 5xx from the worker. Returns the
        :class:`WorkerEjected` it applied when this failure ejects the
        worker (:mod:`._ejection`), else nothing.
        """
        return self._commit(self.decide_outcome(worker_id, verb, capability, ok=ok, now=now))

    def cleanup_stale(self, *, now: float) -> tuple[Event, ...]:
        """The sweep: silent past ``unhealthy_after``: unhealthy; past ``evict_after``: evicted.

        Returns the ``unhealthy`` and ``evicted`` events, in the order of
        their deadlines, and a ``self_preservation`` change when it begins
        or ends (:mod:`._preservation`: while it lasts, no worker is made
        unhealthy or evicted). Costs in proportion to the deadlines that
        have passed, not to the size of the registry.
        """
        events, swept = self._sweep(now)
        self._commit(events)
        for worker in swept:
            if self._workers.get(worker.worker_id) is worker:
                self._push(worker)  # silent now: this pushes its expiry
        return events

    # ------------------------------------------------- deciding, for a store

    def decide_register(
        self,
        worker_id: str,
        worker_url: str,
        capabilities: Iterable[CapabilitySchema],
        *,
        now: float,
    ) -> tuple[Event, ...]:
        """The events :meth:`register` causes, pending until :meth:`confirm` applies them.

        Raises as :meth:`register` does (nothing is then decided).
        """
        registration = Registration(worker_id, worker_url, tuple(capabilities))
        _check_now(now)
        return self._decide(worker_id, HealthInput.REGISTER, now, registration=registration)

    def decide_heartbeat(
        self, worker_id: str, *, now: float, load: LoadReport | None = None
    ) -> tuple[Event, ...]:
        """The events :meth:`heartbeat` causes; raises as it does.

        The heartbeat itself is applied at once (it is not a change), and so
        is its ``load``; a change it causes (``healthy``) is pending until
        :meth:`confirm`.
        """
        _check_now(now)
        worker = self._workers.get(worker_id)
        if worker is None:
            events = self._decide(worker_id, HealthInput.HEARTBEAT, now)  # refused
        elif now < worker.last_heartbeat:
            raise ValidationError.single(
                "now", "is earlier than the worker's last heartbeat (time never goes backwards)"
            )
        else:
            events = self._steady_heartbeat(worker, now) or self._decide(
                worker_id, HealthInput.HEARTBEAT, now
            )
        if load is not None:
            self._report_load(worker_id, load, now)
        return events

    def _steady_heartbeat(self, worker: Worker, now: float) -> tuple[Event, ...]:
        """The common heartbeat, decided and applied; ``()`` for any other (take the plain path).

        A healthy worker heard before its deadline, neither draining nor
        ejected, with no change pending for it and no self-preservation: the
        state table's ``(HEALTHY, HEARTBEAT)`` entry, a :class:`HeartbeatReceived`
        and nothing else, which :meth:`_decide` then :meth:`apply` reach through the table, the
        pending shadows and the fold's dispatch (most of a heartbeat's cost,
        benchmarks/core.py). tests/core/test_heartbeat.py checks that both
        paths leave equal registries and return equal events.
        """
        if (
            worker.health is not Health.HEALTHY
            or now > worker.deadline
            or worker.parked
            or worker.draining
            or worker.ejected_until is not None
            or self._preserving_since is not None
            or worker.worker_id in self._pending_workers
        ):
            return ()
        if now > worker.last_heartbeat:
            # _refresh of a healthy worker that no route parked: a later deadline
            # (the heap's entry for the earlier one wakes the sweep in time), to
            # which it stays routable.
            worker.last_heartbeat = now
            worker.deadline = worker.routable_until = self._deadline(
                Health.HEALTHY, now, self._policy
            )
        return (heartbeat_received(worker.worker_id, now),)

    def report_load(self, worker_id: str, report: LoadReport, *, now: float) -> None:
        """Keep a load report another controller heard in a heartbeat at ``now``.

        What :meth:`heartbeat` does with its ``load``, alone: a replica of a
        shared registry learns the loads its peers heard this way. Not an
        event and not a change; a worker not held keeps none.
        """
        _check_now(now)
        self._report_load(worker_id, report, now)

    def decide_deregister(self, worker_id: str, *, now: float) -> tuple[Event, ...]:
        """The events :meth:`deregister` causes, pending until :meth:`confirm`; raises alike."""
        _check_now(now)
        return self._decide(worker_id, HealthInput.DEREGISTER, now)

    def decide_drain(self, worker_id: str, *, now: float) -> tuple[Event, ...]:
        """The change :meth:`drain` makes, pending until :meth:`confirm`; raises alike."""
        return self._decide_drain(worker_id, now, draining=True)

    def decide_undrain(self, worker_id: str, *, now: float) -> tuple[Event, ...]:
        """The change :meth:`undrain` makes, pending until :meth:`confirm`; raises alike."""
        return self._decide_drain(worker_id, now, draining=False)

    def _decide_drain(self, worker_id: str, now: float, *, draining: bool) -> tuple[Event, ...]:
        """Decide that ``worker_id`` starts or stops draining: nothing when it is so already."""
        _check_now(now)
        current = self._draining_as_decided(worker_id)
        if current is None:
            raise WorkerNotRegistered(worker_id)
        if current is draining:
            return ()
        kind = WorkerDraining if draining else WorkerUndrained
        change = kind(worker_id, now, revision=self._decided + 1)
        self._decided = change.revision
        self._pending.append(change)
        return (change,)

    def _draining_as_decided(self, worker_id: str) -> bool | None:
        """Whether ``worker_id`` drains as the changes decided leave it; ``None``: not held.

        The fold's rules, run over the worker's pending changes in order.
        """
        worker = self._workers.get(worker_id)
        held = worker is not None
        draining = worker is not None and worker.draining
        verified = worker is not None and worker.health.verified
        for change in self._pending:
            if not isinstance(change, WorkerChange) or change.worker_id != worker_id:
                continue
            if isinstance(change, (WorkerDraining, WorkerUndrained)):
                draining = isinstance(change, WorkerDraining)
            elif isinstance(change, WorkerRegistered):
                draining = held and _drain_outlives_registration(
                    draining=draining, verified=verified
                )
                held = verified = True
            elif isinstance(change, WorkerImported):
                held, draining, verified = True, False, False
            elif isinstance(change, (WorkerDeregistered, WorkerEvicted)):
                held = draining = False
        return draining if held else None

    def decide_outcome(
        self, worker_id: str, verb: str, capability: str, *, ok: bool, now: float
    ) -> tuple[Event, ...]:
        """The ejection :meth:`report_outcome` causes, pending until :meth:`confirm`.

        The failure is counted at once (this process' count, not a change),
        but not for a worker not registered or ejected already (the calls
        it had in flight): its count starts again. Nothing is decided for
        such a worker, one whose ejection is pending, or when the ejection would take the
        pair's ejected share over the cap as this registry sees it now (its
        count stays: each later failure tries again); the fold checks the
        cap again when it applies the change.
        """
        _check_now(now)
        outcomes = self._outcomes
        worker = self._workers.get(worker_id)
        if ok or worker is None or worker.ejected_until is not None:
            outcomes.forget(worker_id)  # kept only while failing: bounded by the workers
            return ()
        settings = self._ejection
        if not settings.enabled or outcomes.failed(worker_id) < settings.after_failures:
            return ()
        pending = [change for change in self._pending if isinstance(change, WorkerEjected)]
        if any(change.worker_id == worker_id for change in pending):
            return ()
        key = (verb, capability)
        pending_here = sum(1 for change in pending if (change.verb, change.capability) == key)
        if not self._ejection_fits(key, settings.max_ejected_percent, pending_here):
            return ()
        outcomes.forget(worker_id)
        ejections = streak_before(worker.ejections, worker.ejection_ended, now) + 1
        return self._hold(
            WorkerEjected(
                worker_id,
                now,
                now + ejection_seconds(ejections),
                verb,
                capability,
                settings.max_ejected_percent,
                ejections,
                revision=self._decided + 1,
            )
        )

    def _ejection_fits(self, key: CapabilityKey, max_ejected_percent: float, more: int = 0) -> bool:
        """Whether one more ejection (and ``more`` pending) keeps ``key``'s share within the cap.

        O(the pair's workers): ejections are rare.
        """
        rotation = self._rotations.get(key)
        members = () if rotation is None else rotation.everyone()
        ejected = sum(1 for member in members if member.worker.ejected_until is not None)
        return within_cap(ejected + more, len(members), max_ejected_percent)

    def decide_sweep(self, *, now: float) -> tuple[Event, ...]:
        """The events :meth:`cleanup_stale` causes, pending until :meth:`confirm`.

        A worker with a pending change is left for a later sweep; so is
        every worker swept here until its change is applied (a sweep after
        :meth:`discard_pending` decides it again).
        """
        events, swept = self._sweep(now)
        for worker in swept:
            self._push(worker)  # still at its old deadline: due again until applied
        return events

    def confirm(self, revision: int) -> None:
        """The store made the pending changes up to ``revision`` durable: apply them, in order."""
        pending = self._pending
        shadows = self._pending_workers
        while pending and pending[0].revision <= revision:
            change = pending.popleft()
            self.apply(change)
            if not isinstance(change, WorkerChange):
                continue
            shadow = shadows.get(change.worker_id)
            if shadow is not None and shadow.revision == change.revision:
                del shadows[change.worker_id]

    def discard_pending(self) -> tuple[Change, ...]:
        """The store failed: drop every pending change (none is applied); returns them.

        Every one goes: the store fails the writes queued behind a failed
        one, since they were decided on its outcome. The next decision
        takes the revision after the last applied change again.
        """
        dropped = tuple(self._pending)
        self._pending.clear()
        self._pending_workers.clear()
        self._decided = self._revision
        watch = self._watch
        watch.since = self._preserving_since  # as applied
        if watch.since is None:
            self._push_back(watch.release())
        return dropped

    def _push_back(self, workers: Iterable[Worker]) -> None:
        """Put workers the sweep held back in the deadline heap (those still held)."""
        for worker in workers:
            if self._workers.get(worker.worker_id) is worker:
                self._push(worker)

    def _sweep(self, now: float) -> tuple[tuple[Event, ...], list[Worker]]:
        """Decide the time-driven changes due at ``now``; also the workers they concern.

        The workers decided on (and those with a change pending) are out of
        the deadline heap; the caller pushes them back. Self-preservation
        (:mod:`._preservation`) is decided here: before the silences of
        this pass, whether they start it; while it lasts, the workers due
        are held instead, and whether it ends.
        """
        _check_now(now)
        watch = self._watch
        events: list[Event] = []
        swept: dict[str, Worker] = {}
        self._decide_restorations(now, events)
        heap = self._deadlines
        # Every entry due now, in deadline order (popped in order: a heap).
        due: list[tuple[float, int, Worker]] = []
        while heap and heap[0][0] < now:
            due.append(heapq.heappop(heap))
        restart_window = False
        if not watch.preserving:
            falling = self._falling_silent(due, now)
            if watch.enters(falling):
                for worker_id in falling:
                    watch.fell_silent(worker_id)
                reinstated = watch.reinstate(
                    now, self._policy.unhealthy_after, self._still_silenced
                )
                events += self._preservation_change(
                    now, active=True, reason=ENTERED, reinstated=reinstated
                )
        if watch.preserving:
            self._hold_due(due, now, swept)
            due = []  # each one held, left for later or pushed back: none is decided now
            reason = watch.ends(now)
            if reason is None:
                self._expire_tombstones(now)
                return tuple(events), list(swept.values())
            events += self._preservation_change(now, active=False, reason=reason)
            # The workers still silent: a grace of unhealthy_after, then judged.
            later = watch.grace_until = now + self._policy.unhealthy_after
            for worker in watch.release():
                if self._workers.get(worker.worker_id) is worker:
                    watch.grace.add(worker.worker_id)
                    heapq.heappush(self._deadlines, (later, worker.order, worker))
            restart_window = True
        silenced = self._decide_due(due, now, events, swept)
        if restart_window or watch.window_over(now):
            if now > watch.grace_until:
                watch.grace.clear()  # every one was judged at the grace's end
            # Routable now: held in a routable state, less those found silent just
            # now and those in the grace.
            watched = self._routable_count - silenced - len(watch.grace)
            watch.start_window(now, watched, self._policy.unhealthy_after)
        self._expire_tombstones(now)
        return tuple(events), list(swept.values())

    def _decide_restorations(self, now: float, events: list[Event]) -> None:
        """Decide ``restored`` for every ejection whose deadline has come by ``now``.

        Self-preservation does not hold them back (a restoration makes a
        worker routable, it judges no silence). A restoration decided stays
        in the heap until applied: when the store drops it, or it is
        discarded, a later sweep decides it again; one pending is not
        decided twice.
        """
        heap = self._ejections
        due: list[tuple[float, int, str]] = []
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap))
        if not due:
            return
        pending = {
            change.worker_id for change in self._pending if isinstance(change, WorkerRestored)
        }
        for entry in due:
            until, _, worker_id = entry
            worker = self._workers.get(worker_id)
            if worker is None or worker.ejected_until != until:
                continue  # ended, or the worker left, since this entry was pushed
            heapq.heappush(heap, entry)  # until it is applied
            if worker_id not in pending:
                events += self._hold(
                    WorkerRestored(worker_id, now, until, revision=self._decided + 1)
                )

    def _still_silenced(self, reinstatement: Reinstatement) -> bool:
        """Whether its worker is, as the changes decided leave it, in the silence it undoes."""
        shadow = self._pending_workers.get(reinstatement.worker_id)
        if shadow is not None:
            return still_silenced(reinstatement, shadow.health, shadow.last_heartbeat)
        worker = self._workers.get(reinstatement.worker_id)
        return worker is not None and still_silenced(
            reinstatement, worker.health, worker.last_heartbeat
        )

    def _falling_silent(self, due: list[tuple[float, int, Worker]], now: float) -> list[str]:
        """The workers of ``due`` whose silence the sweep would decide now."""
        shadows = self._pending_workers
        return [
            worker.worker_id
            for _, _, worker in due
            if self._workers.get(worker.worker_id) is worker
            and worker.worker_id not in shadows
            and health.due_input(worker.health, worker.last_heartbeat, now, self._policy)
            is HealthInput.SILENCE
        ]

    def _hold_due(
        self, due: list[tuple[float, int, Worker]], now: float, swept: dict[str, Worker]
    ) -> None:
        """Self-preservation: keep every worker due out of the heap, deciding nothing."""
        watch = self._watch
        for _, _, worker in due:
            worker_id = worker.worker_id
            if self._workers.get(worker_id) is not worker:
                continue  # replaced or removed since this entry was pushed
            if worker_id in self._pending_workers:
                swept[worker_id] = worker  # a change of it is pending: a later sweep
                continue
            given = health.due_input(worker.health, worker.last_heartbeat, now, self._policy)
            if given is None:
                self._push(worker)  # a heartbeat moved its deadline on
            else:
                watch.hold(worker, silent=given is HealthInput.SILENCE)

    def _decide_due(
        self,
        heap: list[tuple[float, int, Worker]],
        now: float,
        events: list[Event],
        swept: dict[str, Worker],
    ) -> int:
        """Decide the changes of the entries of ``heap`` (all due); returns the silences decided."""
        shadows = self._pending_workers
        decided: set[str] = set()  # workers decided on in this sweep
        silenced = 0
        while heap:
            _, _, worker = heapq.heappop(heap)
            worker_id = worker.worker_id
            if self._workers.get(worker_id) is not worker:
                continue  # replaced or removed since this entry was pushed
            shadow = shadows.get(worker_id)
            if shadow is None:
                state, last_heartbeat = worker.health, worker.last_heartbeat
            elif worker_id in decided and shadow.health is not None:
                state, last_heartbeat = shadow.health, shadow.last_heartbeat
            else:
                swept[worker_id] = worker  # a change of it is pending: a later sweep decides
                continue
            due = health.due_input(state, last_heartbeat, now, self._policy)
            if due is None:
                if shadow is None:
                    self._push(worker)  # a heartbeat moved its deadline on
                continue  # (else an older entry of a worker decided on: in swept)
            events += self._decide(worker_id, due, now, state=state)
            if due is HealthInput.SILENCE:
                if self._watch.fell_silent(worker_id):
                    # Reinstated, should self-preservation begin soon (._preservation).
                    self._watch.made_unhealthy(worker_id, state, last_heartbeat, now)
                silenced += 1
            decided.add(worker_id)
            swept[worker_id] = worker
            shadow = shadows[worker_id]
            if shadow.deadline < now:
                # Silent past evict_after too: its expiry is due in this sweep.
                heapq.heappush(heap, (shadow.deadline, worker.order, worker))
        return silenced

    def _expire_tombstones(self, now: float) -> None:
        expiry = self._tombstone_expiry
        while expiry and expiry[0][0] < now:
            _, worker_id, at = expiry.popleft()
            if self._tombstones.get(worker_id) == at:
                del self._tombstones[worker_id]

    def _preservation_change(
        self,
        now: float,
        *,
        active: bool,
        reason: str,
        reinstated: tuple[Reinstatement, ...] = (),
    ) -> tuple[Event, ...]:
        """Decide that self-preservation begins (reinstating ``reinstated``) or ends at ``now``."""
        watch = self._watch
        change = SelfPreservationChanged(
            now,
            active,
            reason,
            len(watch.silenced),
            watch.watched,
            reinstated,
            revision=self._decided + 1,
        )
        watch.since = now if active else None
        return self._hold(change)

    def import_remote_state(
        self, controller_id: str, state: Mapping[str, Any], *, now: float
    ) -> tuple[Event, ...]:
        """Merge a snapshot exported by another controller.

        Per worker the record with the newest heartbeat wins (a tie keeps
        the local one, so importing your own export changes nothing); an
        imported record is ``unverified`` here. A worker deregistered here
        later than the remote's heartbeat is not resurrected, and records
        already past ``evict_after`` are ignored; a remote heartbeat later
        than ``now`` (a clock that is ahead) counts as ``now``. Raises
        :class:`ValidationError` (nothing changes) for a malformed snapshot.
        """
        _check_now(now)
        events: list[Event] = []
        for record in _parse_state(state):
            last_heartbeat = min(record.last_heartbeat, now)
            if health.state_at(Health.UNVERIFIED, last_heartbeat, now, self._policy) is None:
                continue
            deregistered_at = self._tombstones.get(record.worker_id)
            if deregistered_at is not None and deregistered_at >= last_heartbeat:
                continue
            local = self._workers.get(record.worker_id)
            if local is not None and local.last_heartbeat >= last_heartbeat:
                continue
            imported = WorkerRecord(
                record.worker_id, record.worker_url, record.capabilities, last_heartbeat
            )
            events += self._commit(
                self._decide(
                    record.worker_id, HealthInput.IMPORT, now, record=imported, source=controller_id
                )
            )
        return tuple(events)

    # ------------------------------------------------------- the one fold

    def apply(self, event: Event) -> None:
        """Apply one event: the only way the registry's workers change.

        A heartbeat moves a worker's last heartbeat forward (one for a
        worker not held, or older than the last, changes nothing: it is not
        a change). A :class:`Change` must come after the registry's
        revision (:class:`ValidationError` otherwise) and replays the
        transition of the state table that emitted it
        (:data:`~._health.CAUSES`): :class:`WorkerNotRegistered` if the
        table refuses it for the worker's state, and
        :class:`~._health.TransitionError` if the table has no such
        transition. Nothing changes when it raises.
        """
        if isinstance(event, HeartbeatReceived):
            worker = self._workers.get(event.worker_id)
            if worker is not None and event.at > worker.last_heartbeat:
                worker.last_heartbeat = event.at
                self._refresh(worker)
            if self._preserving_since is not None:
                self._heard(event.worker_id)
            return
        if not isinstance(event, Change):
            raise TypeError(f"not a registry event: {event!r}")
        if event.revision <= self._revision:
            raise ValidationError.single(
                "revision", f"{event.revision} is not after the registry's {self._revision}"
            )
        if isinstance(event, RegistryChange):
            self._apply_setting(event)
        elif isinstance(event, WorkerChange):
            self._apply_worker_change(event)
        else:
            raise TypeError(f"not a registry change: {event!r}")
        self._revision = event.revision
        self._decided = max(self._decided, event.revision)
        if isinstance(event, (WorkerRegistered, WorkerImported)):
            # The feed's window keeps the capabilities the registry stores (shared
            # by equal registrations), not the ones this event brought: a window
            # of 100 000 registrations would otherwise keep every worker's copy.
            event = attrs.evolve(event, capabilities=self._workers[event.worker_id].capabilities)
        self._feed.record(event)

    def _apply_setting(self, event: RegistryChange) -> None:
        """Apply a change of the whole registry: it replaces a setting with its new value."""
        match event:
            case SlosChanged():
                self._slos = ServiceLevels(event.slos)
            case PolicyChanged():
                self._access_rules = event.access_policy
                self._use_access(event.access_policy.policy(self.required_targets))
            case SelfPreservationChanged():
                self._preserving_since = event.at if event.active else None
                # The sweep decided it already; a replay or a replica learns it here.
                watch = self._watch
                if event.active and not watch.preserving:
                    watch.since = event.at
                    watch.start_window(event.at, event.watched, self._policy.unhealthy_after)
                elif not event.active and watch.preserving:
                    watch.since = None
                    self._push_back(watch.release())
                for reinstatement in event.reinstated:
                    self._reinstate(reinstatement)
            case _:
                raise TypeError(f"not a registry change: {event!r}")

    def _reinstate(self, reinstatement: Reinstatement) -> None:
        """Put a worker back in the routable state its silence took it from (if still silent).

        Its last heartbeat stays (no heartbeat is faked): routable while
        self-preservation lasts, held by the sweep like the workers found
        due, and judged as they are once it ends. A worker no longer in that
        silence (heard from, gone, registered again) is skipped.
        """
        worker = self._workers.get(reinstatement.worker_id)
        if worker is None or not still_silenced(
            reinstatement, worker.health, worker.last_heartbeat
        ):
            return
        self._routable_count += 1  # from a silent state to a routable one
        worker.health = returns_to(reinstatement)
        self._refresh(worker)  # its earlier deadline: the next sweep holds it

    def _heard(self, worker_id: str) -> None:
        """Self-preservation: ``worker_id`` was heard from or left; the sweep takes it back."""
        held = self._watch.heard(worker_id)
        if held is not None and self._workers.get(worker_id) is held:
            self._push(held)

    def _apply_worker_change(self, event: WorkerChange) -> None:
        """Apply a change of one worker: replay the state table's transition that emitted it.

        A drain and an ejection are beside the health states, not among them.
        A drain sets the worker's ``draining`` flag (a second ``draining``
        leaves it set), and a registration, which holds a new record, clears
        it (:func:`_drain_outlives_registration` says when it does not).
        """
        if isinstance(event, (WorkerEjected, WorkerRestored)):
            self._apply_ejection(event)  # a flag beside the health state, not in its table
            return
        if isinstance(event, (WorkerDraining, WorkerUndrained)):
            drained = self._workers.get(event.worker_id)
            if drained is None:
                raise WorkerNotRegistered(event.worker_id)
            drained.draining = isinstance(event, WorkerDraining)
            self._refresh(drained)
            return
        if self._preserving_since is not None and not isinstance(event, WorkerUnhealthy):
            self._heard(event.worker_id)
        held = self._workers.get(event.worker_id)
        step = health.transition(None if held is None else held.health, health.CAUSES[type(event)])
        if isinstance(step, Refusal):
            raise WorkerNotRegistered(event.worker_id)
        match event:
            case WorkerRegistered():
                assert step.to is not None
                self._install(
                    event.worker_id,
                    event.worker_url,
                    event.capabilities,
                    step.to,
                    event.at,
                    draining=held is not None
                    and _drain_outlives_registration(
                        draining=held.draining, verified=held.health.verified
                    ),
                )
                self._tombstones.pop(event.worker_id, None)
            case WorkerImported():
                assert step.to is not None
                self._install(
                    event.worker_id,
                    event.worker_url,
                    event.capabilities,
                    step.to,
                    event.last_heartbeat,
                )
            case WorkerHealthy() | WorkerUnhealthy():
                assert held is not None and step.to is not None
                self._routable_count += (step.to in health.ROUTABLE) - (
                    held.health in health.ROUTABLE
                )
                held.health = step.to
                # The heartbeat the change was decided on (one not journaled, or
                # not sent to a replica, still counts).
                heard = event.at if isinstance(event, WorkerHealthy) else event.last_heartbeat
                held.last_heartbeat = max(held.last_heartbeat, heard)
                self._refresh(held)
            case WorkerDeregistered():
                assert held is not None
                self._remove(held)
                self._tombstones[event.worker_id] = event.at
                self._tombstone_expiry.append(
                    (event.at + self._policy.evict_after, event.worker_id, event.at)
                )
            case WorkerEvicted():
                assert held is not None
                self._remove(held)
            case _:
                raise TypeError(f"not a registry change: {event!r}")

    def _apply_ejection(self, event: WorkerEjected | WorkerRestored) -> None:
        """Apply an ejection or a restoration; one that does not apply now is dropped.

        Raises :class:`WorkerNotRegistered` for a worker not held. Dropped
        (the revision passes, nothing changes): an ejection of a worker
        ejected already, or one that would take the ejected share of its
        ``(verb, capability)`` over its cap (checked here, in revision
        order, so every registry drops the same one); a restoration of an
        ejection that is not the worker's current one.
        """
        worker = self._workers.get(event.worker_id)
        if worker is None:
            raise WorkerNotRegistered(event.worker_id)
        if isinstance(event, WorkerRestored):
            if worker.ejected_until == event.until:
                self._set_ejection(worker, None, worker.ejections, event.at)
            return
        if worker.ejected_until is None and self._ejection_fits(
            (event.verb, event.capability), event.max_ejected_percent
        ):
            self._set_ejection(worker, event.until, event.ejections, worker.ejection_ended)

    def _set_ejection(
        self, worker: Worker, until: float | None, ejections: int, ended: float
    ) -> None:
        """Eject ``worker`` until ``until`` (``None``: restore it), keeping its streak."""
        self._ejected_count += (until is not None) - (worker.ejected_until is not None)
        worker.ejected_until = until
        worker.ejections = ejections
        worker.ejection_ended = ended
        if until is not None:
            heapq.heappush(self._ejections, (until, worker.order, worker.worker_id))
        self._refresh(worker)

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Replace the whole registry with ``snapshot`` (its workers, settings and revision).

        Each worker is held in the state its record's ``verified`` and
        ``silent`` describe. The snapshot's access policy and SLO files
        replace this registry's (a custom policy too: a snapshot holding
        no access policy leaves none).
        """
        for worker in self._workers.values():
            _unlink(worker)
        self._workers.clear()
        self._routable_count = 0
        self._rotations.clear()
        self._values.clear()
        self._deadlines.clear()
        self._everyone.clear()
        self._by_capability.clear()
        self._keys.clear()
        self._tombstones.clear()
        self._tombstone_expiry.clear()
        self._pending.clear()
        self._pending_workers.clear()
        self._ejections.clear()
        self._ejected_count = 0
        self._restore(snapshot.workers)
        self._slos = ServiceLevels(snapshot.slos)
        # No window yet: workers the first sweep finds silent are not counted.
        self._watch.forget()
        self._preserving_since = self._watch.since = snapshot.self_preservation
        if snapshot.self_preservation is not None:
            self._watch.start_window(
                snapshot.self_preservation, self._routable_count, self._policy.unhealthy_after
            )
        self._access_rules = snapshot.access_policy
        self._use_access(
            None
            if snapshot.access_policy is None
            else snapshot.access_policy.policy(self.required_targets)
        )
        self._revision = self._decided = snapshot.revision
        # The changes before the snapshot are not this registry's to hand out.
        self._feed.reset(snapshot.revision)

    def restart(self, *, now: float | None = None) -> None:
        """Say that this registry restarted: it has heard from none of its workers since.

        Every worker becomes ``unverified`` (routable while its last
        heartbeat is recent, answered ``worker_not_registered`` on heartbeat
        until it registers again). ``now``, the restarted service's time,
        is what the replayed times are compared with: a last heartbeat later
        than it (written by a clock that was ahead, or before the wall clock
        was set back) counts as ``now``, so that a silent worker is not
        routable for the size of the difference. Not a change: routability
        stays as it was, so there is no event and no revision.
        """
        if now is not None:
            _check_now(now)
        for worker in self._workers.values():
            step = health.transition(worker.health, HealthInput.RESTART)
            assert isinstance(step, health.Transition) and step.to is not None
            self._routable_count += (step.to in health.ROUTABLE) - (
                worker.health in health.ROUTABLE
            )
            worker.health = step.to
            if now is not None and worker.last_heartbeat > now:
                worker.last_heartbeat = now
            self._refresh(worker)
        if not self._watch.preserving:
            # A new window starts at the next sweep: the workers silent since
            # before the restart are not counted as falling silent in it.
            self._push_back(self._watch.forget())

    def restore(self, records: Iterable[WorkerRecord], *, now: float) -> int:
        """Load records of workers this registry has not heard from; returns how many were kept.

        Each becomes ``unverified``. Records already past ``evict_after``
        are dropped; a last heartbeat later than ``now`` (a clock that was
        ahead) counts as ``now``. Not a change: no revision.
        """
        _check_now(now)
        kept = 0
        for record in records:
            last_heartbeat = min(record.last_heartbeat, now)
            if health.state_at(Health.UNVERIFIED, last_heartbeat, now, self._policy) is None:
                continue
            self._install(
                record.worker_id,
                record.worker_url,
                record.capabilities,
                Health.UNVERIFIED,
                last_heartbeat,
                draining=record.draining,
            )
            kept += 1
        return kept

    # ------------------------------------------------------------------- reads

    def route(
        self,
        verb: str,
        capability: str,
        *,
        now: float,
        options: RouteOptions | None = None,
    ) -> WorkerEndpoint | None:
        """The next routable worker for ``(verb, capability)``, or ``None``.

        Without ``options``: round-robin, O(1). With them: the filters and
        the strategy of :mod:`._routing`, O(k) in the workers of this pair. The
        access policy (:meth:`set_access_policy`) is asked for
        ``options.requester_identity`` (``None``: anonymous) and a denial
        raises :class:`PolicyDenied`; a route whose only option is the
        requester stays on the O(1) path.

        ``None`` means the pair is known (some registered worker offers it,
        in any state) but no worker is a candidate at ``now``: an outage,
        worth retrying (or, with options, a question no worker meets). A
        pair no registered worker offers at all raises
        :class:`UnknownCapability`: a typo is not an outage. Both cost one
        dictionary lookup: a pair keeps its rotation while it has members.
        """
        access = self._anonymous_access
        if options is not None:
            if options.requester_identity is None or not _only_requester(options):
                return self._route_with(verb, capability, now, options, explain=False)[0]
            access = self._access
        rotation = self._rotations.get((verb, capability))
        if rotation is None:
            raise UnknownCapability(verb, capability)
        _check_now(now)
        if access is not None:
            # The requester is read here only: the plain path pays one test.
            requester = None if options is None else options.requester_identity
            decision = access.decide(requester, verb, capability)
            if not decision.allowed:
                raise PolicyDenied(requester, verb, capability, decision.reason)
        # self._routable_at(now), inline: a method call is a tenth of a plain route.
        member = rotation.next(now if self._preserving_since is None else _EARLIEST)
        return None if member is None else member.endpoint

    def explain_route(
        self,
        verb: str,
        capability: str,
        *,
        now: float,
        options: RouteOptions | None = None,
    ) -> tuple[WorkerEndpoint | None, RouteExplanation]:
        """:meth:`route`, and why: every worker of the pair, a candidate or removed by a rule.

        The endpoint (``None`` if no candidate is left) comes with its
        ``explain`` set to the explanation.
        """
        endpoint, explanation = self._route_with(
            verb, capability, now, RouteOptions() if options is None else options, explain=True
        )
        assert explanation is not None
        if endpoint is not None:
            endpoint = attrs.evolve(endpoint, explain=explanation)
        return endpoint, explanation

    def _route_with(
        self, verb: str, capability: str, now: float, options: RouteOptions, *, explain: bool
    ) -> tuple[WorkerEndpoint | None, RouteExplanation | None]:
        key = (verb, capability)
        rotation = self._rotations.get(key)
        if rotation is None:
            raise UnknownCapability(verb, capability)
        _check_now(now)
        if self._access is not None:
            requester = options.requester_identity
            decision = self._access.decide(requester, verb, capability)
            if not decision.allowed:
                raise PolicyDenied(
                    requester,
                    verb,
                    capability,
                    decision.reason,
                    explain=(
                        policy_explanation(rotation, options, self._routable_at(now), self._workers)
                        if explain
                        else None
                    ),
                )
        member, explanation = choose(
            key,
            rotation,
            options,
            now=now,
            memory=self._idempotency,
            explain=explain,
            slos=self._slos,
            rng=self._rng,
            health=self._policy,
            # self._routable_at(now), inline: a method call is a tenth of a plain route.
            routable_at=now if self._preserving_since is None else _EARLIEST,
            workers=self._workers,
        )
        return (None if member is None else member.endpoint), explanation

    def concurrency_limits(self, worker_id: str) -> tuple[tuple[CapabilityKey, int], ...]:
        """Each ``(verb, name)`` ``worker_id`` offers, with its ``max_concurrency``.

        Empty for a worker not registered (unknown, or gone). O(the
        worker's capabilities).
        """
        worker = self._workers.get(worker_id)
        if worker is None:
            return ()
        return tuple((schema.key, schema.max_concurrency) for schema in worker.capabilities)

    def capability_of(self, worker_id: str, verb: str, capability: str) -> CapabilitySchema | None:
        """``worker_id``'s ``(verb, capability)`` as it registered it (schemas, version, limits).

        ``None`` for a worker not registered, or one that does not offer the
        pair. O(the worker's capabilities). A gateway checks a payload
        against the ``input_schema`` of the worker it routed the call to.
        """
        worker = self._workers.get(worker_id)
        if worker is None:
            return None
        key = (verb, capability)
        return next((schema for schema in worker.capabilities if schema.key == key), None)

    def count_calls(self, worker_id: str, calls: int) -> None:
        """``calls``: how many calls this process has in flight to ``worker_id`` now.

        A gateway tells it when a call starts and when it ends, so that
        ``least_loaded`` counts them from start to end (hand-outs alone fade
        after a heartbeat interval, and a long call outlasts them). An
        unknown worker is ignored. Not registry state: not journalled.
        """
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValidationError.single("calls", "must be an integer >= 0")
        worker = self._workers.get(worker_id)
        if worker is None:
            return
        if worker.load is None:
            if calls == 0:
                return
            worker.load = Load()
        worker.load.count_calls(calls)

    def _routable_at(self, now: float) -> float:
        """The moment routability is judged at: ``now``, or in self-preservation any moment.

        In self-preservation no silence is decided, so routing continues to
        the last known workers: every worker held in a routable state,
        however long ago it was heard from (its ``routable_until`` is at
        least the earliest moment; an unhealthy worker's is ``-inf``).
        Listings and counts judge at the same moment, so that they show
        what routing does (``is_healthy`` is "routable now").
        """
        return now if self._preserving_since is None else _EARLIEST

    def next_deadline(self) -> float | None:
        """When the next worker may stop being routable or become evictable.

        Something can change for any ``now`` strictly after the returned
        time; a sweep at or before it does nothing. ``None``: nothing left
        to watch. An early answer is possible (a heartbeat moved the
        deadline, or the worker has left since), never a late one.
        """
        deadline = self._deadlines[0][0] if self._deadlines else None
        ends = self._watch.deadline()  # self-preservation's end at the latest
        if ends is not None and (deadline is None or ends < deadline):
            deadline = ends
        if self._ejections:
            # An ejection ends at its deadline (the sweep runs strictly after a deadline).
            restore = self._ejections[0][0]
            if deadline is None or restore < deadline:
                deadline = restore
        return deadline

    def get_workers_for_capability(self, capability: str) -> list[WorkerEndpoint]:
        """Every worker registered for ``"verb:name"``, healthy or not, in registration order.

        Walks the capability's own index of its workers, not the registry.
        """
        key = parse_capability_label(capability)
        index = self._by_capability.get(key)
        if index is None:
            return []
        return [
            member.endpoint
            for _, worker_id in index.after(-1)
            for member in self._workers[worker_id].members
            if member.key == key
        ]

    def get_all_capabilities(self, *, now: float) -> list[CapabilityView]:
        """One entry per ``(verb, capability, version)``, sorted, with its workers.

        The whole listing in one call; a service pages it with
        :meth:`capabilities_pager`.
        """
        return list(self.capabilities_page(now=now, limit=None).capabilities)

    def workers(self, *, now: float) -> list[WorkerView]:
        """Every registered worker at ``now``, in registration order."""
        judged_at = self._routable_at(now)
        return [self._view(worker, judged_at) for worker in self._workers.values()]

    def get_worker(self, worker_id: str, *, now: float) -> WorkerView | None:
        """One worker at ``now``, or ``None`` if it is not registered."""
        worker = self._workers.get(worker_id)
        return None if worker is None else self._view(worker, self._routable_at(now))

    def counts(self, *, now: float) -> tuple[int, int]:
        """``(total, routable)`` worker counts at ``now``.

        Looks at every worker; a service counts with :meth:`counter`, in steps.
        """
        counts = self.counts_of(now=now)
        return counts.total, counts.routable

    def counts_of(
        self,
        *,
        now: float,
        state: WorkerState | HealthState | None = None,
        verb: str | None = None,
        capability: str | None = None,
    ) -> Counts:
        """The workers in all, routable at ``now``, and matching the filters (as listings)."""
        counter = self.counter(now=now, state=state, verb=verb, capability=capability)
        while not counter.step(len(self._workers) + 1):
            pass  # a budget past the registry's size: it ends in a step or two
        return counter.counts()

    def counter(
        self,
        *,
        now: float,
        state: WorkerState | HealthState | None = None,
        verb: str | None = None,
        capability: str | None = None,
    ) -> WorkerCounter:
        """A :class:`~._listing.WorkerCounter` of every worker, counted in steps.

        Each ``step(budget)`` counts at most ``budget`` more workers.
        """
        _check_now(now)
        return WorkerCounter(
            self._workers,
            self._everyone,
            self._policy,
            now=self._routable_at(now),
            state=state,
            verb=verb,
            capability=capability,
        )

    def workers_page(
        self,
        *,
        now: float,
        after: int | None = None,
        limit: int | None,
        state: WorkerState | HealthState | None = None,
        verb: str | None = None,
        capability: str | None = None,
    ) -> WorkersPage:
        """A page of workers at ``now``, in registration order, after position ``after``.

        At most ``limit`` workers (``None``: all) that match every filter
        given: ``state`` (as listed), ``verb``, ``capability`` (a worker
        offering a capability with that verb and/or name). The page's
        ``next_after`` is the ``after`` of the next page, ``None`` on the
        last. An unfiltered page costs O(``limit``), never a scan of the
        registry. Built in one call; a service uses :meth:`workers_pager`.
        """
        pager = self.workers_pager(
            now=now, after=after, limit=limit, state=state, verb=verb, capability=capability
        )
        while not pager.step(len(self._workers) + 1):
            pass  # a budget past the registry's size: it ends in a step or two
        return pager.page()

    def workers_pager(
        self,
        *,
        now: float,
        after: int | None = None,
        limit: int | None,
        state: WorkerState | HealthState | None = None,
        verb: str | None = None,
        capability: str | None = None,
    ) -> WorkersPager:
        """The :class:`~._listing.WorkersPager` of :meth:`workers_page`: built in bounded steps."""
        _check_now(now)
        return WorkersPager(
            self._workers,
            self._everyone,
            self._by_capability,
            self._view,
            self._policy,
            now=self._routable_at(now),
            after=after,
            limit=limit,
            state=state,
            verb=verb,
            capability=capability,
        )

    def capabilities_page(
        self,
        *,
        now: float,
        after: CapabilityPosition | None = None,
        limit: int | None,
        state: WorkerState | HealthState | None = None,
        verb: str | None = None,
        capability: str | None = None,
    ) -> CapabilitiesPage:
        """A page of ``(verb, capability, version)`` entries, sorted, after position ``after``.

        ``verb`` and ``capability`` choose entries; ``state`` keeps in each
        entry its workers in that state (an entry left with none is left
        out). Walks only the capabilities listed (each capability keeps an
        index of its workers). Built in one call; a service uses
        :meth:`capabilities_pager`.
        """
        pager = self.capabilities_pager(
            now=now, after=after, limit=limit, state=state, verb=verb, capability=capability
        )
        while not pager.step(len(self._workers) + 1):
            pass  # a step walks capabilities until the budget is spent
        return pager.page()

    def capabilities_pager(
        self,
        *,
        now: float,
        after: CapabilityPosition | None = None,
        limit: int | None,
        state: WorkerState | HealthState | None = None,
        verb: str | None = None,
        capability: str | None = None,
    ) -> CapabilitiesPager:
        """The :class:`~._listing.CapabilitiesPager` of :meth:`capabilities_page`."""
        _check_now(now)
        return CapabilitiesPager(
            self._workers,
            self._keys,
            self._by_capability,
            self._policy,
            now=self._routable_at(now),
            after=after,
            limit=limit,
            state=state,
            verb=verb,
            capability=capability,
        )

    def state_counts(self, *, now: float) -> dict[WorkerState, int]:
        """How many workers :meth:`workers` would list in each ``state`` at ``now``.

        Every state is a key (0 when none is in it); a draining worker counts
        as ``draining`` only. One pass that builds no views: the service's
        metrics read it at every scrape.
        """
        _check_now(now)
        judged_at = self._routable_at(now)
        held = collections.Counter(
            (
                worker.health,
                judged_at
                <= (
                    worker.healthy_until()
                    if worker.draining or worker.ejected_until is not None
                    else worker.routable_until
                ),
                worker.draining,
                worker.ejected_until is not None,
            )
            for worker in self._workers.values()
        )
        counts = dict.fromkeys(WorkerState, 0)
        for (state, routable, draining, ejected), number in held.items():
            shown = health.shown_state_if(state, routable=routable).reported
            counts[WorkerState.of(shown, draining=draining, ejected=ejected)] += number
        return counts

    def capability_count(self) -> int:
        """How many distinct ``(verb, capability)`` pairs the registered workers offer."""
        return len(self._rotations)

    def records(self) -> list[WorkerRecord]:
        """Every worker as a record, in registration order."""
        return [worker.record() for worker in self._workers.values()]

    def snapshot(self) -> Snapshot:
        """The whole registry at its revision, for :meth:`apply_snapshot` elsewhere."""
        return Snapshot(
            self._revision,
            tuple(self.records()),
            access_policy=self._access_rules,
            slos=self._slos.files,
            self_preservation=self._preserving_since,
        )

    def snapshot_copy(self) -> SnapshotCopy:
        """The registry at its revision, copied cheaply: :class:`~._feed.SnapshotCopy`."""
        return SnapshotCopy(
            self._revision,
            list(map(_ROW, self._workers.values())),
            access_policy=self._access_rules,
            slos=self._slos.files,
            self_preservation=self._preserving_since,
        )

    def export_state(self) -> dict[str, Any]:
        """A versioned, JSON-safe snapshot of every worker."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "workers": unstructure(self.records()),
        }

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    # -------------------------------------------------------------- deciding

    def _decide(
        self,
        worker_id: str,
        given: HealthInput,
        now: float,
        *,
        state: Health | None = None,
        registration: Registration | None = None,
        record: WorkerRecord | None = None,
        source: str = "",
    ) -> tuple[Event, ...]:
        """The events ``given`` causes for ``worker_id`` at ``now``, held pending.

        Decided on the worker's state at ``now`` as the changes decided
        before leave it (``state`` overrides it: the sweep decides on the
        state it found). Its changes take the revisions after the last
        decided and wait in :attr:`pending`; a heartbeat is applied at once.
        """
        shadow = self._pending_workers.get(worker_id) if self._pending_workers else None
        if shadow is None:
            held = self._workers.get(worker_id)
            present = held is not None
            last_heartbeat = -math.inf if held is None else held.last_heartbeat
            if state is None and held is not None:
                # Before the worker's deadline nothing is due: its state is the one
                # held; in self-preservation (or its grace) no silence applies either.
                if now <= held.deadline or not self._watch.judged(worker_id):
                    state = held.health
                else:
                    state = health.state_at(held.health, last_heartbeat, now, self._policy)
        else:
            present = shadow.health is not None
            last_heartbeat = shadow.last_heartbeat
            if state is None and shadow.health is not None:
                state = (
                    health.state_at(shadow.health, last_heartbeat, now, self._policy)
                    if self._watch.judged(worker_id)
                    else shadow.health
                )
        step = health.transition(state, given)
        if isinstance(step, Refusal):
            raise WorkerNotRegistered(worker_id)
        if step.emits == _HEARTBEAT_ONLY:
            # The steady traffic: no change, applied at once.
            beat = heartbeat_received(worker_id, now)
            self.apply(beat)
            if shadow is not None and now > last_heartbeat:
                shadow.last_heartbeat = now
                assert state is not None  # a worker not held is refused a heartbeat
                shadow.deadline = health.deadline(state, now, self._policy)
            return (beat,)
        events: list[Event] = []
        revision = self._decided
        for kind in step.emits:
            if kind is HeartbeatReceived:
                beat = heartbeat_received(worker_id, now)
                self.apply(beat)
                events.append(beat)
                continue
            revision += 1
            if kind is WorkerRegistered:
                assert registration is not None
                events.append(
                    WorkerRegistered(
                        worker_id,
                        registration.worker_url,
                        registration.capabilities,
                        now,
                        replaced=present,
                        revision=revision,
                    )
                )
                last_heartbeat = now
            elif kind is WorkerImported:
                assert record is not None
                events.append(
                    WorkerImported(
                        worker_id,
                        record.worker_url,
                        record.capabilities,
                        record.last_heartbeat,
                        source,
                        revision=revision,
                    )
                )
                last_heartbeat = record.last_heartbeat
            elif kind is WorkerDeregistered:
                events.append(WorkerDeregistered(worker_id, now, revision=revision))
            elif kind is WorkerHealthy:
                events.append(WorkerHealthy(worker_id, now, revision=revision))
                last_heartbeat = max(last_heartbeat, now)
            elif kind is WorkerUnhealthy:
                assert present
                events.append(WorkerUnhealthy(worker_id, now, last_heartbeat, revision=revision))
            else:
                assert present and kind is WorkerEvicted
                events.append(WorkerEvicted(worker_id, now, last_heartbeat, revision=revision))
        self._decided = revision
        self._pending.extend(event for event in events if isinstance(event, Change))
        self._pending_workers[worker_id] = _Pending(step.to, last_heartbeat, revision, self._policy)
        return tuple(events)

    def _last_pending(self, kind: type[_Setting]) -> _Setting | None:
        """The last pending change of ``kind``: a setting as the changes decided leave it."""
        for change in reversed(self._pending):
            if isinstance(change, kind):
                return change
        return None

    def _hold(self, change: RegistryChange | WorkerEjected | WorkerRestored) -> tuple[Event, ...]:
        """Hold a change outside the state table pending; it takes the next revision decided."""
        assert change.revision == self._decided + 1
        self._decided = change.revision
        self._pending.append(change)
        return (change,)

    def _commit(self, events: tuple[Event, ...]) -> tuple[Event, ...]:
        """Apply changes just decided (the in-memory path: decide, then apply at once)."""
        if self._pending:
            self.confirm(self._decided)
        return events

    # ------------------------------------------------------------- internals

    def _report_load(self, worker_id: str, report: LoadReport, now: float) -> None:
        """Keep a heartbeat's load report (a worker not held yet, still pending, keeps none)."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return
        if worker.load is None:
            worker.load = Load()
        worker.load.reported(report, now)

    def _view(self, worker: Worker, now: float) -> WorkerView:
        shown = (
            worker.health
            if self._routes_by_state
            else health.shown_state(worker.health, worker.last_heartbeat, now, self._policy)
        )
        load = worker.load
        report = None if load is None else load.report
        return WorkerView(
            worker_id=worker.worker_id,
            worker_url=worker.worker_url,
            last_heartbeat=worker.last_heartbeat,
            state=shown.reported,
            is_healthy=now <= worker.routable_until,
            capabilities=worker.capabilities,
            draining=worker.draining,
            load=report,
            load_reported_at=None if load is None or report is None else load.reported_at,
            ejected_until=worker.ejected_until,
        )

    def _refresh(self, worker: Worker) -> None:
        """Recompute what follows from the worker's state and last heartbeat.

        On a registry that routes by state no deadline is ever due
        (:func:`~._health.no_deadline`), so a routable state stays routable
        until an event changes it.
        """
        deadline = self._deadline(worker.health, worker.last_heartbeat, self._policy)
        # A draining or ejected worker takes no route whatever its health.
        worker.routable_until = (
            -math.inf
            if worker.draining or worker.ejected_until is not None
            else health.routable_until(worker.health, deadline)
        )
        earlier = deadline < worker.deadline
        worker.deadline = deadline
        if earlier:
            # The heap holds only later entries for it: it must not wake late.
            self._push(worker)
        if worker.parked and worker.routable_until > -math.inf:
            for member in worker.members:
                if member.slot < 0:
                    self._rotations[member.key].join(member)
            worker.parked = False

    def _push(self, worker: Worker) -> None:
        heapq.heappush(self._deadlines, (worker.deadline, worker.order, worker))

    def _install(
        self,
        worker_id: str,
        worker_url: str,
        capabilities: tuple[CapabilitySchema, ...],
        state: Health,
        last_heartbeat: float,
        *,
        draining: bool = False,
    ) -> None:
        """Hold a worker, in place of any worker with its id, keeping its seats and position.

        The new record is not draining unless ``draining`` says so (a
        snapshot's record): a registration ends a drain.
        """
        old = self._workers.get(worker_id)
        self._routable_count += (state in health.ROUTABLE) - (
            old is not None and old.health in health.ROUTABLE
        )
        order = next(self._registrations) if old is None else old.order
        if old is None:
            self._everyone.add(order, worker_id)
        worker = Worker(worker_id, worker_url, (), state, last_heartbeat, order)
        worker.draining = draining
        previous: dict[CapabilityKey, tuple[Member, CapabilitySchema]] = {}
        if old is not None:
            # A registration again does not end an ejection (nor its streak).
            worker.ejected_until = old.ejected_until
            worker.ejections = old.ejections
            worker.ejection_ended = old.ejection_ended
            if old.load is not None and old.load.calls:
                # This process's calls in flight (count_calls) are not registry
                # state: they outlast the record, and end when their answers do.
                worker.load = Load()
                worker.load.count_calls(old.load.calls)
            previous = {
                member.key: (member, stored)
                for member, stored in zip(old.members, old.capabilities, strict=True)
            }
        stored_capabilities: list[CapabilitySchema] = []
        members: list[Member] = []
        endpoints: dict[str, WorkerEndpoint] = {}
        for given in capabilities:
            values = self._values_of(given)
            key = values.key  # the stored tuple: members keep no strings of their own
            rotation = self._rotations[key]
            capability = values.share(given)
            endpoint = endpoints.get(capability.version)
            if endpoint is None:
                endpoint = endpoints[capability.version] = WorkerEndpoint(
                    worker_id, worker_url, capability.version
                )
            member = Member(worker, key, endpoint, capability)
            replaced = previous.pop(key, None)
            if replaced is None:
                rotation.add(member)
                self._by_capability[key].add(order, worker_id)
            else:
                old_member, old_capability = replaced
                values.release(old_capability)
                rotation.take_seat(old_member, member)
            stored_capabilities.append(capability)
            members.append(member)
        for old_member, old_capability in previous.values():
            self._leave(old_member, old_capability)
        if old is not None:
            _unlink(old)
        # Workers restored from one snapshot share its tuple of each capability set.
        shared = all(map(operator.is_, stored_capabilities, capabilities))
        worker.capabilities = capabilities if shared else tuple(stored_capabilities)
        worker.members = tuple(members)
        self._workers[worker_id] = worker
        self._refresh(worker)

    def _values_of(self, capability: CapabilitySchema) -> CapabilityValues:
        """The stored values of the capability's ``(verb, name)``; new ones with their rotation."""
        key = capability.key
        values = self._values.get(key)
        if values is None:
            values = self._values[key] = CapabilityValues(key)
            self._rotations[key] = Rotation()
            self._by_capability[key] = OrderIndex()
            bisect.insort(self._keys, key)
        return values

    def _restore(self, records: Iterable[WorkerRecord]) -> None:
        """Hold a snapshot's workers in this emptied registry: :meth:`_install` for each, faster.

        Recovery's fast path (``benchmarks/redis_recovery.py``, 100 000
        workers in <= 2 s: it takes a fifth to a quarter off applying a
        snapshot). The workers of one capability set share one tuple in a
        snapshot read back, so what :meth:`_install` works out for each of
        their capabilities (its stored values, rotation and index, and the
        tuple the worker keeps) is worked out once per tuple; each worker
        still counts as a holder of each value, gets its endpoints and
        members, joins the rotations and indexes and is refreshed, in the
        order :meth:`_install` does it. A worker id met again is installed
        by :meth:`_install`. ``tests/core/test_restore.py`` checks that the
        registry this builds equals the one :meth:`_install` builds.
        """
        # id(tuple) -> (the tuple the workers keep, a seat per capability:
        # its values, stored value, key, rotation and index). The records
        # keep their tuples alive, so an id is not reused meanwhile.
        plans: dict[int, tuple[tuple[CapabilitySchema, ...], list[_Seat]]] = {}
        for record in records:
            worker_id, worker_url = record.worker_id, record.worker_url
            state = Health.of(verified=record.verified, silent=record.silent)
            if worker_id in self._workers:
                self._install(
                    worker_id,
                    worker_url,
                    record.capabilities,
                    state,
                    record.last_heartbeat,
                    draining=record.draining,
                )
                self._restore_ejection(self._workers[worker_id], record)
                # It let go of the values of the worker it replaced: a capability
                # may be gone, so the plans are worked out again.
                plans.clear()
                continue
            plan = plans.get(id(record.capabilities))
            first = plan is None
            if plan is None:
                # Sharing the values for this first worker tells which are stored.
                plan = plans[id(record.capabilities)] = self._plan(record.capabilities)
            capabilities, seats = plan
            self._routable_count += state in health.ROUTABLE
            order = next(self._registrations)
            self._everyone.add(order, worker_id)
            worker = Worker(
                worker_id, worker_url, capabilities, state, record.last_heartbeat, order
            )
            worker.draining = record.draining
            members: list[Member] = []
            endpoints: dict[str, WorkerEndpoint] = {}
            for values, stored, key, rotation, index in seats:
                if not first:
                    values.share(stored)  # as share(given): given is, or equals, stored
                endpoint = endpoints.get(stored.version)
                if endpoint is None:
                    endpoint = endpoints[stored.version] = WorkerEndpoint(
                        worker_id, worker_url, stored.version
                    )
                member = Member(worker, key, endpoint, stored)
                rotation.add(member)
                index.add(order, worker_id)
                members.append(member)
            worker.members = tuple(members)
            self._workers[worker_id] = worker
            self._refresh(worker)
            self._restore_ejection(worker, record)

    def _restore_ejection(self, worker: Worker, record: WorkerRecord) -> None:
        """Give ``worker`` the ejection (and streak) its snapshot ``record`` holds, if any."""
        if record.ejections is not None or record.ejected_until is not None:
            self._set_ejection(
                worker,
                record.ejected_until,
                record.ejections or 0,
                -math.inf if record.ejection_ended is None else record.ejection_ended,
            )

    def _plan(
        self, capabilities: tuple[CapabilitySchema, ...]
    ) -> tuple[tuple[CapabilitySchema, ...], list[_Seat]]:
        """What :meth:`_restore` keeps for a capability tuple; shares its values once."""
        seats: list[_Seat] = []
        for given in capabilities:
            values = self._values_of(given)
            key = values.key
            seats.append(
                (values, values.share(given), key, self._rotations[key], self._by_capability[key])
            )
        stored = [seat[1] for seat in seats]
        shared = all(map(operator.is_, stored, capabilities))
        return (capabilities if shared else tuple(stored)), seats

    def _remove(self, worker: Worker) -> None:
        self._routable_count -= worker.health in health.ROUTABLE
        self._ejected_count -= worker.ejected_until is not None  # its heap entry is skipped
        self._outcomes.forget(worker.worker_id)
        for member, capability in zip(worker.members, worker.capabilities, strict=True):
            self._leave(member, capability)
        self._everyone.discard(worker.order)
        del self._workers[worker.worker_id]
        _unlink(worker)

    def _leave(self, member: Member, capability: CapabilitySchema) -> None:
        rotation = self._rotations[member.key]
        rotation.remove(member)
        self._values[member.key].release(capability)
        self._by_capability[member.key].discard(member.worker.order)
        if not len(rotation):
            del self._rotations[member.key]
            del self._values[member.key]
            del self._by_capability[member.key]
            del self._keys[bisect.bisect_left(self._keys, member.key)]


def _unlink(worker: Worker) -> None:
    """Break the cycle between a record leaving the registry and its members.

    A worker and its members refer to each other. Without the cycle a
    record no longer held is freed by reference counting alone, also once
    the service froze the recovered registry (``gc.freeze()``: the
    collector never looks at a frozen cycle again). Its members may keep
    their ``worker``: once the rotations let go of them, nothing refers
    back to them.
    """
    worker.members = ()


def _drain_outlives_registration(*, draining: bool, verified: bool) -> bool:
    """Whether a registration of a worker held ``draining`` and ``verified`` leaves it draining.

    A registration ends a drain: it comes from a new worker process. Except
    the one that repairs a restart: a worker held ``unverified`` (restored
    from the journal, or from a snapshot, not yet heard from) registers
    again because this registry forgot it, not because it restarted, so an
    operator's drain outlives a restart of the controller.
    """
    return draining and not verified


# A capability's place, as _restore works it out once per capability tuple:
# its stored values, the stored value, its key, rotation and listing index.
_Seat = tuple[CapabilityValues, CapabilitySchema, CapabilityKey, Rotation, OrderIndex]

# A worker's fields a SnapshotCopy keeps (one C call per worker).
_ROW = operator.attrgetter(
    "worker_id",
    "worker_url",
    "capabilities",
    "last_heartbeat",
    "health",
    "draining",
    "ejected_until",
    "ejections",
    "ejection_ended",
)


def _check_now(now: float) -> None:
    if type(now) is float and -_INF < now < _INF:
        return  # the common case, first: every call of the hot paths checks it
    if not isinstance(now, (int, float)) or isinstance(now, bool) or not math.isfinite(now):
        raise ValidationError.single("now", "must be a finite number of seconds")


_INF = math.inf
# Before any heartbeat, and after -inf: the moment every routable state is routable at.
_EARLIEST = -sys.float_info.max


def _parse_state(state: Mapping[str, Any]) -> list[WorkerRecord]:
    if not isinstance(state, Mapping):
        raise ValidationError.single("", "must be an object")
    problems = [
        ValidationError.single(str(key), "unknown field")
        for key in state
        if key not in ("format_version", "workers")
    ]
    version = state.get("format_version")
    if type(version) is not int or version != STATE_FORMAT_VERSION:
        problems.append(
            ValidationError.single(
                "format_version",
                f"unsupported state format {version!r} (expected {STATE_FORMAT_VERSION})",
            )
        )
    if "workers" not in state:
        problems.append(ValidationError.single("workers", "is required"))
    else:
        try:
            records = structure(state["workers"], tuple[WorkerRecord, ...])
        except ValidationError as error:
            problems.append(error.prefixed("workers"))
    if problems:
        raise ValidationError(problem for error in problems for problem in error.problems)
    return list(records)
