"""Listings in pages: the paging rules of ``GET /workers`` and ``GET /capabilities``.

A listing is read in pages, each ending at a *position*: for workers, the
registration order of the page's last worker (:attr:`Worker.order`, which
a worker keeps when it registers again); for capabilities, the page's last
``(verb, capability, version)``. The next page starts strictly after that
position, so a worker present throughout a paging is listed exactly once,
whatever registers or leaves meanwhile (a newcomer is listed or not,
depending on whether paging has passed its position).

A page is built by a *pager* in steps of bounded cost (``step(budget)``
examines at most ``budget`` entries), so that the service can yield to its
event loop between steps; the registry's ``*_page`` methods run a pager to
the end in one call. A pager holds positions only, never an iterator, so
the registry may change between two steps. Counts over the whole registry
are taken the same way by a :class:`WorkerCounter`.

Where a pager starts from: :class:`OrderIndex`, the registration orders of
a set of workers, sorted, which can be entered at any position (a bisect)
and costs O(1) amortised per change. The registry keeps one for all its
workers and one per ``(verb, name)``.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
from collections.abc import Callable, Iterator, Mapping, Sequence

import attrs

from . import _health as health
from ._errors import ValidationError
from ._models import (
    CapabilityKey,
    CapabilityView,
    HealthPolicy,
    HealthState,
    WorkerState,
    WorkerView,
)
from ._records import Worker

__all__ = [
    "CapabilitiesPage",
    "CapabilitiesPager",
    "CapabilityPosition",
    "Counts",
    "OrderIndex",
    "WorkerCounter",
    "WorkersPage",
    "WorkersPager",
    "decode_capabilities_cursor",
    "decode_workers_cursor",
    "encode_capabilities_cursor",
    "encode_workers_cursor",
]

#: ``(verb, capability, version)``: where a page of capabilities ends.
CapabilityPosition = tuple[str, str, str]


class OrderIndex:
    """Worker ids by registration order, sorted, enterable at any position.

    Removal leaves a hole (``None``) that lookups skip; the lists are
    compacted when holes outnumber entries, so a change costs O(1)
    amortised (plus a bisect) and a walk skips at most as many holes as it
    lists entries, plus a constant.
    """

    __slots__ = ("holes", "ids", "orders")

    def __init__(self) -> None:
        self.orders: list[int] = []
        self.ids: list[str | None] = []
        self.holes = 0

    def add(self, order: int, worker_id: str) -> None:
        """Index ``worker_id`` at ``order`` (not indexed yet)."""
        orders = self.orders
        if not orders or order > orders[-1]:
            orders.append(order)  # the common case: a new registration comes last
            self.ids.append(worker_id)
            return
        index = bisect.bisect_left(orders, order)
        if index < len(orders) and orders[index] == order:
            assert self.ids[index] is None, f"order {order} is indexed twice"
            self.ids[index] = worker_id
            self.holes -= 1
            return
        orders.insert(index, order)
        self.ids.insert(index, worker_id)

    def discard(self, order: int) -> None:
        """Forget the worker at ``order``, if indexed."""
        index = bisect.bisect_left(self.orders, order)
        if index == len(self.orders) or self.orders[index] != order or self.ids[index] is None:
            return
        self.ids[index] = None
        self.holes += 1
        if self.holes > len(self.orders) - self.holes + 16:
            self._compact()

    def clear(self) -> None:
        """Forget every worker (in place: a pager between two steps holds this index)."""
        self.orders.clear()
        self.ids.clear()
        self.holes = 0

    def after(self, position: int) -> Iterator[tuple[int, str]]:
        """``(order, worker_id)`` of every indexed worker after ``position``, in order.

        Valid until the index next changes (a pager walks it within one step).
        """
        orders = self.orders
        ids = self.ids
        for index in range(bisect.bisect_right(orders, position), len(orders)):
            worker_id = ids[index]
            if worker_id is not None:
                yield orders[index], worker_id

    def chunk(self, position: int, size: int) -> tuple[list[str], int | None]:
        """The ids of at most ``size`` entries after ``position``, and the last one's order.

        Holes are left out of the ids; the order is ``None`` when there is no
        entry after ``position``.
        """
        start = bisect.bisect_right(self.orders, position)
        end = min(start + size, len(self.orders))
        if start == end:
            return [], None
        return [i for i in self.ids[start:end] if i is not None], self.orders[end - 1]

    def __len__(self) -> int:
        return len(self.orders) - self.holes

    def _compact(self) -> None:
        kept = [(o, i) for o, i in zip(self.orders, self.ids, strict=True) if i is not None]
        self.orders = [o for o, _ in kept]
        self.ids = [i for _, i in kept]
        self.holes = 0


# ------------------------------------------------------------------- pages


@attrs.frozen
class WorkersPage:
    """A page of workers; ``next_after`` is where the next page starts (``None``: the last page)."""

    workers: tuple[WorkerView, ...]
    next_after: int | None


@attrs.frozen
class CapabilitiesPage:
    """A page of capability entries; ``next_after`` as in :class:`WorkersPage`."""

    capabilities: tuple[CapabilityView, ...]
    next_after: CapabilityPosition | None


@attrs.frozen
class Counts:
    """Workers in all, routable ones, and (for a filtered count) those that match."""

    total: int
    routable: int
    matching: int


# ----------------------------------------------------------------- filters


def _listed_state(state: WorkerState | HealthState | None) -> WorkerState | None:
    """A filter's state as listed (a :class:`HealthState` given in-process names its own)."""
    return None if state is None else WorkerState(state.value)


