"""Drive an ASGI app in-process: lifespan, then requests through httpx."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx


@contextlib.asynccontextmanager
async def running(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``app``'s ASGI lifespan around an httpx client talking to it."""
    send_stream, receive_stream = anyio.create_memory_object_stream[dict[str, Any]](10)
    sent: list[dict[str, Any]] = []
    started = anyio.Event()
    finished = anyio.Event()

    async def receive() -> dict[str, Any]:
        return await receive_stream.receive()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"].startswith("lifespan.startup"):
            started.set()
        if message["type"].startswith("lifespan.shutdown"):
            finished.set()

    failure: dict[str, Any] | None = None
    async with anyio.create_task_group() as group:
        group.start_soon(app, {"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        await send_stream.send({"type": "lifespan.startup"})
        await started.wait()
        if sent[-1]["type"] != "lifespan.startup.complete":
            failure = sent[-1]  # the app has returned: the task group ends by itself
        else:
            transport = httpx.ASGITransport(app=app)
            try:
                client = httpx.AsyncClient(transport=transport, base_url="http://worker")
                async with client:
                    yield client
            finally:
                await send_stream.send({"type": "lifespan.shutdown"})
                await finished.wait()
    if failure is not None:
        raise RuntimeError(f"start-up failed: {failure}")


async def invoke(client: httpx.AsyncClient, verb: str, name: str, payload: Any) -> httpx.Response:
    return await client.post(f"/invoke/{verb}/{name}", json={"payload": payload})


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines() if line]
