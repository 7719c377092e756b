"""A write answered 503 changes nothing in memory (DESIGN, Hardening: Failed writes).

The journal's disk is made full in the process (:class:`~tests.journal.helpers.DiskFull`):
what a client was told, what is listed, routed and heartbeat-able, and what
a restart restores agree.
"""

from __future__ import annotations

import logging
import pathlib

import anyio
import httpx
import pytest

from crank_registry import CapabilityRegistry, replay_bytes
from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig
from crank_registry_asgi.journal import JOURNAL_NAME
from tests.builders import registration_payload
from tests.journal.helpers import DiskFull, ids
from tests.service.helpers import Controller, running

pytestmark = pytest.mark.anyio


def on_disk(state_dir: pathlib.Path) -> CapabilityRegistry:
    """The registry the journal in ``state_dir`` restores."""
    registry = CapabilityRegistry()
    replay_bytes((state_dir / JOURNAL_NAME).read_bytes(), registry)
    return registry


def assert_memory_is_disk(api: Controller, state_dir: pathlib.Path) -> None:
    """The live registry holds exactly the workers and revision its journal restores."""
    assert not api.registry.pending
    restored = on_disk(state_dir)
    assert ids(restored) == ids(api.registry)
    assert restored.revision == api.registry.revision


def assert_journal_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "journal_unavailable"
    assert "No space left on device" in response.json()["message"]
    assert response.headers["Retry-After"].isdigit()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_registration_answered_503_is_not_listed_routed_heartbeatable_nor_restored(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ServiceConfig(state_dir=tmp_path)
    clock = FakeClock()
    disk = DiskFull(monkeypatch, tmp_path / JOURNAL_NAME)
    async with running(config, clock=clock) as api:
        await api.register("w1")
        disk.full = True
        assert_journal_unavailable(await api.post("/register", registration_payload("w2")))
        assert set(await api.workers()) == {"w1"}
        assert {await api.route() for _ in range(4)} == {"w1"}
        response = await api.post("/heartbeat", {"worker_id": "w2"})
        assert (response.status_code, response.json()["error"]) == (404, "worker_not_registered")
        disk.full = False
        assert_memory_is_disk(api, tmp_path)
        assert api.registry.revision == 2  # the access policy's, then w1's
    clock.advance(1)
    async with running(config, clock=clock) as api:
        assert set(await api.workers()) == {"w1"}


async def test_a_deregistration_answered_503_leaves_the_worker_and_its_retry_succeeds(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ServiceConfig(state_dir=tmp_path)
    clock = FakeClock()
    disk = DiskFull(monkeypatch, tmp_path / JOURNAL_NAME)
    async with running(config, clock=clock) as api:
        await api.register("w1")
        disk.full = True
        assert_journal_unavailable(await api.post("/deregister", {"worker_id": "w1"}))
        assert set(await api.workers()) == {"w1"}
        assert await api.route() == "w1"
        # Heartbeats are answered during the outage (DESIGN, Codes for a store outage).
        api.advance(1)
        assert (await api.post("/heartbeat", {"worker_id": "w1"})).status_code == 200
        assert_memory_is_disk(api, tmp_path)
        disk.full = False
        response = await api.post("/deregister", {"worker_id": "w1"})
        assert response.status_code == 200, response.text
        assert await api.workers() == {}
        assert_memory_is_disk(api, tmp_path)
    async with running(config, clock=clock) as api:
        assert await api.workers() == {}


async def test_a_change_a_heartbeat_causes_waits_for_the_journal(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unhealthy worker heard again during an outage: 200, but unhealthy until journaled."""
    disk = DiskFull(monkeypatch, tmp_path / JOURNAL_NAME)
    async with running(ServiceConfig(state_dir=tmp_path)) as api:
        await api.register("w1")
        api.advance(65)  # past unhealthy_after (60 s by default)
        assert [type(e).__name__ for e in await api.service.sweep()] == ["WorkerUnhealthy"]
        disk.full = True
        assert (await api.post("/heartbeat", {"worker_id": "w1"})).status_code == 200
        assert (await api.workers())["w1"]["state"] == "unhealthy"
        assert await api.route() is None
        assert_memory_is_disk(api, tmp_path)
        disk.full = False
        assert (await api.post("/heartbeat", {"worker_id": "w1"})).status_code == 200
        assert (await api.workers())["w1"]["state"] == "healthy"
        assert_memory_is_disk(api, tmp_path)


async def test_a_sweep_the_journal_cannot_take_changes_nothing_and_is_retried(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="crank_registry_asgi")
    config = ServiceConfig(state_dir=tmp_path)
    clock = FakeClock()
    disk = DiskFull(monkeypatch, tmp_path / JOURNAL_NAME)
    async with running(config, clock=clock) as api:
        await api.register("w1")
        await api.register("w2")
        disk.full = True
        api.advance(200)  # both past evict_after
        assert await api.service.sweep() == ()
        assert "w1" in api.registry and "w2" in api.registry
        assert any("sweep not journaled" in message for message in caplog.messages)
        # Not woken at once again by the deadlines it could not apply.
        assert api.service.sweeper.delay() == api.registry.policy.heartbeat_interval
        assert_memory_is_disk(api, tmp_path)
        disk.full = False
        swept = await api.service.sweep()
        assert [(type(e).__name__, e.worker_id) for e in swept] == [
            ("WorkerUnhealthy", "w1"),
            ("WorkerUnhealthy", "w2"),
            ("WorkerEvicted", "w1"),
            ("WorkerEvicted", "w2"),
        ]
        assert len(api.registry) == 0
        assert_memory_is_disk(api, tmp_path)
    async with running(config, clock=clock) as api:
        assert await api.workers() == {}


async def test_concurrent_writes_on_one_worker_fail_together_and_leave_memory_as_disk(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decided on each other while their batch is written: a failed batch takes both."""
    disk = DiskFull(monkeypatch, tmp_path / JOURNAL_NAME)
    async with running(ServiceConfig(state_dir=tmp_path)) as api:
        await api.register("w1")
        disk.full = True
        answers: dict[str, int] = {}

        async def send(name: str, path: str, body: object) -> None:
            answers[name] = (await api.post(path, body)).status_code

        async with anyio.create_task_group() as tasks:
            # w2 registers, then leaves while its registration is still pending;
            # w1 registers again twice; w3 registers.
            tasks.start_soon(send, "register w2", "/register", registration_payload("w2"))
            tasks.start_soon(send, "deregister w2", "/deregister", {"worker_id": "w2"})
            tasks.start_soon(send, "register w1", "/register", registration_payload("w1"))
            tasks.start_soon(send, "register w1 again", "/register", registration_payload("w1"))
            tasks.start_soon(send, "register w3", "/register", registration_payload("w3"))
        assert set(answers.values()) <= {503, 404}, answers
        assert answers["register w3"] == 503
        assert set(await api.workers()) == {"w1"}
        assert_memory_is_disk(api, tmp_path)

        disk.full = False
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(send, "register w2", "/register", registration_payload("w2"))
            tasks.start_soon(send, "deregister w2", "/deregister", {"worker_id": "w2"})
            tasks.start_soon(send, "register w1", "/register", registration_payload("w1"))
            tasks.start_soon(send, "register w3", "/register", registration_payload("w3"))
        assert answers == {
            "register w2": 200,
            "deregister w2": 200,  # decided on the pending registration, in revision order
            "register w1": 200,
            "register w1 again": answers["register w1 again"],
            "register w3": 200,
        }
        assert set(await api.workers()) == {"w1", "w3"}
        assert_memory_is_disk(api, tmp_path)
