"""Redis out of reach, trimmed past, killed, restarted empty: routing goes on, nothing is lost."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis

from crank_registry import AccessRules
from crank_registry.testing import FakeClock
from crank_registry_asgi.redis_store import StoreKeys
from tests.builders import registration_payload
from tests.redis.helpers import (
    Partition,
    RedisServer,
    controller,
    machine_url,
    raw_client,
    unique_prefix,
    wait_until,
)
from tests.service.helpers import Controller

pytestmark = pytest.mark.anyio

MACHINE_PORT = 6379


def same_registry(a: Controller, b: Controller) -> bool:
    return a.registry.revision == b.registry.revision and sorted(
        a.registry.export_state()["workers"], key=lambda record: record["worker_id"]
    ) == sorted(b.registry.export_state()["workers"], key=lambda record: record["worker_id"])


async def test_cut_off_from_redis_a_controller_routes_refuses_writes_and_catches_up() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            Partition(MACHINE_PORT) as link,
            controller(url, prefix, "a", clock) as a,
            controller(link.url, prefix, "b", clock) as b,
        ):
            await a.register("w1")
            await wait_until(lambda: "w1" in b.registry, what="w1 on B")
            link.cut()
            await wait_until(lambda: not b.service.store.available, what="B sees the outage")
            # Routing goes on from the replica, and /ready keeps B in the load balancer.
            assert await b.route() == "w1"
            ready = await b.get("/ready")
            assert ready.status_code == 200
            assert ready.json() == {
                "status": "ready",
                "store": "unavailable",
                "self_preservation": False,
            }
            # A write is refused, and changes nothing.
            response = await b.request("POST", "/register", json=registration_payload("w2"))
            assert response.status_code == 503, response.text
            assert response.json()["error"] == "store_unavailable"
            assert response.headers["Retry-After"] == "30"
            assert "w2" not in b.registry
            response = await b.post("/deregister", {"worker_id": "w1"})
            assert response.json()["error"] == "store_unavailable"
            # A heartbeat is answered, and kept.
            clock.advance(5)
            assert (await b.post("/heartbeat", {"worker_id": "w1"})).status_code == 200
            # Nobody sweeps through an outage from B.
            assert not b.service.store.may_sweep()
            await a.register("w3")
            link.heal()
            await wait_until(lambda: same_registry(a, b), what="B caught up", timeout=10)
            assert "w3" in b.registry
            assert (await b.get("/ready")).json()["store"] == "ok"
            # The kept heartbeat was written once Redis was back.
            await wait_until(
                lambda: a.registry.get_worker("w1", now=clock.now).last_heartbeat == clock.now,
                what="B's kept heartbeat on A",
            )
            # And B waits one unhealthy_after before it may sweep.
            assert b.service.store._sweep_not_before == clock.now + 60


async def test_a_controller_whose_position_was_trimmed_reloads_the_snapshot() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            Partition(MACHINE_PORT) as link,
            controller(url, prefix, "a", clock, redis_snapshot_every=3) as a,
        ):
            await wait_until(a.service.store.may_sweep, what="A holds the lease")
            async with controller(link.url, prefix, "b", clock, redis_snapshot_every=3) as b:
                await a.register("w0")
                await wait_until(lambda: "w0" in b.registry, what="w0 on B")
                link.cut()
                await wait_until(lambda: not b.service.store.available, what="B sees the outage")
                for number in range(1, 10):
                    await a.register(f"w{number}")
                response = await a.post("/deregister", {"worker_id": "w0"})
                assert response.status_code == 200
                raw = await raw_client(url)
                keys = StoreKeys(prefix)
                await wait_until_snapshot(raw, keys, at_least=8)
                entries = await raw.xrange(keys.stream)
                # B's position (revision 1) was trimmed: the first entry left is far past it.
                first = entries[0][1] if entries else None
                assert first is None or int(first[b"revision"]) > 2
                await raw.aclose()
                link.heal()
                await wait_until(lambda: same_registry(a, b), what="B reloaded", timeout=10)
                assert "w0" not in b.registry and len(b.registry) == 9


async def wait_until_snapshot(raw: Redis, keys: StoreKeys, *, at_least: int) -> None:
    deadline = time.monotonic() + 5
    while True:
        revision = await raw.hget(keys.snapshot, "revision")
        if revision is not None and int(revision) >= at_least:
            return
        assert time.monotonic() < deadline, "no snapshot written"
        await anyio.sleep(0.01)


async def test_a_controller_started_after_snapshots_loads_them_and_the_rest() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with controller(url, prefix, "a", clock, redis_snapshot_every=4) as a:
            await wait_until(a.service.store.may_sweep, what="A holds the lease")
            for number in range(10):
                await a.register(f"w{number}")
            clock.advance(1)
            assert (await a.post("/heartbeat", {"worker_id": "w3"})).status_code == 200
            await wait_until_snapshot(await raw_client(url), StoreKeys(prefix), at_least=4)
            await a.register("w10")
            async with controller(url, prefix, "b", clock) as b:
                await wait_until(lambda: same_registry(a, b), what="B loaded")
                assert b.registry.get_worker("w3", now=clock.now).last_heartbeat == clock.now


async def test_an_acknowledged_registration_survives_kill_9_of_redis(tmp_path: Path) -> None:
    clock = FakeClock()
    with RedisServer(tmp_path) as server:
        async with controller(server.url, "crank", "a", clock) as a:
            for number in range(20):
                await a.register(f"w{number}")
            server.kill()
            await wait_until(lambda: not a.service.store.available, what="A sees the outage")
            response = await a.request("POST", "/register", json=registration_payload("late"))
            assert response.json()["error"] == "store_unavailable"
            assert await a.route() is not None
            server.start()
            await wait_until(lambda: a.service.store.available, what="A reconnects", timeout=10)
            epoch = a.service.epoch
            async with controller(server.url, "crank", "b", clock) as b:
                assert len(b.registry) == 20 and b.registry.revision == 20
                assert b.service.epoch == epoch
                assert "late" not in b.registry


async def test_redis_restarted_empty_starts_a_new_history_that_workers_rebuild(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    # Not the default access rules: the new history starts under the default
    # ones, and the lease holder publishes these again.
    fleet = AccessRules(trust_domain="fleet.example")
    with RedisServer(tmp_path, persistent=False) as server:
        async with (
            controller(server.url, "crank", "a", clock, trust_domain=fleet.trust_domain) as a,
            controller(server.url, "crank", "b", clock, trust_domain=fleet.trust_domain) as b,
        ):
            await a.register("w1")
            await wait_until(lambda: "w1" in b.registry, what="w1 on B")
            assert a.registry.access_rules == b.registry.access_rules == fleet
            old_epoch = a.service.epoch
            server.kill()
            server.start()
            await wait_until(
                lambda: a.service.epoch != old_epoch and b.service.epoch != old_epoch,
                what="a new history",
                timeout=10,
            )
            assert a.service.epoch == b.service.epoch
            await wait_until(
                lambda: a.registry.access_rules == b.registry.access_rules == fleet,
                what="the access policy published again",
                timeout=10,
            )
            assert len(a.registry) == len(b.registry) == 0
            # The worker's next heartbeat is refused: it registers again.
            response = await b.post("/heartbeat", {"worker_id": "w1"})
            assert response.status_code == 404
            assert response.json()["error"] == "worker_not_registered"
            await b.register("w1")
            await wait_until(lambda: "w1" in a.registry, what="w1 again on A")
            # The new history: the access policy published again, the registration.
            assert a.registry.revision == b.registry.revision == 2


async def test_redis_restarted_behind_the_replicas_is_followed_by_every_controller(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    with RedisServer(tmp_path, persistent=False) as server:
        async with (
            controller(server.url, "crank", "a", clock) as a,
            controller(server.url, "crank", "b", clock) as b,
        ):
            await a.register("w1")
            await wait_until(lambda: "w1" in b.registry, what="w1 on B")
            raw = Redis.from_url(server.url)
            await raw.save()  # an RDB file that knows w1 only
            await raw.aclose()
            await a.register("w2")
            await wait_until(lambda: "w2" in b.registry, what="w2 on B")
            # Redis comes back from its RDB file: the same history, one change behind
            # both replicas (as after a lost fsync). The replicas follow what it holds.
            server.kill()
            server.start()
            await wait_until(
                lambda: all("w1" in api.registry and len(api.registry) == 1 for api in (a, b)),
                what="the replicas back to what Redis holds",
                timeout=10,
            )
            assert a.registry.revision == b.registry.revision == 1
            # w2's next heartbeat is refused, so it registers again; every change from
            # now on is applied everywhere (none is taken for one applied already).
            assert (await b.post("/heartbeat", {"worker_id": "w2"})).status_code == 404
            await b.register("w2")
            await a.register("w3")
            await wait_until(
                lambda: same_registry(a, b) and len(a.registry) == 3,
                what="the same three workers on both",
                timeout=10,
            )


@pytest.mark.slow
async def test_no_acknowledged_registration_is_lost_to_repeated_kill_9_of_redis(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    acknowledged: set[str] = set()
    refused = 0
    with RedisServer(tmp_path) as server:
        async with controller(server.url, "crank", "a", clock) as a:

            async def register_storm(client: int, stop: anyio.Event) -> None:
                nonlocal refused
                number = 0
                while not stop.is_set():
                    worker_id = f"c{client}-{number}"
                    number += 1
                    response = await a.request(
                        "POST", "/register", json=registration_payload(worker_id)
                    )
                    if response.status_code == 200:
                        acknowledged.add(worker_id)
                    else:
                        assert response.json()["error"] == "store_unavailable", response.text
                        refused += 1
                        await anyio.sleep(0.01)

            stop = anyio.Event()
            async with anyio.create_task_group() as storm:
                for client in range(4):
                    storm.start_soon(register_storm, client, stop)
                for _ in range(5):
                    await anyio.sleep(0.3)
                    server.kill()
                    await anyio.sleep(0.1)
                    server.start()
                    await wait_until(
                        lambda: a.service.store.available, what="A reconnects", timeout=10
                    )
                await anyio.sleep(0.3)
                stop.set()
            async with controller(server.url, "crank", "b", clock) as b:
                held = {record.worker_id for record in b.registry.records()}
                missing = acknowledged - held
                assert not missing, sorted(missing)[:10]
    assert len(acknowledged) >= 20 and refused >= 1, (len(acknowledged), refused)
