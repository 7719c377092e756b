"""The gateway's back-pressure: calls in flight per worker, and a bounded queue per capability.

The gateway counts the calls it has in flight to each worker (from the
moment a worker is chosen to the end of its answer, streams included). A
worker with as many calls in flight as the routed capability's
``max_concurrency`` takes no more: the route excludes it (the core's
``exclude``), so another candidate is chosen. When every candidate is full,
the call waits its turn in a FIFO per ``(verb, capability)`` of at most
``queue_limit`` calls; past it, 503 ``overloaded`` with ``Retry-After``.
While a capability has calls waiting, a new call joins the end of its
queue rather than taking a slot ahead of them.

A call that ends wakes the first waiting call of each capability its
worker offers; that call routes again (a slot freed on a worker, or a
worker that registered meanwhile, may take it). The first waiting call
also routes again every ``recheck`` seconds, so a worker that joined while
nothing ended is found. A caller that disconnects (or is cancelled) while
waiting leaves the queue at once.

The counts also go to the registry (:meth:`~crank_registry.CapabilityRegistry.count_calls`),
so that ``least_loaded`` weighs the gateway's own calls in flight.

With a fleet of controllers on one Redis (``fleet``, the
:class:`FleetCounts` of :mod:`crank_registry_asgi.fleet_calls`), a worker
this process has room for takes the call only once the fleet-wide
reservation is taken; a refusal passes it over like a locally full one.
A call that ends here wakes the first waiting call as before (its
reservation is given back by the next one taken, in the same script);
calls end elsewhere unseen, so the first waiting call also routes again
after a backoff from ``fleet.poll_first`` seconds up to ``fleet.poll_max``.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Collection
from typing import Protocol, TypeVar

import anyio
from starlette.types import Receive

from crank_registry import CapabilityKey, CapabilityRegistry, WorkerEndpoint

from .http import ApiError

__all__ = ["CallSlots", "CallerLeft", "Check", "FleetCounts", "Router", "Slot", "until_disconnect"]

T = TypeVar("T")

#: ``route(busy)`` routes excluding the workers ``busy``: the endpoint, or
#: ``None`` when no candidate is left (it may raise the registry's errors).
Router = Callable[[Collection[str]], WorkerEndpoint | None]
#: ``check(endpoint)``: raises when the call may not go to the worker chosen
#: (the gateway's payload check against that worker's ``input_schema``).
Check = Callable[[WorkerEndpoint], None]


class FleetCounts(Protocol):
    """The calls in flight of every gateway sharing the workers (one Redis)."""

    #: Seconds before the first waiting call routes again when nothing ended here,
    #: doubling up to ``poll_max``.
    poll_first: float
    poll_max: float

    async def reserve(self, worker_id: str, limit: int) -> bool:
        """Take a call to ``worker_id`` if the fleet has fewer than ``limit`` in flight."""

    def release(self, worker_id: str) -> None:
        """Give a call to ``worker_id`` back (the next :meth:`reserve` sees it given back)."""


class CallerLeft(Exception):
    """The caller disconnected while its call was waiting: there is no one to answer."""


class Slot:
    """One call in flight to ``endpoint``; :meth:`release` when its answer has ended."""

    __slots__ = ("_slots", "endpoint", "released")

    def __init__(self, slots: CallSlots, endpoint: WorkerEndpoint) -> None:
        self._slots = slots
        self.endpoint = endpoint
        self.released = False

    def release(self) -> None:
        """The call has ended (idempotent: the second release does nothing)."""
        if not self.released:
            self.released = True
            self._slots._ended(self.endpoint.worker_id)


class _Waiter:
    __slots__ = ("woken",)

    def __init__(self) -> None:
        self.woken = anyio.Event()


class _AllFull:
    """What :meth:`CallSlots._try` returns when every candidate is full."""


_FULL = _AllFull()


class CallSlots:
    """The calls in flight per worker and the queues of calls waiting for a worker.

    ``queue_limit``: the most calls waiting per ``(verb, capability)`` (0:
    none wait, a full capability is ``overloaded`` at once); ``recheck``:
    seconds between two routes of the first waiting call when nothing ends;
    ``overloaded``: makes the 503 for a ``(verb, capability)``; ``fleet``:
    the other gateways' calls, when they share the workers.
    """

    def __init__(
        self,
        registry: CapabilityRegistry,
        *,
        queue_limit: int,
        recheck: float,
        overloaded: Callable[[str, str], ApiError],
        fleet: FleetCounts | None = None,
    ) -> None:
        self._registry = registry
        self.queue_limit = queue_limit
        self.recheck = recheck
        self._overloaded = overloaded
        self.fleet = fleet
        self._in_flight: dict[str, int] = {}
        self._queues: dict[CapabilityKey, collections.deque[_Waiter]] = {}
        # Per (verb, capability), its workers with no free slot; per worker,
        # the pairs it is full for. Kept when a count changes, so that a
        # route reads its busy workers in O(1), not by walking the counts.
        self._full: dict[CapabilityKey, set[str]] = {}
        self._full_for: dict[str, tuple[CapabilityKey, ...]] = {}
        # Per worker with calls in flight, its (verb, capability) limits.
        self._limits: dict[str, tuple[tuple[CapabilityKey, int], ...]] = {}

    def in_flight(self, worker_id: str) -> int:
        """The gateway's calls in flight to ``worker_id``."""
        return self._in_flight.get(worker_id, 0)

    def waiting(self, verb: str, capability: str) -> int:
        """How many calls wait for a worker of ``(verb, capability)``."""
        queue = self._queues.get((verb, capability))
        return 0 if queue is None else len(queue)

    def busy(self, verb: str, capability: str) -> Collection[str]:
        """The workers with as many calls in flight as their ``max_concurrency`` for the pair.

        A worker's limits are those it had when its first call in flight
        started (one that registers again with another limit has it once
        its calls in flight have ended).
        """
        return self._full.get((verb, capability), ())

    async def acquire(
        self,
        verb: str,
        capability: str,
        route: Router,
        *,
        check: Check | None = None,
        receive: Receive | None = None,
    ) -> Slot | None:
        """A slot on a worker of ``(verb, capability)``, waiting for one if every candidate is full.

        ``None``: no candidate at all (not a matter of load). ``check`` is
        given the worker chosen before its slot is taken (what it raises
        ends the call, no slot taken). Raises the ``overloaded``
        :class:`~crank_registry_asgi.http.ApiError` when the queue is full,
        :class:`CallerLeft` when ``receive`` says the caller disconnected
        while waiting, and whatever ``route`` or ``check`` raise.
        """
        key = (verb, capability)
        if key not in self._queues:
            taken = await self._try(verb, capability, route, check)
            if not isinstance(taken, _AllFull):
                return taken
        queue = self._queues.setdefault(key, collections.deque())
        if len(queue) >= self.queue_limit:
            if not queue:
                del self._queues[key]
            raise self._overloaded(verb, capability)
        waiter = _Waiter()
        queue.append(waiter)
        handed: list[Slot | None] = []

        async def wait() -> Slot | None:
            handed.append(await self._wait(waiter, queue, route, check, key))
            return handed[0]

        try:
            return await until_disconnect(receive, wait)
        except BaseException:
            # Taken just as the call was cancelled: nobody will use it.
            for slot in handed:
                if slot is not None:
                    slot.release()
            raise
        finally:
            first = queue[0] is waiter
            queue.remove(waiter)
            if not queue:
                del self._queues[key]
            elif first:
                # The next in line may take a slot freed meanwhile.
                queue[0].woken.set()

    async def _wait(
        self,
        waiter: _Waiter,
        queue: collections.deque[_Waiter],
        route: Router,
        check: Check | None,
        key: CapabilityKey,
    ) -> Slot | None:
        # Calls that end on other gateways wake nobody here: poll, backing off.
        first, most = self.recheck, self.recheck
        if self.fleet is not None:
            first, most = self.fleet.poll_first, min(self.fleet.poll_max, self.recheck)
        delay = first
        while True:
            with anyio.move_on_after(delay) as timer:
                await waiter.woken.wait()
            delay = min(delay * 2, most) if timer.cancelled_caught else first
            waiter.woken = anyio.Event()
            if queue[0] is not waiter:
                continue
            taken = await self._try(*key, route, check)
            if not isinstance(taken, _AllFull):
                return taken

    async def _try(
        self, verb: str, capability: str, route: Router, check: Check | None
    ) -> Slot | _AllFull | None:
        """A slot, ``None`` (no candidate at all), or :data:`_FULL` (every candidate is full).

        ``check`` sees each worker chosen before anything is reserved on it.
        With a ``fleet``, a worker whose fleet-wide reservation is refused
        is passed over for this call, as a locally full one is.
        """
        key = (verb, capability)
        refused: set[str] = set()
        while True:
            busy: Collection[str] = self._full.get(key, ())
            if refused:
                busy = refused.union(busy)
            endpoint = route(busy)
            if endpoint is None:
                # Without the busy workers nothing is left: were they the candidates?
                return _FULL if busy and route(()) is not None else None
            if check is not None:
                check(endpoint)
            worker_id = endpoint.worker_id
            if self.fleet is not None and not await self.fleet.reserve(
                worker_id, self._limit(worker_id, key)
            ):
                refused.add(worker_id)
                continue
            self._count(worker_id, self._in_flight.get(worker_id, 0) + 1)
            return Slot(self, endpoint)

    def _limit(self, worker_id: str, key: CapabilityKey) -> int:
        """``worker_id``'s ``max_concurrency`` for ``key`` (the limits its calls in flight use)."""
        limits = self._limits.get(worker_id)
        if limits is None:
            limits = self._registry.concurrency_limits(worker_id)
        return dict(limits).get(key, 1)

    def _ended(self, worker_id: str) -> None:
        limits = self._count(worker_id, self._in_flight[worker_id] - 1)
        if self.fleet is not None:
            self.fleet.release(worker_id)
        # A slot is free on this worker: the first waiting call of each of its pairs tries.
        for key, _ in limits:
            queue = self._queues.get(key)
            if queue:
                queue[0].woken.set()

    def _count(self, worker_id: str, calls: int) -> tuple[tuple[CapabilityKey, int], ...]:
        """Set ``worker_id``'s count to ``calls``: its full pairs, the registry; its limits.

        A worker's limits are read from the registry when its first call
        starts and kept while it has calls in flight.
        """
        limits = self._limits.get(worker_id)
        if limits is None:
            limits = self._limits[worker_id] = self._registry.concurrency_limits(worker_id)
        if calls:
            self._in_flight[worker_id] = calls
        else:
            del self._in_flight[worker_id]
            del self._limits[worker_id]
        self._registry.count_calls(worker_id, calls)
        for key in self._full_for.pop(worker_id, ()):
            full = self._full[key]
            full.discard(worker_id)
            if not full:
                del self._full[key]
        full_for = tuple(key for key, most in limits if calls >= most)
        for key in full_for:
            self._full.setdefault(key, set()).add(worker_id)
        if full_for:
            self._full_for[worker_id] = full_for
        return limits


async def until_disconnect(receive: Receive | None, wait: Callable[[], Awaitable[T]]) -> T:
    """``await wait()``, unless the caller disconnects first (then :class:`CallerLeft`).

    ``receive`` is the request's, its body already read: what it says next
    is ``http.disconnect``. ``None``: nothing to watch. What ``wait``
    raises is raised as it is.
    """
    if receive is None:
        return await wait()
    outcome: list[T] = []
    failed: list[Exception] = []
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch)
        # Caught here: raised inside the task group it would come out wrapped in an
        # ExceptionGroup, which the caller's handlers (an ApiError's answer) miss.
        try:
            outcome.append(await wait())
        except Exception as error:
            failed.append(error)
        group.cancel_scope.cancel()
    if failed:
        raise failed[0]
    if not outcome:
        raise CallerLeft
    return outcome[0]
