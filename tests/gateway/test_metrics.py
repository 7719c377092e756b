"""/metrics behind the gateway: /execute is timed once, under its own path."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from crank_registry.testing import FakeClock
from tests.gateway.helpers import (
    FakeWorker,
    WorkerNetwork,
    client_of,
    execute,
    hello,
    make_gateway,
    register,
    serving,
)

pytestmark = pytest.mark.anyio


async def test_execute_is_in_the_request_histogram_and_routes() -> None:
    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(serving({("greet", "hello"): hello})))
    app = make_gateway(network, FakeClock())
    assert app.state.metrics_registry is app.state.service.metrics.registry
    async with client_of(app) as client:
        await register(client, "w1", "https://w1.test:8443")
        assert (await execute(client, {"name": "Ada"})).status_code == 200
        response = await client.get("/metrics")
    assert response.status_code == 200
    figures = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    durations = {
        labels: value
        for (name, labels), value in figures.items()
        if name == "crank_http_request_duration_seconds_count"
    }
    assert durations == {
        (("method", "POST"), ("path", "/register"), ("status", "200")): 1,
        (("method", "POST"), ("path", "/execute"), ("status", "200")): 1,
    }
    assert figures[("crank_routes_total", (("outcome", "routed"),))] == 1
