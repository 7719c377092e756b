"""ControllerClient against httpx.MockTransport: answers, errors, URLs, TLS, tracing."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider

from crank_registry import (
    CapabilityView,
    HealthState,
    Problem,
    Registration,
    RemovedWorker,
    RouteExplanation,
    WorkerEndpoint,
    WorkerState,
)
from crank_registry_asgi import ServiceConfig
from crank_worker_client import (
    DEFAULT_CONTROLLER_URL,
    ClientError,
    ConfigurationError,
    ControllerClient,
    ControllerError,
    ControllerHealth,
    ControllerUnavailable,
    ForbiddenError,
    HeartbeatAck,
    InvalidRequest,
    NoWorkerAvailable,
    PolicyDenied,
    RateLimited,
    TLSConfig,
    UnexpectedResponse,
    UnknownCapability,
    WorkerNotRegisteredError,
)
from crank_worker_client._client import _closed_by_the_server_in_handshake
from tests.builders import capability, capability_payload
from tests.service.helpers import running

pytestmark = pytest.mark.anyio

URL = "https://controller.test"

Handler = Callable[[httpx.Request], httpx.Response]


def client_for(handler: Handler, url: str = URL) -> ControllerClient:
    return ControllerClient(url, transport=httpx.MockTransport(handler))


def answer(status: int, body: object = None, headers: dict[str, str] | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body, headers=headers)

    return handler


async def test_route_returns_the_endpoint_and_sends_only_the_given_optionals() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json={"worker_id": "w1", "worker_url": "https://w1:8443", "version": "1.2.0", "x": 1},
        )

    async with client_for(handler) as client:
        endpoint = await client.route("classify", "image.classify")
        await client.route("classify", "image.classify", version=">=1.2", budget_tokens=3.5)
        await client.route(
            "classify",
            "image.classify",
            exclude=("w2", "w3"),
            slo_constraints={"latency_p95_ms": 100},
            strategy="affinity",
            affinity_key="user-7",
            idempotency_key="order-1",
            requester_identity="spiffe://crank.local/caller",
            explain=True,
        )
        with pytest.raises(TypeError, match="exclude"):
            await client.route("classify", "image.classify", exclude="w2")
    assert endpoint == WorkerEndpoint("w1", "https://w1:8443", "1.2.0")
    assert [(r.method, r.url.path) for r in seen] == [("POST", "/route")] * 3
    assert json.loads(seen[0].content) == {"verb": "classify", "capability": "image.classify"}
    assert json.loads(seen[1].content) == {
        "verb": "classify",
        "capability": "image.classify",
        "version": ">=1.2",
        "budget_tokens": 3.5,
    }
    assert json.loads(seen[2].content) == {
        "verb": "classify",
        "capability": "image.classify",
        "exclude": ["w2", "w3"],
        "slo_constraints": {"latency_p95_ms": 100},
        "strategy": "affinity",
        "affinity_key": "user-7",
        "idempotency_key": "order-1",
        "requester_identity": "spiffe://crank.local/caller",
        "explain": True,
    }


async def test_route_options_and_explain_against_the_real_app() -> None:
    async with running() as api:
        await api.register("w1", capabilities=[capability_payload(version="1.4.0")])
        await api.register("w2", capabilities=[capability_payload(version="2.1.0")])
        transport = httpx.ASGITransport(app=api.app)
        async with ControllerClient(URL, transport=transport) as client:
            endpoint = await client.route(
                "classify", "image.classify", version=">=1.2,<2", explain=True
            )
            assert (endpoint.worker_id, endpoint.version) == ("w1", "1.4.0")
            assert endpoint.explain == RouteExplanation(
                strategy="round_robin",
                candidates=("w1",),
                removed=(RemovedWorker(worker_id="w2", reason="version"),),
            )
            plain = await client.route("classify", "image.classify", exclude=["w1"])
            assert (plain.worker_id, plain.explain) == ("w2", None)
            with pytest.raises(NoWorkerAvailable) as caught:
                await client.route("classify", "image.classify", version=">=3", explain=True)
            assert caught.value.explain is not None
            assert [entry.reason for entry in caught.value.explain.removed] == ["version"] * 2
            with pytest.raises(NoWorkerAvailable) as caught:
                await client.route("classify", "image.classify", version=">=3")
            assert caught.value.explain is None
            with pytest.raises(InvalidRequest) as invalid:
                await client.route("classify", "image.classify", strategy="affinity")
            assert [p.path for p in invalid.value.problems] == ["affinity_key"]


async def test_no_worker_available_carries_the_retry_after() -> None:
    body = {"error": "no_worker_available", "verb": "classify", "capability": "image.classify"}
    client = client_for(answer(503, body, {"Retry-After": "30"}))
    with pytest.raises(NoWorkerAvailable) as caught:
        await client.route("classify", "image.classify")
    await client.aclose()
    error = caught.value
    assert (error.code, error.status, error.retry_after) == ("no_worker_available", 503, 30.0)
    assert isinstance(error, ControllerError) and not isinstance(error, ControllerUnavailable)
    assert "classify:image.classify" in str(error) and "retry after 30 s" in str(error)


async def test_unknown_capability_is_its_own_error_and_is_asked_once() -> None:
    seen: list[httpx.Request] = []
    body = {
        "error": "unknown_capability",
        "message": "no registered worker offers verb 'classify' on capability 'image.clasify'",
        "verb": "classify",
        "capability": "image.clasify",
    }

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(404, json=body)

    async with client_for(handler) as client:
        with pytest.raises(UnknownCapability) as caught:
            await client.route("classify", "image.clasify")
    error = caught.value
    assert (error.code, error.status, error.verb, error.capability) == (
        "unknown_capability",
        404,
        "classify",
        "image.clasify",
    )
    assert isinstance(error, ControllerError)
    assert not isinstance(error, (NoWorkerAvailable, ControllerUnavailable))
    assert "classify:image.clasify" in str(error) and "unknown capability" in str(error)
    assert len(seen) == 1  # not an outage: never waited for nor retried


async def test_a_route_the_policy_denies_is_policy_denied_never_retried(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('default = "deny"\n')
    async with running(ServiceConfig(policy_file=policy)) as api:
        await api.register("w1")
        seen: list[httpx.Request] = []
        app = httpx.ASGITransport(app=api.app)

        class Counted(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                seen.append(request)
                return await app.handle_async_request(request)

        async with ControllerClient(URL, transport=Counted()) as client:
            with pytest.raises(PolicyDenied) as caught:
                await client.route("classify", "image.classify", explain=True)
            with pytest.raises(ForbiddenError):  # not a trusted gateway
                await client.route(
                    "classify", "image.classify", requester_identity="spiffe://crank.local/x"
                )
    error = caught.value
    assert (error.code, error.status) == ("policy_denied", 403)
    assert error.reason == "no rule matches 'classify:image.classify'; default deny"
    assert error.explain == RouteExplanation(
        strategy="round_robin",
        candidates=(),
        removed=(RemovedWorker(worker_id="w1", reason="policy"),),
    )
    assert not isinstance(error, (UnknownCapability, NoWorkerAvailable, ControllerUnavailable))
    assert "classify:image.classify" in str(error) and "default deny" in str(error)
    assert len(seen) == 2  # one request each: neither is retried


async def test_retry_after_accepts_seconds_and_http_dates() -> None:
    body = {"error": "no_worker_available", "verb": "classify", "capability": "image.classify"}

    async def retry_after(value: str | None) -> float | None:
        headers = {} if value is None else {"Retry-After": value}
        async with client_for(answer(503, body, headers)) as client:
            with pytest.raises(NoWorkerAvailable) as caught:
                await client.route("classify", "image.classify")
        return caught.value.retry_after

    assert await retry_after("7") == 7.0
    assert await retry_after(None) is None
    assert await retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    assert 100 < await retry_after(later) <= 120  # type: ignore[operator]
    earlier = format_datetime(datetime.now(UTC) - timedelta(seconds=120), usegmt=True)
    assert await retry_after(earlier) == 0.0


@pytest.mark.parametrize(
    ("status", "body", "expected", "code"),
    [
        (
            404,
            {"error": "worker_not_registered", "worker_id": "w1"},
            WorkerNotRegisteredError,
            "worker_not_registered",
        ),
        (403, {"error": "forbidden"}, ForbiddenError, "forbidden"),
        (415, {"error": "unsupported_media_type"}, InvalidRequest, "unsupported_media_type"),
        (400, {"error": "invalid_json"}, InvalidRequest, "invalid_json"),
        (413, {"error": "request_too_large"}, InvalidRequest, "request_too_large"),
        (404, {"error": "not_found"}, UnexpectedResponse, "not_found"),
        (405, {"error": "method_not_allowed"}, UnexpectedResponse, "method_not_allowed"),
        (409, "<html>conflict</html>", UnexpectedResponse, "unexpected_response"),
    ],
)
async def test_error_answers_map_to_the_hierarchy(
    status: int, body: object, expected: type[ControllerError], code: str
) -> None:
    client = client_for(answer(status, body))
    with pytest.raises(expected) as caught:
        await client.heartbeat("w1")
    await client.aclose()
    assert type(caught.value) is expected
    assert (caught.value.code, caught.value.status) == (code, status)
    assert isinstance(caught.value, ClientError)


async def test_invalid_request_lists_the_controllers_problems() -> None:
    body = {
        "error": "invalid_request",
        "detail": [
            {"path": "capabilities[0].max_concurrency", "message": "must be >= 1"},
            {"path": "worker_url", "message": "must be an absolute http:// or https:// URL"},
        ],
    }
    client = client_for(answer(422, body))
    with pytest.raises(InvalidRequest) as caught:
        await client.route("classify", "image.classify")
    assert caught.value.problems == (
        Problem("capabilities[0].max_concurrency", "must be >= 1"),
        Problem("worker_url", "must be an absolute http:// or https:// URL"),
    )
    # The problems, not the message that repeats them, follow the code.
    assert str(caught.value) == (
        "POST /route: the controller answered 422 invalid_request: "
        "capabilities[0].max_concurrency: must be >= 1; "
        "worker_url: must be an absolute http:// or https:// URL"
    )


async def test_error_messages_carry_the_controllers_reason() -> None:
    reason = "identity 'spiffe://crank.local/worker/ocr-1' may not act on worker 'ocr-2'"
    client = client_for(
        answer(403, {"error": "forbidden", "message": reason, "worker_id": "ocr-2"})
    )
    with pytest.raises(ForbiddenError) as caught:
        await client.heartbeat("ocr-2")
    await client.aclose()
    assert str(caught.value) == f"POST /heartbeat: the controller answered 403 forbidden: {reason}"
    # Without a message of its own the answer reads as before.
    client = client_for(answer(404, {"error": "not_found"}))
    with pytest.raises(UnexpectedResponse) as unexpected:
        await client.heartbeat("w1")
    await client.aclose()
    assert str(unexpected.value) == "POST /heartbeat: the controller answered 404 not_found"
    # A 5xx answer's message is kept too.
    client = client_for(answer(500, {"error": "internal_error", "message": "it broke"}))
    with pytest.raises(ControllerUnavailable) as unavailable:
        await client.health()
    await client.aclose()
    assert str(unavailable.value).endswith("answered 500 internal_error: it broke")


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
async def test_server_failures_are_controller_unavailable(status: int) -> None:
    client = client_for(answer(status, {"error": "internal_error"}))
    with pytest.raises(ControllerUnavailable) as caught:
        await client.health()
    assert caught.value.status == status
    assert not isinstance(caught.value, RateLimited)
    assert caught.value.retry_after is None


async def test_a_rate_limited_route_says_when_to_try_again_and_asks_no_other_controller() -> None:
    asked: list[str] = []

    def limited(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url.host))
        body = {"error": "rate_limited", "message": "over the limit"}
        return httpx.Response(429, json=body, headers={"Retry-After": "3"})

    client = ControllerClient(
        "https://ctl-a:9000,https://ctl-b:9000", transport=httpx.MockTransport(limited)
    )
    with pytest.raises(RateLimited) as caught:
        await client.route("classify", "image.classify")
    await client.aclose()
    assert (caught.value.status, caught.value.code, caught.value.retry_after) == (
        429,
        "rate_limited",
        3.0,
    )
    assert str(caught.value).endswith("over the limit; retry after 3 s")
    assert asked == ["ctl-a"]


async def test_network_errors_are_controller_unavailable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    client = client_for(refuse)
    with pytest.raises(ControllerUnavailable) as caught:
        await client.route("classify", "image.classify")
    assert caught.value.status is None
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert URL in str(caught.value) and "Connection refused" in str(caught.value)


async def test_a_controller_that_never_answers_is_given_up_after_the_timeout() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    client = ControllerClient(URL, transport=httpx.MockTransport(hang), timeout=3.0)
    started = anyio.current_time()
    with pytest.raises(ControllerUnavailable) as caught:
        await client.route("classify", "image.classify")
    # Bounded even where httpx's own timeouts do not apply (each read, not the whole).
    assert anyio.current_time() - started == 3.0
    assert str(caught.value) == f"POST /route: the controller at {URL} did not answer within 3 s"
    with pytest.raises(ControllerUnavailable, match=re.escape("within 0.5 s")):
        await client.heartbeat("w1", timeout=0.5)
    await client.aclose()


@pytest.mark.parametrize(
    "body",
    [
        "not json at all",
        [1, 2, 3],
        {"worker_id": "w1", "worker_url": "https://w1"},
        {"worker_id": 7, "worker_url": "https://w1", "version": "1.0.0"},
    ],
)
async def test_answers_outside_the_protocol_are_unexpected_response(body: object) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(200, text=body)
        return httpx.Response(200, json=body)

    client = client_for(handler)
    with pytest.raises(UnexpectedResponse):
        await client.route("classify", "image.classify")


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        (
            "/heartbeat",
            {"status": "acknowledged", "timestamp": "soon", "heartbeat_interval_s": 30},
            "timestamp",
        ),
        (
            "/heartbeat",
            {
                "status": "acknowledged",
                "timestamp": "2026-11-26T20:00:00Z",
                "heartbeat_interval_s": 0,
            },
            "heartbeat_interval_s",
        ),
        (
            "/heartbeat",
            {"status": "ok", "timestamp": "2026-11-26T20:00:00Z", "heartbeat_interval_s": 30},
            "status",
        ),
        (
            "/register",
            {"status": "registered", "worker_id": "w1", "heartbeat_interval_s": True},
            "heartbeat_interval_s",
        ),
        (
            "/register",
            {"status": "registered", "heartbeat_interval_s": 30},
            "worker_id: is required",
        ),
    ],
)
async def test_an_invalid_answer_to_the_worker_api_says_which_field(
    path: str, body: dict[str, object], reason: str
) -> None:
    client = client_for(answer(200, body))
    with pytest.raises(UnexpectedResponse) as caught:
        if path == "/heartbeat":
            await client.heartbeat("w1")
        else:
            await client.register(Registration("w1", "https://w1", (capability(),)))
    await client.aclose()
    assert f"POST {path}: the controller's answer is not valid: " in str(caught.value)
    assert reason in str(caught.value)


async def test_an_answer_with_fields_this_client_does_not_know_is_read() -> None:
    body = {
        "status": "acknowledged",
        "timestamp": "2026-11-26T20:00:00Z",
        "heartbeat_interval_s": 2.5,
        "load": 0.3,
    }
    async with client_for(answer(200, body)) as client:
        ack = await client.heartbeat("w1")
    assert ack == HeartbeatAck(datetime(2026, 11, 26, 20, 0, tzinfo=UTC), 2.5)


async def test_listings_and_health_are_read_into_values() -> None:
    answers = {
        "/capabilities": {
            "capabilities": [
                {
                    "verb": "classify",
                    "capability": "image.classify",
                    "version": "1.0.0",
                    "workers": ["w1", "w2"],
                    "healthy_workers": ["w1"],
                }
            ],
            "total_workers": 2,
            "healthy_workers": 1,
        },
        "/workers": {
            "workers": [
                {
                    "worker_id": "w1",
                    "worker_url": "https://w1:8443",
                    "last_heartbeat": "2026-11-26T20:00:00Z",
                    "is_healthy": True,
                    "state": "healthy",
                    "capabilities": ["classify:image.classify"],
                }
            ],
            "total_workers": 1,
            "healthy_workers": 1,
        },
        "/health": {"status": "ok", "total_workers": 2, "healthy_workers": 1},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "GET"
        return httpx.Response(200, json=answers[request.url.path])

    async with client_for(handler) as client:
        capabilities = await client.capabilities()
        workers = await client.workers()
        health = await client.health()
    assert capabilities == [
        CapabilityView("classify", "image.classify", "1.0.0", ("w1", "w2"), ("w1",))
    ]
    (worker,) = workers
    assert worker.worker_id == "w1" and worker.is_healthy and worker.state is WorkerState.HEALTHY
    assert worker.health is HealthState.HEALTHY and not worker.draining
    assert worker.last_heartbeat == datetime(2026, 11, 26, 20, 0, tzinfo=UTC)
    assert worker.capabilities == (("classify", "image.classify"),)
    assert health == ControllerHealth("ok", 2, 1)


def _worker_entry(worker_id: str) -> dict[str, object]:
    return {
        "worker_id": worker_id,
        "worker_url": f"https://{worker_id}:8443",
        "last_heartbeat": "2026-11-26T20:11:50.123Z",
        "is_healthy": True,
        "state": "healthy",
        "capabilities": ["classify:image.classify"],
    }


def _capability_entry(name: str) -> dict[str, object]:
    return {
        "verb": "classify",
        "capability": name,
        "version": "1.0.0",
        "workers": ["w1"],
        "healthy_workers": ["w1"],
    }


async def test_listings_follow_next_cursor_until_it_is_absent() -> None:
    seen: list[httpx.Request] = []
    # Pages keyed by the cursor asked for (None: the first request).
    counts = {"total_workers": 4, "healthy_workers": 4}
    workers = {
        None: {
            "workers": [_worker_entry("w1"), _worker_entry("w2")],
            **counts,
            "next_cursor": "c2",
        },
        "c2": {"workers": [_worker_entry("w3")], **counts, "next_cursor": "c3"},
        "c3": {"workers": [_worker_entry("w4")], **counts},
    }
    capabilities = {
        None: {"capabilities": [_capability_entry("a")], **counts, "next_cursor": "x"},
        "x": {"capabilities": [_capability_entry("b")], **counts},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        pages = workers if request.url.path == "/workers" else capabilities
        return httpx.Response(200, json=pages[request.url.params.get("cursor")])

    async with client_for(handler) as client:
        listed = await client.workers()
        views = await client.capabilities()
    assert [worker.worker_id for worker in listed] == ["w1", "w2", "w3", "w4"]
    assert [view.capability for view in views] == ["a", "b"]
    # The first request of each listing sends no cursor; the next ones send the one given.
    assert [(r.url.path, dict(r.url.params)) for r in seen] == [
        ("/workers", {}),
        ("/workers", {"cursor": "c2"}),
        ("/workers", {"cursor": "c3"}),
        ("/capabilities", {}),
        ("/capabilities", {"cursor": "x"}),
    ]


@pytest.mark.parametrize("cursor", ["", 7, "again"])
async def test_a_next_cursor_that_would_loop_or_is_not_a_string_is_unexpected(
    cursor: object,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        # "again" is given again on the page it leads to: a loop.
        return httpx.Response(
            200,
            json={"workers": [], "total_workers": 0, "healthy_workers": 0, "next_cursor": cursor},
        )

    async with client_for(handler) as client:
        with pytest.raises(UnexpectedResponse, match="next_cursor"):
            await client.workers()


async def test_a_worker_entry_with_an_unknown_state_is_unexpected() -> None:
    entry = {
        "worker_id": "w1",
        "worker_url": "https://w1",
        "last_heartbeat": "2026-11-26T20:00:00Z",
        "is_healthy": True,
        "state": "sleepy",
        "capabilities": [],
    }
    body = {"workers": [entry], "total_workers": 1, "healthy_workers": 1}
    client = client_for(answer(200, body))
    with pytest.raises(UnexpectedResponse, match="not valid"):
        await client.workers()


async def test_listings_follow_next_cursor_and_send_the_filters() -> None:
    def entry(worker_id: str) -> dict[str, Any]:
        return {
            "worker_id": worker_id,
            "worker_url": f"https://{worker_id}",
            "last_heartbeat": "2026-11-26T20:00:00Z",
            "is_healthy": True,
            "state": "healthy",
            "capabilities": ["classify:image.classify"],
        }

    pages: dict[str | None, dict[str, Any]] = {
        None: {"workers": [entry("w1"), entry("w2")], "next_cursor": "c2"},
        "c2": {"workers": [entry("w3")]},
    }
    queries: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        query = dict(request.url.params)
        queries.append(query)
        page = pages[query.get("cursor")]
        return httpx.Response(200, json={**page, "total_workers": 3, "healthy_workers": 3})

    async with client_for(handler) as client:
        workers = await client.workers(state=HealthState.HEALTHY, verb="classify", page_size=2)
    assert [worker.worker_id for worker in workers] == ["w1", "w2", "w3"]
    filters = {"state": "healthy", "verb": "classify", "limit": "2"}
    assert queries == [filters, {**filters, "cursor": "c2"}]


async def test_get_worker_answers_one_worker_as_the_listing_does_against_the_real_app() -> None:
    async with running() as api:
        await api.register("w1", capabilities=[capability_payload()])
        await api.register("w2", capabilities=[capability_payload("text.summarize", "summarize")])
        transport = httpx.ASGITransport(app=api.app)
        async with ControllerClient(URL, transport=transport) as client:
            listed = {worker.worker_id: worker for worker in await client.workers()}
            one = await client.get_worker("w2")
            assert one == listed["w2"]
            assert one.capabilities == (("summarize", "text.summarize"),)
            await api.post("/deregister", {"worker_id": "w2"})
            with pytest.raises(WorkerNotRegisteredError) as missing:
                await client.get_worker("w2")
            assert (missing.value.status, missing.value.code) == (404, "worker_not_registered")
            with pytest.raises(ConfigurationError, match="worker_id"):
                await client.get_worker("..")  # a path segment, not a worker id: not sent


async def test_works_without_a_context_manager_and_reopens_after_aclose() -> None:
    client = client_for(answer(200, {"status": "ok", "total_workers": 0, "healthy_workers": 0}))
    assert (await client.health()).status == "ok"
    await client.aclose()
    assert (await client.health()).total_workers == 0
    await client.aclose()
    await client.aclose()  # closing twice is harmless


def test_plain_http_is_refused_unless_insecure_is_asked_for() -> None:
    with pytest.raises(ConfigurationError, match="insecure=True"):
        ControllerClient("http://localhost:9000")
    assert (
        ControllerClient("http://localhost:9000", insecure=True).controller_url
        == "http://localhost:9000"
    )
    with pytest.raises(ConfigurationError, match="TLS settings"):
        ControllerClient("http://localhost:9000", insecure=True, tls=ssl.create_default_context())


@pytest.mark.parametrize(
    "url", ["localhost:9000", "ftp://host", "https://", "https://host:99999", "https://h/?q=1"]
)
def test_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        ControllerClient(url)


def test_the_url_comes_from_the_environment_then_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CONTROLLER_URL", raising=False)
    assert ControllerClient().controller_url == DEFAULT_CONTROLLER_URL == "https://localhost:9000"
    monkeypatch.setenv("CONTROLLER_URL", "https://registry.internal:9443/")
    assert ControllerClient().controller_url == "https://registry.internal:9443"
    assert ControllerClient("https://other:1").controller_url == "https://other:1"
    monkeypatch.setenv("CONTROLLER_URL", "http://registry.internal:9000")
    with pytest.raises(ConfigurationError, match="plain HTTP"):
        ControllerClient()


def test_tls_settings_are_checked_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="keyfile given without certfile"):
        TLSConfig(keyfile=tmp_path / "k.pem")
    with pytest.raises(
        ConfigurationError,
        match=re.escape(f"CA certificates file not found: {tmp_path / 'missing-ca.pem'}"),
    ):
        ControllerClient(URL, tls=TLSConfig(ca_certs=tmp_path / "missing-ca.pem"))
    with pytest.raises(
        ConfigurationError,
        match=re.escape(f"certificate file not found: {tmp_path / 'missing.pem'}"),
    ):
        ControllerClient(URL, tls=TLSConfig(certfile=tmp_path / "missing.pem"))
    context = TLSConfig().ssl_context()
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname


async def test_the_current_trace_context_is_injected() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "ok", "total_workers": 0, "healthy_workers": 0})

    tracer = TracerProvider().get_tracer("tests.client")
    async with client_for(handler) as client:
        await client.health()  # no current span: nothing to inject
        with tracer.start_as_current_span("caller") as span:
            await client.health()
            trace_id = format(span.get_span_context().trace_id, "032x")
            span_id = format(span.get_span_context().span_id, "016x")
    assert "traceparent" not in seen[0].headers
    assert seen[1].headers["traceparent"].startswith(f"00-{trace_id}-{span_id}-")


def test_without_opentelemetry_nothing_is_injected_and_nothing_breaks() -> None:
    script = """
