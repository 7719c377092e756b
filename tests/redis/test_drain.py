"""Drain on a shared registry: a drain made on one controller stops routes on every other."""

from __future__ import annotations

import time
from typing import Any

import pytest

from crank_registry.testing import FakeClock
from crank_registry_asgi.redis_store import StoreKeys
from tests.redis.helpers import (
    controller,
    machine_url,
    raw_client,
    unique_prefix,
    wait_until,
    wait_until_async,
)

pytestmark = pytest.mark.anyio


async def test_a_drain_on_one_controller_stops_routes_on_the_other() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            await a.register("w1")
            await a.register("w2")
            await wait_until(lambda: len(b.registry) == 2, what="the workers on B")
            started = time.perf_counter()
            response = await a.request("POST", "/workers/w1/drain")
            assert response.json() == {"worker_id": "w1", "draining": True, "changed": True}
            # Applied on A before its answer, from the stream as every change is.
            assert {await a.route() for _ in range(4)} == {"w2"}

            def drained_on_b() -> bool:
                view = b.registry.get_worker("w1", now=clock.now)
                return view is not None and view.draining

            await wait_until(drained_on_b, what="the drain applied on B")
            lag_ms = (time.perf_counter() - started) * 1000
            print(f"drain on A routable-off on B after {lag_ms:.1f} ms")
            assert {await b.route() for _ in range(4)} == {"w2"}
            # Draining again on B is no second change; undrain on B returns it on A.
            again = await b.request("POST", "/workers/w1/drain")
            assert again.json()["changed"] is False
            await b.request("POST", "/workers/w1/undrain")
            await wait_until(
                lambda: not a.registry.get_worker("w1", now=clock.now).draining,  # type: ignore[union-attr]
                what="the undrain applied on A",
            )
            assert {await a.route() for _ in range(4)} == {"w1", "w2"}
            assert a.registry.revision == b.registry.revision == 4
            assert a.registry.records() == b.registry.records()


async def test_a_controller_started_later_loads_the_drains_from_the_snapshot() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with controller(url, prefix, "a", clock, redis_snapshot_every=3) as a:
            await wait_until(a.service.store.may_sweep, what="A holds the lease")
            for worker_id in ("w1", "w2", "w3"):
                await a.register(worker_id)
            await a.request("POST", "/workers/w2/drain")
            await a.register("w4")
            await a.register("w5")  # the sixth change: a snapshot is due (every 3)
            keys = StoreKeys(prefix)
            raw = await raw_client(url)
            try:
                await wait_until_async(
                    lambda: _snapshot_at_least(raw, keys, 6), what="a snapshot holding the drain"
                )
            finally:
                await raw.aclose()
            await a.register("w6")  # past the snapshot: from the stream
            async with controller(url, prefix, "b", clock) as b:
                await wait_until(lambda: len(b.registry) == 6, what="B loaded")
                assert [r.draining for r in b.registry.records()] == [
                    worker_id == "w2" for worker_id in ("w1", "w2", "w3", "w4", "w5", "w6")
                ]
                assert "w2" not in {await b.route() for _ in range(12)}


async def _snapshot_at_least(raw: Any, keys: StoreKeys, revision: int) -> bool:
    written = await raw.hget(keys.snapshot, "revision")
    return written is not None and int(written) >= revision
