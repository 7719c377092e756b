"""The registry's own records: a worker, its seat in each rotation, shared capability values.

These are the mutable objects inside :class:`~crank_registry.CapabilityRegistry`;
they are never handed out (readers get frozen views and records). This
module sits below :mod:`._health`, :mod:`._rotation` and :mod:`._registry`,
which all use it.
"""

from __future__ import annotations

import json
import math

from ._converter import unstructure
from ._health import Health, routable_until
from ._models import CapabilityKey, CapabilitySchema, LoadReport, WorkerEndpoint, WorkerRecord

__all__ = ["MAX_VARIANTS", "CapabilityValues", "Load", "Member", "Worker"]

#: When a worker's last ejection ended, before it had one.
_NEVER = -math.inf

#: At most this many distinct values of one ``(verb, name)`` are shared
#: between workers; beyond it a registration keeps its own (bounded work).
MAX_VARIANTS = 8


class Worker:
    """One worker as the registry holds it.

    ``health``, ``last_heartbeat``, ``routable_until`` and ``deadline`` are
    set only by the registry's fold; ``routable_until`` and ``deadline`` are
    :func:`~crank_registry._health.routable_until` and
    :func:`~crank_registry._health.deadline` of the other two, kept so that
    a route compares one float. ``draining`` (set by the fold too) makes
    ``routable_until`` -inf whatever the health: a drained worker takes no
    new routes, and the plain route's one comparison still says so.
    """

    __slots__ = (
        "capabilities",
        "deadline",
        "draining",
        "ejected_until",
        "ejection_ended",
        "ejections",
        "health",
        "id_hash",
        "last_heartbeat",
        "load",
        "members",
        "order",
        "parked",
        "routable_until",
        "worker_id",
        "worker_url",
    )

    def __init__(  # noqa: PLR0917 (all six are what a worker is)
        self,
        worker_id: str,
        worker_url: str,
        capabilities: tuple[CapabilitySchema, ...],
        health: Health,
        last_heartbeat: float,
        order: int,
    ) -> None:
        self.worker_id = worker_id
        self.worker_url = worker_url
        self.capabilities = capabilities
        self.health = health
        self.last_heartbeat = last_heartbeat
        self.draining = False
        # Its place in registration order (kept when it registers again).
        self.order = order
        # Until the registry's fold sets them: not routable, no deadline yet.
        self.routable_until = -math.inf
        self.deadline = math.inf
        self.members: tuple[Member, ...] = ()
        # True once a rotation dropped one of its members (found unroutable);
        # the heartbeat that makes it routable again puts them back.
        self.parked = False
        # Made by its first load report or hand-out (most workers of a
        # round-robin registry never need one: one slot, no object).
        self.load: Load | None = None
        # The hash of its id that affinity weighs it by (an odd number), made
        # by the first affinity route that weighs it: 0 until then.
        self.id_hash = 0
        # Outlier ejection (._ejection), set by the fold: until when it is
        # ejected (None: it is not), the ejections of its streak, and when
        # the last of them ended.
        self.ejected_until: float | None = None
        self.ejections = 0
        self.ejection_ended = _NEVER  # one shared float, not one per worker

    def __lt__(self, other: Worker) -> bool:
        # Heap entries are (deadline, order, worker): a tie on both is an entry
        # of a worker that registered again, and those need no order.
        return False

    def record(self) -> WorkerRecord:
        """The worker as a frozen record."""
        return WorkerRecord(
            worker_id=self.worker_id,
            worker_url=self.worker_url,
            capabilities=self.capabilities,
            last_heartbeat=self.last_heartbeat,
            verified=self.health.verified,
            silent=self.health.silent,
            draining=self.draining,
            ejected_until=self.ejected_until,
            ejections=self.ejections or None,
            ejection_ended=None if self.ejection_ended == -math.inf else self.ejection_ended,
        )

    def healthy_until(self) -> float:
        """When its health alone stops it being routable (-inf: not routable by health now).

        ``routable_until``, draining and ejection left aside: what the
        listings' health and ``explain`` tell apart from ``draining`` and ``ejected``.
        """
        return routable_until(self.health, self.deadline)


