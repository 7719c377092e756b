"""Outlier ejection on a shared registry: decided on one controller, it holds on every one."""

from __future__ import annotations

import time

import pytest

from crank_registry import WorkerEjected, WorkerRestored
from crank_registry.testing import FakeClock
from tests.redis.helpers import controller, machine_url, unique_prefix, wait_until
from tests.redis.test_shared_registry import holder_and_other
from tests.service.helpers import Controller

pytestmark = pytest.mark.anyio

VERB, NAME = "classify", "image.classify"


async def eject(api: Controller, worker_id: str) -> tuple[WorkerEjected, ...]:
    """What the gateway does on ``api`` for a worker whose calls keep failing: decide, write."""
    registry = api.registry
    events: tuple[object, ...] = ()
    for _ in range(registry.ejection_settings.after_failures):
        api.service.effects.check_writable()
        events = registry.decide_outcome(worker_id, VERB, NAME, ok=False, now=api.clock.now)
    assert events, "the last failure decides the ejection"
    written = await api.service.effects.commit(events)  # type: ignore[arg-type]
    return tuple(event for event in written if isinstance(event, WorkerEjected))


async def test_an_ejection_decided_on_one_controller_stops_routes_on_the_other() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            await a.register("w1")
            await a.register("w2")
            await wait_until(lambda: "w2" in b.registry, what="w1 and w2 on B")
            started = time.monotonic()
            (ejected,) = await eject(a, "w1")
            written = time.monotonic() - started
            assert a.registry.ejected_until("w1") == ejected.until
            await wait_until(
                lambda: b.registry.ejected_until("w1") is not None, what="the ejection on B"
            )
            lag = time.monotonic() - started
            print(
                f"ejection decided on A: applied on A after {written * 1000:.2f} ms, "
                f"on B after {lag * 1000:.2f} ms (from the decision)"
            )
            assert [await b.route() for _ in range(4)] == ["w2"] * 4
            listed = (await b.workers())["w1"]
            assert (listed["state"], listed["health"]) == ("ejected", "healthy")
            # Restored at its deadline, by the lease holder only, on both.
            holder, other = await holder_and_other(a, b)
            clock.advance(ejected.until - clock.now)
            assert await other.service.sweep() == ()
            (restored,) = await holder.service.sweep()
            assert isinstance(restored, WorkerRestored)
            await wait_until(
                lambda: other.registry.ejected_until("w1") is None, what="the restoration"
            )
            assert {await b.route() for _ in range(4)} == {"w1", "w2"}
            assert a.registry.revision == b.registry.revision == 4


async def test_a_restoration_decided_on_an_older_record_is_dropped_by_the_script() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            await a.register("w1")
            await a.register("w2")
            await wait_until(lambda: "w2" in b.registry, what="w1 and w2 on B")
            (ejected,) = await eject(a, "w1")
            await wait_until(lambda: b.registry.ejected_until("w1") is not None, what="on B")
            holder, other = await holder_and_other(a, b)
            clock.advance(ejected.until - clock.now)
            decided = holder.registry.decide_sweep(now=clock.now)
            assert [type(event) for event in decided] == [WorkerRestored]
            store = holder.service.store
            based = store._records["w1"]  # the record the holder decided on
            # Before it is written, w1 registers again on the other controller.
            await other.register("w1")
            revision = other.registry.revision
            await wait_until(lambda: holder.registry.revision == revision, what="registration")
            # The holder writes as it would have before its replica applied that
            # registration (its decision and its write are one step of its loop).
            current, store._records["w1"] = store._records["w1"], based
            assert current != based
            assert await store.commit(decided) == ()
            store._records["w1"] = current
            # The registration did not end the ejection; the next sweep decides again.
            for api in (a, b):
                assert api.registry.ejected_until("w1") == ejected.until
            (restored,) = await holder.service.sweep()
            assert isinstance(restored, WorkerRestored)
            await wait_until(lambda: other.registry.ejected_until("w1") is None, what="restored")
            assert a.registry.revision == b.registry.revision == revision + 1


async def test_two_controllers_ejecting_at_once_stay_within_the_cap_on_both() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            for worker_id in ("w1", "w2", "w3"):
                await a.register(worker_id)
            await wait_until(lambda: "w3" in b.registry, what="the workers on B")
            # Each decides on its own replica, where none is ejected yet: both within
            # the cap (one of three at 10 %). Redis keeps both; the fold drops the later.
            first = a.registry.decide_outcome
            for _ in range(4):
                first("w1", VERB, NAME, ok=False, now=clock.now)
                b.registry.decide_outcome("w2", VERB, NAME, ok=False, now=clock.now)
            on_a = first("w1", VERB, NAME, ok=False, now=clock.now)
            on_b = b.registry.decide_outcome("w2", VERB, NAME, ok=False, now=clock.now)
            assert len(on_a) == len(on_b) == 1
            (written_a,) = await a.service.effects.commit(on_a)
            (written_b,) = await b.service.effects.commit(on_b)
            assert written_b.revision == written_a.revision + 1
            await wait_until(
                lambda: a.registry.revision == b.registry.revision == written_b.revision,
                what="both changes on both",
            )
            for api in (a, b):
                assert api.registry.ejected_until("w1") is not None
                assert api.registry.ejected_until("w2") is None
                assert api.registry.ejected_count == 1
            assert a.registry.records() == b.registry.records()
