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
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

import anyio
from starlette.types import Receive

from crank_registry import CapabilityKey, CapabilityRegistry, WorkerEndpoint

from .http import ApiError

__all__ = ["CallSlots", "CallerLeft", "Slot", "until_disconnect"]

T = TypeVar("T")

#: ``route(busy)`` routes excluding the workers ``busy``: the endpoint, or
#: ``None`` when no candidate is left (it may raise the registry's errors).
Router = Callable[[Collection[str]], WorkerEndpoint | None]


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


#: What :meth:`CallSlots._try` returns when every candidate is full.
_FULL = object()


class CallSlots:
    """The calls in flight per worker and the queues of calls waiting for a worker.

    ``queue_limit``: the most calls waiting per ``(verb, capability)`` (0:
    none wait, a full capability is ``overloaded`` at once); ``recheck``:
    seconds between two routes of the first waiting call when nothing ends;
    ``overloaded``: makes the 503 for a ``(verb, capability)``.
    """

    def __init__(
        self,
        registry: CapabilityRegistry,
        *,
        queue_limit: int,
        recheck: float,
        overloaded: Callable[[str, str], ApiError],
    ) -> None:
        self._registry = registry
        self.queue_limit = queue_limit
        self.recheck = recheck
        self._overloaded = overloaded
        self._in_flight: dict[str, int] = {}
        self._queues: dict[CapabilityKey, collections.deque[_Waiter]] = {}

    def in_flight(self, worker_id: str) -> int:
        """The gateway's calls in flight to ``worker_id``."""
        return self._in_flight.get(worker_id, 0)

    def waiting(self, verb: str, capability: str) -> int:
        """How many calls wait for a worker of ``(verb, capability)``."""
        queue = self._queues.get((verb, capability))
        return 0 if queue is None else len(queue)

    def busy(self, verb: str, capability: str) -> list[str]:
        """The workers with as many calls in flight as their ``max_concurrency`` for the pair.

        O(the workers with calls in flight), never the registry.
        """
        limit = self._registry.concurrency_limit
        return [
            worker_id
            for worker_id, calls in self._in_flight.items()
            if (most := limit(worker_id, verb, capability)) is not None and calls >= most
        ]

    async def acquire(
        self, verb: str, capability: str, route: Router, *, receive: Receive | None = None
    ) -> Slot | None:
        """A slot on a worker of ``(verb, capability)``, waiting for one if every candidate is full.

        ``None``: no candidate at all (not a matter of load). Raises the
        ``overloaded`` :class:`~crank_registry_asgi.http.ApiError` when the
        queue is full, :class:`CallerLeft` when ``receive`` says the caller
        disconnected while waiting, and whatever ``route`` raises.
        """
        key = (verb, capability)
        if key not in self._queues:
            taken = self._try(verb, capability, route)
            if taken is not _FULL:
                return taken  # type: ignore[return-value]
        queue = self._queues.setdefault(key, collections.deque())
        if len(queue) >= self.queue_limit:
            if not queue:
                del self._queues[key]
            raise self._overloaded(verb, capability)
        waiter = _Waiter()
        queue.append(waiter)
        try:
            return await until_disconnect(receive, lambda: self._wait(waiter, queue, route, key))
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
        key: CapabilityKey,
    ) -> Slot | None:
        while True:
            with anyio.move_on_after(self.recheck):
                await waiter.woken.wait()
            waiter.woken = anyio.Event()
            if queue[0] is not waiter:
                continue
            taken = self._try(*key, route)
            if taken is not _FULL:
                return taken  # type: ignore[return-value]

    def _try(self, verb: str, capability: str, route: Router) -> Slot | object | None:
        """A slot, ``None`` (no candidate at all), or :data:`_FULL` (every candidate is full)."""
        busy = self.busy(verb, capability) if self._in_flight else []
        endpoint = route(busy)
        if endpoint is None:
            # Without the busy workers nothing is left: were they the candidates?
            return _FULL if busy and route(()) is not None else None
        calls = self._in_flight.get(endpoint.worker_id, 0) + 1
        self._in_flight[endpoint.worker_id] = calls
        self._registry.count_calls(endpoint.worker_id, calls)
        return Slot(self, endpoint)

    def _ended(self, worker_id: str) -> None:
        calls = self._in_flight[worker_id] - 1
        if calls:
            self._in_flight[worker_id] = calls
        else:
            del self._in_flight[worker_id]
        self._registry.count_calls(worker_id, calls)
        limit = self._registry.concurrency_limit
        for (verb, capability), queue in self._queues.items():
            if limit(worker_id, verb, capability) is not None:
                queue[0].woken.set()


async def until_disconnect(receive: Receive | None, wait: Callable[[], Awaitable[T]]) -> T:
    """``await wait()``, unless the caller disconnects first (then :class:`CallerLeft`).

    ``receive`` is the request's, its body already read: what it says next
    is ``http.disconnect``. ``None``: nothing to watch.
    """
    if receive is None:
        return await wait()
    outcome: list[T] = []
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch)
        outcome.append(await wait())
        group.cancel_scope.cancel()
    if not outcome:
        raise CallerLeft
    return outcome[0]
