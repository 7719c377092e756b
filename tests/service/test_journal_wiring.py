"""The app with a state directory: the journal is replayed at start and written on change."""

from __future__ import annotations

import json
import logging
import pathlib

import httpx
import pytest

from crank_registry import JOURNAL_FORMAT_VERSION
from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, create_app
from crank_registry_asgi.journal import JournalError
from tests.builders import registration_payload
from tests.service.helpers import running

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_unverified_after_restart(tmp_path: pathlib.Path) -> None:
    config = ServiceConfig(state_dir=tmp_path)
    clock = FakeClock()
    async with running(config, clock=clock) as api:
        await api.register("w1")
        await api.register("w2")
        await api.post("/deregister", {"worker_id": "w2"})
    assert (tmp_path / "registry.jsonl").stat().st_size > 0

    clock.advance(10)
    async with running(config, clock=clock) as api:
        workers = await api.workers()
        assert set(workers) == {"w1"}
        assert (workers["w1"]["state"], workers["w1"]["is_healthy"]) == ("unverified", True)
        assert await api.route() == "w1"
        response = await api.post("/heartbeat", {"worker_id": "w1"})
        assert response.status_code == 404
        assert response.json()["error"] == "worker_not_registered"
        await api.register("w1")
        assert (await api.workers())["w1"]["state"] == "healthy"

    # The re-registration was journaled too: a third start restores it.
    clock.advance(10)
    async with running(config, clock=clock) as api:
        assert set(await api.workers()) == {"w1"}


async def test_evictions_are_journaled(tmp_path: pathlib.Path) -> None:
    config = ServiceConfig(state_dir=tmp_path)
    clock = FakeClock()
    async with running(config, clock=clock) as api:
        await api.register("w1")
        await api.register("w2")
        api.advance(100)
        await api.post("/heartbeat", {"worker_id": "w2"})
        api.advance(21)
        events = await api.service.sweep()
        assert [(type(e).__name__, e.worker_id) for e in events] == [
            ("WorkerUnhealthy", "w1"),
            ("WorkerEvicted", "w1"),
        ]
    async with running(config, clock=clock) as api:
        assert set(await api.workers()) == {"w2"}


async def test_recovery_is_logged(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="crank_registry_asgi")
    config = ServiceConfig(state_dir=tmp_path)
    async with running(config) as api:
        await api.register("w1")
    caplog.clear()
    async with running(config):
        pass
    recovered = [m for m in caplog.messages if m.startswith("journal recovered")]
    assert len(recovered) == 1
    assert "workers_restored=1" in recovered[0]


async def test_a_locked_state_directory_refuses_to_start(tmp_path: pathlib.Path) -> None:
    config = ServiceConfig(state_dir=tmp_path)
    async with running(config):
        second = create_app(config=config, clock=FakeClock())
        with pytest.raises(JournalError):
            async with second.router.lifespan_context(second):
                pass


async def test_writes_after_shutdown_are_refused(tmp_path: pathlib.Path) -> None:
    app = create_app(config=ServiceConfig(state_dir=tmp_path), clock=FakeClock())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        async with app.router.lifespan_context(app):
            response = await client.post("/register", json=registration_payload("w1"))
            assert response.status_code == 200
        response = await client.post("/register", json=registration_payload("w2"))
        assert response.status_code == 503
        assert response.json()["error"] == "journal_unavailable"
        assert "w2" not in app.state.service.registry


FORMAT_2 = pathlib.Path(__file__).parents[1] / "journal" / "fixtures" / "journal-format-2.jsonl"


async def test_a_journal_of_format_2_is_served_and_written_in_format_3_from_then_on(
    tmp_path: pathlib.Path,
) -> None:
    journal = tmp_path / "registry.jsonl"
    journal.write_bytes(FORMAT_2.read_bytes())
    config = ServiceConfig(state_dir=tmp_path)
    async with running(config) as api:
        workers = await api.workers()
        assert sorted(workers) == ["a", "c", "e"]
        assert {entry["state"] for entry in workers.values()} == {"unverified"}
        await api.register("w9")
        versions = [json.loads(line)["v"] for line in journal.read_bytes().splitlines()]
        assert set(versions[:15]) == {2} and set(versions[15:]) == {JOURNAL_FORMAT_VERSION}
        await api.service.effects.journal.compact()
    assert {json.loads(line)["v"] for line in journal.read_bytes().splitlines()} == {3}
    async with running(config) as api:
        assert sorted(await api.workers()) == ["a", "c", "e", "w9"]


async def test_a_journal_of_a_newer_format_refuses_to_start_naming_it_and_both_versions(
    tmp_path: pathlib.Path,
) -> None:
    config = ServiceConfig(state_dir=tmp_path)
    async with running(config) as api:
        await api.register("w1")
    journal = tmp_path / "registry.jsonl"
    newer = {"v": JOURNAL_FORMAT_VERSION + 1, "type": "a change of that format", "revision": 2}
    journal.write_bytes(journal.read_bytes() + json.dumps(newer).encode() + b"\n")
    written = journal.read_bytes()
    app = create_app(config=config, clock=FakeClock())
    with pytest.raises(JournalError) as refused:
        async with app.router.lifespan_context(app):
            pass
    message = str(refused.value)
    assert str(journal) in message
    assert "journal format 4; this release reads formats 1, 2, 3 and writes 3" in message
    assert journal.read_bytes() == written  # not skipped, compacted nor written over
