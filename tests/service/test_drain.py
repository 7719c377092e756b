"""POST /workers/{id}/drain and /undrain: who may, what they answer, what routes do after."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig
from tests.builders import registration_payload
from tests.service.helpers import CertificateAuthority, check_documented, running

pytestmark = pytest.mark.anyio


def proxied(authority: CertificateAuthority, **fields: Any) -> ServiceConfig:
    """Identities from a trusted proxy's header, verified against ``authority``."""
    return ServiceConfig(
        require_identity=True,
        proxy_cert_header="x-ssl-client-cert",
        proxy_cert_authorities=[authority.certificate],
        **fields,
    )


def as_identity(authority: CertificateAuthority, spiffe_id: str) -> dict[str, str]:
    return {"x-ssl-client-cert": quote(authority.issue(spiffe_id))}


async def test_drain_stops_new_routes_and_undrain_returns_them() -> None:
    async with running() as api:
        await api.register("w1")
        await api.register("w2")
        response = await api.request("POST", "/workers/w1/drain")
        assert response.status_code == 200
        assert check_documented("POST", "/workers/{worker_id}/drain", response) == {
            "worker_id": "w1",
            "draining": True,
            "changed": True,
        }
        again = await api.request("POST", "/workers/w1/drain")
        assert again.json()["changed"] is False  # draining twice is one change
        assert {await api.route() for _ in range(4)} == {"w2"}
        listed = (await api.workers())["w1"]
        assert (listed["state"], listed["health"], listed["draining"], listed["is_healthy"]) == (
            "draining",
            "healthy",
            True,
            False,
        )
        only = (await api.get("/workers?state=draining")).json()["workers"]
        assert [worker["worker_id"] for worker in only] == ["w1"]
        # Still registered: its heartbeats are acknowledged.
        assert (await api.post("/heartbeat", {"worker_id": "w1"})).status_code == 200
        explained = await api.post(
            "/route", {"verb": "classify", "capability": "image.classify", "explain": True}
        )
        assert explained.json()["explain"]["removed"] == [{"worker_id": "w1", "reason": "draining"}]
        metrics = (await api.get("/metrics")).text
        assert 'crank_workers{state="draining"} 1.0' in metrics
        assert 'crank_drain_changes_total{draining="true"} 1.0' in metrics
        undrained = await api.request("POST", "/workers/w1/undrain")
        assert undrained.json() == {"worker_id": "w1", "draining": False, "changed": True}
        assert {await api.route() for _ in range(4)} == {"w1", "w2"}


async def test_a_registration_ends_the_drain() -> None:
    async with running() as api:
        await api.register("w1")
        await api.request("POST", "/workers/w1/drain")
        await api.register("w1")  # a new worker process
        assert (await api.workers())["w1"]["state"] == "healthy"
        assert await api.route() == "w1"


async def test_unknown_worker_is_404_and_a_bad_worker_id_is_422() -> None:
    async with running() as api:
        response = await api.request("POST", "/workers/nobody/drain")
        assert response.status_code == 404
        assert response.json()["error"] == "worker_not_registered"
        response = await api.request("POST", "/workers/not%20an%20id/undrain")
        assert response.status_code == 422
        assert response.json()["detail"][0]["path"] == "worker_id"
        assert (await api.request("GET", "/workers/w1/drain")).status_code == 405


async def test_the_worker_itself_an_operator_and_no_one_else_may_drain(
    authority: CertificateAuthority,
) -> None:
    config = proxied(authority, operators=("spiffe://crank.local/client/ops-*",))
    # Certificates are checked at the service's time: now, as they were issued.
    async with running(config, clock=FakeClock(time.time())) as api:
        own = as_identity(authority, "spiffe://crank.local/worker/w1")
        await api.request("POST", "/register", json=registration_payload("w1"), headers=own)
        await api.request(
            "POST",
            "/register",
            json=registration_payload("w2"),
            headers=as_identity(authority, "spiffe://crank.local/worker/w2"),
        )
        assert (await api.request("POST", "/workers/w1/drain", headers=own)).status_code == 200
        operator = as_identity(authority, "spiffe://crank.local/client/ops-alice")
        response = await api.request("POST", "/workers/w2/drain", headers=operator)
        assert response.status_code == 200
        # An operator may ask about any worker, so an unknown one is 404 to it.
        response = await api.request("POST", "/workers/nobody/drain", headers=operator)
        assert response.status_code == 404
        refused = {
            "another worker": as_identity(authority, "spiffe://crank.local/worker/w2"),
            "a client not matching": as_identity(authority, "spiffe://crank.local/client/bob"),
            "another trust domain": as_identity(authority, "spiffe://elsewhere/client/ops-x"),
            "no identity": {},
        }
        for who, headers in refused.items():
            response = await api.request("POST", "/workers/w1/undrain", headers=headers)
            assert response.status_code == 403, who
            body = check_documented("POST", "/workers/{worker_id}/undrain", response)
            assert body["error"] == "forbidden"
            assert "--operator" in body["message"], who
        assert (await api.workers())["w1"]["draining"] is True


async def test_operator_globs_are_checked() -> None:
    for glob in ("ops-*", "spiffe://crank.local/client/[ops", "spiffe://a b"):
        with pytest.raises(ValueError, match="operators"):
            ServiceConfig(operators=(glob,))


async def test_a_store_outage_is_503_and_changes_nothing(tmp_path: Path) -> None:
    # The lifespan has not opened the journal: every write is refused, nothing changes.
    async with running(ServiceConfig(state_dir=tmp_path), lifespan=False) as api:
        response = await api.request("POST", "/workers/w1/drain")
        assert response.status_code == 503
        assert response.json()["error"] == "journal_unavailable"
        assert "retry-after" in response.headers


async def test_drains_are_journalled_and_survive_a_restart(tmp_path: Path) -> None:
    config = ServiceConfig(state_dir=tmp_path)
    async with running(config) as api:
        await api.register("w1")
        await api.register("w2")
        await api.request("POST", "/workers/w1/drain")
    async with running(config) as api:
        listed = await api.workers()
        assert listed["w1"]["draining"] is True and listed["w1"]["state"] == "draining"
        assert listed["w2"]["draining"] is False
        assert {await api.route() for _ in range(4)} == {"w2"}
        snapshot = (await api.get("/snapshot")).json()
        assert [worker.get("draining", False) for worker in snapshot["workers"]] == [True, False]
        # w1's heartbeat is refused (restored, unverified): the registration that
        # repairs the restart is not a new process, and leaves it draining.
        assert (await api.post("/heartbeat", {"worker_id": "w1"})).status_code == 404
        await api.register("w1")
        assert (await api.workers())["w1"]["state"] == "draining"
        assert {await api.route() for _ in range(4)} == {"w2"}
