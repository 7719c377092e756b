"""Load reports over HTTP: a heartbeat's ``load``, ``/workers``, ``least_loaded``, ``features``.

Through the real app in-process, with a fake clock; every answer is checked
against the OpenAPI document by the test client.
"""

from __future__ import annotations

import collections
import random
from typing import Any

import pytest

from crank_registry import PROTOCOL_FEATURES, CapabilityRegistry
from tests.builders import capability_payload
from tests.service.helpers import Controller, running

pytestmark = pytest.mark.anyio

ROUTE = {"verb": "classify", "capability": "image.classify"}


async def beat(api: Controller, worker_id: str, load: Any) -> Any:
    response = await api.post("/heartbeat", {"worker_id": worker_id, "load": load})
    return response


async def test_register_lists_the_controllers_features() -> None:
    async with running() as api:
        response = await api.register("w1")
        assert response.json()["features"] == ["load_reports", "drain"] == list(PROTOCOL_FEATURES)


async def test_a_heartbeat_with_load_is_shown_in_workers_with_its_time() -> None:
    async with running() as api:
        await api.register("w1")
        await api.register("w2")
        load = {"in_flight": 3, "latency_p95_ms": 42.5, "error_rate": 0.25}
        response = await beat(api, "w1", load)
        assert response.status_code == 200, response.text
        reported_at = response.json()["timestamp"]
        workers = await api.workers()
        assert workers["w1"]["load"] == {**load, "reported_at": reported_at}
        assert "load" not in workers["w2"]  # absent when none was reported
        # A heartbeat without load keeps the report; a partial report replaces it.
        api.advance(5)
        assert (await api.post("/heartbeat", {"worker_id": "w1"})).status_code == 200
        assert (await api.workers())["w1"]["load"] == {**load, "reported_at": reported_at}
        response = await beat(api, "w1", {"in_flight": 0})
        assert (await api.workers())["w1"]["load"] == {
            "in_flight": 0,
            "reported_at": response.json()["timestamp"],
        }


@pytest.mark.parametrize(
    ("load", "path"),
    [
        ({"in_flight": -1}, "load.in_flight"),
        ({"in_flight": 2.5}, "load.in_flight"),
        ({"in_flight": "3"}, "load.in_flight"),
        ({"in_flight": True}, "load.in_flight"),
        ({"latency_p95_ms": -1}, "load.latency_p95_ms"),
        ({"latency_p95_ms": None, "error_rate": 2}, "load.error_rate"),
        ({"error_rate": -0.5}, "load.error_rate"),
        ({"cpu": 0.5}, "load.cpu"),
        ("busy", "load"),
    ],
)
async def test_a_bad_load_is_a_422_naming_the_field(load: Any, path: str) -> None:
    async with running() as api:
        await api.register("w1")
        response = await beat(api, "w1", load)
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["error"] == "invalid_request"
        assert [problem["path"] for problem in body["detail"]] == [path]
        assert "load" not in (await api.workers())["w1"]  # refused whole: nothing kept


async def test_least_loaded_over_http_prefers_the_less_loaded_and_explains_at_capacity() -> None:
    registry = CapabilityRegistry(rng=random.Random(5))
    async with running(registry=registry) as api:
        for worker_id in ("idle", "busy", "full"):
            await api.register(worker_id, capabilities=[capability_payload(max_concurrency=8)])
        await beat(api, "idle", {"in_flight": 0})
        await beat(api, "busy", {"in_flight": 6})
        await beat(api, "full", {"in_flight": 8})
        body = {**ROUTE, "strategy": "least_loaded", "explain": True}
        response = await api.post("/route", body)
        assert response.status_code == 200, response.text
        explain = response.json()["explain"]
        assert explain["strategy"] == "least_loaded"
        assert sorted(explain["candidates"]) == ["busy", "idle"]
        assert explain["removed"] == [{"worker_id": "full", "reason": "at_capacity"}]
        counts: collections.Counter[str] = collections.Counter()
        for _ in range(6):
            response = await api.post("/route", {**ROUTE, "strategy": "least_loaded"})
            counts[response.json()["worker_id"]] += 1
        # Two candidates, both drawn: idle (0, plus the route above) takes each route
        # until its hand-outs bring it level with busy's 6; the tie goes to "busy".
        assert response.json()["worker_id"] == "busy"
        assert counts == {"idle": 5, "busy": 1}


async def test_an_observed_latency_beats_the_declared_slo_over_http() -> None:
    async with running() as api:
        await api.register("w1", capabilities=[capability_payload(slo={"latency_p95_ms": 50})])
        bound = {**ROUTE, "slo_constraints": {"latency_p95_ms": 100}, "explain": True}
        assert (await api.post("/route", bound)).status_code == 200
        await beat(api, "w1", {"latency_p95_ms": 250})
        response = await api.post("/route", bound)
        assert response.status_code == 503
        assert response.json()["explain"]["removed"] == [{"worker_id": "w1", "reason": "slo"}]
