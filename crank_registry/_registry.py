"""The registry: who can do what, who is healthy, who gets the next request.

All state changes live here. Every call that depends on time takes ``now``
(seconds since the epoch, never going backwards); nothing here reads a
clock, sleeps, logs or does I/O. Mutators return the events that happened.

Data layout, chosen so that the hot paths never scan the registry:

* ``_workers``: worker id -> :class:`_Worker`, in registration order.
* ``_capabilities``: ``(verb, name)`` -> :class:`_Capability`, which holds
  every registered member (registration order, for listings) and the
  rotation: an ordered dict of members still believed routable. ``route``
  takes the rotation's head and moves it to the end (round-robin, O(1)); a
  head found unroutable is taken out of the rotation and put back by its
  next heartbeat, so it is skipped at most once.
* ``_deadlines``: a heap of (deadline, seq, worker). Heartbeats do not
  touch it; an entry that surfaces early is pushed again with the worker's
  current deadline, so a sweep costs what it evicts plus, amortised, one
  push per worker per ``evict_after``.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Iterable, Mapping
from typing import Any

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


class _Worker:
    """The registry's mutable record of one worker (never handed out)."""

    __slots__ = (
        "worker_id",
        "worker_url",
        "capabilities",
        "last_heartbeat",
        "verified",
        "routable_until",
        "evict_at",
        "members",
        "parked",
    )

    def __init__(
        self,
        record: WorkerRecord,
        policy: HealthPolicy,
    ) -> None:
        self.worker_id = record.worker_id
        self.worker_url = record.worker_url
        self.capabilities = record.capabilities
        self.verified = record.verified
        self.members: dict[CapabilityKey, _Member] = {}
        # True once some rotation dropped this worker; its next heartbeat puts
        # it back everywhere.
        self.parked = False
        self.last_heartbeat = record.last_heartbeat
        self.routable_until = record.last_heartbeat + policy.unhealthy_after
        self.evict_at = record.last_heartbeat + policy.evict_after

    def record(self) -> WorkerRecord:
        return WorkerRecord(
            worker_id=self.worker_id,
            worker_url=self.worker_url,
            capabilities=self.capabilities,
            last_heartbeat=self.last_heartbeat,
            verified=self.verified,
        )


class _Member:
    """A worker's membership in one capability, with its endpoint prebuilt."""

    __slots__ = ("worker", "endpoint", "version")

    def __init__(self, worker: _Worker, capability: CapabilitySchema) -> None:
        self.worker = worker
        self.version = capability.version
        self.endpoint = WorkerEndpoint(worker.worker_id, worker.worker_url, capability.version)


class _Capability:
    __slots__ = ("members", "rotation")

    def __init__(self) -> None:
        self.members: dict[str, _Member] = {}
        self.rotation: collections.OrderedDict[str, _Member] = collections.OrderedDict()


