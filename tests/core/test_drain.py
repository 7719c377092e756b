"""Drain: a worker beside its health takes no new routes, until undrained or registered again."""

from __future__ import annotations

import pytest

from crank_registry import (
    CapabilityRegistry,
    HealthState,
    RouteOptions,
    Snapshot,
    WorkerDraining,
    WorkerNotRegistered,
    WorkerRecord,
    WorkerState,
    WorkerUndrained,
    decode_line,
    encode_event,
    encode_snapshot,
    replay,
    structure,
    structure_event,
    unstructure,
    unstructure_event,
)
from tests.builders import capability
from tests.core.helpers import T0, registry_with, routes


def test_a_draining_worker_takes_no_new_route_and_undrain_returns_it() -> None:
    registry = registry_with("w1", "w2")
    events = registry.drain("w1", now=T0 + 1)
    assert events == (WorkerDraining("w1", T0 + 1, revision=3),)
    assert routes(registry, 4, now=T0 + 2) == ["w2"] * 4
    assert registry.undrain("w1", now=T0 + 3) == (WorkerUndrained("w1", T0 + 3, revision=4),)
    assert sorted(routes(registry, 4, now=T0 + 4)) == ["w1", "w1", "w2", "w2"]


def test_the_only_worker_draining_leaves_no_candidate_but_the_pair_known() -> None:
    registry = registry_with("w1")
    registry.drain("w1", now=T0)
    assert routes(registry, 2, now=T0 + 1) == [None, None]  # known: not unknown_capability


def test_draining_twice_is_one_change_and_undraining_a_worker_not_draining_is_none() -> None:
    registry = registry_with("w1")
    assert registry.undrain("w1", now=T0) == ()
    assert len(registry.drain("w1", now=T0 + 1)) == 1
    assert registry.drain("w1", now=T0 + 2) == ()
    assert registry.revision == 2
    # Decided but not yet confirmed (a store writing it): a second decision sees it.
    registry.undrain("w1", now=T0 + 3)
    assert len(registry.decide_drain("w1", now=T0 + 4)) == 1
    assert registry.decide_drain("w1", now=T0 + 4) == ()
    registry.discard_pending()
    assert not registry.get_worker("w1", now=T0 + 5).draining  # type: ignore[union-attr]


def test_an_unknown_worker_cannot_be_drained() -> None:
    registry = registry_with("w1")
    with pytest.raises(WorkerNotRegistered):
        registry.drain("nobody", now=T0)
    with pytest.raises(WorkerNotRegistered):
        registry.undrain("nobody", now=T0)
    registry.deregister("w1", now=T0)
    with pytest.raises(WorkerNotRegistered):
        registry.drain("w1", now=T0)
    # The fold refuses it too (an event about a worker not held).
    with pytest.raises(WorkerNotRegistered):
        registry.apply(WorkerDraining("w1", T0, revision=registry.revision + 1))


def test_a_draining_worker_keeps_heartbeating_its_registration_and_its_health() -> None:
    registry = registry_with("w1", "w2")
    registry.drain("w1", now=T0)
    now = T0
    for _ in range(5):
        now += 30
        assert registry.heartbeat("w1", now=now) != ()  # acknowledged, not refused
        registry.heartbeat("w2", now=now)
        assert registry.cleanup_stale(now=now) == ()
    view = registry.get_worker("w1", now=now)
    assert view is not None
    assert (view.state, view.draining, view.listed_state) == (
        HealthState.HEALTHY,
        True,
        WorkerState.DRAINING,
    )
    assert view.is_healthy is False  # not routable now
    assert routes(registry, 3, now=now) == ["w2"] * 3
    # Silent, a draining worker falls unhealthy and is evicted as any other.
    later = now + 61
    registry.heartbeat("w2", now=later)
    assert [type(e).__name__ for e in registry.cleanup_stale(now=later)] == ["WorkerUnhealthy"]
    view = registry.get_worker("w1", now=later)
    assert view is not None and view.state is HealthState.UNHEALTHY and view.draining


