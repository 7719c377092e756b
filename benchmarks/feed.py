"""Benchmark: 1,000 open long polls of ``GET /watch`` while registrations and heartbeats run.

Run: ``.venv/bin/python benchmarks/feed.py`` (``--watchers N``,
``--changes N``, ``--heartbeat-workers N``); about 20 s.

The controller app runs in process over ``httpx.ASGITransport`` (asyncio).
``--watchers`` followers each hold a long poll open and, once answered,
poll again from the revision answered (as a follower does). A client
heartbeats ``--heartbeat-workers`` workers one after another, without a
pause, the whole time. Every 100 ms a worker registers (a change).

Figures:

* wake-up: from the moment a change is applied (the service's hook that
  wakes the watchers, timed) to the moment the last of the watchers has its
  answer (the answer parsed by its client): p50 and max over the changes.
  Target 50 ms (DESIGN, "Targets": 50 ms wake), the ratio printed;
* heartbeat latency (p50, p99), first without watchers, then with them
  open: the price the watchers put on the hot path.

In process: the watchers call the app through the bare ASGI interface
(the lightest client there is; they still parse each answer's JSON on
the same loop), the heartbeats go through ``httpx.ASGITransport``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import anyio
import httpx

from crank_registry import HealthPolicy
from crank_registry_asgi import ServiceConfig, create_app, feed

WAKE_TARGET_S = 0.050
CHANGE_EVERY_S = 0.1


def registration_payload(worker_id: str) -> dict[str, Any]:
    """A registration of ``worker_id`` offering one capability."""
    capability = {
        "name": "image.classify",
        "verb": "classify",
        "version": "1.0.0",
        "input_schema": {"type": "object"},
        "output_schema": {"type": "object"},
        "requires_gpu": False,
        "max_concurrency": 4,
    }
    return {
        "worker_id": worker_id,
        "worker_url": f"http://{worker_id}.test:8080",
        "capabilities": [capability],
    }


async def call(app: Any, query: str) -> tuple[int, bytes]:
    """``GET /watch?QUERY`` straight through the ASGI interface: a watcher's request.

    A client as light as the protocol allows, so that the figures are the
    controller's (a follower on another machine costs it no client work).
    """
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/watch",
        "raw_path": b"/watch",
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("bench", 80),
        "state": {},
    }
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def heartbeats(client: httpx.AsyncClient, count: int, stop: anyio.Event) -> list[float]:
    """Heartbeat ``count`` workers in turn until ``stop``; each request's latency."""
    latencies: list[float] = []
    index = 0
    while not stop.is_set():
        started = time.perf_counter()
        response = await client.post("/heartbeat", json={"worker_id": f"hb{index % count}"})
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        index += 1
        # In process, a heartbeat may run to its end without suspending: let the
        # rest of the loop (watchers, registrations) run, as a network would.
        await anyio.sleep(0)
    return latencies


async def run(watchers: int, changes: int, heartbeat_workers: int) -> dict[str, Any]:
    # A long interval: nothing turns unhealthy during the run.
    config = ServiceConfig(policy=HealthPolicy(300.0, 600.0, 1200.0))
    app = create_app(config=config)
    service = app.state.service
    applied_at: dict[int, float] = {}
    wake = service.effects.applied

    def timed_wake() -> None:
        applied_at[service.registry.revision] = time.perf_counter()
        wake()

    service.effects.applied = timed_wake
    # revision -> when the service had built each watcher's answer
    built: dict[int, list[float]] = {}
    build = feed.watch

    async def timed_watch(*args: Any) -> Any:
        answer = await build(*args)
        events = json.loads(answer)["events"]
        if events:
            built.setdefault(events[0]["revision"], []).append(time.perf_counter())
        return answer

    feed.watch = timed_watch  # type: ignore[assignment]
    # revision -> when the last watcher had it
    answered: dict[int, list[float]] = {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://bench", limits=limits) as client,
    ):
        for index in range(heartbeat_workers):
            await client.post("/register", json=registration_payload(f"hb{index}"))
        start_revision = service.registry.revision

        stop = anyio.Event()
        alone: list[float] = []

        async def measure_alone() -> None:
            alone.extend(await heartbeats(client, heartbeat_workers, stop))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(measure_alone)
            await anyio.sleep(2.0)
            stop.set()

        async def follow(since: int) -> None:
            while True:
                status, raw = await call(app, f"since={since}&timeout=60")
                assert status == 200, raw
                body = json.loads(raw)
                now = time.perf_counter()
                for event in body["events"]:
                    answered.setdefault(event["revision"], []).append(now)
                since = body["revision"]

        stop = anyio.Event()
        loaded: list[float] = []

        async def measure_loaded() -> None:
            loaded.extend(await heartbeats(client, heartbeat_workers, stop))

        async with anyio.create_task_group() as tasks:
            for _ in range(watchers):
                tasks.start_soon(follow, start_revision)
            while service.broadcast.waiting() < watchers:
                await anyio.sleep(0.01)
            tasks.start_soon(measure_loaded)
            for index in range(changes):
                await anyio.sleep(CHANGE_EVERY_S)
                await client.post("/register", json=registration_payload(f"new{index}"))
            await anyio.sleep(1.0)
            stop.set()
            await anyio.sleep(0.2)
            tasks.cancel_scope.cancel()
    feed.watch = build  # type: ignore[assignment]
    wakes, builds = [], []
    for revision, at in applied_at.items():
        times = answered.get(revision, [])
        if revision > start_revision and len(times) == watchers:
            wakes.append(max(times) - at)
            builds.append(max(built[revision]) - at)
    return {
        "wakes": wakes,
        "builds": builds,
        "alone": alone,
        "loaded": loaded,
        "changes": changes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--heartbeat-workers", type=int, default=100)
    args = parser.parse_args()
    figures = anyio.run(run, args.watchers, args.changes, args.heartbeat_workers)
    wakes = figures["wakes"]
    print(
        f"{args.watchers} watchers, {len(wakes)} of {figures['changes']} changes answered "
        "to every watcher"
    )
    worst, median = max(wakes), statistics.median(wakes)
    print(
        f"change applied -> last watcher answered: p50 {median * 1000:.1f} ms "
        f"({median / WAKE_TARGET_S:.2f}x the {WAKE_TARGET_S * 1000:.0f} ms target), "
        f"max {worst * 1000:.1f} ms ({worst / WAKE_TARGET_S:.2f}x)"
    )
    builds = figures["builds"]
    print(
        f"change applied -> last answer built by the service: p50 "
        f"{statistics.median(builds) * 1000:.1f} ms, max {max(builds) * 1000:.1f} ms"
    )
    for name, values in (
        ("without watchers", figures["alone"]),
        ("with watchers", figures["loaded"]),
    ):
        print(
            f"heartbeat {name}: p50 {statistics.median(values) * 1e6:.0f} us, "
            f"p99 {percentile(values, 0.99) * 1e6:.0f} us ({len(values)} heartbeats)"
        )


if __name__ == "__main__":
    main()
