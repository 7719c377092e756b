"""Benchmark: listings at 100 000 workers, and heartbeats while listers loop.

Run: ``.venv/bin/python benchmarks/listings.py`` (``--workers N``,
``--seconds S`` for each loaded phase; ``--quick``: 10 000 workers, 5 s).

100 000 workers, replicas of 100 services (3 capabilities each), twice:

* in process: the controller app over ``httpx.ASGITransport`` (asyncio), so
  that the loop it runs on can be watched. ``/workers`` page times alone
  (the first page and one from the middle, at the default size, 500, and
  the largest, 5000; a ``state`` filtered page), a ``/capabilities`` page
  and ``/health``; then, for ``--seconds``, 8 listers walk ``/workers`` page
  by page while a client heartbeats 200 workers, timing each, and every
  step of the loop is timed in CPU time (the longest time one piece of
  work held the loop), apart from steps in which the garbage collector ran;
* against a ``crank-registry serve`` process restored from a journal of the
  same fleet: page times from the middle, and the same loaded phase
  (200 probe workers registered over HTTP heartbeat).

The listers read only ``next_cursor`` from each answer (a byte search), so
that the client's own JSON parsing does not slow the heartbeats.

Targets (DESIGN.md, "Targets"; Hardening, "Listings"): heartbeat p99
< 100 ms while listing; no loop stall > 20 ms (the listings yield at least
every 20 ms at 100 000 workers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import pathlib
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx

from crank_registry import (
    CapabilityRegistry,
    CapabilitySchema,
    Snapshot,
    WorkerRecord,
    encode_snapshot,
    encode_workers_cursor,
    structure,
    unstructure,
)
from crank_registry_asgi import create_app
from crank_registry_asgi.journal import JOURNAL_NAME

LISTERS = 8
PROBES = 200
HEARTBEAT_P99_TARGET_S = 0.100
STALL_TARGET_S = 0.020
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
def watching(
    steps: list[tuple[float, bool]], collections: list[tuple[int, float]]
) -> Iterator[None]:
    """Record how long each event-loop step and each garbage collection takes.

    A step (a callback of the loop) is one piece of a task's work between
    two yields: the longest is the longest time one piece of work held the
    loop. Steps are timed in CPU time of this thread: on a shared machine a
    step's wall time also counts the time the process waited for a core.
    Each step says whether a collection ran inside it (the collector runs
    wherever an allocation triggers it): ``collections`` holds the
    generation and (wall) duration of each.
    """
    run = asyncio.events.Handle._run
    started = [0.0]

    def timed_run(handle: asyncio.events.Handle) -> None:
        before = len(collections)
        start = time.thread_time()
        run(handle)
        steps.append((time.thread_time() - start, len(collections) > before))

    def collector(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collections.append((info["generation"], time.perf_counter() - started[0]))

    asyncio.events.Handle._run = timed_run  # type: ignore[method-assign,assignment]
    gc.callbacks.append(collector)
    try:
        yield
    finally:
        asyncio.events.Handle._run = run  # type: ignore[method-assign]
        gc.callbacks.remove(collector)


async def loaded(
    client: httpx.AsyncClient, seconds: float, probe_ids: list[str], *, watch: bool
) -> dict[str, Any]:
    """Heartbeat latencies while ``LISTERS`` listers loop; with ``watch``, the loop's steps."""
    latencies: list[float] = []
    pages = 0
    stop = anyio.Event()

    async def lister() -> None:
        nonlocal pages
        cursor: str | None = None
        while not stop.is_set():
            url = "/workers" if cursor is None else f"/workers?cursor={cursor}"
            _, body = await timed_get(client, url)
            found = _CURSOR.search(body, len(body) - 300)
            cursor = None if found is None else found.group(1).decode()
            pages += 1

    async def heartbeats() -> None:
        n = 0
        while not stop.is_set():
            start = time.perf_counter()
            body = {"worker_id": probe_ids[n % len(probe_ids)]}
            response = await client.post("/heartbeat", json=body)
            latencies.append(time.perf_counter() - start)
            assert response.status_code == 200, response.text
            n += 1
            await anyio.sleep(0.005)

    steps: list[tuple[float, bool]] = []
    collections: list[tuple[int, float]] = []
    with watching(steps, collections) if watch else contextlib.nullcontext():
        async with anyio.create_task_group() as group:
            group.start_soon(heartbeats)
            for _ in range(LISTERS):
                group.start_soon(lister)
            await anyio.sleep(seconds)
            stop.set()
    latencies.sort()
    quiet = sorted(duration for duration, collected in steps if not collected)
    return {
        "heartbeats": len(latencies),
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[int(len(latencies) * 0.99)],
        "max": latencies[-1],
        "pages": pages,
        "step": max((duration for duration, _ in steps), default=0.0),
        "quiet_step": quiet[-1] if quiet else 0.0,
        "quiet_p99": quiet[int(len(quiet) * 0.99)] if quiet else 0.0,
        "young": max((d for g, d in collections if g < 2), default=0.0),
        "full": [d for g, d in collections if g == 2],
    }