def test_a_registration_a_new_worker_process_ends_the_drain() -> None:
    registry = registry_with("w1", "w2")
    registry.drain("w1", now=T0)
    registry.register("w1", "https://w1:9443", [capability()], now=T0 + 1)
    assert not registry.get_worker("w1", now=T0 + 1).draining  # type: ignore[union-attr]
    assert "w1" in routes(registry, 2, now=T0 + 2)
    # The decision sees a pending registration too.
    registry.drain("w1", now=T0 + 3)
    registry.decide_register("w1", "https://w1:9443", [capability()], now=T0 + 4)
    assert len(registry.decide_drain("w1", now=T0 + 4)) == 1


def test_a_drain_outlives_a_restart_and_the_registration_that_repairs_it() -> None:
    registry = registry_with("w1", "w2")
    registry.drain("w1", now=T0)
    registry.restart(now=T0 + 5)  # every worker unverified: heard from by no one since
    # The restored worker's heartbeat is refused, so it registers again: not a new process.
    assert len(registry.decide_register("w1", "https://w1:8443", [capability()], now=T0 + 6)) == 1
    assert registry.decide_drain("w1", now=T0 + 6) == ()  # the decision sees it draining still
    registry.confirm(registry.revision + 1)
    view = registry.get_worker("w1", now=T0 + 6)
    assert view is not None and view.draining and view.state is HealthState.HEALTHY
    assert routes(registry, 3, now=T0 + 7) == ["w2"] * 3
    # Verified again: its next registration is a new process's, and ends the drain.
    registry.register("w1", "https://w1:8443", [capability()], now=T0 + 8)
    assert not registry.get_worker("w1", now=T0 + 8).draining  # type: ignore[union-attr]


def test_explain_names_draining_after_health_and_before_the_other_rules() -> None:
    registry = registry_with("w1", "w2", "w3")
    registry.drain("w1", now=T0)
    registry.drain("w3", now=T0)
    registry.heartbeat("w2", now=T0 + 50)
    registry.heartbeat("w1", now=T0 + 50)
    # At T0 + 70: w3 is silent (unhealthy comes first), w1 draining, w2 excluded.
    endpoint, explanation = registry.explain_route(
        "classify", "image.classify", now=T0 + 70, options=RouteOptions(exclude=("w1", "w2"))
    )
    assert endpoint is None
    assert {r.worker_id: r.reason for r in explanation.removed} == {
        "w1": "draining",
        "w2": "excluded",
        "w3": "unhealthy",
    }
    # With options, a draining worker is never a candidate either.
    for strategy in ("round_robin", "least_loaded"):
        options = RouteOptions(strategy=strategy)
        for _ in range(4):
            chosen = registry.route("classify", "image.classify", now=T0 + 60, options=options)
            assert chosen is not None and chosen.worker_id == "w2"


def test_in_self_preservation_a_draining_worker_still_takes_no_route() -> None:
    registry = CapabilityRegistry()
    for index in range(12):
        registry.register(f"w{index}", f"https://w{index}:1", [capability()], now=T0)
    registry.drain("w0", now=T0)
    registry.cleanup_stale(now=T0 + 1)  # the first window starts
    assert any(
        type(e).__name__ == "SelfPreservationChanged" for e in registry.cleanup_stale(now=T0 + 61)
    )
    assert registry.self_preservation is not None
    assert "w0" not in routes(registry, 24, now=T0 + 90)