class Load:
    """What the registry knows of a worker's load: its latest report, and routes handed out since.

    Not journalled and not an event: load is ephemeral, and a restarted
    controller learns it again from the next heartbeats. ``handed_out``
    counts the ``least_loaded`` routes given to the worker since
    ``counted_since``: since
    its latest report that has ``in_flight`` (that count includes them),
    else since the start of the current heartbeat interval
    (:meth:`hand_out`), so that it cannot grow for ever. ``calls`` are the
    calls this process has sent the worker and not seen end (a gateway's or
    a follower's own count, kept exact from start to end: it does not
    fade; :meth:`count_calls`).
    """

    __slots__ = (
        "calls",
        "counted_since",
        "handed_out",
        "in_flight",
        "latency_p95_ms",
        "report",
        "reported_at",
    )

    def __init__(self) -> None:
        self.report: LoadReport | None = None
        self.reported_at = -math.inf
        # The report's latency_p95_ms and in_flight, read for every member
        # by routes with slo_constraints and least_loaded: here, they cost
        # no read of the report (another object in memory).
        self.latency_p95_ms: float | None = None
        self.in_flight: int | None = None
        self.handed_out = 0
        self.counted_since = -math.inf
        self.calls = 0

    def reported(self, report: LoadReport, now: float) -> None:
        """A heartbeat at ``now`` carried ``report``."""
        self.report = report
        self.reported_at = now
        self.latency_p95_ms = report.latency_p95_ms
        self.in_flight = report.in_flight
        if report.in_flight is not None:
            self.handed_out = 0
            self.counted_since = now

    def hand_out(self, now: float, interval: float) -> None:
        """A route at ``now`` gave this worker a call; ``interval``: the heartbeat interval.

        Without an ``in_flight`` to count from, hand-outs fade: the count
        restarts once a heartbeat interval has passed since it started.
        """
        if self._faded(now, interval):
            self.handed_out = 0
            self.counted_since = now
        self.handed_out += 1

    def count_calls(self, calls: int) -> None:
        """Set the calls this process has in flight to the worker now.

        A call that starts was a route's hand-out: it takes that hand-out's
        place, so that it is counted once, and stops counting when it ends.
        """
        started = calls - self.calls
        if started > 0:
            self.handed_out = max(0, self.handed_out - started)
        self.calls = calls

    def estimate(self, now: float, interval: float) -> int:
        """The calls the worker is thought to serve.

        The reported ``in_flight`` plus hand-outs since, and at least the
        ``calls`` this process has in flight there: those are certain (the
        report counts them too, so the larger is taken, not the sum).
        """
        if self.in_flight is None:
            reported = 0 if self._faded(now, interval) else self.handed_out
        else:
            reported = self.in_flight + self.handed_out
        return max(reported, self.calls)

    def _faded(self, now: float, interval: float) -> bool:
        return self.in_flight is None and now - self.counted_since > interval


class Member:
    """A worker's seat in the rotation of one of its capabilities.

    ``capability`` is the worker's value of that capability (the one in its
    ``capabilities``), which routing options read. ``slot`` is the seat's
    index in the rotation's ring, or -1 while it is out.
    """

    __slots__ = ("capability", "endpoint", "key", "slot", "worker")

    def __init__(
        self,
        worker: Worker,
        key: CapabilityKey,
        endpoint: WorkerEndpoint,
        capability: CapabilitySchema,
    ) -> None:
        self.worker = worker
        self.key = key
        self.endpoint = endpoint
        self.capability = capability
        self.slot = -1


class _Variant:
    """One stored value, its JSON text, and how many workers hold it.

    ``text`` is ``None`` until a second value of the same ``(verb, name)``
    has to be told apart from it: most capabilities have one value, and
    rendering it costs 18 us (a tenth of the recovery of 100 000 workers of
    10 000 capabilities, ``benchmarks/redis_recovery.py --shape distinct``).
    ``""`` (no JSON text is empty): too deep to render, equal to no other.
    """

    __slots__ = ("text", "users", "value")

    def __init__(self, value: CapabilitySchema, text: str | None) -> None:
        self.value = value
        self.text = text
        self.users = 1

    def rendered(self) -> str:
        """The value's JSON text, rendered on the first call."""
        if self.text is None:
            self.text = _json_text(self.value)
        return self.text


class CapabilityValues:
    """The distinct values registered for one ``(verb, name)``, each stored once.

    A fleet of replicas registers equal capabilities many times over;
    storing each value once keeps memory per worker small. Two values are
    equal when they render to the same JSON, which tells ``1``, ``1.0``
    and ``true`` apart (``==`` does not). Each value counts the workers
    holding it, so that the last to leave frees it.

    ``key`` is the one ``(verb, name)`` tuple the registry stores for the
    capability (the first registration's), which every member refers to:
    a member's own ``given.key`` would keep a tuple and that registration's
    copies of the verb and name alive (about 170 bytes a member, once the
    registration's value itself is shared).
    """

    __slots__ = ("key", "variants")

    def __init__(self, key: CapabilityKey) -> None:
        self.key = key
        self.variants: list[_Variant] = []

    def share(self, capability: CapabilitySchema) -> CapabilitySchema:
        """The stored value equal to ``capability`` (it, if none is), counted for one more user."""
        for variant in self.variants:
            if variant.value is capability:
                variant.users += 1
                return capability
        if not self.variants:
            self.variants.append(_Variant(capability, None))
            return capability
        text = _json_text(capability)
        if not text:
            return capability  # too deep to render: kept unshared
        for variant in self.variants:
            if variant.rendered() == text:
                variant.users += 1
                return variant.value
        if len(self.variants) < MAX_VARIANTS:
            self.variants.append(_Variant(capability, text))
        return capability

    def release(self, capability: CapabilitySchema) -> None:
        """A worker holding ``capability`` (a value :meth:`share` returned) let go of it."""
        for index, variant in enumerate(self.variants):
            if variant.value is capability:
                variant.users -= 1
                if not variant.users:
                    del self.variants[index]
                return


def _json_text(capability: CapabilitySchema) -> str:
    """The value's JSON text with its keys sorted; ``""`` when it is nested too deeply to render."""
    try:
        return json.dumps(unstructure(capability), sort_keys=True, separators=(",", ":"))
    except RecursionError:
        return ""
