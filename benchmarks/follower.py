"""Benchmark of RegistryFollower.route: a route answered in the caller's process, at 10 000 workers.

Run: ``.venv/bin/python benchmarks/follower.py`` (about 20 s; ``--quick``
for a smoke run). Exits 1 when the target is missed.

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
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx

from crank_registry import CapabilityRegistry, CapabilitySchema, HealthPolicy, structure
from crank_registry_asgi import ServiceConfig, create_app
from crank_worker_client import RegistryFollower

WORKERS = 10_000
PER_CAPABILITY = 10
TARGET_US = 5.0
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


async def bench(calls: int, repeat: int) -> bool:
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
        return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    args = parser.parse_args(argv)
    calls, repeat = (1_000, 3) if args.quick else (10_000, 9)
    return 0 if anyio.run(bench, calls, repeat) else 1


if __name__ == "__main__":
    sys.exit(main())