def test_listings_show_health_draining_and_state_and_filter_by_state() -> None:
    registry = registry_with("w1", "w2", "w3")
    registry.drain("w1", now=T0)
    registry.heartbeat("w1", now=T0 + 50)
    registry.heartbeat("w2", now=T0 + 50)
    now = T0 + 70  # w3 silent past unhealthy_after
    page = registry.workers_page(now=now, limit=None, state=WorkerState.DRAINING)
    assert [view.worker_id for view in page.workers] == ["w1"]
    healthy = registry.workers_page(now=now, limit=None, state=WorkerState.HEALTHY)
    assert [view.worker_id for view in healthy.workers] == ["w2"]  # w1 is listed draining
    # An in-process HealthState filter means the same listed state.
    assert registry.workers_page(now=now, limit=None, state=HealthState.HEALTHY) == healthy
    assert registry.counts_of(now=now, state=WorkerState.DRAINING).matching == 1
    assert registry.state_counts(now=now) == {
        WorkerState.HEALTHY: 1,
        WorkerState.UNHEALTHY: 1,
        WorkerState.UNVERIFIED: 0,
        WorkerState.DRAINING: 1,
        WorkerState.EJECTED: 0,
    }
    entries = registry.capabilities_page(now=now, limit=None).capabilities
    assert [(e.workers, e.healthy_workers) for e in entries] == [(("w1", "w2", "w3"), ("w2",))]
    drained = registry.capabilities_page(now=now, limit=None, state=WorkerState.DRAINING)
    assert [e.workers for e in drained.capabilities] == [("w1",)]


def test_events_journal_and_feed_round_trip() -> None:
    for event in (WorkerDraining("w1", T0, revision=7), WorkerUndrained("w1", T0 + 1, revision=8)):
        assert structure_event(unstructure_event(event)) == event
        assert decode_line(encode_event(event)) == (event,)
    assert unstructure_event(WorkerDraining("w1", T0, revision=7)) == {
        "type": "draining",
        "worker_id": "w1",
        "revision": 7,
        "at": T0,
    }
    registry = registry_with("w1")
    registry.drain("w1", now=T0)
    changes, _ = registry.changes_since(1)
    assert changes == (WorkerDraining("w1", T0, revision=2),)


def test_a_journal_with_drains_replays_and_its_snapshot_keeps_them() -> None:
    original = registry_with("w1", "w2", "w3")
    original.drain("w1", now=T0 + 1)
    original.drain("w2", now=T0 + 1)
    original.undrain("w2", now=T0 + 2)
    original.deregister("w3", now=T0 + 3)
    changes, _ = original.changes_since(0)  # every change, as the journal holds them
    replayed = CapabilityRegistry()
    assert replay([encode_event(change) for change in changes], replayed).lines_skipped == 0
    assert replayed.records() == original.records()
    assert [r.draining for r in replayed.records()] == [True, False]
    # A compacted journal: the snapshot's parts carry the drain of each worker.
    for part_size in (1, 2, 4096):
        compacted = CapabilityRegistry()
        result = replay(encode_snapshot(original.snapshot(), part_size=part_size), compacted)
        assert result.lines_skipped == 0
        assert compacted.records() == original.records()
        assert routes(compacted, 3, now=T0 + 4) == ["w2"] * 3


def test_a_snapshot_line_without_draining_reads_as_none_draining() -> None:
    registry = registry_with("w1")
    (line,) = encode_snapshot(registry.snapshot())
    assert b'"draining"' not in line  # written only when a worker drains: older readers read it
    restored = CapabilityRegistry()
    replay([line], restored)
    assert restored.records()[0].draining is False


def test_records_write_draining_only_when_true() -> None:
    record = WorkerRecord("w1", "https://w1:1", (capability(),), T0)
    assert "draining" not in unstructure(record)
    drained = WorkerRecord("w1", "https://w1:1", (capability(),), T0, draining=True)
    assert unstructure(drained)["draining"] is True
    assert structure(unstructure(drained), WorkerRecord) == drained


def test_a_follower_applies_drains_through_the_fold_and_stops_routing_there() -> None:
    controller = registry_with("w1", "w2")
    follower = CapabilityRegistry(routes_by_state=True)
    follower.apply_snapshot(controller.snapshot())
    for change in controller.drain("w1", now=T0 + 1):
        follower.apply(change)
    far = T0 + 10_000  # a follower keeps no health clock: only events change it
    assert routes(follower, 3, now=far) == ["w2"] * 3
    follower.apply_snapshot(Snapshot(controller.revision, tuple(controller.records())))
    assert routes(follower, 3, now=far) == ["w2"] * 3
    for change in controller.undrain("w1", now=T0 + 2):
        follower.apply(change)
    assert sorted(routes(follower, 2, now=far)) == ["w1", "w2"]
