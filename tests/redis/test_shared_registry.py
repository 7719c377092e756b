"""Two controllers on one Redis: changes made on one are routable on the other."""

from __future__ import annotations

import gc

import anyio
import anyio.abc
import httpx
import pytest

from crank_registry import HeartbeatReceived
from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, create_app
from crank_registry_asgi.clock import AnchoredClock
from crank_registry_asgi.redis_store import RedisStore, RedisStoreError, StoreKeys
from tests.redis.helpers import (
    controller,
    machine_url,
    raw_client,
    unique_prefix,
    wait_until,
    wait_until_async,
)
from tests.service.helpers import Controller

pytestmark = pytest.mark.anyio


async def test_a_registration_on_one_controller_is_routable_on_the_other() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            await a.register("w1")
            # Applied on A before its answer: A routes to it at once.
            assert await a.route() == "w1"
            await wait_until(lambda: "w1" in b.registry, what="w1 on B")
            assert await b.route() == "w1"
            assert a.registry.revision == b.registry.revision == 1
            assert a.service.epoch == b.service.epoch


async def test_a_deregistration_on_the_other_controller_removes_it_everywhere() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            await a.register("w1")
            await wait_until(lambda: "w1" in b.registry, what="w1 on B")
            response = await b.post("/deregister", {"worker_id": "w1"})
            assert response.status_code == 200, response.text
            assert "w1" not in b.registry
            await wait_until(lambda: "w1" not in a.registry, what="w1 gone from A")
            assert a.registry.revision == b.registry.revision == 2


async def test_a_controller_started_later_loads_the_registry() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with controller(url, prefix, "a", clock) as a:
            for number in range(5):
                await a.register(f"w{number}")
            async with controller(url, prefix, "b", clock) as b:
                assert set(await b.workers()) == {f"w{number}" for number in range(5)}
                assert b.registry.revision == 5


async def test_heartbeats_are_batched_and_applied_by_every_controller() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            for number in range(3):
                await a.register(f"w{number}")
            await wait_until(lambda: len(b.registry) == 3, what="the workers on B")
            clock.advance(10)
            for number in range(3):
                response = await b.post("/heartbeat", {"worker_id": f"w{number}"})
                assert response.status_code == 200, response.text

            def heard_on_a() -> bool:
                return all(
                    view.last_heartbeat == clock.now for view in a.registry.workers(now=clock.now)
                )

            await wait_until(heard_on_a, what="B's heartbeats applied on A")
            # Heartbeats are not changes: no revision was taken.
            assert a.registry.revision == b.registry.revision == 3
            # One entry held all three (they arrived within the batch's few milliseconds).
            raw = await raw_client(url)
            entries = await raw.xrange(StoreKeys(prefix).stream)
            await raw.aclose()
            beats = [fields for _, fields in entries if b"beats" in fields]
            assert len(beats) == 1
            assert beats[0][b"beats"].count(b"\n") == 3


async def holder_and_other(a: Controller, b: Controller) -> tuple[Controller, Controller]:
    """The controller holding the sweeper lease, and the other."""
    await wait_until(
        lambda: a.service.store.may_sweep() or b.service.store.may_sweep(), what="a lease holder"
    )
    return (a, b) if a.service.store.may_sweep() else (b, a)


async def test_only_the_lease_holder_sweeps_and_every_replica_applies_it() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            await a.register("w1")
            await wait_until(lambda: "w1" in b.registry, what="w1 on B")
            holder, other = await holder_and_other(a, b)
            clock.advance(a.registry.policy.unhealthy_after + 1)
            assert await other.service.sweep() == ()
            (unhealthy,) = await holder.service.sweep()
            assert type(unhealthy).__name__ == "WorkerUnhealthy" and unhealthy.revision == 2
            await wait_until(lambda: other.registry.revision == 2, what="the change on the other")
            for api in (a, b):
                assert (await api.workers())["w1"]["state"] == "unhealthy"
            clock.advance(a.registry.policy.evict_after)
            assert await other.service.sweep() == ()
            (evicted,) = await holder.service.sweep()
            assert type(evicted).__name__ == "WorkerEvicted" and evicted.revision == 3
            await wait_until(lambda: "w1" not in other.registry, what="the eviction on the other")