def report(figures: dict[str, Any], seconds: float) -> float:
    """Print the loaded phase's figures; returns the heartbeat p99's ratio to its target."""
    ratio: float = figures["p99"] / HEARTBEAT_P99_TARGET_S
    print(
        f"  while {LISTERS} listers loop ({figures['pages']} pages of 500 in {seconds:.0f} s): "
        f"{figures['heartbeats']} heartbeats, p50 {figures['p50'] * 1000:.1f} ms, "
        f"max {figures['max'] * 1000:.1f} ms"
    )
    print(
        f"  heartbeat p99 {figures['p99'] * 1000:.1f} ms "
        f"(target < {HEARTBEAT_P99_TARGET_S * 1000:.0f} ms): {ratio:.2f}x"
    )
    return ratio


def report_steps(figures: dict[str, Any]) -> float:
    """Print how long steps held the loop; returns the longest quiet step's ratio to its target."""
    ratio: float = figures["quiet_step"] / STALL_TARGET_S
    print(
        f"  longest step holding the loop (CPU time), no collection in it: "
        f"{figures['quiet_step'] * 1000:.1f} ms (target < {STALL_TARGET_S * 1000:.0f} ms): "
        f"{ratio:.2f}x; p99 of those steps {figures['quiet_p99'] * 1000:.2f} ms"
    )
    full = figures["full"]
    print(
        f"  with collections: longest step {figures['step'] * 1000:.1f} ms; longest young "
        f"collection {figures['young'] * 1000:.1f} ms; {len(full)} full collection(s)"
        + (f", longest {max(full) * 1000:.0f} ms" if full else "")
    )
    return ratio


async def in_process(workers: int, seconds: float) -> tuple[float, float]:
    """The app in this process: page times, heartbeats and the loop's steps while listing."""
    print(f"in process ({workers} workers, replicas of 100 services):")
    registry = fleet(workers, time.time())
    app = create_app(registry)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://controller") as client:
        for name, elapsed in (await page_times(client, workers)).items():
            print(f"  {name:45} {elapsed * 1000:8.1f} ms")
        probe_ids = [f"worker-{w}" for w in range(0, workers, max(1, workers // PROBES))]
        figures = await loaded(client, seconds, probe_ids, watch=True)
    del registry, app, transport
    gc.collect()
    return report(figures, seconds), report_steps(figures)


async def real_server(workers: int, seconds: float) -> float:
    """A ``crank-registry serve`` process restored from a journal: pages and heartbeats."""
    print(f"a crank-registry serve process ({workers} workers restored from its journal):")
    with tempfile.TemporaryDirectory() as directory:
        state_dir = pathlib.Path(directory) / "state"
        state_dir.mkdir()
        now = time.time()
        sets = [tuple(capability(s, i) for i in range(3)) for s in range(100)]
        records = tuple(
            WorkerRecord(
                f"worker-{w}", f"https://10.0.{w // 250}.{w % 250}:8443", sets[w % 100], now
            )
            for w in range(workers)
        )
        (state_dir / JOURNAL_NAME).write_bytes(
            b"".join(encode_snapshot(Snapshot(workers, records)))
        )
        del records
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        argv = [sys.executable, "-m", "crank_registry_asgi", "serve", "--insecure"]
        argv += ["--port", str(port), "--state-dir", str(state_dir)]
        log = (pathlib.Path(directory) / "server.log").open("wb")
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            limits = httpx.Limits(max_connections=LISTERS + 2)
            async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
                await ready(client, server)
                probe_ids = [f"probe-{n}" for n in range(PROBES)]
                for worker_id in probe_ids:
                    response = await client.post("/register", json=registration(worker_id))
                    assert response.status_code == 200, response.text
                cursor = encode_workers_cursor(workers // 2 - 1)
                for name, url_path in (
                    ("/workers, page of 500 from the middle", f"/workers?cursor={cursor}"),
                    (
                        "/workers, page of 5000 from the middle",
                        f"/workers?limit=5000&cursor={cursor}",
                    ),
                ):
                    times = [(await timed_get(client, url_path))[0] for _ in range(5)]
                    print(f"  {name:45} {statistics.median(times) * 1000:8.1f} ms")
                figures = await loaded(client, seconds, probe_ids, watch=False)
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()
    return report(figures, seconds)


async def ready(client: httpx.AsyncClient, server: subprocess.Popen[bytes]) -> None:
    """Wait until the server answers ``/health`` (it replays its journal first)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server exited"
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await anyio.sleep(0.1)
    raise AssertionError("the server did not answer /health in 60 s")


def registration(worker_id: str) -> dict[str, Any]:
    return {
        "worker_id": worker_id,
        "worker_url": "https://10.9.9.9:8443",
        "capabilities": [unstructure(capability(999, 0))],
    }


async def main(workers: int, seconds: float) -> int:
    p99_ratio, step_ratio = await in_process(workers, seconds)
    server_ratio = await real_server(workers, seconds)
    return 0 if max(p99_ratio, step_ratio, server_ratio) < 1 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--quick", action="store_true", help="10 000 workers, 5 s")
    args = parser.parse_args()
    if args.quick:
        args.workers, args.seconds = 10_000, 5.0
    raise SystemExit(anyio.run(main, args.workers, args.seconds))
