"""A registry that routes by state alone (a follower's replica) and counts calls in progress."""

from __future__ import annotations

import random

from crank_registry import (
    CapabilityRegistry,
    HealthPolicy,
    HealthState,
    RouteOptions,
    WorkerRecord,
)
from crank_registry._events import Snapshot
from tests.builders import capability

T0 = 1_700_000_000.0
POLICY = HealthPolicy(heartbeat_interval=10.0, unhealthy_after=20.0, evict_after=40.0)
LEAST_LOADED = RouteOptions(strategy="least_loaded")


def controller_and_replica() -> tuple[CapabilityRegistry, CapabilityRegistry]:
    """A controller with w1 and w2, and a replica fed its changes."""
    controller = CapabilityRegistry(POLICY)
    replica = CapabilityRegistry(POLICY, routes_by_state=True)
    for worker_id in ("w1", "w2"):
        controller.register(worker_id, f"https://{worker_id}:8443", [capability()], now=T0)
    for change in controller.changes_since(0)[0]:
        replica.apply(change)
    return controller, replica


def routed(registry: CapabilityRegistry, now: float, count: int = 4) -> set[str | None]:
    return {
        None if endpoint is None else endpoint.worker_id
        for endpoint in (
            registry.route("classify", "image.classify", now=now) for _ in range(count)
        )
    }


def test_a_replica_keeps_routing_a_healthy_worker_however_late_it_is() -> None:
    controller, replica = controller_and_replica()
    much_later = T0 + 10 * POLICY.evict_after
    assert routed(controller, much_later) == {None}
    assert routed(replica, much_later) == {"w1", "w2"}
    assert replica.next_deadline() is None  # nothing for a sweep to do
    assert replica.cleanup_stale(now=much_later) == ()
    view = replica.get_worker("w1", now=much_later)
    assert view is not None
    assert (view.state, view.is_healthy) == (HealthState.HEALTHY, True)


def test_a_replica_stops_and_resumes_routing_a_worker_by_the_events_alone() -> None:
    controller, replica = controller_and_replica()
    controller.heartbeat("w2", now=T0 + 15)
    swept = controller.cleanup_stale(now=T0 + POLICY.unhealthy_after + 1)
    assert [change.worker_id for change in swept] == ["w1"]
    for change in controller.changes_since(replica.revision)[0]:
        replica.apply(change)
    assert routed(replica, T0) == {"w2"}  # the event, not the time, took w1 out
    view = replica.get_worker("w1", now=T0)
    assert view is not None
    assert (view.state, view.is_healthy) == (HealthState.UNHEALTHY, False)
    controller.heartbeat("w1", now=T0 + 22)  # heard again: healthy
    for change in controller.changes_since(replica.revision)[0]:
        replica.apply(change)
    assert routed(replica, T0) == {"w1", "w2"}


def test_a_replica_routes_a_snapshot_by_its_records_states() -> None:
    replica = CapabilityRegistry(POLICY, routes_by_state=True)
    records = (
        WorkerRecord("w1", "https://w1:8443", (capability(),), T0, verified=True, silent=False),
        WorkerRecord("w2", "https://w2:8443", (capability(),), T0, verified=True, silent=True),
        WorkerRecord("w3", "https://w3:8443", (capability(),), T0, verified=False, silent=False),
        WorkerRecord("w4", "https://w4:8443", (capability(),), T0, verified=False, silent=True),
    )
    replica.apply_snapshot(Snapshot(7, records))
    assert routed(replica, T0 + 1e6, count=8) == {"w1", "w3"}
    assert replica.revision == 7


def test_a_call_in_progress_counts_for_least_loaded_until_it_ends() -> None:
    registry = CapabilityRegistry(POLICY, rng=random.Random(1), routes_by_state=True)
    for worker_id in ("w1", "w2"):
        registry.register(worker_id, f"https://{worker_id}:8443", [capability()], now=T0)
    # Long after any hand-out faded, two calls in progress on w1 make w2 the less loaded
    # until w2 has been handed two calls too.
    registry.count_calls("w1", 2)
    later = T0 + 5 * POLICY.heartbeat_interval
    first_two = [
        registry.route("classify", "image.classify", now=later, options=LEAST_LOADED)
        for _ in range(2)
    ]
    assert [endpoint.worker_id if endpoint else None for endpoint in first_two] == ["w2", "w2"]
    registry.count_calls("w1", 0)
    # Both idle again (w2's hand-outs faded): a tie, which goes to the smaller id.
    much_later = later + 5 * POLICY.heartbeat_interval
    endpoint = registry.route("classify", "image.classify", now=much_later, options=LEAST_LOADED)
    assert endpoint is not None
    assert endpoint.worker_id == "w1"


def test_a_call_in_progress_and_its_routes_hand_out_count_once() -> None:
    registry = CapabilityRegistry(POLICY, rng=random.Random(1))
    registry.register("w1", "https://w1:8443", [capability()], now=T0)
    endpoint = registry.route("classify", "image.classify", now=T0, options=LEAST_LOADED)
    assert endpoint is not None
    worker = registry._workers["w1"]
    assert worker.load is not None
    assert worker.load.estimate(T0, POLICY.heartbeat_interval) == 1  # the hand-out
    registry.count_calls("w1", 1)
    assert worker.load.estimate(T0, POLICY.heartbeat_interval) == 1  # the same call, once
    later = T0 + 2 * POLICY.heartbeat_interval
    assert worker.load.estimate(later, POLICY.heartbeat_interval) == 1  # a call does not fade
    registry.count_calls("w1", 0)
    assert worker.load.estimate(later, POLICY.heartbeat_interval) == 0
    registry.count_calls("gone", 1)  # a worker not held: nothing to count
