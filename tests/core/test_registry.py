"""The registry's rules with explicit time: health, routing, sweeping, snapshots."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest

from crank_registry import (
    STATE_FORMAT_VERSION,
    CapabilityRegistry,
    CapabilitySchema,
    CapabilityView,
    Forbidden,
    HealthPolicy,
    HealthState,
    HeartbeatReceived,
    UnknownCapability,
    ValidationError,
    WorkerDeregistered,
    WorkerEndpoint,
    WorkerEvicted,
    WorkerImported,
    WorkerNotRegistered,
    WorkerRecord,
    WorkerRegistered,
    WorkerUnhealthy,
    authorize_worker,
    identity_problem,
    is_trust_domain,
    structure,
    worker_name_of,
)
from crank_registry.testing import FakeClock
from tests.builders import capability, capability_payload
from tests.core.helpers import T0, UNKNOWN, registry_with, routes, state_of

KEY = ("classify", "image.classify")


def routed(registry: CapabilityRegistry, now: float) -> str | None:
    endpoint = registry.route(*KEY, now=now)
    return None if endpoint is None else endpoint.worker_id


# ---------------------------------------------------------------------- health


def test_health_timings_default_30_60_120() -> None:
    clock = FakeClock(T0)
    registry = registry_with("w1", now=clock())
    assert registry.policy == HealthPolicy(30.0, 60.0, 120.0)
    assert state_of(registry, "w1", clock.advance(60.0)) is HealthState.HEALTHY
    assert routed(registry, clock()) == "w1"
    # Unhealthy only when silent for MORE than unhealthy_after.
    assert state_of(registry, "w1", clock.advance(0.001)) is HealthState.UNHEALTHY
    assert routed(registry, clock()) is None
    view = registry.get_worker("w1", now=clock())
    assert view is not None and not view.is_healthy and view.last_heartbeat == T0
    # The sweep says so; evicted only when silent for MORE than evict_after.
    assert registry.cleanup_stale(now=T0 + 120.0) == (
        WorkerUnhealthy("w1", T0 + 120.0, T0, revision=2),
    )
    assert "w1" in registry
    assert registry.cleanup_stale(now=T0 + 120.001) == (
        WorkerEvicted("w1", T0 + 120.001, T0, revision=3),
    )
    assert "w1" not in registry and registry.get_worker("w1", now=T0 + 121) is None


def test_health_timings_configurable() -> None:
    registry = registry_with("w1", policy=HealthPolicy(1.0, 2.5, 4.0))
    assert routed(registry, T0 + 2.5) == "w1"
    assert routed(registry, T0 + 2.75) is None
    assert [type(e) for e in registry.cleanup_stale(now=T0 + 4.0)] == [WorkerUnhealthy]
    assert [type(e) for e in registry.cleanup_stale(now=T0 + 4.25)] == [WorkerEvicted]


def test_heartbeat_keeps_a_worker_healthy() -> None:
    clock = FakeClock(T0)
    registry = registry_with("w1", now=clock())
    for _ in range(10):
        clock.advance(59.0)
        assert registry.heartbeat("w1", now=clock()) == (HeartbeatReceived("w1", clock()),)
        assert state_of(registry, "w1", clock.advance(60.0)) is HealthState.HEALTHY
        clock.now -= 60.0  # look ahead only; the heartbeats stay 59 s apart
    assert registry.cleanup_stale(now=clock.advance(59.0)) == ()


def test_heartbeat_of_an_unhealthy_worker_brings_it_back() -> None:
    registry = registry_with("w1", "w2")
    now = T0 + 61.0
    assert routes(registry, 3, now=now) == [None, None, None]
    registry.heartbeat("w2", now=now)
    assert routes(registry, 3, now=now) == ["w2", "w2", "w2"]
    registry.heartbeat("w1", now=now + 59)
    assert sorted(routes(registry, 2, now=now + 59)) == ["w1", "w2"]
    assert state_of(registry, "w1", now + 59) is HealthState.HEALTHY


def test_heartbeat_of_an_unknown_worker() -> None:
    registry = registry_with("w1")
    with pytest.raises(WorkerNotRegistered) as caught:
        registry.heartbeat("ghost", now=T0)
    assert caught.value.worker_id == "ghost"
    assert (caught.value.code, caught.value.status_hint) == ("worker_not_registered", 404)


def test_heartbeat_past_evict_raises_even_before_a_sweep() -> None:
    registry = registry_with("w1")
    registry.heartbeat("w1", now=T0 + 120.0)  # exactly evict_after: still accepted
    with pytest.raises(WorkerNotRegistered):
        registry.heartbeat("w1", now=T0 + 240.5)
    # It must register again; nothing was changed by the refused heartbeat.
    view = registry.get_worker("w1", now=T0 + 240.5)
    assert view is not None and view.last_heartbeat == T0 + 120.0


def test_heartbeat_rejects_time_going_backwards_and_non_finite_now() -> None:
    registry = registry_with("w1")
    with pytest.raises(ValidationError, match="now"):
        registry.heartbeat("w1", now=T0 - 1)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValidationError, match="now"):
            registry.heartbeat("w1", now=bad)
        with pytest.raises(ValidationError, match="now"):
            registry.register("w2", "http://w2", [capability()], now=bad)
        with pytest.raises(ValidationError, match="now"):
            registry.cleanup_stale(now=bad)
    assert routed(registry, T0 + 1) == "w1"


def test_route_with_nan_now_refused_and_changes_nothing() -> None:
    registry = registry_with("w1", "w2")
    with pytest.raises(ValidationError, match="now"):
        registry.route(*KEY, now=float("nan"))
    assert sorted(routes(registry, 2, now=T0)) == ["w1", "w2"]


# ------------------------------------------------------------- unverified state


def records_at(*worker_ids: str, last_heartbeat: float) -> list[WorkerRecord]:
    return [
        WorkerRecord(w, f"https://{w}:8443", (capability(),), last_heartbeat) for w in worker_ids
    ]


def test_restore_makes_records_unverified() -> None:
    registry = CapabilityRegistry()
    kept = registry.restore(records_at("w1", "w2", last_heartbeat=T0), now=T0 + 30)
    assert kept == 2
    assert [v.state for v in registry.workers(now=T0 + 30)] == [HealthState.UNVERIFIED] * 2
    # The warm cache keeps routing while the last heartbeat is within unhealthy_after.
    assert sorted(routes(registry, 2, now=T0 + 60)) == ["w1", "w2"]
    assert routes(registry, 1, now=T0 + 60.5) == [None]
    # Still unverified (not "unhealthy") until it re-registers or is evicted.
    view = registry.get_worker("w1", now=T0 + 100)
    assert view is not None and view.state is HealthState.UNVERIFIED and not view.is_healthy
    assert {e.worker_id for e in registry.cleanup_stale(now=T0 + 121)} == {"w1", "w2"}


def test_restore_drops_records_past_evict() -> None:
    registry = CapabilityRegistry()
    records = records_at("old", last_heartbeat=T0) + records_at("new", last_heartbeat=T0 + 100)
    assert registry.restore(records, now=T0 + 120.5) == 1
    assert [v.worker_id for v in registry.workers(now=T0 + 120.5)] == ["new"]


def test_restore_and_import_take_a_heartbeat_from_the_future_as_now() -> None:
    far = T0 + 1e12  # a clock that was far ahead; iso_utc could not even print it
    registry = CapabilityRegistry()
    assert registry.restore(records_at("w1", last_heartbeat=far), now=T0) == 1
    remote = registry_with("w2", now=far)
    [event] = registry.import_remote_state("b", remote.export_state(), now=T0)
    assert isinstance(event, WorkerImported) and event.last_heartbeat == T0
    assert [v.last_heartbeat for v in registry.workers(now=T0)] == [T0, T0]
    assert routes(registry, 1, now=T0 + 60.5) == [None]
    assert {e.worker_id for e in registry.cleanup_stale(now=T0 + 121)} == {"w1", "w2"}


def test_heartbeat_of_unverified_raises_then_re_registration_verifies() -> None:
    registry = CapabilityRegistry()
    registry.restore(records_at("w1", last_heartbeat=T0), now=T0)
    with pytest.raises(WorkerNotRegistered):
        registry.heartbeat("w1", now=T0 + 5)
    assert state_of(registry, "w1", T0 + 5) is HealthState.UNVERIFIED
    [event] = registry.register("w1", "https://w1:9443", [capability()], now=T0 + 6)
    assert isinstance(event, WorkerRegistered) and event.replaced
    assert state_of(registry, "w1", T0 + 6) is HealthState.HEALTHY
    assert registry.heartbeat("w1", now=T0 + 7) == (HeartbeatReceived("w1", T0 + 7),)


# ------------------------------------------------------------ re-registration


def test_re_registration_replaces_url_and_capabilities_atomically() -> None:
    registry = CapabilityRegistry()
    registry.register(
        "w1", "https://old:1", [capability("a"), capability("b", version="1.0.0")], now=T0
    )
    registry.register("w2", "https://w2:1", [capability("a")], now=T0)
    [event] = registry.register(
        "w1", "https://new:2", [capability("b", version="2.0.0"), capability("c")], now=T0 + 1
    )
    assert event == WorkerRegistered(
        "w1",
        "https://new:2",
        (capability("b", version="2.0.0"), capability("c")),
        T0 + 1,
        replaced=True,
        revision=3,
    )
    # Removed capability: no longer routes to w1.
    assert routes(registry, 4, now=T0 + 1, name="a") == ["w2"] * 4
    assert registry.route("classify", "b", now=T0 + 1) == WorkerEndpoint(
        "w1", "https://new:2", "2.0.0"
    )
    assert registry.get_workers_for_capability("classify:a") == [
        WorkerEndpoint("w2", "https://w2:1", "1.0.0")
    ]
    assert registry.get_workers_for_capability("classify:c") == [
        WorkerEndpoint("w1", "https://new:2", "1.0.0")
    ]
    # Registration order is kept.
    assert [v.worker_id for v in registry.workers(now=T0 + 1)] == ["w1", "w2"]


def test_invalid_re_registration_changes_nothing() -> None:
    registry = registry_with("w1")
    before = registry.export_state()
    with pytest.raises(ValidationError):
        registry.register("w1", "ftp://nope", [capability("x")], now=T0 + 1)
    with pytest.raises(ValidationError) as caught:
        registry.register("w1", "https://w1:1", [capability("x"), capability("x")], now=T0 + 1)
    assert [p.path for p in caught.value.problems] == ["capabilities[1]"]
    with pytest.raises(ValidationError):
        registry.register("w1", "https://w1:1", [], now=T0 + 1)
    assert registry.export_state() == before
    assert routed(registry, T0 + 1) == "w1"


def test_re_registration_keeps_the_rotation_going() -> None:
    registry = registry_with("w1", "w2", "w3")
    assert routes(registry, 2, now=T0) == ["w1", "w2"]
    registry.register("w2", "https://w2:9", [capability()], now=T0)
    assert routes(registry, 6, now=T0) == ["w3", "w1", "w2", "w3", "w1", "w2"]


# --------------------------------------------------------------------- routing


def test_round_robin_across_three_workers() -> None:
    registry = registry_with("w1", "w2", "w3")
    assert routes(registry, 7, now=T0) == ["w1", "w2", "w3", "w1", "w2", "w3", "w1"]


@pytest.mark.parametrize("workers", [1, 2, 3, 5, 8])
def test_round_robin_is_fair_over_any_window(workers: int) -> None:
    registry = registry_with(*(f"w{i}" for i in range(workers)))
    answers = routes(registry, 5 * workers + 3, now=T0)
    for start in range(len(answers)):
        for length in range(1, len(answers) - start + 1):
            window = answers[start : start + length]
            counts = [window.count(f"w{i}") for i in range(workers)]
            assert min(counts) >= length // workers
            assert max(counts) <= -(-length // workers)


def test_a_silent_worker_is_skipped_at_most_once_then_leaves_the_rotation() -> None:
    registry = registry_with("w1", "w2", "w3")
    now = T0 + 30
    for worker in ("w1", "w3"):
        registry.heartbeat(worker, now=now)
    now = T0 + 61  # w2 silent for 61 s; no sweep has run
    assert routes(registry, 4, now=now) == ["w1", "w3", "w1", "w3"]
    assert routes(registry, 4, now=now) == ["w1", "w3", "w1", "w3"]
    registry.heartbeat("w2", now=now)
    assert sorted(routes(registry, 3, now=now)) == ["w1", "w2", "w3"]


def test_route_is_correct_without_any_sweep() -> None:
    registry = CapabilityRegistry()
    for index in range(5):
        registry.register(f"w{index}", f"https://w{index}:1", [capability()], now=T0 + index)
    # At T0 + 62.5, w0..w2 are silent for more than 60 s; w3 and w4 are not.
    assert routes(registry, 6, now=T0 + 62.5) == ["w3", "w4"] * 3
    assert routes(registry, 2, now=T0 + 64.5) == [None, None]


def test_a_pair_no_worker_offers_is_unknown_not_unavailable() -> None:
    registry = registry_with("w1")
    for verb, name in [("classify", "other"), ("other", "image.classify")]:
        with pytest.raises(UnknownCapability) as raised:
            registry.route(verb, name, now=T0)
        assert (raised.value.verb, raised.value.capability) == (verb, name)
        assert (raised.value.code, raised.value.status_hint) == ("unknown_capability", 404)


def test_a_known_pair_without_a_routable_worker_is_none() -> None:
    registry = registry_with("w1")
    # Silent past unhealthy_after, still registered: the pair is known.
    assert registry.route(*KEY, now=T0 + 61) is None
    registry.cleanup_stale(now=T0 + 61)
    assert registry.route(*KEY, now=T0 + 61) is None
    # Heard again: routable again.
    registry.heartbeat("w1", now=T0 + 62)
    assert routes(registry, 1, now=T0 + 62) == ["w1"]
    # Its last worker gone, the pair is unknown.
    registry.deregister("w1", now=T0 + 63)
    assert routes(registry, 1, now=T0 + 63) == [UNKNOWN]


def test_route_returns_the_matched_capability_version() -> None:
    registry = CapabilityRegistry()
    registry.register(
        "w1", "https://w1:1", [capability("a", version="1.2.3"), capability("b")], now=T0
    )
    assert registry.route("classify", "a", now=T0) == WorkerEndpoint("w1", "https://w1:1", "1.2.3")
    assert registry.route("classify", "b", now=T0) == WorkerEndpoint("w1", "https://w1:1", "1.0.0")


def test_many_silent_workers_leave_the_ring_and_it_stays_compact() -> None:
    registry = registry_with(*(f"w{i}" for i in range(100)))
    for index in range(0, 100, 10):
        registry.heartbeat(f"w{index}", now=T0 + 30)
    now = T0 + 61
    expected = [f"w{i}" for i in range(0, 100, 10)]
    # The eleventh route walks past w91..w99: every silent worker was skipped once.
    assert routes(registry, 11, now=now) == [*expected, "w0"]
    assert routes(registry, 20, now=now) == expected[1:] + expected + expected[:1]


# -------------------------------------------------------------------- deadlines


def test_next_deadline() -> None:
    registry = CapabilityRegistry()
    assert registry.next_deadline() is None
    registry.register("w1", "https://w1:1", [capability()], now=T0)
    deadline = registry.next_deadline()
    assert deadline == T0 + 60
    # Nothing changes at the deadline itself, only strictly after it.
    assert registry.cleanup_stale(now=deadline) == ()
    assert routed(registry, deadline) == "w1"
    assert routed(registry, deadline + 0.001) is None
    # A sweep past it says the worker is unhealthy; the next deadline is the eviction.
    assert [type(e) for e in registry.cleanup_stale(now=deadline + 0.001)] == [WorkerUnhealthy]
    assert registry.next_deadline() == T0 + 120
    assert registry.cleanup_stale(now=T0 + 120) == ()
    assert len(registry.cleanup_stale(now=T0 + 120.001)) == 1


def test_next_deadline_is_early_never_late_after_a_heartbeat() -> None:
    registry = registry_with("w1")
    registry.heartbeat("w1", now=T0 + 50)
    deadline = registry.next_deadline()
    assert deadline is not None and deadline <= T0 + 110
    # Waking at the early deadline and sweeping moves it to the true one.
    assert registry.cleanup_stale(now=deadline + 0.001) == ()
    assert registry.next_deadline() == T0 + 110


def test_next_deadline_of_the_soonest_worker() -> None:
    registry = CapabilityRegistry()
    registry.register("late", "https://l:1", [capability()], now=T0 + 10)
    registry.register("early", "https://e:1", [capability()], now=T0)
    assert registry.next_deadline() == T0 + 60


# --------------------------------------------------------------------- cleanup


def test_cleanup_evicts_exactly_the_stale_ones() -> None:
    registry = CapabilityRegistry()
    beats = {"a": 0.0, "b": 5.0, "c": 10.0, "d": 20.0, "e": 30.0}
    for worker_id in beats:
        registry.register(worker_id, f"https://{worker_id}:1", [capability()], now=T0)
    for worker_id, at in beats.items():
        if at:
            registry.heartbeat(worker_id, now=T0 + at)
    registry.cleanup_stale(now=T0 + 70)  # the unroutable deadlines pass first
    now = T0 + 130.5  # silent > 120: a (130.5), b (125.5), c (120.5)
    events = [e for e in registry.cleanup_stale(now=now) if isinstance(e, WorkerEvicted)]
    assert sorted((e.worker_id, e.at, e.last_heartbeat) for e in events) == [
        ("a", now, T0),
        ("b", now, T0 + 5),
        ("c", now, T0 + 10),
    ]
    assert [v.worker_id for v in registry.workers(now=now)] == ["d", "e"]
    assert registry.get_workers_for_capability("classify:image.classify") == [
        WorkerEndpoint("d", "https://d:1", "1.0.0"),
        WorkerEndpoint("e", "https://e:1", "1.0.0"),
    ]
    assert registry.cleanup_stale(now=now) == ()


def test_cleanup_in_one_jump_past_evict() -> None:
    registry = registry_with("w1", "w2")
    registry.heartbeat("w2", now=T0 + 100)
    events = registry.cleanup_stale(now=T0 + 200)
    assert [e.worker_id for e in events if isinstance(e, WorkerEvicted)] == ["w1"]
    assert "w2" in registry


def test_evicted_capability_disappears_from_listings() -> None:
    registry = registry_with("w1")
    registry.cleanup_stale(now=T0 + 121)
    assert registry.get_all_capabilities(now=T0 + 121) == []
    assert registry.get_workers_for_capability("classify:image.classify") == []
    assert routes(registry, 1, now=T0 + 121) == [UNKNOWN]


# -------------------------------------------------------------------- deregister


def test_deregister() -> None:
    registry = registry_with("w1", "w2")
    assert registry.deregister("w1", now=T0 + 1) == (WorkerDeregistered("w1", T0 + 1, revision=3),)
    assert routes(registry, 2, now=T0 + 1) == ["w2", "w2"]
    assert [v.worker_id for v in registry.workers(now=T0 + 1)] == ["w2"]
    with pytest.raises(WorkerNotRegistered):
        registry.deregister("w1", now=T0 + 2)
    with pytest.raises(WorkerNotRegistered):
        registry.heartbeat("w1", now=T0 + 2)


# ---------------------------------------------------------------------- listings


def test_listings() -> None:
    registry = CapabilityRegistry()
    registry.register(
        "w1", "https://w1:1", [capability("a"), capability("b", version="2.0.0")], now=T0
    )
    registry.register("w2", "https://w2:1", [capability("b")], now=T0 + 30)
    registry.register("w3", "https://w3:1", [capability("b", version="2.0.0")], now=T0 + 30)
    now = T0 + 61  # w1 unhealthy
    assert registry.counts(now=now) == (3, 2)
    assert registry.get_all_capabilities(now=now) == [
        CapabilityView("classify", "a", "1.0.0", ("w1",), ()),
        CapabilityView("classify", "b", "1.0.0", ("w2",), ("w2",)),
        CapabilityView("classify", "b", "2.0.0", ("w1", "w3"), ("w3",)),
    ]
    views = registry.workers(now=now)
    assert [(v.worker_id, v.state, v.is_healthy) for v in views] == [
        ("w1", HealthState.UNHEALTHY, False),
        ("w2", HealthState.HEALTHY, True),
        ("w3", HealthState.HEALTHY, True),
    ]
    assert views[0].capabilities == (capability("a"), capability("b", version="2.0.0"))
    assert len(registry) == 3
    with pytest.raises(ValidationError):
        registry.get_workers_for_capability("no-colon")


def test_equal_capabilities_are_stored_once_but_keep_their_own_types() -> None:
    registry = CapabilityRegistry()
    registry.register("w1", "https://w1:1", [capability(constraints={"n": 1})], now=T0)
    registry.register("w2", "https://w2:1", [capability(constraints={"n": 1})], now=T0)
    registry.register("w3", "https://w3:1", [capability(constraints={"n": 1.0})], now=T0)
    registry.register("w4", "https://w4:1", [capability(constraints={"n": True})], now=T0)
    records = {r.worker_id: r for r in registry.records()}
    assert records["w1"].capabilities[0] is records["w2"].capabilities[0]
    snapshot = json.loads(json.dumps(registry.export_state()))
    constraints = [w["capabilities"][0]["constraints"]["n"] for w in snapshot["workers"]]
    assert [type(n) for n in constraints] == [int, int, float, bool]


# ---------------------------------------------------------------- export/import


def test_export_is_versioned_and_json_safe() -> None:
    registry = registry_with("w1", "w2")
    registry.register(
        "w3",
        "https://w3:1",
        [capability(slo={"availability": 0.99}, required_capabilities=["a:b"])],
        now=T0,
    )
    state = registry.export_state()
    text = json.dumps(state, allow_nan=False)
    assert json.loads(text) == state
    assert state["format_version"] == STATE_FORMAT_VERSION
    assert [w["worker_id"] for w in state["workers"]] == ["w1", "w2", "w3"]
    assert state["workers"][0]["last_heartbeat"] == T0
    assert state["workers"][0]["verified"] is True


def test_importing_your_own_export_is_a_no_op() -> None:
    registry = registry_with("w1", "w2")
    registry.heartbeat("w2", now=T0 + 10)
    state = json.loads(json.dumps(registry.export_state()))
    before = registry.records()
    assert registry.import_remote_state("self", state, now=T0 + 20) == ()
    assert registry.records() == before
    assert state_of(registry, "w1", T0 + 20) is HealthState.HEALTHY


def test_import_keeps_the_newest_heartbeat_per_worker() -> None:
    local = registry_with("w1", "w2")
    remote = CapabilityRegistry()
    remote.register("w1", "https://moved:1", [capability()], now=T0 + 10)  # newer
    remote.register("w3", "https://w3:1", [capability()], now=T0 + 10)  # new here
    local.heartbeat("w2", now=T0 + 20)
    remote.register("w2", "https://stale:1", [capability()], now=T0 + 15)  # older
    events = local.import_remote_state("ctl-b", remote.export_state(), now=T0 + 20)
    assert events == (
        WorkerImported("w1", "https://moved:1", (capability(),), T0 + 10, "ctl-b", revision=3),
        WorkerImported("w3", "https://w3:1", (capability(),), T0 + 10, "ctl-b", revision=4),
    )
    views = {v.worker_id: v for v in local.workers(now=T0 + 20)}
    assert views["w1"].worker_url == "https://moved:1"
    assert views["w1"].state is HealthState.UNVERIFIED
    assert views["w2"].worker_url == "https://w2:8443"
    assert views["w2"].state is HealthState.HEALTHY
    assert views["w3"].state is HealthState.UNVERIFIED
    assert sorted(routes(local, 3, now=T0 + 20)) == ["w1", "w2", "w3"]
    # An imported worker heartbeating here must register here first.
    with pytest.raises(WorkerNotRegistered):
        local.heartbeat("w3", now=T0 + 21)


def test_import_never_resurrects_a_worker_deregistered_here_later() -> None:
    remote = registry_with("w1", now=T0 + 10)
    local = registry_with("w1", now=T0)
    local.deregister("w1", now=T0 + 20)
    assert local.import_remote_state("b", remote.export_state(), now=T0 + 30) == ()
    assert "w1" not in local
    # A remote heartbeat newer than the deregistration is news: imported.
    remote.heartbeat("w1", now=T0 + 25)
    [event] = local.import_remote_state("b", remote.export_state(), now=T0 + 30)
    assert isinstance(event, WorkerImported) and event.last_heartbeat == T0 + 25


def test_import_ignores_records_past_evict() -> None:
    remote = registry_with("w1")
    local = CapabilityRegistry()
    assert local.import_remote_state("b", remote.export_state(), now=T0 + 120.5) == ()
    assert len(local) == 0


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda s: s.update(format_version=2), "format_version"),
        (lambda s: s.update(format_version=True), "format_version"),
        (lambda s: s.update(format_version="1"), "format_version"),
        (lambda s: s.pop("format_version"), "format_version"),
        (lambda s: s.pop("workers"), "workers"),
        (lambda s: s.update(extra=1), "extra"),
        (lambda s: s.update(workers={}), "workers"),
        (lambda s: s["workers"][1].update(last_heartbeat="soon"), "workers[1].last_heartbeat"),
        (lambda s: s["workers"][1].update(worker_url="nope"), "workers[1].worker_url"),
        (lambda s: s["workers"][1].pop("capabilities"), "workers[1].capabilities"),
        (
            lambda s: s["workers"][1]["capabilities"][0].update(max_concurrency=0),
            "workers[1].capabilities[0].max_concurrency",
        ),
    ],
)
def test_malformed_snapshot_raises_and_changes_nothing(mutate: Any, path: str) -> None:
    remote = registry_with("w8", "w9", now=T0 + 5)
    state = json.loads(json.dumps(remote.export_state()))
    mutate(state)
    local = registry_with("w1")
    before = local.export_state()
    with pytest.raises(ValidationError) as caught:
        local.import_remote_state("b", state, now=T0 + 6)
    assert path in [p.path for p in caught.value.problems]
    assert local.export_state() == before


@pytest.mark.parametrize("state", [None, [], "state", 1])
def test_snapshot_must_be_an_object(state: Any) -> None:
    registry = registry_with("w1")
    with pytest.raises(ValidationError):
        registry.import_remote_state("b", state, now=T0)
    assert len(registry) == 1


# ------------------------------------------------------------------- identity


def test_a_restart_counts_heartbeats_from_a_clock_that_was_ahead_as_now() -> None:
    # The journal was written an hour ahead of the restarted service's clock.
    registry = registry_with("w1", now=T0 + 3600)
    registry.restart(now=T0)
    assert registry.get_worker("w1", now=T0).last_heartbeat == T0
    policy = registry.policy
    assert routes(registry, 1, now=T0 + policy.unhealthy_after) == ["w1"]
    assert routes(registry, 1, now=T0 + policy.unhealthy_after + 1) == [None]
    events = registry.cleanup_stale(now=T0 + policy.evict_after + 1)
    assert [type(event).__name__ for event in events] == ["WorkerUnhealthy", "WorkerEvicted"]
    # Times not ahead of it are kept as they were.
    registry = registry_with("w1", now=T0 - 10)
    registry.restart(now=T0)
    assert registry.get_worker("w1", now=T0).last_heartbeat == T0 - 10
    with pytest.raises(ValidationError):
        registry.restart(now=math.nan)


DOMAIN = "crank.local"


def test_authorize_worker() -> None:
    authorize_worker(None, "w1", trust_domain=DOMAIN)  # no identities, no checks
    authorize_worker("spiffe://crank.local/worker/w1", "w1", trust_domain=DOMAIN)
    authorize_worker("spiffe://prod.example/worker/w1", "w1", trust_domain="prod.example")
    refused = {
        "spiffe://crank.local/client/w1": "may not act on worker 'w1': it is a client's",
        "spiffe://crank.local/worker/w2": "may not act on worker 'w1': it is 'w2'",
        "spiffe://crank.local/worker/w1x": "may not act on worker 'w1': it is 'w1x'",
        # Only exactly spiffe://DOMAIN/worker/NAME: not another domain, not a longer path.
        "spiffe://evil.local/worker/w1": "trust domain 'evil.local' is not the trusted",
        "spiffe://crank.local/client/gw/worker/w1": "path '/client/gw/worker/w1' is not",
        "spiffe://crank.local/ns/prod/worker/w1": "path '/ns/prod/worker/w1' is not",
        "spiffe://other.domain/w1": "trust domain 'other.domain'",
        "https://crank.local/worker/w1": "not a SPIFFE ID",
        "spiffe://crank.local": "its path '' is not /worker/NAME or /client/NAME",
        "spiffe://w1": "trust domain 'w1'",
        "": "not a SPIFFE ID",
    }
    for identity, reason in refused.items():
        with pytest.raises(Forbidden) as caught:
            authorize_worker(identity, "w1", trust_domain=DOMAIN)
        assert (caught.value.code, caught.value.status_hint) == ("forbidden", 403)
        assert caught.value.identity == identity and caught.value.worker_id == "w1"
        assert reason in str(caught.value), (identity, str(caught.value))
    # The trust domain is the one given, not a default.
    with pytest.raises(
        Forbidden, match=re.escape("'crank.local' is not the trusted 'prod.example'")
    ):
        authorize_worker("spiffe://crank.local/worker/w1", "w1", trust_domain="prod.example")
    # Under mutual TLS a caller without an identity acts on no worker record.
    authorize_worker("spiffe://crank.local/worker/w1", "w1", trust_domain=DOMAIN, required=True)
    with pytest.raises(Forbidden, match="a client certificate with a SPIFFE ID is required"):
        authorize_worker(None, "w1", trust_domain=DOMAIN, required=True)


def test_worker_name_of() -> None:
    assert worker_name_of("spiffe://crank.local/worker/w1", DOMAIN) == "w1"
    assert worker_name_of("spiffe://other.example/worker/w1", "other.example") == "w1"
    for not_a_worker in (
        "spiffe://crank.local/ns/a/worker/w1",
        "spiffe://evil.local/worker/w1",
        "spiffe://crank.local/w1",
        "spiffe://crank.local/client/w1",
        "spiffe://crank.local/worker/",
        "spiffe://crank.local/worker/w1/",
        "spiffe://crank.local/worker/..",
        "spiffe://crank.local/worker/w%31",
        "spiffe://crank.local",
        "spiffe://crank.local/",
        "http://crank.local/w1",
        "SPIFFE://crank.local/worker/w1",
    ):
        assert worker_name_of(not_a_worker, DOMAIN) is None, not_a_worker


def test_identity_problem_and_trust_domains() -> None:
    assert identity_problem("spiffe://crank.local/client/gw", DOMAIN) is None
    assert identity_problem("spiffe://crank.local/worker/w1", DOMAIN) is None
    assert identity_problem("spiffe://crank.local/admin/w1", DOMAIN) == (
        "its path '/admin/w1' is not /worker/NAME or /client/NAME"
    )
    assert is_trust_domain("crank.local") and is_trust_domain("prod-1.example_x")
    for bad in ("", "Crank.local", "crank.local/x", "a b", None, 1, "x" * 256):
        assert not is_trust_domain(bad), bad


def test_capabilities_too_deep_to_compare_are_kept_unshared() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(5_000):
        node["x"] = {}
        node = node["x"]
    registry = CapabilityRegistry()
    registry.register("w1", "https://w1:1", [capability(input_schema=deep)], now=T0)
    registry.register("w2", "https://w2:1", [capability(input_schema=deep)], now=T0)
    assert sorted(routes(registry, 2, now=T0)) == ["w1", "w2"]


def test_members_of_a_capability_share_its_stored_key() -> None:
    """Each registration brings its own verb and name strings; the registry keeps none of them.

    A member refers to the capability's one stored ``(verb, name)`` tuple,
    whose strings are those of the stored (shared) value.
    """

    def wire_capability() -> CapabilitySchema:
        # Decoded from JSON, as a request's: strings of its own, equal to the others'.
        return structure(json.loads(json.dumps(capability_payload())), CapabilitySchema)

    registry = CapabilityRegistry()
    for worker_id in ("w1", "w2"):
        registry.register(worker_id, f"https://{worker_id}:1", [wire_capability()], now=T0)
    [first], [second] = (registry._workers[w].members for w in ("w1", "w2"))
    stored = registry._workers["w2"].capabilities[0]
    assert first.key is second.key
    assert first.key[0] is stored.verb and first.key[1] is stored.name
    # The first to register leaves; a newcomer and a re-registration still share the key.
    registry.deregister("w1", now=T0)
    registry.register("w3", "https://w3:1", [wire_capability()], now=T0)
    registry.register("w2", "https://w2:2", [wire_capability()], now=T0)
    [third], [again] = (registry._workers[w].members for w in ("w3", "w2"))
    assert third.key is again.key is second.key
    # Once every worker has left, the next registration stores its own key.
    for worker_id in ("w2", "w3"):
        registry.deregister(worker_id, now=T0)
    given = wire_capability()
    registry.register("w4", "https://w4:1", [given], now=T0)
    [fourth] = registry._workers["w4"].members
    assert fourth.key is not second.key
    assert fourth.key[0] is given.verb and fourth.key[1] is given.name


def test_heartbeat_events_equal_the_constructed_ones() -> None:
    registry = registry_with("w1")
    [event] = registry.heartbeat("w1", now=T0 + 1.5)
    assert type(event) is HeartbeatReceived
    assert event == HeartbeatReceived("w1", T0 + 1.5)
    assert hash(event) == hash(HeartbeatReceived("w1", T0 + 1.5))
    assert (event.worker_id, event.at) == ("w1", T0 + 1.5)
    with pytest.raises(AttributeError):
        event.at = 0.0  # type: ignore[misc]