import sys
sys.modules["opentelemetry"] = None  # as if the tracing extra were not installed
import anyio, httpx
import crank_worker_client
seen = []
def handler(request):
    seen.append(request)
    return httpx.Response(200, json={"status": "ok", "total_workers": 0, "healthy_workers": 0})
async def main():
    client = crank_worker_client.ControllerClient(
        "https://c.test", transport=httpx.MockTransport(handler)
    )
    async with client:
        await client.health()
anyio.run(main)
assert "traceparent" not in seen[0].headers and not crank_worker_client.TRACING_AVAILABLE
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_package_imports_no_server_packages() -> None:
    script = """
import sys
import crank_worker_client, crank_worker_client.serving
forbidden = {"starlette", "hypercorn", "cryptography", "crank_registry_asgi", "uvicorn",
             "granian", "trio", "h2"}
loaded = {name.split(".")[0] for name in sys.modules}
print(",".join(sorted(loaded & forbidden)))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"server packages imported: {done.stdout.strip()}"


def test_the_source_imports_only_the_core_httpx_anyio_and_what_its_extras_add() -> None:
    import ast

    import crank_worker_client

    # opentelemetry with the tracing extra; jsonschema and referencing with serving.
    allowed = {"crank_registry", "crank_worker_client", "httpx", "anyio", "opentelemetry"}
    allowed |= {"jsonschema", "referencing"}
    package = Path(crank_worker_client.__file__).parent
    found: set[str] = set()
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    assert found - set(sys.stdlib_module_names) <= allowed, found - set(sys.stdlib_module_names)


@pytest.mark.parametrize("timeout", [0, -1.0, float("inf"), float("nan"), True, "10"])
def test_a_timeout_that_is_not_a_positive_number_of_seconds_is_refused(timeout: object) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        ControllerClient("http://h:1", insecure=True, timeout=timeout)  # type: ignore[arg-type]


def test_a_reset_in_the_handshake_is_looked_into_an_untrusted_certificate_is_not() -> None:
    """Under TLS 1.3 a refused client certificate may arrive as a reset on the first read."""
    reset = httpx.ReadError("reset")
    reset.__cause__ = ConnectionResetError(104, "Connection reset by peer")
    closed = httpx.ConnectError("closed")
    closed.__context__ = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    untrusted = httpx.ConnectError("untrusted")
    untrusted.__cause__ = ssl.SSLCertVerificationError(1, "certificate verify failed")
    other = httpx.ReadError("other")
    other.__cause__ = OSError(5, "I/O error")
    assert _closed_by_the_server_in_handshake(reset)
    assert _closed_by_the_server_in_handshake(closed)
    assert not _closed_by_the_server_in_handshake(untrusted)
    assert not _closed_by_the_server_in_handshake(other)
