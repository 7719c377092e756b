"""Helpers of the worker client tests: virtual time and a controller to talk to."""

from __future__ import annotations

import asyncio
import json
import math
import selectors
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import httpx

from crank_registry import (
    CapabilityRegistry,
    HealthPolicy,
    HeartbeatRequest,
    Registration,
    UnknownCapability,
    ValidationError,
    WorkerNotRegistered,
    structure,
    unstructure,
)


class _JumpingSelector(selectors.BaseSelector):
    """Polls real I/O without waiting; a wait for a timer moves the clock instead."""

    def __init__(self, loop: VirtualClockEventLoop) -> None:
        self._loop = loop
        self._selector = selectors.DefaultSelector()

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._selector.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._selector.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._selector.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            # No timer is pending: only real I/O can wake the loop.
            return self._selector.select(None)
        ready = self._selector.select(0)
        if not ready and timeout > 0:
            self._loop.virtual_time += timeout
        return ready

    def close(self) -> None:
        self._selector.close()

    def get_map(self) -> Any:
        return self._selector.get_map()


class VirtualClockEventLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose clock jumps to the next timer when every task waits.

    The asyncio counterpart of trio's ``MockClock(autojump_threshold=0)``,
    for code without real I/O (``httpx.MockTransport``, ``ASGITransport``).
    """

    def __init__(self) -> None:
        self.virtual_time = 0.0
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self.virtual_time


@dataclass(frozen=True)
class Call:
    """One request the fake controller received, at virtual time ``at``."""

    at: float
    method: str
    path: str
    body: Any
    headers: dict[str, str] = field(repr=False)


#: 503 answers a fake controller gives as a fault: the code is the fault's name.
UNAVAILABLE_CODES = frozenset({"store_unavailable", "journal_unavailable", "incompatible_peer"})


class FakeController:
    """The controller's HTTP API over ``httpx.MockTransport``, backed by a real registry.

    ``fault`` (for every path) or ``faults[path]`` injects a failure:
    ``"down"`` (connection refused), ``"error"`` (500), ``"hang"`` (never
    answers), ``"refuse"`` (422 ``invalid_request``), or one of
    :data:`UNAVAILABLE_CODES` (503 with that code). :meth:`restart`
    forgets every worker, as a controller restarted without its journal
    does. Time is ``anyio.current_time()``. ``features`` is what its
    registration answer lists (none: a controller older than the list,
    which refuses a heartbeat's ``load`` as an unknown field; without
    ``drain`` it answers the drain paths 404 ``not_found``, as an older one).
    ``registry``: another fake's, for controllers that share one registry.
    """

    def __init__(
        self,
        interval: float = 1.0,
        *,
        features: tuple[str, ...] = (),
        registry: CapabilityRegistry | None = None,
    ) -> None:
        self.policy = HealthPolicy(interval, 2 * interval, 4 * interval)
        self.features = features
        self.registry = CapabilityRegistry(self.policy) if registry is None else registry
        self.fault: str | None = None
        self.faults: dict[str, str] = {}
        self.calls: list[Call] = []
        self.transport = httpx.MockTransport(self.handle)

    def restart(self) -> None:
        self.registry = CapabilityRegistry(self.policy)

    def paths(self) -> list[str]:
        return [call.path for call in self.calls]

    def calls_to(self, path: str) -> list[Call]:
        return [call for call in self.calls if call.path == path]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        # A real network yields to the scheduler (and to cancellation) here.
        await anyio.lowlevel.checkpoint()
        now = anyio.current_time()
        path = request.url.path
        body = json.loads(request.content) if request.content else None
        self.calls.append(Call(now, request.method, path, body, dict(request.headers)))
        fault = self.faults.get(path, self.fault)
        if fault == "down":
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if fault == "error":
            return httpx.Response(500, json={"error": "internal_error"})
        if fault == "hang":
            await anyio.sleep_forever()
        if fault in UNAVAILABLE_CODES:
            return httpx.Response(503, headers={"Retry-After": "1"}, json={"error": fault})
        if fault == "refuse":
            detail = [{"path": "worker_url", "message": "not reachable from the controller"}]
            return httpx.Response(422, json={"error": "invalid_request", "detail": detail})
        try:
            return self._answer(path, body, now)
        except WorkerNotRegistered as error:
            return httpx.Response(404, json={"error": error.code, "worker_id": error.worker_id})
        except ValidationError as error:
            detail = [{"path": p.path, "message": p.message} for p in error.problems]
            return httpx.Response(422, json={"error": error.code, "detail": detail})

    def _answer(self, path: str, body: Any, now: float) -> httpx.Response:
        interval = self.policy.heartbeat_interval
        if path == "/register":
            registration = structure(body, Registration)
            self.registry.register(
                registration.worker_id,
                registration.worker_url,
                registration.capabilities,
                now=now,
            )
            answer = {
                "status": "registered",
                "worker_id": registration.worker_id,
                "heartbeat_interval_s": interval,
            }
            if self.features:
                answer["features"] = list(self.features)
            return httpx.Response(200, json=answer)
        if path == "/heartbeat":
            if "load_reports" not in self.features and "load" in body:
                raise ValidationError.single("load", "unknown field")
            beat = structure(body, HeartbeatRequest)
            self.registry.heartbeat(beat.worker_id, now=now, load=beat.load)
            return httpx.Response(
                200,
                json={
                    "status": "acknowledged",
                    "timestamp": "2026-11-26T20:00:00+00:00",
                    "heartbeat_interval_s": interval,
                },
            )
        if path == "/deregister":
            self.registry.deregister(body["worker_id"], now=now)
            return httpx.Response(
                200, json={"status": "deregistered", "worker_id": body["worker_id"]}
            )
        if path.startswith("/workers/") and path.endswith(("/drain", "/undrain")):
            if "drain" not in self.features:
                return httpx.Response(404, json={"error": "not_found", "message": "no such path"})
            worker_id, _, action = path.removeprefix("/workers/").partition("/")
            change = self.registry.drain if action == "drain" else self.registry.undrain
            changed = bool(change(worker_id, now=now))
            answer = {"worker_id": worker_id, "draining": action == "drain", "changed": changed}
            return httpx.Response(200, json=answer)
        if path == "/route":
            try:
                endpoint = self.registry.route(body["verb"], body["capability"], now=now)
            except UnknownCapability:
                return httpx.Response(404, json={"error": "unknown_capability", **body})
            if endpoint is None:
                return httpx.Response(
                    503,
                    headers={"Retry-After": str(round(interval))},
                    json={"error": "no_worker_available", **body},
                )
            return httpx.Response(200, json=unstructure(endpoint))
        return httpx.Response(404, json={"error": "not_found"})


class TransportByHost(httpx.AsyncBaseTransport):
    """Sends each request to the transport of its URL's host, as a network would."""

    def __init__(self, transports: Mapping[str, httpx.AsyncBaseTransport]) -> None:
        self._transports = dict(transports)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._transports[request.url.host].handle_async_request(request)


