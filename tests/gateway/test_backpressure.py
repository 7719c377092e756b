"""Back-pressure: never more than max_concurrency calls at a worker; a bounded queue; overloaded."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import httpx
import pytest

from crank_registry import CapabilityRegistry, WorkerEndpoint
from crank_registry.testing import FakeClock
from crank_registry_asgi.backpressure import CallSlots, until_disconnect
from crank_registry_asgi.execute import Gateway
from crank_registry_asgi.failover import next_worker
from crank_registry_asgi.gateway import GatewayConfig
from crank_registry_asgi.http import ApiError
from tests.builders import capability
from tests.gateway.helpers import (
    POLICY,
    FakeWorker,
    WorkerNetwork,
    client_of,
    execute,
    make_gateway,
    register,
    serving,
)

pytestmark = pytest.mark.anyio


@attrs.define
class Counted:
    """A worker's handler that counts the calls it serves at once, and may hold them."""

    gate: anyio.Event | None = None
    now: int = 0
    peak: int = 0
    served: int = 0

    async def serve(self, payload: Any) -> Any:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            if self.gate is not None:
                await self.gate.wait()
            # Some work: other calls run meanwhile.
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
        finally:
            self.now -= 1
        self.served += 1
        return {"ok": True}


def fleet(network: WorkerNetwork, names: list[str], handler: Counted | None = None) -> Counted:
    handler = handler or Counted()
    for name in names:
        network.add(f"{name}.test", FakeWorker(serving({("greet", "hello"): handler.serve})))
    return handler


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the other tasks until ``condition`` holds."""
    while not condition():
        await anyio.sleep(0)


async def test_200_concurrent_calls_never_exceed_max_concurrency_at_any_worker() -> None:
    network = WorkerNetwork()
    counters = {name: fleet(network, [name]) for name in ("w1", "w2", "w3")}
    statuses: list[int] = []
    app = make_gateway(network, FakeClock(), GatewayConfig(queue_limit=200))
    async with client_of(app) as client:
        for name in counters:
            await register(
                client,
                name,
                f"https://{name}.test",
                capability("hello", "greet", max_concurrency=2),
            )

        async def call() -> None:
            statuses.append((await execute(client)).status_code)

        async with anyio.create_task_group() as group:
            for _ in range(200):
                group.start_soon(call)
        gateway: Gateway = app.state.gateway
        assert gateway.slots.waiting("greet", "hello") == 0
        assert [gateway.slots.in_flight(name) for name in counters] == [0, 0, 0]
    assert statuses == [200] * 200
    assert sum(counter.served for counter in counters.values()) == 200
    # Counted at the workers: each was kept busy, never beyond its two.
    assert [counter.peak for counter in counters.values()] == [2, 2, 2]


async def test_past_the_queue_a_call_is_503_overloaded_and_the_queued_ones_are_served() -> None:
    network = WorkerNetwork()
    gate = anyio.Event()
    handler = fleet(network, ["w1"], Counted(gate=gate))
    app = make_gateway(network, FakeClock(), GatewayConfig(queue_limit=3))
    gateway: Gateway = app.state.gateway
    statuses: list[int] = []
    async with client_of(app) as client:
        await register(
            client, "w1", "https://w1.test", capability("hello", "greet", max_concurrency=2)
        )

        async def call() -> None:
            statuses.append((await execute(client)).status_code)

        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(call)
            await until(lambda: gateway.slots.waiting("greet", "hello") == 3 and handler.now == 2)
            assert gateway.slots.in_flight("w1") == 2
            refused = await execute(client)
            gate.set()
    assert refused.status_code == 503
    assert refused.json() == {
        "error": "overloaded",
        "message": refused.json()["message"],
        "verb": "greet",
        "capability": "hello",
    }
    assert "3 calls already wait" in refused.json()["message"]
    assert refused.headers["Retry-After"] == "1"
    assert statuses == [200] * 5
    assert (handler.served, handler.peak) == (5, 2)


async def test_a_full_worker_is_passed_over_for_another_candidate() -> None:
    network = WorkerNetwork()
    gate = anyio.Event()
    held = fleet(network, ["busy"], Counted(gate=gate))
    free = fleet(network, ["free"])
    app = make_gateway(network, FakeClock(), GatewayConfig(queue_limit=0))
    gateway: Gateway = app.state.gateway
    async with client_of(app) as client:
        one = capability("hello", "greet", max_concurrency=1)
        await register(client, "busy", "https://busy.test", one)
        await register(client, "free", "https://free.test", one)
        async with anyio.create_task_group() as group:
            group.start_soon(functools.partial(execute, client, exclude=["free"]))
            await until(lambda: held.now == 1)
            # Round-robin would give "busy" its turn: it is full, "free" takes both.
            answers = [(await execute(client)).headers["x-crank-worker-id"] for _ in range(2)]
            gate.set()
    assert answers == ["free", "free"]
    assert (held.peak, free.served) == (1, 2)
    assert gateway.slots.in_flight("busy") == 0


async def test_a_call_the_caller_abandons_while_queued_leaves_the_queue() -> None:
    network = WorkerNetwork()
    gate = anyio.Event()
    handler = fleet(network, ["w1"], Counted(gate=gate))
    app = make_gateway(network, FakeClock())
    gateway: Gateway = app.state.gateway
    async with client_of(app) as client:
        await register(
            client, "w1", "https://w1.test", capability("hello", "greet", max_concurrency=1)
        )
        async with anyio.create_task_group() as group:
            group.start_soon(functools.partial(execute, client))
            await until(lambda: handler.now == 1)
            with anyio.CancelScope() as abandoned:
                group.start_soon(functools.partial(_cancel_when_queued, gateway, abandoned))
                await execute(client)
            assert abandoned.cancelled_caught
            assert gateway.slots.waiting("greet", "hello") == 0
            gate.set()
    assert handler.served == 1


async def _cancel_when_queued(gateway: Gateway, scope: anyio.CancelScope) -> None:
    await until(lambda: gateway.slots.waiting("greet", "hello") == 1)
    scope.cancel()


async def test_a_caller_that_disconnects_while_queued_leaves_the_queue_unanswered() -> None:
    network = WorkerNetwork()
    gate = anyio.Event()
    handler = fleet(network, ["w1"], Counted(gate=gate))
    app = make_gateway(network, FakeClock())
    gateway: Gateway = app.state.gateway
    body = json.dumps({"verb": "greet", "capability": "hello", "payload": {}}).encode()
    hung_up = anyio.Event()
    sent: list[dict[str, Any]] = []
    bodies = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if bodies:
            return bodies.pop()
        await hung_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/execute",
        "headers": [(b"content-type", b"application/json")],
        "query_string": b"",
        "client": ("127.0.0.1", 5000),
        "server": ("controller", 80),
        "scheme": "http",
    }
    async with client_of(app) as client:
        await register(
            client, "w1", "https://w1.test", capability("hello", "greet", max_concurrency=1)
        )
        async with anyio.create_task_group() as group:
            group.start_soon(functools.partial(execute, client))
            await until(lambda: handler.now == 1)
            group.start_soon(gateway, scope, receive, send)
            await until(lambda: gateway.slots.waiting("greet", "hello") == 1)
            hung_up.set()
            await until(lambda: gateway.slots.waiting("greet", "hello") == 0)
            gate.set()
    assert sent == []  # nobody to answer
    assert handler.served == 1


async def test_least_loaded_weighs_the_gateways_own_calls_in_flight() -> None:
    network = WorkerNetwork()
    gate = anyio.Event()
    held = fleet(network, ["a"], Counted(gate=gate))
    fleet(network, ["b"])
    clock = FakeClock()
    app = make_gateway(network, clock)
    async with client_of(app) as client:
        many = capability("hello", "greet", max_concurrency=10)
        await register(client, "a", "https://a.test", many)
        await register(client, "b", "https://b.test", many)
        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(functools.partial(execute, client, exclude=["b"]))
            await until(lambda: held.now == 3)
            # Past a heartbeat interval, hand-outs alone would have faded (a tie,
            # which goes to "a"); the gateway's three calls in flight still count.
            clock.advance(2.0)
            response = await execute(client, strategy="least_loaded")
            gate.set()
    assert response.headers["x-crank-worker-id"] == "b"


async def test_a_stream_holds_its_slot_until_it_ends() -> None:
    seen: list[int] = []

    class Stream(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b'{"n":1}\n'
            seen.append(gateway.slots.in_flight("w1"))
            yield b'{"n":2}\n'

    class StreamingHost(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            return httpx.Response(
                200, headers={"content-type": "application/x-ndjson"}, stream=Stream()
            )

    app = make_gateway(StreamingHost(), FakeClock())
    gateway: Gateway = app.state.gateway
    async with client_of(app) as client:
        await register(client, "w1", "https://w1.test")
        response = await execute(client)
        assert response.text == '{"n":1}\n{"n":2}\n'
        assert seen == [1]
        assert gateway.slots.in_flight("w1") == 0


def test_the_queue_limit_is_checked() -> None:
    with pytest.raises(ValueError, match="queue_limit"):
        GatewayConfig(queue_limit=-1)
    assert GatewayConfig().queue_limit == 100


async def test_waiting_calls_are_served_in_arrival_order() -> None:
    registry = CapabilityRegistry(POLICY)
    registry.register(
        "w1", "https://w1.test", [capability("hello", "greet", max_concurrency=1)], now=0.0
    )
    slots = CallSlots(
        registry,
        queue_limit=10,
        recheck=3600.0,
        overloaded=lambda verb, name: ApiError(503, "overloaded", "full"),
    )

    def route(busy: Collection[str]) -> WorkerEndpoint | None:
        return next_worker(registry, "greet", "hello", tried=(), busy=busy, now=0.0)

    order: list[int] = []

    async def wait_turn(number: int) -> None:
        slot = await slots.acquire("greet", "hello", route)
        assert slot is not None
        order.append(number)
        slot.release()

    first = await slots.acquire("greet", "hello", route)
    assert first is not None and slots.busy("greet", "hello") == {"w1"}
    async with anyio.create_task_group() as group:
        for number in range(5):
            group.start_soon(wait_turn, number)
            await until(lambda n=number: slots.waiting("greet", "hello") == n + 1)
        first.release()
    assert order == [0, 1, 2, 3, 4]
    assert (slots.in_flight("w1"), slots.waiting("greet", "hello")) == (0, 0)
    assert slots.busy("greet", "hello") == ()


async def test_what_a_wait_raises_comes_out_as_itself() -> None:
    # Not wrapped in the watcher's task group's ExceptionGroup: the gateway
    # answers an ApiError raised while a call waits (a payload its worker refuses).
    async def connected() -> dict[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def refused() -> None:
        raise ApiError(422, "invalid_payload", "payload: must be of type object")

    with pytest.raises(ApiError) as raised:
        await until_disconnect(connected, refused)
    assert raised.value.code == "invalid_payload"
