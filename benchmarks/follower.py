"""Benchmark of RegistryFollower.route: a route answered in the caller's process, at 10 000 workers.

Run: ``.venv/bin/python benchmarks/follower.py`` (about 40 s; ``--quick``
for a smoke run). Exits 1 when a target is missed.

The controller app (``crank_registry_asgi.create_app``) holds 10 000
workers, 10 per capability, and is served in-process through
``httpx.ASGITransport`` with its lifespan running; a follower loads its
``/snapshot`` and follows ``/watch`` (a long poll stays parked while the
routes are timed, as in use). Each figure is the median over repeated runs
of the time per call, in CPU time of this thread, of:

* ``await follower.route(verb, capability)``: the target, <= 5 µs
  (DESIGN, "Change feed and followers"), with its ratio;
* the controller-side core route, ``registry.route(verb, capability,
  now=...)`` on the controller's own registry, measured in the same run:
  the baseline, and the follower's ratio to it (what the coroutine, the lag
  check and the client's answer types add);
* without a target: ``route`` with ``strategy="least_loaded"`` (it reads
  the options as the controller does, through ``RouteRequest``) and a call
  counted by ``reserve`` around it.

Then, over HTTP on loopback, against the controller app with 10 000
workers served by hypercorn in a process of its own (``http_route.py``'s
server, as ``crank-registry serve`` runs it):

* one ``POST /route`` round trip (wall time per request, one keep-alive
  connection, median of repeated runs), and ``follower.route``'s ratio to
  it, measured in the same run: what a caller saves per route;
* the lag from a registration to it being routable at a follower of that
  server: a worker registers with a capability of its own, and from the
  moment the ``POST /register`` is sent the follower tries to route to it
  every millisecond until it can (p50, p99, max; target p99 <= 100 ms on
  one host, DESIGN "Targets"). Beside it, the registration's own round
  trip (sent to answered), its floor: the follower cannot route to a
  worker before the controller has made the change durable.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
from http_route import ROUTE_BODY, registration, running_server

from crank_registry import CapabilityRegistry, CapabilitySchema, HealthPolicy, structure
from crank_registry_asgi import ServiceConfig, create_app
from crank_worker_client import RegistryFollower, UnknownCapability

WORKERS = 10_000
PER_CAPABILITY = 10
TARGET_US = 5.0
LAG_TARGET_P99_S = 0.100
#: How often the lag's follower tries the new worker: the resolution of the lag figure.
LAG_POLL_S = 0.001
START = 1_700_000_000.0
URL = "https://controller.bench"


def capability(name: str) -> CapabilitySchema:
    payload: dict[str, Any] = {
        "name": name,
        "verb": "run",
        "version": "1.0.0",
        "input_schema": {"type": "object"},
        "output_schema": {"type": "object"},
        "requires_gpu": False,
        "max_concurrency": 4,
    }
    return structure(payload, CapabilitySchema)


def build() -> tuple[CapabilityRegistry, list[str]]:
    """The controller's registry: 10 000 workers, 10 to each capability; the capability names."""
    registry = CapabilityRegistry(HealthPolicy(), feed_window=WORKERS * 2)
    names = [f"cap-{index}" for index in range(WORKERS // PER_CAPABILITY)]
    values = {name: capability(name) for name in names}
    for worker in range(WORKERS):
        name = names[worker % len(names)]
        registry.register(f"w{worker}", f"https://w{worker}:8443", [values[name]], now=START)
    return registry, names


async def per_call_us(run: Callable[[], Awaitable[None]], calls: int, repeat: int) -> float:
    await run()  # warm up
    runs = []
    for _ in range(repeat):
        started = time.thread_time()
        await run()
        runs.append(time.thread_time() - started)
    return statistics.median(runs) / calls * 1e6


def report(label: str, micros: float, target: float | None = None) -> bool:
    if target is None:
        print(f"{label}: {micros:.2f} µs")
        return True
    ratio = micros / target
    verdict = "PASS" if ratio <= 1 else "FAIL"
    print(f"{label}: {micros:.2f} µs (target {target:.1f} µs: {ratio:.2f}x) {verdict}")
    return ratio <= 1


async def bench(calls: int, repeat: int) -> tuple[bool, float]:
    registry, names = build()
    sample = [names[index % len(names)] for index in range(calls)]
    app = create_app(registry, config=ServiceConfig(), clock=lambda: START)
    async with (
        app.router.lifespan_context(app),
        RegistryFollower(
            URL, transport=httpx.ASGITransport(app=app), rng=random.Random(0)
        ) as follower,
    ):
        assert len(follower.registry) == WORKERS
        route = follower.route
        core_route = registry.route

        async def followed() -> None:
            for name in sample:
                await route("run", name)

        async def controller_side() -> None:
            for name in sample:
                core_route("run", name, now=START)

        async def least_loaded() -> None:
            for name in sample:
                await route("run", name, strategy="least_loaded")

        async def reserved() -> None:
            for name in sample:
                async with follower.reserve("run", name, strategy="least_loaded"):
                    pass

        baseline = await per_call_us(controller_side, calls, repeat)
        micros = await per_call_us(followed, calls, repeat)
        print(
            f"RegistryFollower.route: {WORKERS} workers, {PER_CAPABILITY} per capability, "
            f"Python {sys.version.split()[0]}"
        )
        report("baseline: controller-side core route", baseline)
        ok = report("follower.route, no options", micros, TARGET_US)
        print(f"  follower.route / core route: {micros / baseline:.2f}x")
        report(
            "follower.route, strategy least_loaded", await per_call_us(least_loaded, calls, repeat)
        )
        report(
            "follower.reserve around a least_loaded route",
            await per_call_us(reserved, calls, repeat),
        )
        assert follower.lag <= follower.lag_limit  # every route above was answered locally
        return ok, micros


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def round_trip_us(url: str, calls: int, repeat: int) -> float:
    """Wall time of one ``POST /route`` over HTTP, median of ``repeat`` runs of ``calls``."""
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:

        async def routes() -> None:
            for _ in range(calls):
                response = await client.post("/route", json=ROUTE_BODY)
                assert response.status_code == 200, response.text

        await routes()  # warm up: the connection, the server's caches
        runs = []
        for _ in range(repeat):
            started = time.perf_counter()
            await routes()
            runs.append(time.perf_counter() - started)
    return statistics.median(runs) / calls * 1e6


async def lags(url: str, changes: int) -> tuple[list[float], list[float]]:
    """Registration sent -> routable at a follower of ``url``, and sent -> answered, each change."""
    routable: list[float] = []
    answered: list[float] = []
    async with (
        httpx.AsyncClient(base_url=url, timeout=30.0) as client,
        RegistryFollower(url, insecure=True) as follower,
    ):
        for index in range(changes):
            body = registration(WORKERS + index)
            body["worker_id"] = f"lag{index}"
            name = f"lag.{index}"
            body["capabilities"] = [{**body["capabilities"][0], "name": name}]
            sent = time.perf_counter()
            async with anyio.create_task_group() as tasks:

                async def register(body: dict[str, Any] = body, sent: float = sent) -> None:
                    response = await client.post("/register", json=body)
                    answered.append(time.perf_counter() - sent)
                    assert response.status_code == 200, response.text

                tasks.start_soon(register)
                while True:
                    try:
                        await follower.route("classify", name)
                    except UnknownCapability:  # the registration is not applied yet
                        await anyio.sleep(LAG_POLL_S)
                        continue
                    routable.append(time.perf_counter() - sent)
                    break
            await anyio.sleep(0.02)  # changes apart, as registrations come
    return routable, answered


async def over_http(micros: float, calls: int, repeat: int, changes: int) -> bool:
    """The round trip and the lag against a served controller; whether the lag target is met."""
    with (
        tempfile.TemporaryDirectory() as directory,
        running_server("hypercorn", None, WORKERS, False, Path(directory) / "server.log") as (
            url,
            _,
        ),
    ):
        trip = await round_trip_us(url, max(calls // 10, 100), repeat)
        routable, answered = await lags(url, changes)
    print(f"over HTTP on loopback, hypercorn in its own process, {WORKERS} workers:")
    report("one POST /route round trip (wall time)", trip)
    print(
        f"  follower.route / one /route round trip: {micros / trip:.4f}x "
        f"({trip / micros:.0f}x faster)"
    )
    p99 = percentile(routable, 0.99)
    ratio = p99 / LAG_TARGET_P99_S
    verdict = "PASS" if ratio <= 1 else "FAIL"
    print(
        f"registration sent -> routable at a follower ({changes} changes, polled every "
        f"{LAG_POLL_S * 1000:.0f} ms): p50 {statistics.median(routable) * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms (target {LAG_TARGET_P99_S * 1000:.0f} ms: {ratio:.2f}x) "
        f"{verdict}, max {max(routable) * 1000:.1f} ms"
    )
    print(
        f"  its floor, registration sent -> answered: "
        f"p50 {statistics.median(answered) * 1000:.1f} ms, "
        f"p99 {percentile(answered, 0.99) * 1000:.1f} ms"
    )
    return ratio <= 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    args = parser.parse_args(argv)
    calls, repeat, changes = (1_000, 3, 20) if args.quick else (10_000, 9, 200)
    route_ok, micros = anyio.run(bench, calls, repeat)
    lag_ok = anyio.run(over_http, micros, calls, repeat, changes)
    return 0 if route_ok and lag_ok else 1


if __name__ == "__main__":
    sys.exit(main())
