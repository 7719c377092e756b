"""The HTTP contract of DESIGN.md, through the real app in-process, with a fake clock."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from crank_registry import (
    CapabilityRegistry,
    HealthPolicy,
    WorkerCounter,
    WorkerRecord,
    iso_utc,
)
from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, create_app
from crank_registry_asgi.app import identity_checks_off_warning
from crank_registry_asgi.clock import AnchoredClock
from tests.builders import WORKER_URL, capability, capability_payload, registration_payload
from tests.service.helpers import UNKNOWN, check_documented, running

pytestmark = pytest.mark.anyio


async def test_health_counts_workers() -> None:
    async with running() as api:
        started = api.clock.now
        response = await api.get("/health")
        assert response.json() == {
            "status": "ok",
            "total_workers": 0,
            "healthy_workers": 0,
            "self_preservation": False,
            "epoch": api.service.epoch,
            "revision": 0,
            "timestamp": iso_utc(started),
            "uptime_s": 0.0,
            "heartbeat_interval_s": 30.0,
            "heartbeats_last_minute": 0,
            "expected_heartbeats_per_minute": 0.0,
            "controller_id": "controller",
        }
        await api.register("w1")
        await api.register("w2")
        api.advance(61)
        await api.post("/heartbeat", {"worker_id": "w2"})
        response = await api.get("/health")
        assert response.json() == {
            "status": "ok",
            "total_workers": 2,
            "healthy_workers": 1,
            "self_preservation": False,
            "epoch": api.service.epoch,
            "revision": 3,  # two registrations, then w2 heard after 61 s of silence: healthy
            "timestamp": iso_utc(started + 61),
            "uptime_s": 61.0,
            "heartbeat_interval_s": 30.0,
            "heartbeats_last_minute": 1,
            "expected_heartbeats_per_minute": 4.0,  # two workers, one heartbeat every 30 s
            "controller_id": "controller",
        }


async def test_health_counts_the_heartbeats_of_the_last_minute() -> None:
    async with running() as api:
        await api.register("w1")
        for _ in range(3):
            await api.post("/heartbeat", {"worker_id": "w1"})
            api.advance(20)
        # Heartbeats at 0, 20 and 40 s; now 60 s: the first has left the minute.
        assert (await api.get("/health")).json()["heartbeats_last_minute"] == 2
        api.advance(60)
        assert (await api.get("/health")).json()["heartbeats_last_minute"] == 0


async def test_register_answers_and_lists() -> None:
    async with running() as api:
        response = await api.post("/register", registration_payload("w1"))
        assert response.status_code == 200
        assert response.json() == {
            "status": "registered",
            "worker_id": "w1",
            "heartbeat_interval_s": 30.0,
            "features": ["load_reports", "drain"],
        }
        workers = await api.workers()
        assert workers == {
            "w1": {
                "worker_id": "w1",
                "worker_url": WORKER_URL,
                "last_heartbeat": iso_utc(api.clock.now),
                "is_healthy": True,
                "state": "healthy",
                "health": "healthy",
                "draining": False,
                "capabilities": ["classify:image.classify"],
            }
        }


async def test_reregistration_replaces_url_and_capabilities() -> None:
    async with running() as api:
        await api.register("w1")
        await api.register(
            "w1",
            worker_url="https://new.example:9443",
            capabilities=[capability_payload("text.summarize", "summarize")],
        )
        workers = await api.workers()
        assert workers["w1"]["worker_url"] == "https://new.example:9443"
        assert workers["w1"]["capabilities"] == ["summarize:text.summarize"]
        assert await api.route("classify", "image.classify") == UNKNOWN
        assert await api.route("summarize", "text.summarize") == "w1"


async def test_heartbeat_policy_interval_and_timestamp() -> None:
    policy = HealthPolicy(heartbeat_interval=2.5, unhealthy_after=5, evict_after=10)
    async with running(ServiceConfig(policy=policy)) as api:
        response = await api.register("w1")
        assert response.json()["heartbeat_interval_s"] == 2.5
        api.advance(1.25)
        response = await api.post("/heartbeat", {"worker_id": "w1"})
        assert response.status_code == 200
        assert response.json() == {
            "status": "acknowledged",
            "timestamp": iso_utc(api.clock.now),
            "heartbeat_interval_s": 2.5,
        }
        assert response.json()["timestamp"].endswith("Z")
        assert (await api.workers())["w1"]["last_heartbeat"] == iso_utc(api.clock.now)


async def test_heartbeat_unknown_worker_is_404() -> None:
    async with running() as api:
        response = await api.post("/heartbeat", {"worker_id": "ghost"})
        assert response.status_code == 404
        assert response.json()["error"] == "worker_not_registered"
        assert response.json()["worker_id"] == "ghost"


async def test_deregister_then_unknown() -> None:
    async with running() as api:
        await api.register("w1")
        response = await api.post("/deregister", {"worker_id": "w1"})
        assert response.json() == {"status": "deregistered", "worker_id": "w1"}
        assert await api.workers() == {}
        again = await api.post("/deregister", {"worker_id": "w1"})
        assert again.status_code == 404
        assert again.json()["error"] == "worker_not_registered"
        assert again.json()["worker_id"] == "w1"
        beat = await api.post("/heartbeat", {"worker_id": "w1"})
        assert beat.status_code == 404


async def test_round_robin_across_three_workers() -> None:
    async with running() as api:
        for worker_id in ("w1", "w2", "w3"):
            await api.register(worker_id)
        routed = [await api.route() for _ in range(9)]
        assert routed == ["w1", "w2", "w3"] * 3
        response = await api.post("/route", {"verb": "classify", "capability": "image.classify"})
        assert response.json() == {
            "worker_id": "w1",
            "worker_url": WORKER_URL,
            "version": "1.0.0",
        }


async def test_no_worker_available_has_retry_after() -> None:
    async with running() as api:
        await api.register("w1")
        api.advance(61)  # silent past unhealthy_after: known, not routable
        response = await api.post("/route", {"verb": "classify", "capability": "image.classify"})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "30"
        body = response.json()
        assert body["error"] == "no_worker_available"
        assert (body["verb"], body["capability"]) == ("classify", "image.classify")


@pytest.mark.parametrize(
    ("registered", "verb", "name"),
    [
        (False, "classify", "image.classify"),  # nothing registered at all
        (True, "classify", "image.clasify"),  # a typo of the capability
        (True, "classify_", "image.classify"),  # a typo of the verb
    ],
)
async def test_unknown_capability_is_404_without_retry_after(
    registered: bool, verb: str, name: str
) -> None:
    async with running() as api:
        if registered:
            await api.register("w1")
        response = await api.post("/route", {"verb": verb, "capability": name})
        assert response.status_code == 404
        assert "retry-after" not in response.headers
        assert response.json() == {
            "error": "unknown_capability",
            "message": f"no registered worker offers verb {verb!r} on capability {name!r}; "
            "check the spelling against GET /capabilities",
            "verb": verb,
            "capability": name,
        }


async def test_a_capability_is_known_while_any_worker_offering_it_is_held() -> None:
    async with running() as api:
        await api.register("w1")
        assert await api.route() == "w1"
        api.advance(61)
        assert await api.route() is None  # unhealthy: 503, an outage
        await api.service.sweep()
        assert await api.route() is None  # still held until evict_after
        api.advance(60)
        await api.service.sweep()
        assert await api.route() == UNKNOWN  # evicted: nobody offers it
        await api.register("w2")
        assert await api.route() == "w2"
        await api.post("/deregister", {"worker_id": "w2"})
        assert await api.route() == UNKNOWN


@pytest.mark.parametrize(("interval", "expected"), [(2.5, "3"), (0.2, "1"), (7.0, "7")])
async def test_retry_after_is_interval_rounded_up(interval: float, expected: str) -> None:
    policy = HealthPolicy(heartbeat_interval=interval, unhealthy_after=10, evict_after=20)
    async with running(ServiceConfig(policy=policy)) as api:
        await api.register("w1")
        api.advance(11)
        response = await api.post("/route", {"verb": "classify", "capability": "image.classify"})
        assert response.headers["retry-after"] == expected == str(math.ceil(interval))


async def test_unhealthy_after_60_seconds_and_back_with_a_heartbeat() -> None:
    async with running() as api:
        await api.register("w1")
        api.advance(60)
        assert (await api.workers())["w1"]["state"] == "healthy"
        assert await api.route() == "w1"
        api.advance(1)
        entry = (await api.workers())["w1"]
        assert (entry["state"], entry["is_healthy"]) == ("unhealthy", False)
        assert await api.route() is None
        capabilities = (await api.get("/capabilities")).json()
        assert capabilities["capabilities"][0]["workers"] == ["w1"]
        assert capabilities["capabilities"][0]["healthy_workers"] == []
        assert (await api.post("/heartbeat", {"worker_id": "w1"})).status_code == 200
        assert (await api.workers())["w1"]["state"] == "healthy"
        assert await api.route() == "w1"


async def test_evicted_after_120_seconds(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="crank_registry_asgi")
    async with running() as api:
        await api.register("w1")
        await api.register("w2")
        api.advance(100)
        await api.post("/heartbeat", {"worker_id": "w2"})
        api.advance(20)
        # Exactly 120 s: unhealthy (since 60 s), not yet evicted.
        assert [type(e).__name__ for e in await api.service.sweep()] == ["WorkerUnhealthy"]
        api.advance(1)
        evicted = await api.service.sweep()
        assert [(type(e).__name__, e.worker_id) for e in evicted] == [("WorkerEvicted", "w1")]
        assert set(await api.workers()) == {"w2"}
        response = await api.post("/heartbeat", {"worker_id": "w1"})
        assert response.status_code == 404
        assert (await api.get("/health")).json()["total_workers"] == 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("worker evicted")]
    assert len(lines) == 1
    assert "worker_id=w1" in lines[0]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_the_sweeper_wakes_by_itself() -> None:
    # Short intervals so that the background loop's capped sleep is short; the
    # fake clock decides what is stale, so the outcome does not depend on timing.
    policy = HealthPolicy(heartbeat_interval=0.02, unhealthy_after=0.05, evict_after=0.1)
    async with running(ServiceConfig(policy=policy)) as api:
        await api.register("w1")
        api.advance(1)
        with anyio.fail_after(5):
            while "w1" in api.registry:
                await anyio.sleep(0.01)
        assert await api.workers() == {}


async def test_unverified_after_restart() -> None:
    clock = FakeClock()
    before = CapabilityRegistry()
    cap = capability()
    before.register("w1", "http://w1.example:8000", [cap], now=clock.now)
    records = before.records()
    clock.advance(10)
    after = CapabilityRegistry()
    assert after.restore(records, now=clock.now) == 1
    async with running(registry=after, clock=clock) as api:
        entry = (await api.workers())["w1"]
        assert (entry["state"], entry["is_healthy"]) == ("unverified", True)
        assert await api.route() == "w1"  # the warm cache keeps routing alive
        response = await api.post("/heartbeat", {"worker_id": "w1"})
        assert response.status_code == 404
        assert response.json()["error"] == "worker_not_registered"
        await api.register("w1")
        assert (await api.workers())["w1"]["state"] == "healthy"
        assert (await api.post("/heartbeat", {"worker_id": "w1"})).status_code == 200


async def test_unverified_stops_routing_after_unhealthy_after() -> None:
    clock = FakeClock()
    registry = CapabilityRegistry()
    cap = capability()
    record = WorkerRecord("w1", "http://w1.example:8000", (cap,), clock.now - 50, verified=True)
    registry.restore([record], now=clock.now)
    async with running(registry=registry, clock=clock) as api:
        assert await api.route() == "w1"
        api.advance(11)
        assert await api.route() is None
        assert (await api.workers())["w1"]["state"] == "unverified"


async def test_capabilities_one_entry_per_version() -> None:
    async with running() as api:
        await api.register("w1", capabilities=[capability_payload(version="1.0.0")])
        await api.register("w2", capabilities=[capability_payload(version="2.0.0")])
        await api.register(
            "w3",
            capabilities=[
                capability_payload(version="1.0.0"),
                capability_payload("text.embed", "embed"),
            ],
        )
        body = (await api.get("/capabilities")).json()
        entries = [
            (e["verb"], e["capability"], e["version"], e["workers"]) for e in body["capabilities"]
        ]
        assert entries == [
            ("classify", "image.classify", "1.0.0", ["w1", "w3"]),
            ("classify", "image.classify", "2.0.0", ["w2"]),
            ("embed", "text.embed", "1.0.0", ["w3"]),
        ]
        assert (body["total_workers"], body["healthy_workers"]) == (3, 3)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("requester_identity", 5),
        ("slo_constraints", "fast"),
        ("budget_tokens", "12"),
        ("budget_tokens", -1),
        ("idempotency_key", ["k"]),
        ("version", "1.0"),
    ],
)
async def test_wrong_type_of_optional_is_invalid_request_first(field: str, value: Any) -> None:
    async with running() as api:
        body = {"verb": "classify", "capability": "image.classify", field: value}
        response = await api.post("/route", body)
        assert response.status_code == 422
        assert response.json()["error"] == "invalid_request"
        assert [d["path"] for d in response.json()["detail"]] == [field]


async def test_invalid_request_lists_every_problem() -> None:
    async with running() as api:
        body = registration_payload(
            "w1", capabilities=[capability_payload(max_concurrency=0), capability_payload()]
        )
        body["worker_url"] = "ftp://w1"
        response = await api.post("/register", body)
        assert response.status_code == 422
        detail = response.json()["detail"]
        paths = {d["path"] for d in detail}
        assert {"worker_url", "capabilities[0].max_concurrency"} <= paths
        assert all(set(d) == {"path", "message"} for d in detail)


async def test_unknown_path_and_method_are_json() -> None:
    async with running() as api:
        response = await api.get("/nowhere")
        assert response.status_code == 404
        assert response.json()["error"] == "not_found"
        response = await api.request("GET", "/register")
        assert response.status_code == 405
        assert response.json()["error"] == "method_not_allowed"
        assert response.headers["allow"] == "POST"
        response = await api.request("DELETE", "/workers")
        assert response.status_code == 405
        assert "GET" in response.headers["allow"]


async def test_openapi_document_is_served() -> None:
    async with running() as api:
        document = (await api.get("/openapi.json")).json()
        assert document["openapi"] == "3.1.0"
        assert set(document["paths"]) == {
            "/health",
            "/ready",
            "/register",
            "/heartbeat",
            "/deregister",
            "/workers/{worker_id}/drain",
            "/workers/{worker_id}/undrain",
            "/route",
            "/capabilities",
            "/workers",
            "/workers/{worker_id}",
            "/slos",
            "/snapshot",
            "/watch",
            "/metrics",
            "/openapi.json",
            "/ui",
            "/ui/app.js",
            "/ui/style.css",
        }


async def test_journal_unavailable_when_the_lifespan_has_not_run(tmp_path: Any) -> None:
    config = ServiceConfig(state_dir=tmp_path)
    async with running(config, lifespan=False) as api:
        response = await api.post("/register", registration_payload("w1"))
        assert response.status_code == 503
        assert response.json()["error"] == "journal_unavailable"
        assert len(api.registry) == 0  # refused before the registry was touched
        # Reads still work.
        assert (await api.get("/health")).status_code == 200


async def test_clock_never_goes_backwards() -> None:
    wall, monotonic = FakeClock(), FakeClock(0.0)
    start = wall.now
    clock = AnchoredClock(wall=wall, monotonic=monotonic)
    async with running(clock=monotonic, service_clock=clock) as api:
        await api.register("w1")
        first = (await api.post("/heartbeat", {"worker_id": "w1"})).json()["timestamp"]
        wall.now -= 3600  # the wall clock is set back
        monotonic.advance(1.0)
        second = (await api.post("/heartbeat", {"worker_id": "w1"})).json()["timestamp"]
        # The service's time moved on by the monotonic clock's second, not back an hour.
        assert (first, second) == (iso_utc(start), iso_utc(start + 1.0))
        assert (await api.workers())["w1"]["state"] == "healthy"


async def test_logs_one_line_per_registration_deregistration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="crank_registry_asgi")
    async with running() as api:
        await api.register("w1")
        await api.register("w1")
        for _ in range(3):
            await api.post("/heartbeat", {"worker_id": "w1"})
            await api.route()
        await api.post("/deregister", {"worker_id": "w1"})
    lines = [r.getMessage() for r in caplog.records if r.name == "crank_registry_asgi"]
    assert lines[0] == identity_checks_off_warning()
    assert lines[1] == (
        "controller starting controller_id=controller state_dir=none "
        "heartbeat_interval_s=30.0 unhealthy_after_s=60.0 evict_after_s=120.0"
    )
    assert lines[2:] == [
        f"worker registered worker_id=w1 worker_url={WORKER_URL} "
        "capabilities=classify:image.classify replaced=false revision=1",
        f"worker registered worker_id=w1 worker_url={WORKER_URL} "
        "capabilities=classify:image.classify replaced=true revision=2",
        "worker deregistered worker_id=w1 revision=3",
    ]


async def test_last_resort_handler_answers_json_500() -> None:
    class Broken(CapabilityRegistry):
        def counter(self, **_: Any) -> WorkerCounter:
            raise RuntimeError("injected fault")

    app = create_app(Broken(), clock=FakeClock())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/health")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == "internal_error"
    assert "injected" not in response.text


async def test_a_registry_passed_in_keeps_its_policy() -> None:
    policy = HealthPolicy(heartbeat_interval=5, unhealthy_after=10, evict_after=20)
    async with running(registry=CapabilityRegistry(policy)) as api:
        response = await api.register("w1")
        assert response.json()["heartbeat_interval_s"] == 5
        api.advance(11)
        assert await api.route() is None


async def test_every_response_is_checked_against_the_document() -> None:
    # The checker itself must reject a body that disagrees with the document.
    response = httpx.Response(200, json={"status": "ok"})
    with pytest.raises(Exception, match="required"):
        check_documented("GET", "/health", response)
    with pytest.raises(AssertionError, match="not documented"):
        check_documented("GET", "/health", httpx.Response(404, json={"error": "x"}))


async def test_a_number_with_a_zero_fraction_is_an_integer() -> None:
    # As in JSON Schema, which the OpenAPI document follows: 4.0 is the integer 4.
    async with running() as api:
        body = registration_payload("w1", capabilities=[capability_payload(max_concurrency=4.0)])
        assert (await api.post("/register", body)).status_code == 200
        body = registration_payload("w2", capabilities=[capability_payload(max_concurrency=4.5)])
        assert (await api.post("/register", body)).status_code == 422


@contextlib.asynccontextmanager
async def mounted() -> AsyncIterator[httpx.AsyncClient]:
    """The app mounted at /crank in another app whose lifespan runs the app's."""
    controller = create_app(clock=FakeClock())

    @contextlib.asynccontextmanager
    async def lifespan(parent: Starlette) -> AsyncIterator[None]:
        async with controller.router.lifespan_context(controller):
            yield

    parent = Starlette(routes=[Mount("/crank", app=controller)], lifespan=lifespan)
    transport = httpx.ASGITransport(app=parent)
    async with (
        parent.router.lifespan_context(parent),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        yield client


async def test_mounted_in_another_app() -> None:
    async with mounted() as client:
        response = await client.post("/crank/register", json=registration_payload("w1"))
        assert response.status_code == 200
        response = await client.post(
            "/crank/route", json={"verb": "classify", "capability": "image.classify"}
        )
        assert response.json()["worker_id"] == "w1"
        response = await client.get("/crank/nowhere")
        assert (response.status_code, response.json()["error"]) == (404, "not_found")
        response = await client.get("/elsewhere")
        assert response.status_code == 404
