"""Benchmark: listings at 100 000 workers, and heartbeats while listers loop.

Run: ``.venv/bin/python benchmarks/listings.py`` (``--workers N``,
``--seconds S`` for the loaded phase; ``--quick`` for a smoke run).

The controller app runs in-process (``httpx.ASGITransport``, asyncio) over
a registry of 100 000 workers (replicas of 100 services, 3 capabilities
each), so that the loop the app runs on can be watched:

* ``/workers`` page time, alone: the first page, a page from the middle, at
  the default size (500) and the largest (5000); a ``state`` filtered page;
  a ``/capabilities`` page;
* then, for ``--seconds``, 8 listers walk ``/workers`` page by page (default
  size, around and around) while one heartbeat client sends heartbeats
  for 200 workers back to back, timing each, and a ticker measures how late
  the loop wakes it (the longest time anything held the loop).

The listers read only ``next_cursor`` from each answer (a byte search),
so that the client's own JSON parsing does not count against the app.

Targets (DESIGN.md, "Targets"; Hardening, "Listings"): heartbeat p99
< 100 ms while listing; no loop stall > 20 ms (the listings yield at least
every 20 ms at 100 000 workers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import re
import statistics
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx

from crank_registry import CapabilityRegistry, CapabilitySchema, encode_workers_cursor, structure
from crank_registry_asgi import create_app

LISTERS = 8
PROBES = 200
HEARTBEAT_P99_TARGET_S = 0.100
STALL_TARGET_S = 0.020
TICK_S = 0.002
_CURSOR = re.compile(rb'"next_cursor":"([A-Za-z0-9_-]+)"')


def capability(service: int, index: int) -> CapabilitySchema:
    payload: dict[str, Any] = {
        "name": f"service{service}.task{index}",
        "verb": "infer",
        "version": "1.2.0",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
        "output_schema": {"type": "object"},
        "requires_gpu": False,
        "max_concurrency": 4,
    }
    return structure(payload, CapabilitySchema)


def fleet(workers: int, now: float) -> CapabilityRegistry:
    """``workers`` replicas of 100 services, 3 capabilities each, registered at ``now``."""
    sets = [tuple(capability(s, i) for i in range(3)) for s in range(100)]
    registry = CapabilityRegistry()
    for w in range(workers):
        registry.register(
            f"worker-{w}", f"https://10.0.{w // 250}.{w % 250}:8443", sets[w % 100], now=now
        )
    return registry


async def timed_get(client: httpx.AsyncClient, url: str) -> tuple[float, bytes]:
    start = time.perf_counter()
    response = await client.get(url)
    elapsed = time.perf_counter() - start
    assert response.status_code == 200, response.text[:300]
    return elapsed, response.content


async def page_times(client: httpx.AsyncClient, workers: int) -> dict[str, float]:
    """Median time of each kind of page, measured alone."""
    # Worker n registered n-th: the cursor after the first half.
    cursor = encode_workers_cursor(workers // 2 - 1)
    cases = {
        "/workers, first page of 500": "/workers",
        "/workers, page of 500 from the middle": f"/workers?cursor={cursor}",
        "/workers, first page of 5000": "/workers?limit=5000",
        "/workers, page of 5000 from the middle": f"/workers?limit=5000&cursor={cursor}",
        "/workers?state=healthy, page of 500": "/workers?state=healthy",
        "/capabilities, page of 500": "/capabilities",
        "/health": "/health",
    }
    figures = {}
    for name, url in cases.items():
        times = [(await timed_get(client, url))[0] for _ in range(5)]
        figures[name] = statistics.median(times)
    return figures


@contextlib.contextmanager
def watching(callbacks: list[float], collections: list[float]) -> Iterator[None]:
    """Record how long each event-loop callback and each garbage collection takes.

    A callback is one step of a task between two yields: the longest is the
    longest time one piece of work held the loop. A step in which a full
    collection ran is left out of ``callbacks``: the collection's own time
    is in ``collections``.
    """
    run = asyncio.events.Handle._run
    started = [0.0]

    def timed_run(handle: asyncio.events.Handle) -> None:
        full = len(collections)
        start = time.perf_counter()
        run(handle)
        if len(collections) == full:  # a full collection's steps are counted apart
            callbacks.append(time.perf_counter() - start)

    def collector(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif info["generation"] == 2:  # the oldest generation: a full collection
            collections.append(time.perf_counter() - started[0])

    asyncio.events.Handle._run = timed_run  # type: ignore[method-assign,assignment]
    gc.callbacks.append(collector)
    try:
        yield
    finally:
        asyncio.events.Handle._run = run  # type: ignore[method-assign]
        gc.callbacks.remove(collector)


async def loaded(client: httpx.AsyncClient, seconds: float, probe_ids: list[str]) -> dict[str, Any]:
    """Heartbeat latencies and the longest loop stall while ``LISTERS`` listers loop."""
    latencies: list[float] = []
    stalls: list[float] = []
    pages = 0
    stop = anyio.Event()

    async def lister() -> None:
        nonlocal pages
        cursor: str | None = None
        while not stop.is_set():
            url = "/workers" if cursor is None else f"/workers?cursor={cursor}"
            _, body = await timed_get(client, url)
            found = _CURSOR.search(body[-200:])
            cursor = None if found is None else found.group(1).decode()
            pages += 1

    async def heartbeats() -> None:
        n = 0
        while not stop.is_set():
            start = time.perf_counter()
            response = await client.post(
                "/heartbeat", json={"worker_id": probe_ids[n % len(probe_ids)]}
            )
            latencies.append(time.perf_counter() - start)
            assert response.status_code == 200, response.text
            n += 1
            await anyio.sleep(0.002)

    async def ticker() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            await anyio.sleep(TICK_S)
            stalls.append(time.perf_counter() - start - TICK_S)

    callbacks: list[float] = []
    collections: list[float] = []
    with watching(callbacks, collections):
        async with anyio.create_task_group() as group:
            group.start_soon(ticker)
            group.start_soon(heartbeats)
            for _ in range(LISTERS):
                group.start_soon(lister)
            await anyio.sleep(seconds)
            stop.set()
    latencies.sort()
    callbacks.sort()
    return {
        "heartbeats": len(latencies),
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[int(len(latencies) * 0.99)],
        "max": latencies[-1],
        "wake": max(stalls),
        "callback": callbacks[-1],
        "callback_p99": callbacks[int(len(callbacks) * 0.99)],
        "collections": len(collections),
        "collection": max(collections, default=0.0),
        "pages": pages,
    }


async def main(workers: int, seconds: float) -> int:
    now = time.time()
    started = time.perf_counter()
    registry = fleet(workers, now)
    print(f"{workers} workers registered in {time.perf_counter() - started:.1f} s")
    app = create_app(registry)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://controller") as client:
        for name, elapsed in (await page_times(client, workers)).items():
            print(f"{name:45} {elapsed * 1000:8.1f} ms")
        probe_ids = [f"worker-{w}" for w in range(0, workers, max(1, workers // PROBES))]
        figures = await loaded(client, seconds, probe_ids)
    print(
        f"while {LISTERS} listers loop ({figures['pages']} pages of 500 in {seconds:.0f} s), "
        f"{figures['heartbeats']} heartbeats:"
    )
    p99_ratio = figures["p99"] / HEARTBEAT_P99_TARGET_S
    stall_ratio = figures["callback"] / STALL_TARGET_S
    print(f"  heartbeat p50 {figures['p50'] * 1000:.1f} ms, max {figures['max'] * 1000:.1f} ms")
    print(
        f"  heartbeat p99 {figures['p99'] * 1000:.1f} ms "
        f"(target < {HEARTBEAT_P99_TARGET_S * 1000:.0f} ms): {p99_ratio:.2f}x"
    )
    print(
        f"  longest step holding the loop (no full collection in it) "
        f"{figures['callback'] * 1000:.1f} ms "
        f"(target < {STALL_TARGET_S * 1000:.0f} ms): {stall_ratio:.2f}x; "
        f"p99 of steps {figures['callback_p99'] * 1000:.2f} ms"
    )
    print(
        f"  full garbage collections {figures['collections']}, longest "
        f"{figures['collection'] * 1000:.1f} ms (inside a step: the collector runs when "
        "allocation triggers it)"
    )
    print(f"  latest wake of a {TICK_S * 1000:.0f} ms timer: {figures['wake'] * 1000:.1f} ms late")
    return 0 if p99_ratio < 1 and stall_ratio < 1 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="10 000 workers, 5 s")
    args = parser.parse_args()
    if args.quick:
        args.workers, args.seconds = 10_000, 5.0
    raise SystemExit(anyio.run(main, args.workers, args.seconds))
