"""The registry: who can do what, who is healthy, who gets the next request.

All state changes live here. Every call that depends on time takes ``now``
(seconds since the epoch, never going backwards); nothing here reads a
clock, sleeps, logs or does I/O. Mutators return the events that happened.

Data layout, chosen so that the hot paths never scan the registry:

* ``_workers``: worker id -> :class:`_Worker`, in registration order.
* ``_capabilities``: ``(verb, name)`` -> :class:`_Capability`, which holds
  the rotation: a ring (a list and a cursor) of the members still believed
  routable. ``route`` serves the member under the cursor and moves the
  cursor on (round-robin, O(1)); a member found unroutable leaves the ring
  (its slot becomes a hole) and is put back at the end by its worker's next
  heartbeat, so it is skipped at most once. The ring is compacted when
  holes outnumber members, which keeps hole-skipping O(1) amortised.
* Equal capability values registered by many workers are stored once (see
  :meth:`_Capability.intern`): a registry of 100 000 workers over 10 000
  capabilities holds 10 000 capability objects, not 300 000.
* ``_deadlines``: a heap of ``(deadline, worker id, worker)``. Heartbeats do not touch
  it; an entry that surfaces early is pushed again with the worker's
  current deadline, so a sweep costs what it evicts plus, amortised, one
  push per worker per ``evict_after``.

Health arithmetic uses one form everywhere, ``now > last_heartbeat + limit``,
so that the heap's deadlines and the checks agree to the last bit.
"""

from __future__ import annotations

import collections
import heapq
import marshal
import math
import operator
import types
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import attrs

from ._converter import structure, unstructure
from ._errors import NotSupported, ValidationError, WorkerNotRegistered
from ._events import (
    Event,
    HeartbeatReceived,
    WorkerDeregistered,
    WorkerEvicted,
    WorkerImported,
    WorkerRegistered,
)
from ._models import (
    CapabilityKey,
    CapabilitySchema,
    CapabilityView,
    HealthPolicy,
    HealthState,
    Registration,
    WorkerEndpoint,
    WorkerRecord,
    WorkerView,
    parse_capability_label,
)

__all__ = ["STATE_FORMAT_VERSION", "CapabilityRegistry"]

#: The version of the snapshot written by :meth:`CapabilityRegistry.export_state`.
STATE_FORMAT_VERSION = 1

# At most this many distinct values of one (verb, name) are shared between
# workers; beyond it a registration keeps its own objects (bounded work).
_MAX_VARIANTS = 8

_isfinite = math.isfinite


def _event_factory() -> Callable[[str, float], HeartbeatReceived]:
    """A constructor of :class:`HeartbeatReceived` for the heartbeat's hot path.

    The attrs ``__init__`` of a frozen class sets each field through
    ``object.__setattr__``, a quarter of a heartbeat's cost; setting the two
    slots through their descriptors gives an equal value faster. Should the
    class ever gain a field, a validator or a converter, the real
    constructor is used instead.
    """
    fields: tuple[attrs.Attribute[Any], ...] = attrs.fields(HeartbeatReceived)
    descriptors = [getattr(HeartbeatReceived, field.name, None) for field in fields]
    if [field.name for field in fields] != ["worker_id", "at"] or any(
        field.validator is not None
        or field.converter is not None
        or type(descriptor) is not types.MemberDescriptorType
        for field, descriptor in zip(fields, descriptors, strict=True)
    ):
        return HeartbeatReceived
    new = object.__new__
    set_worker_id = descriptors[0].__set__  # type: ignore[union-attr]
    set_at = descriptors[1].__set__  # type: ignore[union-attr]

    def heartbeat_event(worker_id: str, at: float) -> HeartbeatReceived:
        event: HeartbeatReceived = new(HeartbeatReceived)
        set_worker_id(event, worker_id)
        set_at(event, at)
        return event

    return heartbeat_event


_heartbeat_event = _event_factory()