async def test_a_sweep_decided_on_an_older_record_is_dropped_by_the_script() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            await a.register("w1")
            await wait_until(lambda: "w1" in b.registry, what="w1 on B")
            holder, other = await holder_and_other(a, b)
            clock.advance(a.registry.policy.unhealthy_after + 1)
            # The holder decides on its replica; before it writes, w1 registers again
            # on the other controller: the decision is about a record that is gone.
            decided = holder.registry.decide_sweep(now=clock.now)
            assert [type(event).__name__ for event in decided] == ["WorkerUnhealthy"]
            await other.register("w1")
            assert await holder.service.effects.store.commit(decided) == ()
            await wait_until(lambda: holder.registry.revision == 2, what="the registration")
            for api in (a, b):
                assert (await api.workers())["w1"]["state"] == "healthy"
                assert api.registry.revision == 2


async def test_a_sweep_decided_before_a_later_heartbeat_is_dropped_by_the_script() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            await a.register("w1")
            await wait_until(lambda: "w1" in b.registry, what="w1 on B")
            holder, other = await holder_and_other(a, b)
            clock.advance(a.registry.policy.unhealthy_after + 1)
            decided = holder.registry.decide_sweep(now=clock.now)
            # A heartbeat the other controller took just before (its replica had not
            # seen the deadline yet), written to Redis before the holder's decision.
            beat = HeartbeatReceived("w1", clock.now - 2)
            await other.service.effects.store.commit((beat,))
            raw = await raw_client(url)

            async def written() -> bool:
                heard = await raw.hget(StoreKeys(prefix).heard, "w1")
                return heard == repr(beat.at).encode()

            await wait_until_async(written, what="the heartbeat in Redis")
            await raw.aclose()
            assert await holder.service.effects.store.commit(decided) == ()
            assert holder.registry.revision == other.registry.revision == 1


async def test_a_controller_that_thinks_it_holds_the_lease_cannot_evict_twice() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            await a.register("w1")
            await wait_until(lambda: "w1" in b.registry, what="w1 on B")
            holder, other = await holder_and_other(a, b)
            # The other believes it holds the lease (a paused holder whose lease expired).
            other.service.store._lease_until = float("inf")
            clock.advance(a.registry.policy.unhealthy_after + 1)
            assert await other.service.sweep() == ()
            assert len(await holder.service.sweep()) == 1
            await wait_until(lambda: other.registry.revision == 2, what="one change")
            assert a.registry.revision == b.registry.revision == 2


async def test_a_newer_format_in_the_stream_stops_applying_and_refuses_writes() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with controller(url, prefix, "a", clock) as a:
            await a.register("w1")
            raw = await raw_client(url)
            await raw.xadd(StoreKeys(prefix).stream, {"v": "99", "revision": "2", "changes": b""})
            await wait_until(lambda: a.service.store.incompatible == 99, what="the newer entry")
            # Routing goes on from the replica; writes are refused and change nothing.
            assert await a.route() == "w1"
            response = await a.post("/deregister", {"worker_id": "w1"})
            assert response.status_code == 503
            assert response.json()["error"] == "incompatible_peer"
            assert "w1" in a.registry
            # A controller that starts on it refuses to start, naming both versions.
            with pytest.raises(RedisStoreError, match="format 99; this release reads up to 3"):
                async with controller(url, prefix, "b", clock):
                    pass
            await raw.aclose()


async def test_a_controller_keeps_redis_time_on_its_own_clock() -> None:
    url = machine_url()
    with unique_prefix(url) as prefix:
        app = create_app(config=ServiceConfig(redis_url=url, redis_prefix=prefix))
        async with app.router.lifespan_context(app):
            raw = await raw_client(url)
            seconds, micros = await raw.time()
            await raw.aclose()
            # Within what a round trip on a loaded machine takes.
            assert abs(app.state.service.clock() - (seconds + micros / 1e6)) < 0.5