class SwitchableTransport(httpx.AsyncBaseTransport):
    """Sends requests to the current in-process app; with none, the connection is refused.

    ``requests`` records ``(time, path)`` of every request, answered or not.
    """

    def __init__(self) -> None:
        self.app: Any = None
        self.requests: list[tuple[float, str]] = []

    def times_of(self, path: str, *, since: float = -math.inf) -> list[float]:
        return [at for at, seen in self.requests if seen == path and at >= since]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((anyio.current_time(), request.url.path))
        if self.app is None:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return await httpx.ASGITransport(app=self.app).handle_async_request(request)


class InProcessController:
    """The real controller app, served in-process with its lifespan running.

    Each :meth:`start` builds a new app (a new process, as far as the workers
    can tell) from ``make_app``; :meth:`stop` runs its shutdown. Between the
    two, requests through :attr:`transport` are refused. The app's lifespan
    runs in a task of ``task_group``, so that it can stop while agents,
    started later, keep running.
    """

    def __init__(self, task_group: anyio.abc.TaskGroup, make_app: Callable[[], Any]) -> None:
        self._task_group = task_group
        self._make_app = make_app
        self._stop: anyio.Event | None = None
        self._stopped: anyio.Event | None = None
        self.transport = SwitchableTransport()
        self.app: Any = None

    async def start(self) -> None:
        app = self._make_app()
        stop, stopped = anyio.Event(), anyio.Event()

        async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            try:
                async with app.router.lifespan_context(app):
                    self.transport.app = app
                    task_status.started()
                    await stop.wait()
                    self.transport.app = None
            finally:
                stopped.set()

        await self._task_group.start(serve)
        self.app, self._stop, self._stopped = app, stop, stopped

    async def stop(self) -> None:
        assert self._stop is not None and self._stopped is not None, "not started"
        self._stop.set()
        await self._stopped.wait()
        self._stop = self._stopped = None

    async def restart(self, downtime: float = 0.0) -> None:
        await self.stop()
        await anyio.sleep(downtime)
        await self.start()
