"""``--rate-limit`` on the gateway's ``POST /execute``: one bucket per caller with /route."""

from __future__ import annotations

import pytest

from crank_registry import RateLimit
from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, create_app
from crank_registry_asgi.gateway import create_gateway_app
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


async def test_over_the_limit_is_429_and_calls_no_worker() -> None:
    network = WorkerNetwork()
    worker = network.add("w1.test", FakeWorker(serving({("greet", "hello"): hello})))
    clock = FakeClock()
    controller = create_app(
        config=ServiceConfig(policy=POLICY, rate_limit=RateLimit(0.5, 2)), clock=clock
    )
    app = create_gateway_app(controller, transport=network)
    async with client_of(app) as client:
        await register(client, "w1", "https://w1.test:8443")
        assert (await execute(client)).status_code == 200
        route = {"verb": "greet", "capability": "hello"}
        assert (await client.post("/route", json=route)).status_code == 200
        # /route and /execute take from the same caller's bucket.
        refused = await execute(client)
        assert refused.status_code == 429
        assert refused.json()["error"] == "rate_limited"
        assert refused.headers["retry-after"] == "2"
        assert len(worker.received) == 1
        clock.advance(2)
        assert (await execute(client)).status_code == 200
        exposition = (await client.get("/metrics")).text
        assert 'crank_rate_limited_total{path="/execute"} 1.0' in exposition