def test_an_anchored_clock_aligned_to_another_keeps_advancing_from_it() -> None:
    monotonic = FakeClock(100.0)
    clock = AnchoredClock(wall=lambda: 1_000.0, monotonic=monotonic)
    assert clock() == 1_000.0
    assert clock.align(5_000.0) == 4_000.0
    assert clock() == 5_000.0
    monotonic.advance(2.5)
    assert clock() == 5_002.5


async def test_a_controller_that_stops_gives_the_lease_to_another_at_once() -> None:
    url = machine_url()
    clock = FakeClock()
    stop_a = anyio.Event()

    async def run_a(*, task_status: anyio.abc.TaskStatus[Controller]) -> None:
        async with controller(url, prefix, "a", clock, redis_lease_period=4.0) as a:
            task_status.started(a)
            await stop_a.wait()

    with unique_prefix(url) as prefix:
        async with anyio.create_task_group() as tasks:
            a = await tasks.start(run_a)
            await wait_until(a.service.store.may_sweep, what="A holds the lease")
            async with controller(url, prefix, "b", clock, redis_lease_period=4.0) as b:
                assert not b.service.store.may_sweep()
                stop_a.set()
                # Given back: B takes it at its next try (every second), not at its
                # expiry (A's key lives 3 s, renewed every second: 2 s at least).
                await wait_until(b.service.store.may_sweep, timeout=1.8, what="B takes the lease")


async def test_a_load_report_heard_on_one_controller_reaches_the_others() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            await a.register("w1")
            await wait_until(lambda: "w1" in b.registry, what="w1 on B")
            clock.advance(1)
            load = {"in_flight": 3, "latency_p95_ms": 42.0}
            response = await b.post("/heartbeat", {"worker_id": "w1", "load": load})
            assert response.status_code == 200, response.text

            def reported_on_a() -> bool:
                view = a.registry.get_worker("w1", now=clock.now)
                return view is not None and view.load is not None

            await wait_until(reported_on_a, what="the load report on A")
            view = a.registry.get_worker("w1", now=clock.now)
            assert view is not None and view.load is not None
            assert (view.load.in_flight, view.load.latency_p95_ms) == (3, 42.0)
            assert view.load_reported_at == clock.now
            # A heartbeat without a report carries none: A keeps the one it has.
            clock.advance(1)
            assert (await b.post("/heartbeat", {"worker_id": "w1"})).status_code == 200
            await wait_until(
                lambda: a.registry.get_worker("w1", now=clock.now).last_heartbeat == clock.now,
                what="the second heartbeat on A",
            )
            assert a.registry.get_worker("w1", now=clock.now).load_reported_at == clock.now - 1


async def test_not_ready_until_the_shared_registry_is_loaded() -> None:
    url = machine_url()
    with unique_prefix(url) as prefix:
        app = create_app(config=ServiceConfig(redis_url=url, redis_prefix=prefix))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/ready")
            assert response.status_code == 503
            assert "the shared registry is not loaded from Redis yet" in response.json()["reason"]
            async with app.router.lifespan_context(app):
                response = await client.get("/ready")
                assert response.status_code == 200
                assert response.json()["store"] == "ok"


@pytest.mark.parametrize("gc_options", [True, False])
async def test_the_loaded_registry_is_frozen_and_the_load_unpaused_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, gc_options: bool
) -> None:
    url = machine_url()
    clock = FakeClock()
    seen: list[bool] = []
    load = RedisStore._load

    async def watched(store: RedisStore) -> None:
        seen.append(gc.isenabled())
        await load(store)

    with unique_prefix(url) as prefix:
        async with controller(url, prefix, "a", clock) as a:
            await a.register("w1")
            monkeypatch.setattr(RedisStore, "_load", watched)
            options = {
                "pause_gc_during_recovery": gc_options,
                "freeze_gc_after_recovery": gc_options,
            }
            async with controller(url, prefix, "b", clock, **options) as b:
                assert seen == [not gc_options]
                assert gc.isenabled()
                record = b.registry._workers["w1"]  # loaded from Redis
                # A frozen object is in no generation the collector walks.
                walked = any(tracked is record for tracked in gc.get_objects())
                assert walked is not gc_options
                assert (gc.get_freeze_count() > 0) is gc_options
