"""The request-body deadline of the one bounded reader, and the worker's 408 (virtual time)."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from crank_registry import CapabilitySchema
from crank_worker_client.body import BodyTimeout, DrainRequestBody, read_body
from crank_worker_client.serving import invocation_app

pytestmark = pytest.mark.anyio


class StallingClient:
    """ASGI ``receive``: the body's chunks, then nothing ever again (one byte of many)."""

    def __init__(self, *chunks: bytes, stall: bool = True) -> None:
        self.chunks = list(chunks)
        self.stall = stall

    async def __call__(self) -> dict[str, Any]:
        if self.chunks:
            chunk = self.chunks.pop(0)
            return {
                "type": "http.request",
                "body": chunk,
                "more_body": bool(self.chunks) or self.stall,
            }
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


async def test_a_stalled_body_ends_at_the_deadline() -> None:
    started = anyio.current_time()
    with pytest.raises(BodyTimeout):
        await read_body(StallingClient(b"{"), limit=1000, deadline=started + 10)
    assert anyio.current_time() == pytest.approx(started + 10, abs=0.01)


async def test_a_body_in_time_is_read_whole() -> None:
    client = StallingClient(b'{"a"', b": 1}", stall=False)
    body = await read_body(client, limit=1000, deadline=anyio.current_time() + 10)
    assert body == b'{"a": 1}'


async def test_without_a_deadline_a_stalled_body_waits() -> None:
    with anyio.move_on_after(3600) as scope:
        await read_body(StallingClient(b"{"), limit=1000)
    assert scope.cancelled_caught


async def test_a_408_is_answered_without_draining_the_body() -> None:
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 408, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "http_version": "1.1", "headers": [(b"content-length", b"1000")]}
    started = anyio.current_time()
    await DrainRequestBody(app)(scope, StallingClient(b"{"), send)
    # Not a moment spent waiting for the rest of the body.
    assert anyio.current_time() == started
    assert (b"connection", b"close") in sent[0]["headers"]


@pytest.mark.parametrize(
    ("method", "http_version", "headers", "drained"),
    [
        ("GET", "1.1", [], False),
        ("HEAD", "1.1", [], False),
        ("GET", "1.1", [(b"content-length", b"0")], False),
        ("GET", "1.0", [], False),
        ("GET", "1.1", [(b"content-length", b"2")], True),
        ("GET", "1.1", [(b"transfer-encoding", b"chunked")], True),
        ("GET", "1.1", [(b"content-length", b"x")], True),
        ("GET", "2", [], True),  # HTTP/2 may send a body without declaring it
        ("POST", "1.1", [], True),  # a write: its body is read as before
    ],
)
async def test_a_read_without_a_body_is_answered_without_reading_it(
    method: str, http_version: str, headers: list[tuple[bytes, bytes]], drained: bool
) -> None:
    received: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:  # never reads the body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> dict[str, Any]:
        message = {"type": "http.request", "body": b"", "more_body": False}
        received.append(message)
        return message

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "http_version": http_version, "headers": headers}
    await DrainRequestBody(app)(scope, receive, send)
    assert bool(received) is drained
    assert sent[0]["headers"] == []  # the connection stays usable either way


CAPABILITY = CapabilitySchema(
    name="text.echo",
    verb="echo",
    version="1.0.0",
    input_schema={},
    output_schema={},
    requires_gpu=False,
    max_concurrency=4,
)


async def echo(payload: Any) -> Any:
    return payload


async def test_the_worker_answers_a_stalled_body_408() -> None:
    app = invocation_app({("echo", "text.echo"): echo}, [CAPABILITY], read_timeout=2.5)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": "/invoke/echo/text.echo",
        "raw_path": b"/invoke/echo/text.echo",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
    }
    started = anyio.current_time()
    await app(scope, StallingClient(b"{"), send)
    assert anyio.current_time() == pytest.approx(started + 2.5, abs=0.01)
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    body = json.loads(sent[1]["body"])
    assert body == {"error": "request_timeout", "message": "the body did not arrive within 2.5 s"}


@pytest.mark.parametrize("value", [0, -2, float("inf"), float("nan"), True, "10"])
async def test_the_worker_read_timeout_must_be_a_positive_number(value: Any) -> None:
    with pytest.raises(ValueError, match="read_timeout must be a finite number > 0"):
        invocation_app({("echo", "text.echo"): echo}, [CAPABILITY], read_timeout=value)