class _Worker:
    """The registry's mutable record of one worker (never handed out)."""

    __slots__ = (
        "capabilities",
        "last_heartbeat",
        "members",
        "parked",
        "routable_until",
        "verified",
        "worker_id",
        "worker_url",
    )

    def __init__(
        self,
        worker_id: str,
        worker_url: str,
        last_heartbeat: float,
        verified: bool,
        unhealthy_after: float,
    ) -> None:
        self.worker_id = worker_id
        self.worker_url = worker_url
        self.verified = verified
        self.last_heartbeat = last_heartbeat
        self.routable_until = last_heartbeat + unhealthy_after
        # Filled by _install, in the order of the registration.
        self.capabilities: tuple[CapabilitySchema, ...] = ()
        self.members: tuple[_Member, ...] = ()
        # True once some ring dropped one of its members; the next heartbeat
        # puts them back.
        self.parked = False

    def __lt__(self, other: _Worker) -> bool:
        # Heap entries are (deadline, worker id, worker): ties on both are
        # entries of a replaced worker, which need no order.
        return False

    def record(self) -> WorkerRecord:
        return WorkerRecord(
            worker_id=self.worker_id,
            worker_url=self.worker_url,
            capabilities=self.capabilities,
            last_heartbeat=self.last_heartbeat,
            verified=self.verified,
        )


class _Member:
    """A worker's membership in one capability, with its endpoint.

    ``slot`` is its index in the capability's ring, or -1 while it is out.
    A registration builds the endpoint at once; a restore leaves it to the
    first read: recovery is on a restart's critical path, and a restored
    worker that registers again before it is routed to never needs one.
    """

    __slots__ = ("endpoint", "entry", "slot", "worker")

    def __init__(
        self,
        worker: _Worker,
        endpoint: WorkerEndpoint | None,
        entry: _Capability,
        slot: int = -1,
    ) -> None:
        self.worker = worker
        if endpoint is not None:
            self.endpoint = endpoint
        self.entry = entry
        self.slot = slot

    if not TYPE_CHECKING:  # mypy would take every unknown attribute for an endpoint

        def __getattr__(self, name: str) -> WorkerEndpoint:
            # Reached only while the endpoint slot is empty (read attributes
            # that are set never come here).
            if name != "endpoint":
                raise AttributeError(name)
            worker = self.worker
            key = self.entry.key
            version = next(c.version for c in worker.capabilities if c.key == key)
            endpoint = self.endpoint = WorkerEndpoint(worker.worker_id, worker.worker_url, version)
            return endpoint


class _Capability:
    """One ``(verb, name)``: its ring of routable members and its shared values."""

    __slots__ = ("cursor", "key", "live", "ring", "size", "variants")

    def __init__(self, key: CapabilityKey) -> None:
        self.key = key
        self.ring: list[_Member | None] = []
        self.cursor = 0
        self.live = 0  # members in the ring
        self.size = 0  # members in all
        # [value, number of members using it], for sharing equal values.
        self.variants: list[list[Any]] = []

    def intern(self, capability: CapabilitySchema) -> CapabilitySchema:
        """The stored value equal to ``capability`` (it, if there is none yet), for one member."""
        shared, _ = self.share(capability)
        return shared

    def share(self, capability: CapabilitySchema) -> tuple[CapabilitySchema, list[Any] | None]:
        """:meth:`intern`, also returning the ``[value, uses]`` entry counting its members.

        ``None`` in place of the entry: the value is kept unshared (too
        many variants), and its members are not counted.
        """
        for variant in self.variants:
            if variant[0] is capability or _identical_capabilities(variant[0], capability):
                variant[1] += 1
                return variant[0], variant
        if len(self.variants) < _MAX_VARIANTS:
            variant = [capability, 1]
            self.variants.append(variant)
            return capability, variant
        return capability, None

    def release(self, capability: CapabilitySchema) -> None:
        """A member using ``capability`` left."""
        for index, variant in enumerate(self.variants):
            if variant[0] is capability:
                variant[1] -= 1
                if not variant[1]:
                    del self.variants[index]
                return

    def add(self, member: _Member) -> None:
        member.slot = len(self.ring)
        self.ring.append(member)
        self.live += 1

    def take_out(self, member: _Member) -> None:
        self.ring[member.slot] = None
        member.slot = -1
        self.live -= 1
        if len(self.ring) > 2 * self.live + 4:
            self._compact()

    def _compact(self) -> None:
        ring: list[_Member | None] = []
        cursor = 0
        for index, member in enumerate(self.ring):
            if index == self.cursor:
                cursor = len(ring)
            if member is not None:
                member.slot = len(ring)
                ring.append(member)
        self.ring = ring
        self.cursor = cursor


