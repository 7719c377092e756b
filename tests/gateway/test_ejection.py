"""Outlier ejection through the gateway: failing calls eject a worker, and it gets no more calls."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse

from crank_registry import EjectionSettings, HealthPolicy
from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, create_app
from crank_registry_asgi.gateway import GatewayConfig, create_gateway_app
from crank_registry_asgi.upstream import Refused, WorkerFault, failed
from tests.gateway.helpers import (
    POLICY,
    FakeWorker,
    WorkerNetwork,
    client_of,
    execute,
    hello,
    register,
    serving,
)

pytestmark = pytest.mark.anyio


def gateway(network: WorkerNetwork, clock: FakeClock, *, after_failures: int) -> Starlette:
    ejection = EjectionSettings(after_failures=after_failures)
    controller = create_app(config=ServiceConfig(policy=POLICY, ejection=ejection), clock=clock)
    return create_gateway_app(controller, GatewayConfig(), transport=network)


def broken() -> FakeWorker:
    """A worker that answers 500 to every call."""
    return FakeWorker(JSONResponse({"error": "boom", "message": "broken"}, status_code=500))


async def heartbeat(client: httpx.AsyncClient, *worker_ids: str) -> None:
    for worker_id in worker_ids:
        response = await client.post("/heartbeat", json={"worker_id": worker_id})
        assert response.status_code == 200, response.text


async def live_for(
    client: httpx.AsyncClient, clock: FakeClock, seconds: int, *worker_ids: str
) -> None:
    """Let ``seconds`` pass, the workers heartbeating every second (they stay healthy)."""
    for _ in range(seconds):
        clock.advance(1.0)
        await heartbeat(client, *worker_ids)


async def test_a_worker_answering_500_is_ejected_after_n_calls_and_gets_no_more() -> None:
    network = WorkerNetwork()
    bad = network.add("bad.test", broken())
    good = network.add("good.test", FakeWorker(serving({("greet", "hello"): hello})))
    clock = FakeClock()
    app = gateway(network, clock, after_failures=3)
    async with client_of(app) as client:
        await register(client, "bad", "https://bad.test:8443")
        await register(client, "good", "https://good.test:8443")
        statuses = [(await execute(client)).status_code for _ in range(20)]
        # Round-robin: every other call went to the bad worker until its third 500.
        assert len(bad.received) == 3
        assert statuses.count(502) == 3
        assert statuses.count(200) == 17
        assert len(good.received) == 17
        listed = (await client.get("/workers/bad")).json()
        assert listed["state"] == "ejected"
        assert listed["health"] == "healthy"
        assert listed["ejected_until"] is not None
        assert listed["is_healthy"] is False
        explained = (
            await client.post(
                "/route", json={"verb": "greet", "capability": "hello", "explain": True}
            )
        ).json()
        assert explained["explain"]["removed"] == [{"worker_id": "bad", "reason": "ejected"}]
        metrics = (await client.get("/metrics")).text
        assert "crank_ejections_total 1.0" in metrics
        assert "crank_ejected_workers 1.0" in metrics
        assert 'crank_workers{state="ejected"} 1.0' in metrics
        # Its heartbeats do not end it; 30 s later the sweep does.
        await live_for(client, clock, 29, "bad", "good")
        assert (await client.get("/workers/bad")).json()["state"] == "ejected"
        service = app.state.service
        assert await service.sweep() == ()
        await live_for(client, clock, 1, "bad", "good")
        (restored,) = await service.sweep()
        assert type(restored).__name__ == "WorkerRestored"
        assert (await client.get("/workers/bad")).json()["state"] == "healthy"
        await execute(client)
        await execute(client)
        assert len(bad.received) == 4
        unknown = await client.get("/workers/nobody")
        assert unknown.status_code == 404
        assert unknown.json()["error"] == "worker_not_registered"


async def test_refused_connections_count_and_a_success_resets_the_count() -> None:
    network = WorkerNetwork()
    flaky = network.add("flaky.test", FakeWorker(serving({("greet", "hello"): hello})))
    clock = FakeClock()
    app = gateway(network, clock, after_failures=2)
    async with client_of(app) as client:
        await register(client, "flaky", "https://flaky.test:8443")
        registry = app.state.service.registry
        flaky.failure = httpx.ConnectError
        assert (await execute(client)).status_code == 502
        flaky.failure = None
        assert (await execute(client)).status_code == 200  # resets the count
        flaky.failure = httpx.ConnectError
        assert (await execute(client)).status_code == 502
        assert registry.ejected_until("flaky") is None
        assert (await execute(client)).status_code == 502
        assert registry.ejected_until("flaky") == clock.now + 30
        answer = await execute(client)
        assert answer.status_code == 503
        assert answer.json()["error"] == "no_worker_available"


async def test_a_worker_answering_4xx_or_outside_the_convention_is_not_failing() -> None:
    network = WorkerNetwork()
    network.add("odd.test", FakeWorker(JSONResponse({"error": "nope", "message": "no"}, 404)))
    clock = FakeClock()
    app = gateway(network, clock, after_failures=1)
    async with client_of(app) as client:
        await register(client, "odd", "https://odd.test:8443")
        for _ in range(3):
            assert (await execute(client)).status_code == 404
        registry = app.state.service.registry
        assert registry.ejected_until("odd") is None


def test_what_counts_as_a_failure() -> None:
    assert failed(WorkerFault(504, "worker_timeout", "silent"))
    assert not failed(ValueError("a bug is not the worker's"))
    from crank_registry import WorkerEndpoint

    assert failed(Refused(WorkerEndpoint("w", "https://w:1", "1.0.0"), "refused", timed_out=False))


async def test_an_ejection_is_journalled_and_outlives_a_restart(tmp_path: Path) -> None:
    network = WorkerNetwork()
    network.add("bad.test", broken())
    clock = FakeClock()
    config = ServiceConfig(
        policy=POLICY, state_dir=tmp_path, ejection=EjectionSettings(after_failures=2)
    )

    def app() -> Starlette:
        return create_gateway_app(create_app(config=config, clock=clock), transport=network)

    async with client_of(app()) as client:
        await register(client, "bad", "https://bad.test:8443")
        for _ in range(2):
            assert (await execute(client)).status_code == 502
        until = (await client.get("/workers/bad")).json()["ejected_until"]
        assert until is not None
    restarted = app()
    async with client_of(restarted) as client:
        assert restarted.state.service.registry.ejected_count == 1
        listed = (await client.get("/workers/bad")).json()
        assert (listed["state"], listed["ejected_until"]) == ("ejected", until)
        assert listed["health"] == "unverified"


async def test_the_sweeper_plans_again_for_an_ejection_that_ends_before_its_wake_up() -> None:
    # A heartbeat interval of 60 s: the sweeper sleeps up to 60 s, the ejection lasts 30 s.
    network = WorkerNetwork()
    network.add("bad.test", broken())
    clock = FakeClock()
    policy = HealthPolicy(heartbeat_interval=60.0, unhealthy_after=120.0, evict_after=240.0)
    config = ServiceConfig(policy=policy, ejection=EjectionSettings(after_failures=1))
    app = create_gateway_app(create_app(config=config, clock=clock), transport=network)
    async with client_of(app) as client:
        await register(client, "bad", "https://bad.test:8443")
        sweeper = app.state.service.sweeper
        for _ in range(100):
            await anyio.sleep(0)
        assert sweeper._planned - clock.now == 60.0
        assert (await execute(client)).status_code == 502
        for _ in range(100):
            await anyio.sleep(0)
        assert sweeper._planned - clock.now == pytest.approx(30.0 + 0.1)
