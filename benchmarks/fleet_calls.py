"""Benchmark: what the fleet-wide limits (``--redis``) add to a call of ``POST /execute``.

Run: ``.venv/bin/python benchmarks/fleet_calls.py`` (about 20 s; ``--quick``
for a smoke run, ``--strict`` to exit 1 when a target is missed, ``--redis
URL``, default the machine's ``redis://127.0.0.1:6379/0``).

In one process, 10 workers of one capability behind an in-memory transport
that answers at once, sequential calls driven straight into the gateway's
ASGI endpoint (as ``benchmarks/gateway.py`` does), for two gateways:

* the baseline: a controller without ``--redis`` (calls in flight counted
  in the process, idempotency keys in memory);
* a controller of a shared registry on Redis: each call takes its worker's
  reservation in one script round trip before the call (the release is
  batched by a task of its own), and a call with an ``Idempotency-Key``
  claims the key and writes the answer in Redis.

Wall time per call (the round trips are waiting, not CPU), the median of
runs that take turns, with a bare round trip to the same Redis (a script
that returns 1, through the gateway's own Redis client and its pool)
measured in the same turns. Target: the reservation adds at most two such round trips to a
call: its own before the call, and the release after it (batched with
others under load, alone when calls come one at a time as here). The
figure for a new ``Idempotency-Key`` each call (two more round trips,
the claim and the answer) is reported beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import redis

from crank_registry import HealthPolicy
from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, create_app
from crank_registry_asgi.execute import Gateway
from crank_registry_asgi.gateway import GatewayConfig, create_gateway_app

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from gateway import InstantWorkers, call

WORKERS = 10
#: The reservation's target, in bare round trips to Redis.
RESERVATION_TARGET_ROUND_TRIPS = 2
POLICY = HealthPolicy(heartbeat_interval=3600, unhealthy_after=7200, evict_after=14400)


@contextlib.asynccontextmanager
async def gateway(redis_url: str | None, prefix: str) -> AsyncIterator[Gateway]:
    """A gateway (its lifespan running) over :data:`WORKERS` registered workers."""
    config = ServiceConfig(policy=POLICY)
    if redis_url is not None:
        config = ServiceConfig(
            policy=POLICY, redis_url=redis_url, redis_prefix=prefix, controller_id="bench"
        )
    controller = create_app(config=config, clock=FakeClock())
    app = create_gateway_app(controller, GatewayConfig(), transport=InstantWorkers())
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://controller"
        ) as client,
    ):
        for index in range(WORKERS):
            response = await client.post(
                "/register",
                json={
                    "worker_id": f"w{index}",
                    "worker_url": f"http://w{index}.test",
                    "capabilities": [
                        {
                            "name": "hello",
                            "verb": "greet",
                            "version": "1.0.0",
                            "input_schema": {"type": "object"},
                            "output_schema": {"type": "object"},
                            "requires_gpu": False,
                            "max_concurrency": 4,
                        }
                    ],
                },
            )
            assert response.status_code == 200, response.text
        yield app.state.gateway


async def wall_us(one: Callable[[], Awaitable[object]], calls: int) -> float:
    """Wall time per call of ``one`` over ``calls`` calls, in µs."""
    began = time.perf_counter()
    for _ in range(calls):
        await one()
    return (time.perf_counter() - began) / calls * 1e6


async def bench(redis_url: str, calls: int, repeat: int) -> bool:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        async with gateway(None, prefix) as local, gateway(redis_url, prefix) as shared:
            assert shared.fleet is not None
            # The fleet's own client: the round trip its scripts make, bare.
            round_trip = shared.fleet._redis.register_script("return 1")
            keys = iter(range(10**9))

            def new_key(endpoint: Gateway) -> Callable[[], Awaitable[int]]:
                async def run() -> int:
                    return await call(
                        endpoint, [(b"idempotency-key", f"k-{next(keys)}".encode())]
                    )()

                return run

            runs: dict[str, Callable[[], Awaitable[object]]] = {
                "a bare round trip to Redis (a script returning 1)": round_trip,
                "/execute, no --redis (baseline)": call(local, []),
                "/execute, --redis (fleet-wide reservation)": call(shared, []),
                "/execute with a new Idempotency-Key, no --redis": new_key(local),
                "/execute with a new Idempotency-Key, --redis": new_key(shared),
            }
            for one in runs.values():
                assert await one() in (1, 200)
                for _ in range(calls // 10):
                    await one()  # warm up
            samples: dict[str, list[float]] = {label: [] for label in runs}
            for _ in range(repeat):
                for label, one in runs.items():
                    samples[label].append(await wall_us(one, calls))
            # Every reservation was given back (batched by the fleet's task).
            await asyncio.sleep(0.1)
            assert shared.fleet is not None and shared.fleet.held == {}
    finally:
        client = redis.Redis.from_url(redis_url)
        stale = list(client.scan_iter(match=f"{{{prefix}}}:*"))
        if stale:
            client.delete(*stale)
        client.close()
    figures = {label: statistics.median(values) for label, values in samples.items()}
    baseline = figures["/execute, no --redis (baseline)"]
    trip = figures["a bare round trip to Redis (a script returning 1)"]
    for label, micros in figures.items():
        plain = "baseline" in label or "bare" in label
        against = "" if plain else f" ({micros / baseline:.2f}x the baseline)"
        print(f"{label}: {micros:.1f} µs{against}")
    added = figures["/execute, --redis (fleet-wide reservation)"] - baseline
    target = RESERVATION_TARGET_ROUND_TRIPS * trip
    ratio = added / target
    ok = ratio <= 1
    print(
        f"fleet-wide reservation adds: {added:.1f} µs a call (target "
        f"{RESERVATION_TARGET_ROUND_TRIPS} round trips, {target:.0f} µs: {ratio:.2f}x) "
        f"{'PASS' if ok else 'FAIL'}"
    )
    keyed = (
        figures["/execute with a new Idempotency-Key, --redis"]
        - figures["/execute with a new Idempotency-Key, no --redis"]
    )
    print(
        f"shared Idempotency-Key adds (claim, reservation and its release, answer): "
        f"{keyed:.1f} µs a call ({keyed / trip:.1f} round trips)"
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="the Redis to use")
    args = parser.parse_args(argv)
    calls, repeat = (200, 3) if args.quick else (1_000, 7)
    try:
        redis.Redis.from_url(args.redis, socket_timeout=2).ping()
    except redis.RedisError as error:
        print(f"no Redis at {args.redis} ({error}): start redis-server or pass --redis URL")
        return 1
    print(f"crank fleet-calls benchmark: {WORKERS} workers, Python {sys.version.split()[0]}")
    ok = asyncio.run(bench(args.redis, calls, repeat))
    print("all targets met" if ok else "some targets missed")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
