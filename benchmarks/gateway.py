"""Benchmark of the gateway: what ``POST /execute`` costs over the worker call, accounting included.

Run: ``.venv/bin/python benchmarks/gateway.py`` (about 30 s; ``--quick`` for
a smoke run, ``--strict`` to exit 1 when a target is missed).

In one process, 100 workers of one capability behind an in-memory transport
that answers at once (so the figures are the gateway's, not a network's),
sequential calls driven straight into the gateway's ASGI endpoint. CPU time
of this thread per call, the median of repeated runs, for:

* the worker call alone: the same httpx client and transport, no gateway
  (what any caller pays to reach a worker);
* ``/execute`` without in-flight accounting: the gateway with its slots
  replaced by ones that count nothing (the baseline);
* ``/execute`` with the accounting: calls in flight per worker, the busy
  workers excluded from the route, the count given to the registry for
  ``least_loaded`` (what the gateway runs);
* the same with 50 of the 100 workers holding calls in flight below their
  ``max_concurrency`` (the busy check walks the workers with calls in flight);
* ``/execute`` with an ``Idempotency-Key`` (a new key a call: hashing the
  body and keeping the answer), and a replay of a kept one (no worker call).

Every ``/execute`` checks its payload against the chosen worker's
``input_schema`` (a small object schema, :data:`INPUT_SCHEMA`); that check
is also timed alone: the worker's capability looked up and the payload
validated with the cached validator (what each call pays), and with a
validator compiled for each call (what the cache saves).

The accounting is also timed alone, against the route it wraps (a whole
call's figure swings by more than the accounting costs on a shared
machine): a route, and a route with the acquire and release of a slot,
with no call in flight and with 50 workers holding one. Targets: the
accounting adds at most 5 µs to a call, and at most 10 µs with 50 workers
holding calls. The runs being compared take turns, so that drift on a
shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import httpx
from starlette.types import Message

from crank_registry import (
    CapabilitySchema,
    ExecuteRequest,
    HealthPolicy,
    WorkerEndpoint,
    structure,
)
from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, create_app
from crank_registry_asgi.backpressure import CallSlots, Check, Router, Slot
from crank_registry_asgi.execute import Gateway
from crank_registry_asgi.failover import next_worker
from crank_registry_asgi.gateway import GatewayConfig, create_gateway_app
from crank_worker_client.payload import PayloadSchema

WORKERS = 100
ACCOUNTING_TARGET_US = 5.0
LOADED_ACCOUNTING_TARGET_US = 10.0
ANSWER = b'{"result": {"greeting": "Hello, Ada!"}}'
PAYLOAD = {"name": "Ada", "language": "en", "tags": ["greeting"]}
BODY = json.dumps({"verb": "greet", "capability": "hello", "payload": PAYLOAD}).encode()
#: The capability's input_schema: a realistic small object.
INPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 100},
        "language": {"type": "string", "enum": ["en", "de", "fr"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
    },
    "required": ["name"],
    "additionalProperties": False,
}


class InstantWorkers(httpx.AsyncBaseTransport):
    """Every worker answers at once with the same JSON."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "application/json"}, stream=httpx.ByteStream(ANSWER)
        )


class UncountedSlots(CallSlots):
    """Slots that count nothing: the gateway as it was before back-pressure."""

    async def acquire(
        self,
        verb: str,
        capability: str,
        route: Router,
        *,
        check: Check | None = None,
        receive: Any = None,
    ) -> Slot | None:
        endpoint = route(())
        if endpoint is not None and check is not None:
            check(endpoint)
        return None if endpoint is None else Slot(self, endpoint)

    def _ended(self, worker_id: str) -> None:
        pass


def capability() -> CapabilitySchema:
    payload = {
        "name": "hello",
        "verb": "greet",
        "version": "1.0.0",
        "input_schema": INPUT_SCHEMA,
        "output_schema": {"type": "object"},
        "requires_gpu": False,
        "max_concurrency": 4,
    }
    return structure(payload, CapabilitySchema)


def gateway() -> Gateway:
    """A gateway over 100 registered workers of ``greet:hello``."""
    policy = HealthPolicy(heartbeat_interval=3600, unhealthy_after=7200, evict_after=14400)
    controller = create_app(config=ServiceConfig(policy=policy), clock=FakeClock())
    app = create_gateway_app(controller, GatewayConfig(), transport=InstantWorkers())
    found: Gateway = app.state.gateway
    service = found.service
    for index in range(WORKERS):
        service.registry.register(
            f"w{index}", f"http://w{index}.test", [capability()], now=service.clock()
        )
    return found


