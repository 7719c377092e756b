"""The read deadline's cost per request: POST /route through the app, three ways.

``crank_worker_client.body.read_body`` times a request body with asyncio's
own timeout on asyncio, and with an anyio cancel scope on other event
loops (trio). This runs the controller app alone (direct ASGI calls, no
server, 1 000 workers, as ``http_route.py`` does) with the body reader the
service uses swapped for each way in turn:

- ``no deadline``: the bare read;
- ``read_body``: what the controller and the worker serving helper run
  (asyncio's timeout, here);
- ``anyio cancel scope``: the same deadline through anyio's scope alone.

    .venv/bin/python benchmarks/read_deadline.py               # ~1 min

Target: the deadline adds at most 10 us to /route (about 30 us in the app,
of some 600 us of server CPU a request, see ``http_route.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any
from unittest import mock

import anyio

# The script's own directory is on sys.path: the HTTP benchmark's app and helpers.
from http_route import ROUTE_BODY, _call_app, bench_app

import crank_registry_asgi.http
from crank_worker_client.body import BodyTimeout, _read_body, read_body

TARGET_US = 10.0
WORKERS = 1000
REQUESTS = 4000
RUNS = 5

Reader = Callable[..., Coroutine[Any, Any, bytes]]


async def without_deadline(
    receive: Any, *, limit: int, declared: int | None = None, deadline: float | None = None
) -> bytes:
    return await _read_body(receive, limit)


async def with_anyio_scope(
    receive: Any, *, limit: int, declared: int | None = None, deadline: float | None = None
) -> bytes:
    with anyio.CancelScope(deadline=deadline if deadline is not None else float("inf")):
        return await _read_body(receive, limit)
    raise BodyTimeout


async def route_us(app: Any) -> float:
    """Microseconds per POST /route through ``app``."""
    body = json.dumps(ROUTE_BODY).encode()
    for _ in range(REQUESTS // 10):  # warm-up
        await _call_app(app, "/route", body)
    started = time.perf_counter()
    for _ in range(REQUESTS):
        await _call_app(app, "/route", body)
    return (time.perf_counter() - started) / REQUESTS * 1e6


async def main() -> int:
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    app = bench_app(None, WORKERS)
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, to_app.get, from_app.put)
    )
    await to_app.put({"type": "lifespan.startup"})
    await from_app.get()
    ways: dict[str, Reader] = {
        "no deadline": without_deadline,
        "read_body": read_body,
        "anyio cancel scope": with_anyio_scope,
    }
    runs: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(RUNS):  # interleaved, so that drift hits every way alike
            for name, reader in ways.items():
                with mock.patch.object(crank_registry_asgi.http, "read_body", reader):
                    runs[name].append(await route_us(app))
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        await from_app.get()
        await lifespan
    medians = {name: statistics.median(values) for name, values in runs.items()}
    print(f"POST /route in the app alone, {WORKERS} workers, median of {RUNS} x {REQUESTS}:")
    for name, value in medians.items():
        print(f"  {name:<20} {value:6.1f} us per request")
    added = medians["read_body"] - medians["no deadline"]
    print(
        f"  the deadline adds {added:.1f} us a request: {added / TARGET_US:.2f} of the "
        f"{TARGET_US:g} us target ({'met' if added <= TARGET_US else 'NOT met'}); "
        f"anyio's scope would add {medians['anyio cancel scope'] - medians['no deadline']:.1f} us"
    )
    return 0 if added <= TARGET_US else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
