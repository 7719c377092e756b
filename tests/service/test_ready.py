"""``GET /ready``: readiness, beside ``/health`` (liveness).

503 ``not_ready`` with a reason until the journal is replayed and from the
start of shutdown; 200 while the controller can route, with ``store``
saying whether the journal takes writes (a store outage keeps it ready).
"""

from __future__ import annotations

import pathlib

import httpx
import pytest

from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, create_app
from crank_registry_asgi.journal import JOURNAL_NAME
from tests.builders import registration_payload
from tests.journal.helpers import DiskFull
from tests.service.helpers import check_documented, running

pytestmark = pytest.mark.anyio


async def test_ready_in_memory_without_a_journal() -> None:
    async with running() as api:
        response = await api.get("/ready")
        assert response.status_code == 200
        assert response.json() == {"status": "ready", "store": "ok", "self_preservation": False}


async def test_not_ready_until_the_journal_is_replayed(tmp_path: pathlib.Path) -> None:
    async with running(ServiceConfig(state_dir=tmp_path), lifespan=False) as api:
        response = await api.get("/ready")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        body = response.json()
        assert body["error"] == "not_ready"
        assert body["reason"] == body["message"]
        assert "the journal is not replayed yet" in body["reason"]
        # Liveness is another question: the process answers.
        assert (await api.get("/health")).status_code == 200


async def test_ready_once_replayed(tmp_path: pathlib.Path) -> None:
    async with running(ServiceConfig(state_dir=tmp_path)) as api:
        await api.register("w1")
    async with running(ServiceConfig(state_dir=tmp_path)) as api:
        assert "w1" in api.registry  # replayed before the first answer
        response = await api.get("/ready")
        assert response.json() == {"status": "ready", "store": "ok", "self_preservation": False}


async def test_a_store_outage_is_reported_and_keeps_the_controller_ready(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskFull(monkeypatch, tmp_path / JOURNAL_NAME)
    async with running(ServiceConfig(state_dir=tmp_path)) as api:
        await api.register("w1")
        disk.full = True
        refused = await api.post("/register", registration_payload("w2"))
        assert refused.json()["error"] == "journal_unavailable"
        response = await api.get("/ready")
        assert response.status_code == 200
        assert response.json() == {
            "status": "ready",
            "store": "unavailable",
            "self_preservation": False,
        }
        assert await api.route() == "w1"  # and it routes meanwhile
        # A heartbeat that is not due a journal line writes nothing: still unavailable.
        assert (await api.post("/heartbeat", {"worker_id": "w1"})).status_code == 200
        assert (await api.get("/ready")).json()["store"] == "unavailable"
        disk.full = False
        await api.register("w2")
        assert (await api.get("/ready")).json()["store"] == "ok"


async def test_a_failed_heartbeat_line_is_an_outage_too(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskFull(monkeypatch, tmp_path / JOURNAL_NAME)
    async with running(ServiceConfig(state_dir=tmp_path)) as api:
        await api.register("w1")
        disk.full = True
        api.advance(31)  # the heartbeat is due a journal line
        assert (await api.post("/heartbeat", {"worker_id": "w1"})).status_code == 200
        assert (await api.get("/ready")).json()["store"] == "unavailable"


async def test_not_ready_from_shutdown_on(tmp_path: pathlib.Path) -> None:
    app = create_app(config=ServiceConfig(state_dir=tmp_path), clock=FakeClock())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        async with app.router.lifespan_context(app):
            assert (await client.get("/ready")).status_code == 200
        response = await client.get("/ready")
        body = check_documented("GET", "/ready", response)
        assert response.status_code == 503
        assert body["reason"] == "the controller is shutting down"
        # Started again (an embedding application may): ready again.
        async with app.router.lifespan_context(app):
            assert (await client.get("/ready")).status_code == 200