def call(endpoint: Gateway, headers: list[tuple[bytes, bytes]]) -> Callable[[], Awaitable[int]]:
    """One ``POST /execute`` into ``endpoint``; its status."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/execute",
        "headers": [(b"content-type", b"application/json"), *headers],
        "query_string": b"",
        "client": ("127.0.0.1", 5000),
        "server": ("gateway", 80),
        "scheme": "http",
    }

    async def run() -> int:
        status = 0

        async def receive() -> Message:
            return {"type": "http.request", "body": BODY, "more_body": False}

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await endpoint(scope, receive, send)
        return status

    return run


async def per_call_us(one: Callable[[], Awaitable[object]], calls: int, repeat: int) -> float:
    """Median CPU time of this thread per call of ``one``, over ``repeat`` runs of ``calls``."""
    for _ in range(calls // 10):
        await one()  # warm up
    runs = []
    for _ in range(repeat):
        began = time.thread_time()
        for _ in range(calls):
            await one()
        runs.append(time.thread_time() - began)
    return statistics.median(runs) / calls * 1e6


def report(label: str, micros: float, baseline: float | None = None) -> None:
    against = "" if baseline is None else f" ({micros / baseline:.2f}x the baseline)"
    print(f"{label}: {micros:.1f} µs{against}")


def verdict(label: str, added: float, target: float) -> bool:
    ratio = added / target
    ok = ratio <= 1
    print(
        f"{label}: {added:.2f} µs (target {target:.0f} µs: {ratio:.2f}x) {'PASS' if ok else 'FAIL'}"
    )
    return ok


async def interleaved(
    runs: dict[str, Callable[[], Awaitable[object]]], calls: int, repeat: int
) -> dict[str, float]:
    """:func:`per_call_us` of each run, the runs taking turns (so drift hits them alike)."""
    samples: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeat):
        for label, one in runs.items():
            samples[label].append(await per_call_us(one, calls, 1))
    return {label: statistics.median(values) for label, values in samples.items()}


async def bench(calls: int, repeat: int) -> bool:
    counted = gateway()
    uncounted = gateway()
    uncounted.slots = UncountedSlots(
        uncounted.service.registry,
        queue_limit=100,
        recheck=1.0,
        overloaded=uncounted._overloaded,
    )
    assert await call(counted, [])() == 200 and await call(uncounted, [])() == 200
    client = httpx.AsyncClient(transport=InstantWorkers())

    async def direct() -> None:
        answer = await client.post("http://w0.test/invoke/greet/hello", content=BODY)
        await answer.aread()

    keys = iter(range(10**9))

    async def new_key() -> None:
        await call(counted, [(b"idempotency-key", f"k-{next(keys)}".encode())])()

    replay = call(counted, [(b"idempotency-key", b"kept")])
    await replay()
    whole = await interleaved(
        {
            "worker call alone (httpx, in-memory transport)": direct,
            "/execute without in-flight accounting (baseline)": call(uncounted, []),
            "/execute with in-flight accounting": call(counted, []),
            "/execute with a new Idempotency-Key each call": new_key,
            "/execute replaying a kept Idempotency-Key (no worker call)": replay,
        },
        calls,
        repeat,
    )
    await client.aclose()
    baseline = whole["/execute without in-flight accounting (baseline)"]
    for label, micros in whole.items():
        report(label, micros, None if "baseline" in label or "alone" in label else baseline)
    overhead = (
        whole["/execute with in-flight accounting"]
        - whole["worker call alone (httpx, in-memory transport)"]
    )
    print(f"gateway overhead over the worker call: {overhead:.1f} µs")

    # The accounting alone, against the route it wraps: a whole call's figure
    # swings by more than the accounting costs on a shared machine.
    route = route_of(counted)

    async def plain_route() -> None:
        route(())

    async def accounted_route() -> None:
        slot = await counted.slots.acquire("greet", "hello", route)
        assert slot is not None
        slot.release()

    alone = await interleaved(
        {"route": plain_route, "route with accounting": accounted_route}, calls * 10, repeat
    )
    # Half the workers hold a call in flight, below their max_concurrency of 4.
    held = [await counted.slots.acquire("greet", "hello", route) for _ in range(50)]
    loaded = await interleaved(
        {"route": plain_route, "route with accounting": accounted_route}, calls * 10, repeat
    )
    for slot in held:
        assert slot is not None
        slot.release()
    # The payload check alone: what each call pays, and what compiling each time would.
    ask = structure(json.loads(BODY), ExecuteRequest)
    endpoint = route(())
    assert endpoint is not None

    async def cached_check() -> None:
        counted._check_payload(ask, endpoint)

    async def compiled_each_call() -> None:
        assert PayloadSchema(INPUT_SCHEMA).problems(PAYLOAD) == []

    # Compiling takes about a millisecond: a tenth of the calls keeps the run short.
    checks = await interleaved(
        {"cached": cached_check, "compiled": compiled_each_call}, calls // 10, repeat
    )
    report("payload check per call (cached validator)", checks["cached"])
    report("payload check with a validator compiled each call", checks["compiled"])
    report("route alone", alone["route"])
    report("route with acquire and release of a slot", alone["route with accounting"])
    report("the same, 50 workers holding calls", loaded["route with accounting"])
    ok = verdict(
        "in-flight accounting adds",
        alone["route with accounting"] - alone["route"],
        ACCOUNTING_TARGET_US,
    )
    ok &= verdict(
        "in-flight accounting adds, 50 workers holding calls",
        loaded["route with accounting"] - loaded["route"],
        LOADED_ACCOUNTING_TARGET_US,
    )
    return ok


def route_of(counted: Gateway) -> Router:
    """Routes of ``greet:hello`` excluding the busy workers, as the gateway's own."""
    service = counted.service

    def route(busy: Collection[str]) -> WorkerEndpoint | None:
        return next_worker(
            service.registry, "greet", "hello", tried=(), busy=busy, now=service.clock()
        )

    return route


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    calls, repeat = (500, 3) if args.quick else (3_000, 7)
    print(f"crank gateway benchmark: {WORKERS} workers, Python {sys.version.split()[0]}")
    ok = asyncio.run(bench(calls, repeat))
    print("all targets met" if ok else "some targets missed")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
