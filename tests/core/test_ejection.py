"""Outlier ejection in the core, in virtual time: failures eject, the sweep restores, caps hold."""

from __future__ import annotations

import pytest

from crank_registry import (
    CapabilityRegistry,
    EjectionSettings,
    Event,
    HealthPolicy,
    HealthState,
    RouteOptions,
    ValidationError,
    WorkerEjected,
    WorkerNotRegistered,
    WorkerRestored,
    WorkerState,
    encode_event,
    encode_snapshot,
    replay,
)
from tests.builders import capability
from tests.core.helpers import T0, routes

# Long health timings: the workers stay healthy through ejections of minutes.
POLICY = HealthPolicy(heartbeat_interval=30.0, unhealthy_after=10_000.0, evict_after=20_000.0)
VERB, NAME = "classify", "image.classify"


def fleet(
    count: int, *, after_failures: int = 5, max_ejected_percent: float = 10.0
) -> CapabilityRegistry:
    registry = CapabilityRegistry(
        POLICY,
        ejection=EjectionSettings(
            after_failures=after_failures, max_ejected_percent=max_ejected_percent
        ),
    )
    for n in range(count):
        registry.register(f"w{n}", f"https://w{n}:8443", [capability()], now=T0)
    return registry


def fail(
    registry: CapabilityRegistry, worker_id: str, times: int, now: float
) -> list[WorkerEjected]:
    """``times`` failed calls to ``worker_id`` at ``now``; the ejections they caused."""
    events: list[Event] = []
    for _ in range(times):
        events += registry.report_outcome(worker_id, VERB, NAME, ok=False, now=now)
    ejections = [event for event in events if isinstance(event, WorkerEjected)]
    assert ejections == events  # a failure causes an ejection or nothing
    return ejections


def test_ejected_after_n_failures_in_a_row_and_no_route_goes_to_it() -> None:
    registry = fleet(3)
    now = T0 + 1
    assert fail(registry, "w1", 4, now) == []
    (event,) = fail(registry, "w1", 1, now)
    assert isinstance(event, WorkerEjected)
    assert (event.worker_id, event.until, event.ejections) == ("w1", now + 30, 1)
    assert (event.verb, event.capability, event.revision) == (VERB, NAME, 4)
    assert set(routes(registry, 6, now=now)) == {"w0", "w2"}
    view = registry.get_worker("w1", now=now)
    assert view is not None
    assert (view.listed_state, view.state, view.ejected_until) == (
        WorkerState.EJECTED,
        HealthState.HEALTHY,
        now + 30,
    )
    assert not view.is_healthy
    assert registry.ejected_count == 1
    assert registry.state_counts(now=now)[WorkerState.EJECTED] == 1
    assert registry.state_counts(now=now)[WorkerState.HEALTHY] == 2


def test_a_success_resets_the_failure_count() -> None:
    registry = fleet(3)
    now = T0 + 1
    assert fail(registry, "w1", 4, now) == []
    assert registry.report_outcome("w1", VERB, NAME, ok=True, now=now) == ()
    assert fail(registry, "w1", 4, now) == []
    assert len(fail(registry, "w1", 1, now)) == 1


def test_the_sweep_restores_at_the_deadline() -> None:
    registry = fleet(3)
    now = T0 + 1
    fail(registry, "w1", 5, now)
    deadline = registry.next_deadline()
    assert deadline is not None and deadline <= now + 30
    assert registry.cleanup_stale(now=now + 29.9) == ()
    assert "w1" not in routes(registry, 6, now=now + 29.9)
    (restored,) = registry.cleanup_stale(now=now + 30)
    assert isinstance(restored, WorkerRestored)
    assert (restored.worker_id, restored.until) == ("w1", now + 30)
    assert set(routes(registry, 6, now=now + 30)) == {"w0", "w1", "w2"}
    view = registry.get_worker("w1", now=now + 30)
    assert view is not None and view.state is HealthState.HEALTHY and view.ejected_until is None
    assert registry.cleanup_stale(now=now + 31) == ()  # its heap entry is spent


def ejection_lengths(registry: CapabilityRegistry, count: int, start: float) -> list[float]:
    """Eject w1 ``count`` times in a row, each right after the last ended; each one's length."""
    now = start
    lengths = []
    for _ in range(count):
        (event,) = fail(registry, "w1", 5, now)
        assert isinstance(event, WorkerEjected)
        lengths.append(event.until - event.at)
        now = event.until
        assert len(registry.cleanup_stale(now=now)) == 1
    return lengths


def test_each_ejection_of_a_streak_lasts_longer_up_to_300_seconds() -> None:
    registry = fleet(3)
    assert ejection_lengths(registry, 12, T0 + 1) == [
        30.0,
        60.0,
        90.0,
        120.0,
        150.0,
        180.0,
        210.0,
        240.0,
        270.0,
        300.0,
        300.0,
        300.0,
    ]


