"""Self-preservation on a shared registry: the lease holder's entry reinstates on every replica."""

from __future__ import annotations

import pytest

from crank_registry import SelfPreservationChanged, WorkerUnhealthy
from crank_registry.testing import FakeClock
from tests.redis.helpers import controller, machine_url, unique_prefix, wait_until
from tests.redis.test_shared_registry import holder_and_other
from tests.service.helpers import Controller

pytestmark = pytest.mark.anyio

WORKERS = [f"w{n}" for n in range(20)]


def states(api: Controller) -> list[tuple[str, bool, bool]]:
    """Every worker's health as the replica holds it."""
    return [(r.worker_id, r.verified, r.silent) for r in api.registry.records()]


async def test_the_entry_reinstates_on_every_replica_and_both_route_to_all() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            policy = a.registry.policy
            # Registered over an interval, then never heard again: the silences
            # come one by one, as a partition's do.
            spread = policy.heartbeat_interval / len(WORKERS)
            for worker_id in WORKERS:
                await a.register(worker_id)
                clock.advance(spread)
            await wait_until(lambda: len(b.registry) == len(WORKERS), what="the workers on B")
            holder, other = await holder_and_other(a, b)
            await holder.service.sweep()  # a window starts with all of them routable
            decided: list[object] = []
            give_up = clock.now + policy.evict_after
            while holder.registry.self_preservation is None:
                clock.advance(1.0)
                decided += await holder.service.sweep()
                assert clock.now < give_up, decided
            entered = decided[-1]
            assert isinstance(entered, SelfPreservationChanged) and entered.active
            made_unhealthy = [e.worker_id for e in decided if isinstance(e, WorkerUnhealthy)]
            assert len(made_unhealthy) >= 5
            assert [r.worker_id for r in entered.reinstated] == made_unhealthy
            await wait_until(
                lambda: other.registry.revision == holder.registry.revision,
                what="the entry on the other replica",
            )
            assert other.registry.self_preservation == entered.at
            assert states(other) == states(holder)
            assert not any(silent for _, _, silent in states(other))
            for api in (a, b):
                assert {await api.route() for _ in range(60)} == set(WORKERS)