class _RestorePlan:
    """What :meth:`CapabilityRegistry.restore` installs for one capability tuple.

    Made with the first worker holding the tuple, which it counts in the
    entries (``size``, ``live``) and shared values at once, so that they
    stay in place should a replaced worker leave them meanwhile; the
    workers installed with it after that are counted in ``unsettled``
    until :meth:`settle`.
    """

    __slots__ = ("capabilities", "entries", "stored", "unsettled", "variants")

    def __init__(
        self,
        capabilities: tuple[CapabilitySchema, ...],
        stored: tuple[CapabilitySchema, ...],
        entries: tuple[_Capability, ...],
        variants: tuple[list[Any], ...],
    ) -> None:
        self.capabilities = capabilities
        self.stored = stored
        self.entries = entries
        self.variants = variants
        self.unsettled = 0

    def settle(self) -> None:
        """Count the workers installed with this plan since it was made."""
        uses = self.unsettled
        for entry in self.entries:
            entry.size += uses
            entry.live += uses
        for variant in self.variants:
            variant[1] += uses
        self.unsettled = 0


def _settle(plans: dict[int, _RestorePlan]) -> None:
    """Count what ``plans`` installed, and forget them (the next worker makes a new one)."""
    for plan in plans.values():
        plan.settle()
    plans.clear()


_capability_fields = operator.attrgetter(*(field.name for field in attrs.fields(CapabilitySchema)))


def _identical_capabilities(left: CapabilitySchema, right: CapabilitySchema) -> bool:
    """Equal, with equal types all the way down (``1``, ``1.0`` and ``True`` differ).

    ``==`` alone would let a worker's ``1`` come back as another's ``1.0``;
    marshal's encoding tells the types apart (version 2: no back-references,
    so equal values give equal bytes whatever objects they share).
    """
    try:
        return left == right and marshal.dumps(_capability_fields(left), 2) == marshal.dumps(
            _capability_fields(right), 2
        )
    except (ValueError, RecursionError):
        return False  # a value marshal cannot encode, or too deep: keep it unshared