def test_the_streak_starts_again_after_300_seconds_without_an_ejection() -> None:
    registry = fleet(3)
    now = T0 + 1
    assert ejection_lengths(registry, 2, now) == [30.0, 60.0]
    ended = now + 90
    # 299 s after the last one ended: the streak goes on.
    (third,) = fail(registry, "w1", 5, ended + 299)
    assert isinstance(third, WorkerEjected) and third.ejections == 3
    assert third.until - third.at == 90.0
    registry.cleanup_stale(now=third.until)
    # 300 s after: it starts again.
    (fourth,) = fail(registry, "w1", 5, third.until + 300)
    assert isinstance(fourth, WorkerEjected) and fourth.ejections == 1
    assert fourth.until - fourth.at == 30.0


def test_at_most_the_capped_share_is_ejected_at_once() -> None:
    registry = fleet(20)
    now = T0 + 1
    ejected = []
    for _ in range(5):  # every worker fails its calls, interleaved
        for n in range(20):
            ejected += fail(registry, f"w{n}", 1, now)
    assert [event.worker_id for event in ejected] == ["w0", "w1"]  # 10 % of 20
    assert registry.ejected_count == 2
    # They keep failing: still two.
    for n in range(20):
        assert fail(registry, f"w{n}", 3, now + 1) == []
    assert registry.ejected_count == 2
    # Once those two are back, the next failures eject two others.
    restored = registry.cleanup_stale(now=now + 30)
    assert [(type(e), e.worker_id) for e in restored if isinstance(e, WorkerRestored)] == [
        (WorkerRestored, "w0"),
        (WorkerRestored, "w1"),
    ]
    assert len(restored) == 2
    again = [event for n in range(2, 20) for event in fail(registry, f"w{n}", 1, now + 30)]
    assert [event.worker_id for event in again] == ["w2", "w3"]


def test_at_least_one_worker_may_be_ejected_and_zero_failures_turns_it_off() -> None:
    registry = fleet(3, max_ejected_percent=0.0)
    assert len(fail(registry, "w0", 5, T0 + 1)) == 1
    assert fail(registry, "w1", 5, T0 + 1) == []
    off = fleet(3, after_failures=0)
    assert fail(off, "w0", 50, T0 + 1) == []
    with pytest.raises(ValidationError, match="after_failures"):
        EjectionSettings(after_failures=-1)
    with pytest.raises(ValidationError, match="max_ejected_percent"):
        EjectionSettings(max_ejected_percent=101)


def test_neither_a_heartbeat_nor_a_registration_ends_an_ejection() -> None:
    registry = fleet(3)
    now = T0 + 1
    (event,) = fail(registry, "w1", 5, now)
    registry.heartbeat("w1", now=now + 5)
    assert registry.ejected_until("w1") == event.until
    registry.register("w1", "https://w1-new:8443", [capability()], now=now + 6)
    assert registry.ejected_until("w1") == event.until
    assert "w1" not in routes(registry, 6, now=now + 6)
    # Its ejection still ends at its deadline, and the streak goes on.
    (restored,) = registry.cleanup_stale(now=event.until)
    assert isinstance(restored, WorkerRestored)
    (second,) = fail(registry, "w1", 5, event.until + 1)
    assert isinstance(second, WorkerEjected) and second.ejections == 2


def test_a_worker_that_leaves_takes_its_ejection_with_it() -> None:
    registry = fleet(3)
    now = T0 + 1
    fail(registry, "w1", 5, now)
    registry.deregister("w1", now=now + 1)
    assert registry.ejected_count == 0
    assert registry.cleanup_stale(now=now + 30) == ()
    registry.register("w1", "https://w1:8443", [capability()], now=now + 2)
    assert "w1" in routes(registry, 6, now=now + 2)


def test_failures_of_an_ejected_or_unknown_worker_decide_nothing_nor_count() -> None:
    registry = fleet(3, max_ejected_percent=100.0)
    now = T0 + 1
    (event,) = fail(registry, "w1", 5, now)
    assert fail(registry, "w1", 10, now + 1) == []  # calls that were in flight
    assert fail(registry, "nobody", 10, now + 1) == []
    registry.cleanup_stale(now=event.until)
    # Back in routing, it starts from no failure: five more eject it again.
    assert fail(registry, "w1", 4, event.until) == []
    assert len(fail(registry, "w1", 1, event.until)) == 1


def test_explain_says_ejected_after_health() -> None:
    registry = fleet(3)
    now = T0 + 1
    fail(registry, "w1", 5, now)
    endpoint, explanation = registry.explain_route(VERB, NAME, now=now)
    assert endpoint is not None
    assert set(explanation.candidates) == {"w0", "w2"}
    assert [(r.worker_id, r.reason) for r in explanation.removed] == [("w1", "ejected")]
    # An option route filters it alike.
    endpoint = registry.route(VERB, NAME, now=now, options=RouteOptions(exclude=("w0",)))
    assert endpoint is not None and endpoint.worker_id == "w2"
    # Silent too: health comes first.
    later = now + POLICY.unhealthy_after + 1
    registry.heartbeat("w0", now=later)
    _, explanation = registry.explain_route(VERB, NAME, now=later)
    assert ("w1", "unhealthy") in [(r.worker_id, r.reason) for r in explanation.removed]


