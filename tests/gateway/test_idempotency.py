"""Idempotency-Key on /execute: one worker call per key and body, counted at the worker."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import anyio
import attrs
import httpx
import pytest

from crank_registry import RoutingSettings
from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, create_app
from crank_registry_asgi.execute import Gateway
from crank_registry_asgi.gateway import GatewayConfig, create_gateway_app
from crank_worker_client.serving import InvocationError
from tests.gateway.helpers import POLICY, FakeWorker, WorkerNetwork, client_of, register, serving

pytestmark = pytest.mark.anyio

BODY = {"verb": "greet", "capability": "hello", "payload": {"name": "Ada"}}


@attrs.define
class Worker:
    """Counts its calls; answers with the count, or ``outcome`` (an error to raise)."""

    calls: int = 0
    gate: anyio.Event | None = None
    outcome: Exception | None = None

    async def serve(self, payload: Any) -> Any:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.outcome is not None:
            raise self.outcome
        return {"call": self.calls}


def gateway_app(
    network: WorkerNetwork, clock: FakeClock, ttl: float = 3600.0, **config: Any
) -> Any:
    controller = create_app(
        config=ServiceConfig(policy=POLICY, routing=RoutingSettings(idempotency_ttl=ttl)),
        clock=clock,
    )
    return create_gateway_app(controller, GatewayConfig(**config), transport=network)


async def post(client: httpx.AsyncClient, key: str | None, body: Any = None) -> httpx.Response:
    headers = {} if key is None else {"Idempotency-Key": key}
    return await client.post("/execute", json=BODY if body is None else body, headers=headers)


def worker_network(worker: Worker) -> WorkerNetwork:
    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(serving({("greet", "hello"): worker.serve})))
    return network


async def test_the_same_key_and_body_is_replayed_without_a_worker_call() -> None:
    worker = Worker()
    async with client_of(gateway_app(worker_network(worker), FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        first = await post(client, "order-1")
        again = await post(client, "order-1")
        other_key = await post(client, "order-2")
        no_key = await post(client, None)
    assert (first.status_code, first.json()) == (200, {"result": {"call": 1}})
    assert "idempotent-replayed" not in first.headers
    assert (again.status_code, again.json()) == (200, {"result": {"call": 1}})
    assert again.content == first.content  # the very bytes, not an equal document
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["x-crank-worker-id"] == "w1"
    assert again.headers["content-type"] == "application/json"
    assert other_key.json() == {"result": {"call": 2}}
    assert no_key.json() == {"result": {"call": 3}}
    assert worker.calls == 3


async def test_the_same_key_with_another_body_is_422_reused() -> None:
    worker = Worker()
    async with client_of(gateway_app(worker_network(worker), FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        await post(client, "order-1")
        reused = await post(client, "order-1", {**BODY, "payload": {"name": "Bob"}})
        # The same JSON with its keys in another order is the same body.
        reordered = await post(client, "order-1", dict(reversed(BODY.items())))
    assert reused.status_code == 422
    assert reused.json()["error"] == "idempotency_key_reused"
    assert "new key" in reused.json()["message"]
    assert reordered.headers["Idempotent-Replayed"] == "true"
    assert worker.calls == 1


async def test_a_duplicate_sent_while_the_first_runs_waits_and_gets_its_answer() -> None:
    gate = anyio.Event()
    worker = Worker(gate=gate)
    app = gateway_app(worker_network(worker), FakeClock())
    answers: list[httpx.Response] = []
    async with client_of(app) as client:
        await register(client, "w1", "https://w1.test")

        async def call() -> None:
            answers.append(await post(client, "order-1"))

        async with anyio.create_task_group() as group:
            group.start_soon(call)
            while worker.calls == 0:
                await anyio.sleep(0)
            group.start_soon(call)
            group.start_soon(call)
            # A duplicate with another body does not wait: it is refused at once.
            reused = await post(client, "order-1", {**BODY, "payload": {}})
            gate.set()
    assert reused.status_code == 422
    assert worker.calls == 1
    assert [answer.json() for answer in answers] == [{"result": {"call": 1}}] * 3
    assert len({answer.content for answer in answers}) == 1
    assert [answer.headers.get("Idempotent-Replayed") for answer in answers] == [
        None,
        "true",
        "true",
    ]


@pytest.mark.parametrize(
    ("outcome", "status", "kept"),
    [
        (InvocationError("no_such_note", "no note 9", status=404), 404, True),
        (InvocationError("bad_name", "no name", status=422), 422, True),
        (RuntimeError("disk on fire"), 502, False),
    ],
)
async def test_4xx_answers_are_kept_5xx_are_not(
    outcome: Exception, status: int, kept: bool
) -> None:
    worker = Worker(outcome=outcome)
    async with client_of(gateway_app(worker_network(worker), FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        first = await post(client, "order-1")
        again = await post(client, "order-1")
    assert first.status_code == again.status_code == status
    assert first.json() == again.json()
    assert (again.headers.get("Idempotent-Replayed") == "true") is kept
    assert worker.calls == (1 if kept else 2)


async def test_the_gateways_own_4xx_is_kept_and_its_503_is_not() -> None:
    network = WorkerNetwork()
    async with client_of(gateway_app(network, FakeClock())) as client:
        unknown = await post(client, "a")
        replayed = await post(client, "a")
        await register(client, "w1", "https://w1.test")
        # Known now, but excluded: 503, not kept; the same key runs again.
        excluded = {**BODY, "exclude": ["w1"]}
        assert (await post(client, "b", excluded)).status_code == 503
        assert "idempotent-replayed" not in (await post(client, "b", excluded)).headers
    assert (unknown.status_code, replayed.status_code) == (404, 404)
    assert replayed.headers["Idempotent-Replayed"] == "true"


async def test_an_answer_is_kept_for_the_idempotency_ttl() -> None:
    worker = Worker()
    clock = FakeClock()
    async with client_of(gateway_app(worker_network(worker), clock, ttl=60.0)) as client:
        await register(client, "w1", "https://w1.test")
        await post(client, "order-1")
        clock.advance(59.0)
        await register(client, "w1", "https://w1.test")  # still routable when it runs again
        assert (await post(client, "order-1")).headers["Idempotent-Replayed"] == "true"
        clock.advance(1.0)
        later = await post(client, "order-1")
    assert "idempotent-replayed" not in later.headers
    assert later.json() == {"result": {"call": 2}}


async def test_the_oldest_answer_is_dropped_past_the_bound() -> None:
    worker = Worker()
    app = gateway_app(worker_network(worker), FakeClock(), idempotency_answers=2)
    async with client_of(app) as client:
        await register(client, "w1", "https://w1.test")
        for key in ("a", "b", "c"):
            await post(client, key)
        assert "idempotent-replayed" in (await post(client, "c")).headers
        assert "idempotent-replayed" not in (await post(client, "a")).headers
    gateway: Gateway = app.state.gateway
    assert len(gateway.answers) == 2
    assert worker.calls == 4


async def test_the_routing_options_are_part_of_the_body() -> None:
    worker = Worker()
    async with client_of(gateway_app(worker_network(worker), FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        await post(client, "k")
        optioned = await post(client, "k", {**BODY, "strategy": "round_robin"})
    assert optioned.status_code == 422  # another body: the options are part of it


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ([("Idempotency-Key", "")], "must not be empty"),
        ([("Idempotency-Key", "a b")], "visible ASCII"),
        ([("Idempotency-Key", "x" * 256)], "at most 255"),
        ([("Idempotency-Key", "a"), ("Idempotency-Key", "b")], "sent once"),
    ],
)
async def test_an_unusable_key_is_422_naming_the_header(
    headers: list[tuple[str, str]], message: str
) -> None:
    worker = Worker()
    async with client_of(gateway_app(worker_network(worker), FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        response = await client.post("/execute", json=BODY, headers=headers)
    assert response.status_code == 422
    (problem,) = response.json()["detail"]
    assert problem["path"] == "Idempotency-Key"
    assert message in problem["message"]
    assert worker.calls == 0


async def test_a_whole_stream_is_kept_and_a_broken_one_is_not() -> None:
    calls: list[int] = []

    class Host(httpx.AsyncBaseTransport):
        def __init__(self, broken: bool) -> None:
            self.broken = broken

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            calls.append(1)
            broken = self.broken

            class Lines(httpx.AsyncByteStream):
                async def __aiter__(self) -> AsyncIterator[bytes]:
                    yield b'{"token":"a"}\n'
                    if broken:
                        raise httpx.ReadError("cut")
                    yield b'{"token":"b"}\n'

            return httpx.Response(
                200, headers={"content-type": "application/x-ndjson"}, stream=Lines()
            )

    for broken, expected_calls in ((False, 1), (True, 2)):
        calls.clear()
        app = gateway_app(Host(broken), FakeClock())  # type: ignore[arg-type]
        async with client_of(app) as client:
            await register(client, "w1", "https://w1.test")
            first = await post(client, "s")
            again = await post(client, "s")
        assert again.text == first.text
        assert again.headers["content-type"] == "application/x-ndjson"
        assert len(calls) == expected_calls
        assert (again.headers.get("Idempotent-Replayed") == "true") is not broken


async def test_a_first_call_abandoned_lets_its_duplicate_run() -> None:
    gate = anyio.Event()
    worker = Worker(gate=gate)
    app = gateway_app(worker_network(worker), FakeClock())
    gateway: Gateway = app.state.gateway
    async with client_of(app) as client:
        await register(client, "w1", "https://w1.test")
        async with anyio.create_task_group() as group:
            with anyio.CancelScope() as first:
                group.start_soon(functools.partial(_cancel_after_two_calls, worker, first))
                await post(client, "k")
            assert first.cancelled_caught
            gate.set()
            duplicate = await post(client, "k")
    assert duplicate.status_code == 200
    assert "idempotent-replayed" not in duplicate.headers
    assert gateway.answers.running == 0


async def _cancel_after_two_calls(worker: Worker, scope: anyio.CancelScope) -> None:
    while worker.calls == 0:
        await anyio.sleep(0)
    scope.cancel()
