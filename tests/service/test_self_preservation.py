"""Self-preservation in the service: /health, /snapshot, /watch, the metric, the log lines.

The fleet heartbeats over HTTP on a fake clock; the sweep runs as the
sweeper would, at each step. Every answer is checked against the OpenAPI
document by the test client.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from crank_registry import HealthPolicy, SelfPreservationChanged, structure_event
from crank_registry_asgi import ServiceConfig
from tests.service.helpers import Controller, running

pytestmark = pytest.mark.anyio

POLICY = HealthPolicy(heartbeat_interval=10.0, unhealthy_after=30.0, evict_after=60.0)
WORKERS = [f"w{n}" for n in range(20)]
SILENT = WORKERS[:12]


async def step(api: Controller, alive: list[str], seconds: float) -> None:
    """Heartbeat ``alive`` every interval for ``seconds``, sweeping after each beat."""
    for _ in range(int(seconds / POLICY.heartbeat_interval)):
        api.advance(POLICY.heartbeat_interval)
        for worker_id in alive:
            response = await api.post("/heartbeat", {"worker_id": worker_id})
            assert response.status_code == 200, response.text  # never told to re-register
        await api.service.sweep()


async def health(api: Controller) -> bool:
    response = await api.get("/health")
    return response.json()["self_preservation"]  # type: ignore[no-any-return]


async def gauge(api: Controller) -> float:
    text = (await api.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        if family.name == "crank_self_preservation":
            return family.samples[0].value
    raise AssertionError("no crank_self_preservation gauge")


async def test_entered_and_ended_over_http(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crank_registry_asgi")
    async with running(ServiceConfig(policy=POLICY, state_dir=tmp_path)) as api:
        for worker_id in WORKERS:
            await api.register(worker_id)
        await step(api, WORKERS, 40)
        assert not await health(api) and await gauge(api) == 0
        revision = api.registry.revision
        alive = WORKERS[12:]
        await step(api, alive, POLICY.evict_after * 1.5)
        assert await health(api) and await gauge(api) == 1
        # Reported by /ready, not failed on: the controller routes through it.
        ready = await api.get("/ready")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "store": "ok", "self_preservation": True}
        # No worker was made unhealthy or evicted; the silent ones are still routed to.
        assert len(await api.workers()) == 20
        assert {await api.route() for _ in range(40)} == set(WORKERS)
        response = await api.get(f"/watch?since={revision}&timeout=1")
        (event,) = response.json()["events"]
        change = structure_event(event)
        assert isinstance(change, SelfPreservationChanged)
        assert (change.active, change.silent, change.watched) == (True, 12, 20)
        snapshot = (await api.get("/snapshot")).json()
        assert snapshot["self_preservation"] is True
        assert snapshot["self_preservation_since"] == change.at
        # A restart replays it from the journal.
    async with running(ServiceConfig(policy=POLICY, state_dir=tmp_path)) as api:
        assert await health(api)
        assert api.registry.self_preservation == change.at
        for worker_id in WORKERS:  # restored: each registers again
            await api.register(worker_id)
        await step(api, WORKERS, 20)
        assert not await health(api) and await gauge(api) == 0
        assert (await api.get("/ready")).json()["self_preservation"] is False
    entered = [r for r in caplog.records if r.getMessage().startswith("self-preservation entered")]
    ended = [r for r in caplog.records if r.getMessage().startswith("self-preservation ended")]
    assert [r.levelno for r in entered] == [logging.WARNING]
    assert "silent=12 watched=20" in entered[0].getMessage()
    assert len(ended) == 1 and "reason=heartbeats_returned" in ended[0].getMessage()


async def test_off_with_threshold_zero(tmp_path: Path) -> None:
    from crank_registry import SelfPreservationSettings

    config = ServiceConfig(policy=POLICY, self_preservation=SelfPreservationSettings(threshold=0))
    async with running(config) as api:
        for worker_id in WORKERS:
            await api.register(worker_id)
        await step(api, WORKERS, 40)
        await step(api, WORKERS[12:], POLICY.evict_after * 1.5)
        assert not await health(api)
        assert set(await api.workers()) == set(WORKERS[12:])


async def test_a_spread_partition_is_entered_with_every_worker_routable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Heartbeats spread over the interval: the silences come one by one, swept each second."""
    caplog.set_level(logging.INFO, logger="crank_registry_asgi")
    interval = int(POLICY.heartbeat_interval)
    elapsed = 0

    async def tick(alive: list[str], seconds: int) -> None:
        nonlocal elapsed
        for _ in range(seconds):
            api.advance(1.0)
            elapsed += 1
            phase = elapsed % interval
            for n, worker_id in enumerate(WORKERS):
                if worker_id in alive and n * interval // len(WORKERS) == phase:
                    response = await api.post("/heartbeat", {"worker_id": worker_id})
                    assert response.status_code == 200, response.text
            await api.service.sweep()

    async with running(ServiceConfig(policy=POLICY)) as api:
        for worker_id in WORKERS:
            await api.register(worker_id)
        await tick(WORKERS, 40)
        revision = api.registry.revision
        for _ in range(int(POLICY.evict_after)):  # the partition: nobody is heard
            if await health(api):
                break
            await tick([], 1)
        assert await health(api)
        response = await api.get(f"/watch?since={revision}&timeout=1")
        changes = [structure_event(event) for event in response.json()["events"]]
        entered = changes[-1]
        assert isinstance(entered, SelfPreservationChanged) and entered.active
        made_unhealthy = {change.worker_id for change in changes[:-1]}  # type: ignore[attr-defined]
        assert len(made_unhealthy) >= 5
        assert {r.worker_id for r in entered.reinstated} == made_unhealthy
        # Every worker routable again, none held unhealthy.
        assert {await api.route() for _ in range(60)} == set(WORKERS)
        snapshot = (await api.get("/snapshot")).json()
        assert [worker.get("silent", False) for worker in snapshot["workers"]] == [False] * 20
        text = (await api.get("/metrics")).text
        reinstated = {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }["crank_self_preservation_reinstated_total"]
        assert reinstated == len(made_unhealthy)
    (line,) = [r for r in caplog.records if r.getMessage().startswith("self-preservation entered")]
    assert f"reinstated={len(made_unhealthy)}" in line.getMessage()
    assert f"(reinstated {len(made_unhealthy)} workers" in line.getMessage()