@attrs.frozen
class _Filter:
    """What a listing keeps: workers in ``state``, offering ``verb`` and/or ``capability``.

    ``state`` is the listed one: ``draining`` keeps the draining workers, a
    health state the workers in it that are not draining.
    """

    state: WorkerState | None = attrs.field(converter=_listed_state)
    verb: str | None
    capability: str | None
    policy: HealthPolicy
    now: float

    @property
    def active(self) -> bool:
        return self.state is not None or self.verb is not None or self.capability is not None

    def offers(self, worker: Worker) -> bool:
        """Whether ``worker`` has a capability of the filter's verb and name."""
        verb, name = self.verb, self.capability
        return any(
            (verb is None or c.verb == verb) and (name is None or c.name == name)
            for c in worker.capabilities
        )

    def in_state(self, worker: Worker) -> bool:
        if worker.draining:  # listed as draining, whatever else
            return self.state is WorkerState.DRAINING
        if worker.ejected_until is not None:  # listed as ejected, whatever its health
            return self.state is WorkerState.EJECTED
        if self.state in (WorkerState.DRAINING, WorkerState.EJECTED):
            return False
        shown = health.shown_state(worker.health, worker.last_heartbeat, self.now, self.policy)
        return WorkerState.of(shown.reported, draining=False) is self.state

    def keeps(self, worker: Worker) -> bool:
        if self.state is not None and not self.in_state(worker):
            return False
        return (self.verb is None and self.capability is None) or self.offers(worker)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (type(limit) is not int or limit < 1):
        raise ValidationError.single("limit", f"must be an integer >= 1, got {limit!r}")


# ------------------------------------------------------------------ pagers


class WorkersPager:
    """Builds one page of workers in registration order, a bounded step at a time.

    It looks for ``limit + 1`` matching workers after ``after``: the first
    ``limit`` are the page, the last one only tells that there is a next
    page. ``state`` compares the state a listing shows at ``now``; a
    ``verb`` and ``capability`` pair walks that capability's own index, any
    other filter walks every worker.
    """

    def __init__(
        self,
        workers: Mapping[str, Worker],
        everyone: OrderIndex,
        by_capability: Mapping[CapabilityKey, OrderIndex],
        view: Callable[[Worker, float], WorkerView],
        policy: HealthPolicy,
        *,
        now: float,
        after: int | None,
        limit: int | None,
        state: WorkerState | HealthState | None,
        verb: str | None,
        capability: str | None,
    ) -> None:
        _check_limit(limit)
        self._workers = workers
        self._everyone = everyone
        self._by_capability = by_capability
        self._view = view
        self._filter = _Filter(state, verb, capability, policy, now)
        # With verb and name, the capability's own index holds exactly its workers.
        self._key: CapabilityKey | None = (
            (verb, capability) if verb is not None and capability is not None else None
        )
        self._position = -1 if after is None else after
        self._limit = limit
        self._found: list[WorkerView] = []
        self._listed = 0
        self._last_listed = self._position
        self._done = False
        self._more = False

    def _source(self) -> OrderIndex | None:
        if self._key is None:
            return self._everyone
        return self._by_capability.get(self._key)

    def step(self, budget: int) -> bool:
        """Examine at most ``budget`` more workers; ``True`` once the page is complete."""
        if self._done:
            return True
        source = self._source()
        if source is None:  # nobody offers that capability (any longer)
            self._done = True
            return True
        # A capability's own index holds only its workers: then only a state is left to check.
        checked = self._filter.state is not None or (self._key is None and self._filter.active)
        keep = self._filter.keeps if checked else None
        workers = self._workers
        found = self._found
        limit = self._limit
        for order, worker_id in source.after(self._position):
            if budget <= 0:
                return False
            budget -= 1
            self._position = order
            worker = workers[worker_id]
            if keep is not None and not keep(worker):
                continue
            if limit is not None and self._listed == limit:
                self._more = True  # the (limit + 1)-th: there is a next page
                self._done = True
                return True
            found.append(self._view(worker, self._filter.now))
            self._listed += 1
            self._last_listed = order
        self._done = True
        return True

    def take(self) -> list[WorkerView]:
        """The workers found since the last ``take``, in order; they leave the pager.

        A service renders each step's workers at once, so that none is held
        across a yield (objects that live long enough reach the collector's
        oldest generation, and a full collection stalls the loop).
        """
        found, self._found = self._found, []
        return found

    def page(self) -> WorkersPage:
        """The page, less the workers taken (call once :meth:`step` has returned ``True``)."""
        assert self._done, "the page is not complete yet"
        return WorkersPage(tuple(self._found), self._last_listed if self._more else None)