class CapabilityRegistry:
    """The registry of workers and their capabilities.

    Example, with explicit time::

        registry = CapabilityRegistry()
        now = 1_700_000_000.0
        registry.register("w1", "https://w1:8443", [capability], now=now)
        registry.route("classify", "image.classify", now=now)
    """

    def __init__(self, policy: HealthPolicy | None = None) -> None:
        self._policy = policy if policy is not None else HealthPolicy()
        # The hot paths read these two directly (the policy is frozen).
        self._unhealthy_after = self._policy.unhealthy_after
        self._evict_after = self._policy.evict_after
        self._workers: dict[str, _Worker] = {}
        self._capabilities: dict[CapabilityKey, _Capability] = {}
        self._deadlines: list[tuple[float, str, _Worker]] = []
        # Deregistrations remembered so that an import cannot resurrect the
        # worker; kept for evict_after (older remote records are expired).
        self._tombstones: dict[str, float] = {}
        self._tombstone_expiry: collections.deque[tuple[float, str, float]] = collections.deque()

    @property
    def policy(self) -> HealthPolicy:
        """The timings this registry applies."""
        return self._policy

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
        registration = Registration(worker_id, worker_url, tuple(capabilities))
        _check_now(now)
        replaced = worker_id in self._workers
        worker = self._install(
            registration.worker_id,
            registration.worker_url,
            registration.capabilities,
            last_heartbeat=now,
            verified=True,
        )
        self._tombstones.pop(worker_id, None)
        return (
            WorkerRegistered(
                worker_id=worker_id,
                worker_url=worker.worker_url,
                capabilities=worker.capabilities,
                at=now,
                replaced=replaced,
            ),
        )

    def heartbeat(self, worker_id: str, *, now: float) -> tuple[Event, ...]:
        """Record that a worker is alive.

        Raises :class:`WorkerNotRegistered` for a worker that is unknown,
        restored but not re-registered (``unverified``), or silent for more
        than ``evict_after``: each of them must register again.
        """
        worker = self._workers.get(worker_id)
        if (
            worker is None
            or not worker.verified
            # Also false for a `now` that is NaN, infinite or going backwards.
            or not worker.last_heartbeat <= now <= worker.last_heartbeat + self._evict_after
        ):
            _refuse_heartbeat(worker, worker_id, now)
        worker.last_heartbeat = now
        worker.routable_until = now + self._unhealthy_after
        if worker.parked:
            self._unpark(worker)
        return (_heartbeat_event(worker_id, now),)

    def deregister(self, worker_id: str, *, now: float) -> tuple[Event, ...]:
        """Remove a worker that is leaving; raises :class:`WorkerNotRegistered` if unknown."""
        _check_now(now)
        worker = self._workers.get(worker_id)
        if worker is None:
            raise WorkerNotRegistered(worker_id)
        self._remove(worker)
        self._tombstones[worker_id] = now
        self._tombstone_expiry.append((now + self._evict_after, worker_id, now))
        return (WorkerDeregistered(worker_id, now),)

    def cleanup_stale(self, *, now: float) -> tuple[Event, ...]:
        """Evict every worker silent for more than ``evict_after``.

        Costs in proportion to the deadlines that have passed, not to the
        size of the registry.
        """
        _check_now(now)
        events: list[Event] = []
        heap = self._deadlines
        evict_after = self._evict_after
        while heap and heap[0][0] < now:
            _, _, worker = heapq.heappop(heap)
            if self._workers.get(worker.worker_id) is not worker:
                continue  # replaced or removed since this entry was pushed
            evict_at = worker.last_heartbeat + evict_after
            if now > evict_at:
                self._remove(worker)
                events.append(WorkerEvicted(worker.worker_id, now, worker.last_heartbeat))
            elif now > worker.routable_until:
                heapq.heappush(heap, (evict_at, worker.worker_id, worker))
            else:
                heapq.heappush(heap, (worker.routable_until, worker.worker_id, worker))
        expiry = self._tombstone_expiry
        while expiry and expiry[0][0] < now:
            _, worker_id, at = expiry.popleft()
            if self._tombstones.get(worker_id) == at:
                del self._tombstones[worker_id]
        return tuple(events)

    def restore(self, records: Iterable[WorkerRecord], *, now: float) -> int:
        """Load records recovered from a journal; returns how many were kept.

        Each becomes ``unverified``: routable while its last heartbeat is
        within ``unhealthy_after``, answered ``worker_not_registered`` on
        heartbeat until it re-registers. Records already past ``evict_after``
        are dropped; a last heartbeat later than ``now`` (a clock that was
        ahead) counts as ``now``.
        """
        _check_now(now)
        evict_after = self._evict_after
        unhealthy_after = self._unhealthy_after
        workers = self._workers
        kept = 0
        # Recovery loads up to every worker at once. Workers new to the
        # registry take a bulk path: what their capability tuple implies
        # (entries, shared values, versions) is worked out once per tuple,
        # as replayed records share one tuple per capability set; the counts
        # are added per tuple, endpoints are left to the first read, and the
        # deadline heap is ordered once at the end.
        plans: dict[int, _RestorePlan] = {}
        pending: list[tuple[float, str, _Worker]] = []
        for record in records:
            last_heartbeat = record.last_heartbeat
            if now > last_heartbeat + evict_after:
                continue
            kept += 1
            worker_id = record.worker_id
            if worker_id in workers:
                # Replacing a worker reads and changes the counts: settle them first.
                _settle(plans)
                self._install_record(record, now=now)
                continue
            capabilities = record.capabilities
            plan = plans.get(id(capabilities))
            if plan is None or plan.capabilities is not capabilities:
                plan = plans[id(capabilities)] = self._plan(capabilities)
            else:
                plan.unsettled += 1
            if last_heartbeat > now:  # noqa: PLR1730 (min() is a call: slower here)
                last_heartbeat = now
            worker = _Worker(worker_id, record.worker_url, last_heartbeat, False, unhealthy_after)
            worker.capabilities = plan.stored
            members = []
            for entry in plan.entries:
                # At the end of the ring: registration order.
                ring = entry.ring
                member = _Member(worker, None, entry, len(ring))
                ring.append(member)
                members.append(member)
            worker.members = tuple(members)
            workers[worker_id] = worker
            pending.append((worker.routable_until, worker_id, worker))
        _settle(plans)
        if pending:
            self._deadlines.extend(pending)
            heapq.heapify(self._deadlines)
        return kept

    def _plan(self, capabilities: tuple[CapabilitySchema, ...]) -> _RestorePlan:
        """What installing ``capabilities`` implies, counted for one worker."""
        registry_entries = self._capabilities
        entries: list[_Capability] = []
        stored: list[CapabilitySchema] = []
        variants: list[list[Any]] = []
        for given in capabilities:
            key = (given.verb, given.name)
            entry = registry_entries.get(key)
            if entry is None:
                entry = registry_entries[key] = _Capability(key)
            capability, variant = entry.share(given)
            if variant is not None:
                variants.append(variant)
            entry.size += 1
            entry.live += 1
            entries.append(entry)
            stored.append(capability)
        return _RestorePlan(capabilities, tuple(stored), tuple(entries), tuple(variants))

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
        records = _parse_state(state)
        events: list[Event] = []
        for record in records:
            last_heartbeat = min(record.last_heartbeat, now)
            if now > last_heartbeat + self._evict_after:
                continue
            deregistered_at = self._tombstones.get(record.worker_id)
            if deregistered_at is not None and deregistered_at >= last_heartbeat:
                continue
            local = self._workers.get(record.worker_id)
            if local is not None and local.last_heartbeat >= last_heartbeat:
                continue
            worker = self._install_record(record, now=now)
            events.append(
                WorkerImported(
                    worker_id=worker.worker_id,
                    worker_url=worker.worker_url,
                    capabilities=worker.capabilities,
                    last_heartbeat=worker.last_heartbeat,
                    source=controller_id,
                )
            )
        return tuple(events)

    # ------------------------------------------------------------------- reads

    def route(
        self,
        verb: str,
        capability: str,
        *,
        now: float,
        requester_identity: str | None = None,
        slo_constraints: Mapping[str, Any] | None = None,
        budget_tokens: float | None = None,
        idempotency_key: str | None = None,
        version: str | None = None,
    ) -> WorkerEndpoint | None:
        """The next routable worker for ``(verb, capability)``, round-robin, or ``None``.

        The optional parameters are refused with :class:`NotSupported`
        until they have behaviour.
        """
        if (
            requester_identity is not None
            or slo_constraints is not None
            or budget_tokens is not None
            or idempotency_key is not None
            or version is not None
        ):
            raise NotSupported(
                _first_set(
                    requester_identity=requester_identity,
                    slo_constraints=slo_constraints,
                    budget_tokens=budget_tokens,
                    idempotency_key=idempotency_key,
                    version=version,
                )
            )
        entry = self._capabilities.get((verb, capability))
        if entry is None:
            return None
        while entry.live:
            ring = entry.ring
            index = entry.cursor
            if index >= len(ring):
                index = 0
            member = ring[index]
            entry.cursor = index + 1
            if member is None:
                continue  # a hole left by a member that went out
            if now <= member.worker.routable_until:
                return member.endpoint
            # Unroutable at this `now` (or `now` is not a number): out of the
            # ring until a heartbeat.
            _check_now(now)
            entry.take_out(member)
            member.worker.parked = True
        return None

    def next_deadline(self) -> float | None:
        """When the next worker may stop being routable or become evictable.

        Something can change for any ``now`` strictly after the returned
        time; a sweep at or before it does nothing. ``None``: nothing left
        to watch. An early answer is possible (a heartbeat moved the
        deadline, or the worker has left since), never a late one.
        """
        return self._deadlines[0][0] if self._deadlines else None

    def get_workers_for_capability(self, capability: str) -> list[WorkerEndpoint]:
        """Every worker registered for ``"verb:name"``, healthy or not, in registration order.

        A listing: it walks the workers (``route`` never does).
        """
        entry = self._capabilities.get(parse_capability_label(capability))
        if entry is None:
            return []
        return [
            member.endpoint
            for worker in self._workers.values()
            for member in worker.members
            if member.entry is entry
        ]

    def get_all_capabilities(self, *, now: float) -> list[CapabilityView]:
        """One entry per ``(verb, capability, version)``, sorted, with its workers."""
        groups: dict[tuple[str, str, str], tuple[list[str], list[str]]] = {}
        for worker in self._workers.values():
            routable = self._is_routable(worker, now)
            for capability in worker.capabilities:
                workers, healthy = groups.setdefault(
                    (capability.verb, capability.name, capability.version), ([], [])
                )
                workers.append(worker.worker_id)
                if routable:
                    healthy.append(worker.worker_id)
        return [
            CapabilityView(verb, name, version, tuple(workers), tuple(healthy))
            for (verb, name, version), (workers, healthy) in sorted(groups.items())
        ]

    def workers(self, *, now: float) -> list[WorkerView]:
        """Every registered worker at ``now``, in registration order."""
        return [self._view(worker, now) for worker in self._workers.values()]

    def get_worker(self, worker_id: str, *, now: float) -> WorkerView | None:
        """One worker at ``now``, or ``None`` if it is not registered."""
        worker = self._workers.get(worker_id)
        return None if worker is None else self._view(worker, now)

    def counts(self, *, now: float) -> tuple[int, int]:
        """``(total, routable)`` worker counts at ``now``."""
        routable = sum(1 for worker in self._workers.values() if self._is_routable(worker, now))
        return len(self._workers), routable

    def records(self) -> list[WorkerRecord]:
        """Every worker as a record, in registration order (for snapshots)."""
        return [worker.record() for worker in self._workers.values()]

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

    # --------------------------------------------------------------- internals

    def _is_routable(self, worker: _Worker, now: float) -> bool:
        return now <= worker.routable_until

    def _view(self, worker: _Worker, now: float) -> WorkerView:
        routable = self._is_routable(worker, now)
        if not worker.verified:
            state = HealthState.UNVERIFIED
        elif routable:
            state = HealthState.HEALTHY
        else:
            state = HealthState.UNHEALTHY
        return WorkerView(
            worker_id=worker.worker_id,
            worker_url=worker.worker_url,
            last_heartbeat=worker.last_heartbeat,
            state=state,
            is_healthy=routable,
            capabilities=worker.capabilities,
        )

    def _install_record(self, record: WorkerRecord, *, now: float) -> _Worker:
        """Install a record from a journal or another controller, unverified.

        A heartbeat from the future would keep a silent worker routable (and
        unevictable) for as long as that clock was ahead: it is taken as ``now``.
        """
        return self._install(
            record.worker_id,
            record.worker_url,
            record.capabilities,
            last_heartbeat=min(record.last_heartbeat, now),
            verified=False,
        )

    def _install(
        self,
        worker_id: str,
        worker_url: str,
        capabilities: tuple[CapabilitySchema, ...],
        *,
        last_heartbeat: float,
        verified: bool,
    ) -> _Worker:
        """Put a worker in place of any worker with its id, keeping positions.

        The inputs are already valid; nothing here can fail half-way.
        """
        worker = _Worker(worker_id, worker_url, last_heartbeat, verified, self._unhealthy_after)
        old = self._workers.get(worker_id)
        previous: dict[CapabilityKey, tuple[_Member, CapabilitySchema]] = {}
        if old is not None:
            previous = {
                member.entry.key: (member, stored)
                for member, stored in zip(old.members, old.capabilities, strict=True)
            }
        stored_capabilities: list[CapabilitySchema] = []
        members: list[_Member] = []
        endpoints: dict[str, WorkerEndpoint] = {}
        for given in capabilities:
            key = given.key
            entry = self._capabilities.get(key)
            if entry is None:
                entry = self._capabilities[key] = _Capability(key)
            capability = entry.intern(given)
            endpoint = endpoints.get(capability.version)
            if endpoint is None:
                endpoint = endpoints[capability.version] = WorkerEndpoint(
                    worker_id, worker_url, capability.version
                )
            member = _Member(worker, endpoint, entry)
            replaced = previous.pop(key, None)
            if replaced is None:
                entry.size += 1
                entry.add(member)
            else:
                old_member, old_capability = replaced
                entry.release(old_capability)
                if old_member.slot >= 0:
                    # Take the old member's place in the ring.
                    member.slot = old_member.slot
                    entry.ring[member.slot] = member
                    old_member.slot = -1
                else:
                    entry.add(member)
            stored_capabilities.append(capability)
            members.append(member)
        for old_member, old_capability in previous.values():
            self._leave(old_member, old_capability)
        if old is not None:
            _unlink(old)
        worker.capabilities = tuple(stored_capabilities)
        worker.members = tuple(members)
        self._workers[worker_id] = worker
        heapq.heappush(self._deadlines, (worker.routable_until, worker_id, worker))
        return worker

    def _remove(self, worker: _Worker) -> None:
        for member, capability in zip(worker.members, worker.capabilities, strict=True):
            self._leave(member, capability)
        del self._workers[worker.worker_id]
        _unlink(worker)

    def _leave(self, member: _Member, capability: CapabilitySchema) -> None:
        entry = member.entry
        if member.slot >= 0:
            entry.take_out(member)
        entry.release(capability)
        entry.size -= 1
        if not entry.size:
            del self._capabilities[entry.key]

    def _unpark(self, worker: _Worker) -> None:
        for member in worker.members:
            if member.slot < 0:
                member.entry.add(member)
        worker.parked = False


def _unlink(worker: _Worker) -> None:
    """Break the worker <-> member cycle of a worker that left, so that it is freed at once.

    Reference counting then frees it without the cyclic collector, which
    may never look at it: the service moves a recovered registry's objects
    out of the collector's reach (``gc.freeze``).
    """
    worker.members = ()


def _refuse_heartbeat(worker: _Worker | None, worker_id: str, now: float) -> NoReturn:
    _check_now(now)
    if worker is not None and worker.verified and now < worker.last_heartbeat:
        raise ValidationError.single(
            "now", "is earlier than the worker's last heartbeat (time never goes backwards)"
        )
    raise WorkerNotRegistered(worker_id)


def _check_now(now: float) -> None:
    if not isinstance(now, (int, float)) or isinstance(now, bool) or not _isfinite(now):
        raise ValidationError.single("now", "must be a finite number of seconds")


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


def _first_set(**options: object) -> str:
    return next(name for name, value in options.items() if value is not None)