class CapabilityRegistry:
    """The registry of workers and their capabilities.

    Example, with explicit time::

        registry = CapabilityRegistry()
        now = 1_700_000_000.0
        registry.register("w1", "https://w1:8443", [capability], now=now)
        registry.route("classify", "image.classify", now=now)
    """

    def __init__(self, policy: HealthPolicy | None = None) -> None:
        self.policy = policy if policy is not None else HealthPolicy()
        self._workers: dict[str, _Worker] = {}
        self._capabilities: dict[CapabilityKey, _Capability] = {}
        self._deadlines: list[tuple[float, int, _Worker]] = []
        self._seq = 0
        # Deregistrations remembered so that an import cannot resurrect the
        # worker; kept for evict_after (older remote records are expired).
        self._tombstones: dict[str, float] = {}
        self._tombstone_expiry: collections.deque[tuple[float, str, float]] = collections.deque()

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
        replaced = worker_id in self._workers
        record = WorkerRecord(
            worker_id=registration.worker_id,
            worker_url=registration.worker_url,
            capabilities=registration.capabilities,
            last_heartbeat=now,
            verified=True,
        )
        self._install(record)
        self._tombstones.pop(worker_id, None)
        return (
            WorkerRegistered(
                worker_id=worker_id,
                worker_url=registration.worker_url,
                capabilities=registration.capabilities,
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
        if worker is None or not worker.verified or now > worker.evict_at:
            raise WorkerNotRegistered(worker_id)
        worker.last_heartbeat = now
        worker.routable_until = now + self.policy.unhealthy_after
        worker.evict_at = now + self.policy.evict_after
        if worker.parked:
            self._unpark(worker)
        return (HeartbeatReceived(worker_id, now),)

    def deregister(self, worker_id: str, *, now: float) -> tuple[Event, ...]:
        """Remove a worker that is leaving; raises :class:`WorkerNotRegistered` if unknown."""
        worker = self._workers.get(worker_id)
        if worker is None:
            raise WorkerNotRegistered(worker_id)
        self._remove(worker)
        self._tombstones[worker_id] = now
        self._tombstone_expiry.append((now + self.policy.evict_after, worker_id, now))
        return (WorkerDeregistered(worker_id, now),)

    def cleanup_stale(self, *, now: float) -> tuple[Event, ...]:
        """Evict every worker silent for more than ``evict_after``.

        Costs in proportion to the deadlines that have passed, not to the
        size of the registry.
        """
        events: list[Event] = []
        heap = self._deadlines
        while heap and heap[0][0] < now:
            _, _, worker = heapq.heappop(heap)
            if self._workers.get(worker.worker_id) is not worker:
                continue  # replaced or removed since this entry was pushed
            if now > worker.evict_at:
                self._remove(worker)
                events.append(WorkerEvicted(worker.worker_id, now, worker.last_heartbeat))
            elif now > worker.routable_until:
                self._push(worker.evict_at, worker)
            else:
                self._push(worker.routable_until, worker)
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
        are dropped.
        """
        kept = 0
        for record in records:
            if now - record.last_heartbeat > self.policy.evict_after:
                continue
            self._install(_unverified(record))
            kept += 1
        return kept

    def import_remote_state(
        self, controller_id: str, state: Mapping[str, Any], *, now: float
    ) -> tuple[Event, ...]:
        """Merge a snapshot exported by another controller.

        Per worker the record with the newest heartbeat wins (a tie keeps
        the local one, so importing your own export changes nothing); an
        imported record is ``unverified`` here. A worker deregistered here
        later than the remote's heartbeat is not resurrected, and records
        already past ``evict_after`` are ignored. Raises
        :class:`ValidationError` (nothing changes) for a malformed snapshot.
        """
        records = _parse_state(state)
        events: list[Event] = []
        for record in records:
            if now - record.last_heartbeat > self.policy.evict_after:
                continue
            deregistered_at = self._tombstones.get(record.worker_id)
            if deregistered_at is not None and deregistered_at >= record.last_heartbeat:
                continue
            local = self._workers.get(record.worker_id)
            if local is not None and local.last_heartbeat >= record.last_heartbeat:
                continue
            imported = _unverified(record)
            self._install(imported)
            events.append(
                WorkerImported(
                    worker_id=imported.worker_id,
                    worker_url=imported.worker_url,
                    capabilities=imported.capabilities,
                    last_heartbeat=imported.last_heartbeat,
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
        rotation = entry.rotation
        while rotation:
            worker_id = next(iter(rotation))
            member = rotation[worker_id]
            if now <= member.worker.routable_until:
                rotation.move_to_end(worker_id)
                return member.endpoint
            # Unroutable at this `now`: leave the rotation until a heartbeat.
            del rotation[worker_id]
            member.worker.parked = True
        return None

    def next_deadline(self) -> float | None:
        """When the next worker may stop being routable or become evictable.

        Something can change for any ``now`` strictly after the returned
        time; a sweep at or before it does nothing. ``None``: no workers.
        An early answer is possible (a heartbeat moved the deadline), never
        a late one.
        """
        return self._deadlines[0][0] if self._deadlines else None

    def get_workers_for_capability(self, capability: str) -> list[WorkerEndpoint]:
        """Every worker registered for ``"verb:name"``, healthy or not, in registration order."""
        entry = self._capabilities.get(parse_capability_label(capability))
        if entry is None:
            return []
        return [member.endpoint for member in entry.members.values()]

    def get_all_capabilities(self, *, now: float) -> list[CapabilityView]:
        """One entry per ``(verb, capability, version)``, sorted, with its workers."""
        views: list[CapabilityView] = []
        for (verb, name), entry in sorted(self._capabilities.items()):
            by_version: dict[str, tuple[list[str], list[str]]] = {}
            for worker_id, member in entry.members.items():
                workers, healthy = by_version.setdefault(member.version, ([], []))
                workers.append(worker_id)
                if self._is_routable(member.worker, now):
                    healthy.append(worker_id)
            for version in sorted(by_version):
                workers, healthy = by_version[version]
                views.append(CapabilityView(verb, name, version, tuple(workers), tuple(healthy)))
        return views

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

    def _push(self, deadline: float, worker: _Worker) -> None:
        self._seq += 1  # ties break on insertion order, never on the worker
        heapq.heappush(self._deadlines, (deadline, self._seq, worker))

    def _install(self, record: WorkerRecord) -> None:
        """Put ``record`` in place of any worker with its id, keeping positions."""
        worker = _Worker(record, self.policy)
        old = self._workers.get(record.worker_id)
        new_members = {c.key: _Member(worker, c) for c in record.capabilities}
        if old is not None:
            for key in old.members.keys() - new_members.keys():
                self._leave(key, old.worker_id)
        for key, member in new_members.items():
            entry = self._capabilities.get(key)
            if entry is None:
                entry = self._capabilities[key] = _Capability()
            # Assigning to an existing key keeps its place in both orders.
            entry.members[worker.worker_id] = member
            entry.rotation[worker.worker_id] = member
        worker.members = new_members
        self._workers[worker.worker_id] = worker
        self._push(worker.routable_until, worker)

    def _remove(self, worker: _Worker) -> None:
        for key in worker.members:
            self._leave(key, worker.worker_id)
        del self._workers[worker.worker_id]

    def _leave(self, key: CapabilityKey, worker_id: str) -> None:
        entry = self._capabilities[key]
        del entry.members[worker_id]
        entry.rotation.pop(worker_id, None)
        if not entry.members:
            del self._capabilities[key]

    def _unpark(self, worker: _Worker) -> None:
        for key, member in worker.members.items():
            rotation = self._capabilities[key].rotation
            if worker.worker_id not in rotation:
                rotation[worker.worker_id] = member
        worker.parked = False


def _unverified(record: WorkerRecord) -> WorkerRecord:
    if not record.verified:
        return record
    return WorkerRecord(
        worker_id=record.worker_id,
        worker_url=record.worker_url,
        capabilities=record.capabilities,
        last_heartbeat=record.last_heartbeat,
        verified=False,
    )


def _parse_state(state: Mapping[str, Any]) -> list[WorkerRecord]:
    if not isinstance(state, Mapping):
        raise ValidationError.single("", "state must be an object")
    version = state.get("format_version")
    if version != STATE_FORMAT_VERSION:
        raise ValidationError.single(
            "format_version",
            f"unsupported state format {version!r} (expected {STATE_FORMAT_VERSION})",
        )
    unknown = [key for key in state if key not in ("format_version", "workers")]
    if unknown:
        raise ValidationError.single(str(unknown[0]), "unknown field")
    records = structure(state.get("workers"), tuple[WorkerRecord, ...])
    return list(records)


def _first_set(**options: object) -> str:
    return next(name for name, value in options.items() if value is not None)