class CapabilitiesPager:
    """Builds one page of ``(verb, capability, version)`` entries, a bounded step at a time.

    Entries are sorted; each lists its workers in registration order,
    walked from the capability's own index. ``verb`` and ``capability``
    choose entries; ``state`` keeps in each entry only the workers shown in
    that state, and leaves out an entry that keeps none.
    """

    def __init__(
        self,
        workers: Mapping[str, Worker],
        keys: Sequence[CapabilityKey],
        by_capability: Mapping[CapabilityKey, OrderIndex],
        policy: HealthPolicy,
        *,
        now: float,
        after: CapabilityPosition | None,
        limit: int | None,
        state: WorkerState | HealthState | None,
        verb: str | None,
        capability: str | None,
    ) -> None:
        _check_limit(limit)
        self._workers = workers
        self._keys = keys
        self._by_capability = by_capability
        self._filter = _Filter(state, verb, capability, policy, now)
        self._after = after
        self._limit = limit
        self._found: list[CapabilityView] = []
        self._done = False
        self._more = False
        # The capability being walked, where in its index, what it holds so far.
        self._key: CapabilityKey | None = None
        self._position = -1
        self._groups: dict[str, tuple[list[str], list[str]]] = {}
        self._last_key: CapabilityKey | None = None if after is None else (after[0], after[1])
        # The cursor's capability may have versions after the cursor's: walked again first.
        self._again = after is not None

    def _next_key(self) -> CapabilityKey | None:
        """The first capability after the last one walked that the filter keeps."""
        keys = self._keys
        verb, name = self._filter.verb, self._filter.capability
        if self._last_key is None:
            index = 0
        elif self._again:
            index = bisect.bisect_left(keys, self._last_key)  # the cursor's own, for later versions
        else:
            index = bisect.bisect_right(keys, self._last_key)
        if verb is not None:
            index = max(index, bisect.bisect_left(keys, (verb, "")))
        while index < len(keys):
            key = keys[index]
            if verb is not None and key[0] != verb:
                return None  # sorted by verb first: no later key has it
            if name is None or key[1] == name:
                return key
            index += 1
        return None

    def step(self, budget: int) -> bool:
        """Examine at most ``budget`` more workers; ``True`` once the page is complete."""
        while not self._done:
            if self._key is None:
                key = self._next_key()
                if key is None:
                    self._done = True
                    break
                self._key, self._position, self._groups = key, -1, {}
            index = self._by_capability.get(self._key)
            if index is None:  # its last worker left meanwhile
                self._finish_key(emit=False)
                continue
            for order, worker_id in index.after(self._position):
                if budget <= 0:
                    return False
                budget -= 1
                self._position = order
                self._group(self._workers[worker_id], self._key)
            self._finish_key(emit=True)
        return True

    def _group(self, worker: Worker, key: CapabilityKey) -> None:
        if self._filter.state is not None and not self._filter.in_state(worker):
            return
        for member, value in zip(worker.members, worker.capabilities, strict=True):
            if member.key == key:
                workers, healthy = self._groups.setdefault(value.version, ([], []))
                workers.append(worker.worker_id)
                if self._filter.now <= worker.routable_until:
                    healthy.append(worker.worker_id)
                return

    def _finish_key(self, *, emit: bool) -> None:
        key = self._key
        assert key is not None
        self._key = None
        self._last_key = key
        self._again = False
        if not emit:
            return
        after = self._after
        skip_to = after[2] if after is not None and after[:2] == key else None
        for version in sorted(self._groups):
            if skip_to is not None and version <= skip_to:
                continue
            if self._limit is not None and len(self._found) == self._limit:
                self._more = True
                self._done = True
                return
            workers, healthy = self._groups[version]
            self._found.append(
                CapabilityView(key[0], key[1], version, tuple(workers), tuple(healthy))
            )
        self._groups = {}

    def page(self) -> CapabilitiesPage:
        """The page (call once :meth:`step` has returned ``True``)."""
        assert self._done, "the page is not complete yet"
        last = self._found[-1] if self._more else None
        position = None if last is None else (last.verb, last.capability, last.version)
        return CapabilitiesPage(tuple(self._found), position)


