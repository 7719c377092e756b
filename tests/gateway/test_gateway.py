"""POST /execute in-process: forwarding, failover, errors, the controller behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from crank_registry.testing import FakeClock
from crank_registry_asgi.gateway import EXECUTE_PATH, GatewayConfig, create_gateway_app
from crank_worker_client.serving import InvocationError
from tests.builders import capability
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


async def test_forwards_the_payload_and_returns_the_answer() -> None:
    network = WorkerNetwork()
    worker = network.add("w1.test", FakeWorker(serving({("greet", "hello"): hello})))
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(client, "w1", "https://w1.test:8443")
        response = await execute(client, {"name": "Ada"})
    assert response.status_code == 200
    assert response.json() == {"result": {"greeting": "Hello, Ada!"}}
    assert response.headers["x-crank-worker-id"] == "w1"
    assert response.headers["x-crank-attempts"] == "1"
    assert worker.received == [{"payload": {"name": "Ada"}}]
    (request,) = network.requests
    assert str(request.url) == "https://w1.test:8443/invoke/greet/hello"
    assert request.headers["content-type"] == "application/json"


async def test_names_with_reserved_characters_are_percent_encoded() -> None:
    network = WorkerNetwork()

    async def answer(payload: Any) -> str:
        return "ok"

    network.add("w1.test", FakeWorker(serving({("get", "a/b c"): answer})))
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(client, "w1", "http://w1.test/", capability(verb="get", name="a/b c"))
        response = await client.post(
            "/execute", json={"verb": "get", "capability": "a/b c", "payload": {}}
        )
    assert response.json() == {"result": "ok"}
    assert str(network.requests[0].url) == "http://w1.test/invoke/get/a%2Fb%20c"


async def test_the_path_goes_after_the_worker_urls_path_and_before_its_query() -> None:
    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(serving({("greet", "hello"): hello})))
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(client, "w1", "https://w1.test/base/?tenant=a%20b#part")
        await execute(client)
    (request,) = network.requests
    assert str(request.url) == "https://w1.test/base/invoke/greet/hello?tenant=a%20b"


async def test_a_worker_url_httpx_cannot_use_fails_over_to_the_next_worker() -> None:
    network = WorkerNetwork()
    network.add("w2.test", FakeWorker(serving({("greet", "hello"): hello})))
    async with client_of(make_gateway(network, FakeClock())) as client:
        # Accepted by the registry, refused by httpx's IDNA check: nothing is sent.
        await register(client, "w1", "https://xn--a.test")
        await register(client, "w2", "https://w2.test")
        response = await execute(client)
        await client.post("/deregister", json={"worker_id": "w2"})
        alone = await execute(client)
    assert response.status_code == 200
    assert response.headers["x-crank-worker-id"] == "w2"
    assert response.headers["x-crank-attempts"] == "2"
    assert alone.status_code == 502
    assert alone.json()["error"] == "worker_failed"
    assert alone.json()["worker_id"] == "w1"
    assert "unusable worker URL" in alone.json()["attempts"][0]["error"]


async def test_streams_ndjson_through() -> None:
    async def tokens(payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for word in payload["text"].split():
            yield {"token": word}

    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(serving({("stream", "text"): tokens})))
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(client, "w1", "https://w1.test", capability(verb="stream", name="text"))
        response = await client.post(
            "/execute", json={"verb": "stream", "capability": "text", "payload": {"text": "a b c"}}
        )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.headers["x-crank-worker-id"] == "w1"
    assert response.text == '{"token":"a"}\n{"token":"b"}\n{"token":"c"}\n'


async def test_requests_are_spread_round_robin() -> None:
    network = WorkerNetwork()
    handlers = {("greet", "hello"): hello}
    first = network.add("w1.test", FakeWorker(serving(handlers)))
    second = network.add("w2.test", FakeWorker(serving(handlers)))
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        await register(client, "w2", "https://w2.test")
        answered_by = [(await execute(client)).headers["x-crank-worker-id"] for _ in range(4)]
    assert answered_by == ["w1", "w2", "w1", "w2"]
    assert len(first.received) == len(second.received) == 2


@pytest.mark.parametrize("failure", [httpx.ConnectError, httpx.ConnectTimeout])
async def test_fails_over_when_the_first_worker_cannot_be_reached(
    failure: type[httpx.TransportError],
) -> None:
    network = WorkerNetwork()
    down = network.add("w1.test", FakeWorker(failure=failure))
    up = network.add("w2.test", FakeWorker(serving({("greet", "hello"): hello})))
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        await register(client, "w2", "https://w2.test")
        response = await execute(client)
    assert response.status_code == 200
    assert response.headers["x-crank-worker-id"] == "w2"
    assert response.headers["x-crank-attempts"] == "2"
    assert [r.url.host for r in network.requests] == ["w1.test", "w2.test"]
    assert down.received == []
    assert up.received == [{"payload": {"name": "Ada"}}]


async def test_every_attempt_refused_is_worker_failed_and_bounded_by_max_attempts() -> None:
    network = WorkerNetwork()
    for name in ("w1", "w2", "w3"):
        network.add(f"{name}.test", FakeWorker(failure=httpx.ConnectError))
    app = make_gateway(network, FakeClock(), GatewayConfig(max_attempts=2))
    async with client_of(app) as client:
        for name in ("w1", "w2", "w3"):
            await register(client, name, f"https://{name}.test")
        response = await execute(client)
    assert response.status_code == 502
    body = response.json()
    assert body["error"] == "worker_failed"
    assert body["worker_id"] == "w2"
    assert [a["worker_id"] for a in body["attempts"]] == ["w1", "w2"]
    assert body["attempts"][0]["error"].startswith("ConnectError")
    assert len(network.requests) == 2


async def test_a_single_refusing_worker_is_tried_once() -> None:
    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(failure=httpx.ConnectError))
    async with client_of(
        make_gateway(network, FakeClock(), GatewayConfig(max_attempts=5))
    ) as client:
        await register(client, "w1", "https://w1.test")
        response = await execute(client)
    assert response.status_code == 502
    assert len(network.requests) == 1


async def test_connect_timeouts_everywhere_are_worker_timeout() -> None:
    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(failure=httpx.ConnectTimeout))
    network.add("w2.test", FakeWorker(failure=httpx.ConnectTimeout))
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        await register(client, "w2", "https://w2.test")
        response = await execute(client)
    assert response.status_code == 504
    assert response.json()["error"] == "worker_timeout"
    assert response.json()["worker_id"] == "w2"


async def test_no_retry_after_the_worker_answered_5xx() -> None:
    async def broken(payload: Any) -> Any:
        raise RuntimeError("disk on fire")

    network = WorkerNetwork()
    failing = network.add("w1.test", FakeWorker(serving({("greet", "hello"): broken})))
    spare = network.add("w2.test", FakeWorker(serving({("greet", "hello"): hello})))
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        await register(client, "w2", "https://w2.test")
        response = await execute(client)
    assert response.status_code == 502
    body = response.json()
    assert body["error"] == "worker_failed"
    assert body["worker_id"] == "w1"
    assert body["worker_status"] == 500
    assert body["worker_error"]["error"] == "handler_failed"
    assert len(failing.received) == 1
    assert spare.received == []


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (httpx.ReadTimeout, 504, "worker_timeout"),
        (httpx.WriteTimeout, 504, "worker_timeout"),
        (httpx.RemoteProtocolError, 502, "worker_failed"),
        (httpx.ReadError, 502, "worker_failed"),
    ],
)
async def test_no_retry_once_the_request_may_have_reached_the_worker(
    failure: type[httpx.TransportError], status: int, code: str
) -> None:
    network = WorkerNetwork()
    accepted = network.add("w1.test", FakeWorker(failure=failure))
    spare = network.add("w2.test", FakeWorker(serving({("greet", "hello"): hello})))
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        await register(client, "w2", "https://w2.test")
        response = await execute(client)
    assert response.status_code == status
    assert response.json()["error"] == code
    assert response.json()["worker_id"] == "w1"
    assert len(accepted.received) == 1
    assert spare.received == []


async def test_the_workers_own_4xx_is_passed_through() -> None:
    async def picky(payload: Any) -> Any:
        raise InvocationError("unknown_note", "no note with id 9", status=404)

    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(serving({("greet", "hello"): picky})))
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        response = await execute(client)
    assert response.status_code == 404
    assert response.json() == {"error": "unknown_note", "message": "no note with id 9"}
    assert response.headers["x-crank-worker-id"] == "w1"


async def test_answers_outside_the_convention_are_worker_failed() -> None:
    async def plain_text(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/html")],
            }
        )
        await send({"type": "http.response.body", "body": b"<html>"})

    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(plain_text))
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        response = await execute(client)
    assert response.status_code == 502
    assert response.json()["error"] == "worker_failed"
    assert "outside the invocation convention" in response.json()["message"]


async def test_an_answer_over_the_limit_is_worker_failed() -> None:
    async def big(payload: Any) -> str:
        return "x" * 5000

    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(serving({("greet", "hello"): big})))
    app = make_gateway(network, FakeClock(), GatewayConfig(max_response_bytes=1000))
    async with client_of(app) as client:
        await register(client, "w1", "https://w1.test")
        response = await execute(client)
    assert response.status_code == 502
    assert "larger than 1000 bytes" in response.json()["message"]


async def test_an_unknown_capability_is_404_without_retry_after() -> None:
    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(serving({("greet", "hello"): hello})))
    async with client_of(make_gateway(network, FakeClock())) as client:
        response = await execute(client)
        await register(client, "w1", "https://w1.test")
        typo = await execute(client, capability="helo")
    for answer, name in [(response, "hello"), (typo, "helo")]:
        assert answer.status_code == 404
        assert "retry-after" not in answer.headers
        body = answer.json()
        assert (body["error"], body["verb"], body["capability"]) == (
            "unknown_capability",
            "greet",
            name,
        )
        assert f"capability {name!r}" in body["message"]
    assert network.requests == []


async def test_a_known_capability_without_a_routable_worker_is_503_with_retry_after() -> None:
    clock = FakeClock()
    async with client_of(make_gateway(WorkerNetwork(), clock)) as client:
        await register(client, "w1", "https://w1.test")
        clock.advance(3.5)  # past unhealthy_after = 3
        response = await execute(client)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {
        "error": "no_worker_available",
        "message": "no healthy worker for 'greet' on 'hello'",
        "verb": "greet",
        "capability": "hello",
    }


async def test_an_unhealthy_worker_is_not_tried() -> None:
    clock = FakeClock()
    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(serving({("greet", "hello"): hello})))
    async with client_of(make_gateway(network, clock)) as client:
        await register(client, "w1", "https://w1.test")
        clock.advance(3.5)  # past unhealthy_after = 3
        response = await execute(client)
    assert response.status_code == 503
    assert network.requests == []


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b'{"verb": "greet"}', "text/plain", 415, "unsupported_media_type"),
        (b"{", "application/json", 400, "invalid_json"),
        (b"[1]", "application/json", 422, "invalid_request"),
        (b'{"verb": "greet", "capability": "hello"}', "application/json", 422, "invalid_request"),
        (
            b'{"verb": 1, "capability": "", "payload": {}}',
            "application/json",
            422,
            "invalid_request",
        ),
        (
            b'{"verb": "a", "capability": "b", "payload": {}, "extra": 1}',
            "application/json",
            422,
            "invalid_request",
        ),
        (b'{"payload": "' + b"x" * 2000 + b'"}', "application/json", 413, "request_too_large"),
    ],
)
async def test_bad_execute_bodies(
    content: bytes, content_type: str, status: int, code: str
) -> None:
    app = make_gateway(WorkerNetwork(), FakeClock(), max_body_bytes=1000)
    async with client_of(app) as client:
        response = await client.post(
            "/execute", content=content, headers={"content-type": content_type}
        )
    assert response.status_code == status
    assert response.json()["error"] == code


async def test_invalid_request_lists_every_problem() -> None:
    async with client_of(make_gateway(WorkerNetwork(), FakeClock())) as client:
        response = await client.post("/execute", json={"verb": 1, "capability": " ", "x": 0})
    assert response.json()["detail"] == [
        {"path": "verb", "message": "must be a string"},
        {"path": "capability", "message": "must not be empty"},
        {"path": "payload", "message": "is required"},
        {"path": "x", "message": "unknown field"},
    ]


async def test_wrong_method_and_the_controller_behind_the_gateway() -> None:
    async with client_of(make_gateway(WorkerNetwork(), FakeClock())) as client:
        wrong_method = await client.get(EXECUTE_PATH)
        health = await client.get("/health")
        missing = await client.get("/nowhere")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"] == "method_not_allowed"
    assert health.json()["total_workers"] == health.json()["healthy_workers"] == 0
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"


async def test_a_stream_cut_short_ends_with_an_error_line() -> None:
    class HalfStream(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b'{"token":"a"}\n'
            raise httpx.ReadTimeout("silent")

    class StreamingHost(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            return httpx.Response(
                200, headers={"content-type": "application/x-ndjson"}, stream=HalfStream()
            )

    async with client_of(make_gateway(StreamingHost(), FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        response = await execute(client)
    assert response.status_code == 200
    lines = response.text.splitlines()
    assert lines[0] == '{"token":"a"}'
    assert '"error": "worker_timeout"' in lines[1]


def test_gateway_config_is_checked() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        GatewayConfig(max_attempts=0)
    with pytest.raises(ValueError, match="timeout"):
        GatewayConfig(timeout=float("nan"))
    with pytest.raises(ValueError, match="connect_timeout"):
        GatewayConfig(connect_timeout=0)
    assert GatewayConfig(timeout=2, connect_timeout=5).httpx_timeout().connect == 2


def test_only_a_controller_app_can_be_wrapped() -> None:
    with pytest.raises(TypeError, match="create_app"):
        create_gateway_app(Starlette())


async def test_the_lifespan_runs_the_controller_and_closes_connections() -> None:
    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(serving({("greet", "hello"): hello})))
    app = make_gateway(network, FakeClock())
    async with client_of(app) as client:
        await register(client, "w1", "https://w1.test")
        assert (await execute(client)).status_code == 200
        assert network.closed == 0  # the connections stay open while serving
    assert network.closed == 1  # and the shutdown closed them


async def test_the_openapi_document_describes_execute_too() -> None:
    async with client_of(make_gateway(WorkerNetwork(), FakeClock())) as client:
        first = await client.get("/openapi.json")
        again = await client.get("/openapi.json")
        wrong_method = await client.post("/openapi.json")
    assert first.json() == again.json()
    document = first.json()
    assert {"/register", "/route", "/execute"} <= set(document["paths"])
    execute_doc = document["paths"]["/execute"]["post"]
    assert set(execute_doc["responses"]) >= {"200", "400", "413", "415", "422", "502", "503", "504"}
    schemas = document["components"]["schemas"]
    for response in execute_doc["responses"].values():
        for media in response.get("content", {}).values():
            ref = media["schema"].get("$ref")
            if ref:
                assert ref.removeprefix("#/components/schemas/") in schemas
    assert schemas["ExecuteRequest"]["required"] == ["verb", "capability", "payload"]
    assert wrong_method.status_code == 405


@pytest.mark.parametrize(
    ("verb", "name", "path"),
    [
        ("greet", "hello", "/invoke/greet/hello"),
        ("a/b", "c d", "/invoke/a%2Fb/c%20d"),
        ("x", "é?#%", "/invoke/x/%C3%A9%3F%23%25"),
    ],
)
def test_the_invocation_path_makes_two_segments_of_any_verb_and_name(
    verb: str, name: str, path: str
) -> None:
    from crank_registry import invocation_path

    assert invocation_path(verb, name) == path