def test_listings_filter_on_the_listed_state() -> None:
    registry = fleet(3)
    now = T0 + 1
    fail(registry, "w1", 5, now)
    page = registry.workers_page(now=now, limit=None, state=WorkerState.EJECTED)
    assert [view.worker_id for view in page.workers] == ["w1"]
    page = registry.workers_page(now=now, limit=None, state=HealthState.HEALTHY)
    assert [view.worker_id for view in page.workers] == ["w0", "w2"]
    (entry,) = registry.get_all_capabilities(now=now)
    assert entry.healthy_workers == ("w0", "w2")


def twins() -> tuple[CapabilityRegistry, CapabilityRegistry]:
    """Two controllers' replicas of one registry of 3 workers (the cap: one ejected)."""
    first, second = fleet(3), fleet(3)
    assert first.records() == second.records()
    return first, second


def test_the_fold_drops_an_over_cap_ejection_on_every_replica() -> None:
    a, b = twins()
    now = T0 + 1
    # Each controller decides an ejection on its own replica: each is within the cap there.
    fail(a, "w1", 4, now)
    (first,) = a.decide_outcome("w1", VERB, NAME, ok=False, now=now)
    fail(b, "w2", 4, now)
    (second,) = b.decide_outcome("w2", VERB, NAME, ok=False, now=now)
    assert isinstance(first, WorkerEjected) and isinstance(second, WorkerEjected)
    a.discard_pending()
    b.discard_pending()
    # The store orders them: the second one comes after the first.
    second = WorkerEjected(
        second.worker_id,
        second.at,
        second.until,
        second.verb,
        second.capability,
        second.max_ejected_percent,
        second.ejections,
        revision=first.revision + 1,
    )
    follower = CapabilityRegistry(POLICY, routes_by_state=True)
    follower.apply_snapshot(fleet(3).snapshot())
    for replica in (a, b, follower):
        replica.apply(first)
        replica.apply(second)
        assert replica.ejected_until("w1") == first.until
        assert replica.ejected_until("w2") is None
        assert replica.revision == second.revision
        assert replica.ejected_count == 1
    assert a.records() == b.records() == follower.records()
    # A journal of both replays to the same.
    replayed = fleet(3)
    result = replay([encode_event(first), encode_event(second)], replayed)
    assert result.lines_skipped == 0
    assert replayed.records() == a.records()


def test_a_stale_restoration_is_dropped_and_an_absent_worker_refused() -> None:
    registry = fleet(3)
    now = T0 + 1
    (event,) = fail(registry, "w1", 5, now)
    stale = WorkerRestored("w1", now + 30, now + 999, revision=registry.revision + 1)
    registry.apply(stale)
    assert registry.ejected_until("w1") == event.until
    assert registry.revision == stale.revision
    with pytest.raises(WorkerNotRegistered):
        registry.apply(WorkerRestored("nobody", now, now, revision=registry.revision + 1))


def test_a_follower_applies_ejections_and_restorations_without_a_clock() -> None:
    controller = fleet(3)
    follower = CapabilityRegistry(POLICY, routes_by_state=True)
    follower.apply_snapshot(controller.snapshot())
    now = T0 + 1
    events: list[Event] = [*fail(controller, "w1", 5, now)]
    events += controller.cleanup_stale(now=now + 30)
    follower.apply(events[0])
    assert "w1" not in routes(follower, 6, now=now + 1000)
    follower.apply(events[1])
    assert "w1" in routes(follower, 6, now=now + 1000)


def test_a_snapshot_keeps_ejections_and_their_streaks() -> None:
    registry = fleet(3)
    now = T0 + 1
    ejection_lengths(registry, 1, now)
    fail(registry, "w2", 5, now + 40)
    snapshot = registry.snapshot()
    loaded = CapabilityRegistry(POLICY)
    loaded.apply_snapshot(snapshot)
    assert loaded.records() == registry.records()
    assert loaded.ejected_count == 1
    lines = list(encode_snapshot(snapshot, part_size=2))
    replayed = CapabilityRegistry(POLICY)
    assert replay(lines, replayed).lines_skipped == 0
    assert replayed.records() == registry.records()
    # The loaded copies restore w2 at its deadline, and know w1's streak.
    (restored,) = replayed.cleanup_stale(now=now + 70)
    assert isinstance(restored, WorkerRestored) and restored.worker_id == "w2"
    (second,) = fail(replayed, "w1", 5, now + 71)
    assert isinstance(second, WorkerEjected) and second.ejections == 2