class WorkerCounter:
    """Counts the workers (all, routable, matching a filter) at ``now``, a bounded step at a time.

    It walks every worker in registration order, from a position, as a
    pager does (holding no list of them): a worker present throughout is
    counted once, one that registers meanwhile when the walk reaches it.
    """

    def __init__(
        self,
        workers: Mapping[str, Worker],
        everyone: OrderIndex,
        policy: HealthPolicy,
        *,
        now: float,
        state: WorkerState | HealthState | None,
        verb: str | None,
        capability: str | None,
    ) -> None:
        self._workers = workers
        self._everyone = everyone
        self._filter = _Filter(state, verb, capability, policy, now)
        self._position = -1
        self._done = False
        self._total = 0
        self._routable = 0
        self._matching = 0

    def step(self, budget: int) -> bool:
        """Count at most ``budget`` more index entries; ``True`` once every worker is counted."""
        if self._done:
            return True
        ids, last = self._everyone.chunk(self._position, budget)
        if last is None:
            self._done = True
            return True
        self._position = last
        chunk = [self._workers[worker_id] for worker_id in ids]
        now = self._filter.now
        self._total += len(chunk)
        self._routable += sum(1 for worker in chunk if now <= worker.routable_until)
        if self._filter.active:
            self._matching += sum(1 for worker in chunk if self._filter.keeps(worker))
        return False

    def counts(self) -> Counts:
        """The counts (call once :meth:`step` has returned ``True``)."""
        assert self._done, "the count is not complete yet"
        total = self._total
        return Counts(total, self._routable, self._matching if self._filter.active else total)


# ----------------------------------------------------------------- cursors

# A cursor is opaque to clients: the position, tagged with its listing and
# a format version, as URL-safe base64 of compact JSON.
_WORKERS_TAG = "w1"
_CAPABILITIES_TAG = "c1"


def _encode(value: list[object]) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode(cursor: str, tag: str, listing: str) -> list[object]:
    problem = ValidationError.single(
        "cursor",
        f"is not a cursor of {listing}: pass the next_cursor of the previous page "
        "unchanged, or leave cursor out for the first page",
    )
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw.decode())
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise problem from None
    if not isinstance(value, list) or not value or value[0] != tag:
        raise problem
    return value[1:]


def encode_workers_cursor(position: int) -> str:
    """The opaque cursor of a position in ``GET /workers``."""
    return _encode([_WORKERS_TAG, position])


def decode_workers_cursor(cursor: str) -> int:
    """The position a ``GET /workers`` cursor names; :class:`ValidationError` otherwise."""
    value = _decode(cursor, _WORKERS_TAG, "GET /workers")
    if len(value) != 1 or type(value[0]) is not int or value[0] < 0:
        raise ValidationError.single("cursor", "is damaged: pass next_cursor unchanged")
    return value[0]


def encode_capabilities_cursor(position: CapabilityPosition) -> str:
    """The opaque cursor of a position in ``GET /capabilities``."""
    return _encode([_CAPABILITIES_TAG, *position])


def decode_capabilities_cursor(cursor: str) -> CapabilityPosition:
    """The position a ``GET /capabilities`` cursor names; :class:`ValidationError` otherwise."""
    value = _decode(cursor, _CAPABILITIES_TAG, "GET /capabilities")
    if len(value) != 3 or not all(type(part) is str for part in value):
        raise ValidationError.single("cursor", "is damaged: pass next_cursor unchanged")
    verb, name, version = value
    assert isinstance(verb, str) and isinstance(name, str) and isinstance(version, str)
    return verb, name, version
