"""Self-preservation in virtual time: entry, exit, the cap, scale-downs, small fleets, restarts.

A fleet heartbeats every ``heartbeat_interval`` while a fake clock
advances; the sweep runs at each step, as the service's sweeper does.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
import pytest

from crank_registry import (
    CapabilityRegistry,
    Event,
    HealthPolicy,
    HealthState,
    SelfPreservationChanged,
    SelfPreservationSettings,
    ValidationError,
    WorkerEvicted,
    WorkerHealthy,
    WorkerState,
    WorkerUnhealthy,
    encode_event,
    encode_snapshot,
    replay,
)
from tests.builders import capability
from tests.core.helpers import T0

POLICY = HealthPolicy(heartbeat_interval=10.0, unhealthy_after=30.0, evict_after=60.0)
STEP = POLICY.heartbeat_interval
# Workers silent for a few windows are still held (unhealthy) when it begins.
LONG_EVICTION = HealthPolicy(heartbeat_interval=10.0, unhealthy_after=30.0, evict_after=300.0)


class Fleet:
    """A registry, its workers, a clock, and every event the sweeps and heartbeats made."""

    def __init__(
        self,
        size: int,
        settings: SelfPreservationSettings | None = None,
        policy: HealthPolicy = POLICY,
    ) -> None:
        self.registry = CapabilityRegistry(policy, self_preservation=settings)
        self.now = T0
        self.alive = [f"w{n}" for n in range(size)]
        self.events: list[Event] = []
        for worker_id in self.alive:
            self.events += self.registry.register(
                worker_id, f"https://{worker_id}:8443", [capability()], now=self.now
            )

    def run(self, seconds: float) -> None:
        """Step the clock an interval at a time: the live workers heartbeat, then a sweep."""
        end = self.now + seconds
        while self.now < end:
            self.now += STEP
            for worker_id in self.alive:
                self.events += self.registry.heartbeat(worker_id, now=self.now)
            self.events += self.registry.cleanup_stale(now=self.now)

    def silence(self, worker_ids: Iterable[str]) -> None:
        silent = set(worker_ids)
        self.alive = [worker_id for worker_id in self.alive if worker_id not in silent]

    def wake(self, worker_ids: Iterable[str]) -> None:
        self.alive += [worker_id for worker_id in worker_ids if worker_id not in self.alive]

    def of(self, kind: type[Event]) -> list[Event]:
        return [event for event in self.events if isinstance(event, kind)]

    def silent_ids(self) -> set[str]:
        """The workers held unhealthy (a snapshot's ``silent``)."""
        return {record.worker_id for record in self.registry.records() if record.silent}

    def preservation(self) -> list[tuple[bool, str]]:
        return [
            (event.active, event.reason)
            for event in self.events
            if isinstance(event, SelfPreservationChanged)
        ]

    def routed(self, count: int) -> set[str]:
        endpoints = [
            self.registry.route("classify", "image.classify", now=self.now) for _ in range(count)
        ]
        return {endpoint.worker_id for endpoint in endpoints if endpoint is not None}


def ids(count: int, start: int = 0) -> list[str]:
    return [f"w{n}" for n in range(start, start + count)]


def test_sixty_percent_silent_enters_and_nothing_is_made_unhealthy_or_evicted() -> None:
    fleet = Fleet(20)
    fleet.run(STEP * 4)  # a window has started
    fleet.silence(ids(12))
    fleet.run(POLICY.evict_after * 1.5)
    assert fleet.preservation() == [(True, "workers_fell_silent")]
    assert fleet.of(WorkerUnhealthy) == fleet.of(WorkerEvicted) == []
    assert fleet.registry.self_preservation is not None
    (entered,) = fleet.of(SelfPreservationChanged)
    assert isinstance(entered, SelfPreservationChanged)
    assert (entered.silent, entered.watched) == (12, 20)
    # Routing continues to the last known workers: the silent ones too.
    assert fleet.routed(40) == set(ids(20))
    assert len(fleet.registry) == 20


def test_listings_show_what_routing_does_while_it_lasts() -> None:
    fleet = Fleet(20)
    fleet.run(STEP * 4)
    fleet.silence(ids(12))
    fleet.run(POLICY.evict_after * 1.5)
    registry, now = fleet.registry, fleet.now
    assert registry.self_preservation is not None
    # Every worker is routed to, so every one is listed routable and healthy...
    views = registry.workers(now=now)
    assert {(view.state, view.is_healthy) for view in views} == {(HealthState.HEALTHY, True)}
    assert registry.get_worker(ids(1)[0], now=now).is_healthy  # type: ignore[union-attr]
    assert registry.counts(now=now) == (20, 20)
    assert registry.state_counts(now=now)[WorkerState.HEALTHY] == 20
    page = registry.workers_page(now=now, limit=None, state=WorkerState.UNHEALTHY)
    assert page.workers == ()
    (entry,) = registry.get_all_capabilities(now=now)
    assert len(entry.healthy_workers) == 20
    # ...and the silent ones' last heartbeats say how long they have been silent.
    silent = {view.worker_id: view.last_heartbeat for view in views if view.worker_id in ids(12)}
    assert max(silent.values()) < now - POLICY.evict_after


def test_forty_percent_silent_is_an_ordinary_loss() -> None:
    fleet = Fleet(20)
    fleet.run(STEP * 4)
    fleet.silence(ids(8))
    fleet.run(POLICY.evict_after * 1.5)
    assert fleet.preservation() == []
    assert {event.worker_id for event in fleet.of(WorkerEvicted)} == set(ids(8))  # type: ignore[attr-defined]
    assert fleet.routed(40) == set(ids(12, 8))


def test_it_ends_when_heartbeats_come_back_without_a_registration() -> None:
    fleet = Fleet(20)
    fleet.run(STEP * 4)
    fleet.silence(ids(12))
    fleet.run(POLICY.evict_after * 1.2)  # past evict_after: held, not evicted
    fleet.wake(ids(12))
    fleet.run(STEP * 2)  # heartbeats answered as usual (no worker_not_registered)
    assert fleet.preservation() == [
        (True, "workers_fell_silent"),
        (False, "heartbeats_returned"),
    ]
    assert fleet.of(WorkerUnhealthy) == fleet.of(WorkerEvicted) == []
    assert fleet.registry.self_preservation is None
    fleet.run(POLICY.evict_after * 2)  # and the fleet is ordinary again
    assert fleet.preservation()[-1] == (False, "heartbeats_returned")
    assert fleet.routed(40) == set(ids(20))


def test_it_ends_after_its_longest_and_the_silent_are_decided_then() -> None:
    fleet = Fleet(20, SelfPreservationSettings(max_duration=100))
    fleet.run(STEP * 4)
    fleet.silence(ids(12))
    fleet.run(300)
    assert fleet.preservation() == [(True, "workers_fell_silent"), (False, "max_duration")]
    (entered, ended) = fleet.of(SelfPreservationChanged)
    assert ended.at - entered.at == pytest.approx(100, abs=STEP)  # type: ignore[attr-defined]
    # Judged after a grace of unhealthy_after, and not counted in the window
    # that started when it ended (it did not start again).
    unhealthy = fleet.of(WorkerUnhealthy)
    grace_end = ended.at + POLICY.unhealthy_after  # type: ignore[attr-defined]
    # (at the first sweep after it: sweeps here come every STEP)
    assert {event.at for event in unhealthy} == {grace_end + STEP}  # type: ignore[attr-defined]
    assert {event.worker_id for event in fleet.of(WorkerEvicted)} == set(ids(12))  # type: ignore[attr-defined]
    assert len(fleet.registry) == 8


def test_late_workers_get_a_grace_when_it_ends() -> None:
    fleet = Fleet(20)
    fleet.run(STEP * 4)
    fleet.silence(ids(12))
    fleet.run(POLICY.evict_after * 1.5)
    fleet.wake(ids(10))  # most come back: it ends
    fleet.run(STEP)
    assert fleet.preservation()[-1] == (False, "heartbeats_returned")
    # The last two, past evict_after, are still answered as registered workers
    # (heartbeat() would raise WorkerNotRegistered) within the grace.
    fleet.wake(ids(2, 10))
    fleet.run(STEP * 2)
    assert fleet.of(WorkerEvicted) == []
    fleet.run(POLICY.evict_after * 2)
    assert len(fleet.registry) == 20 and fleet.routed(40) == set(ids(20))


def test_the_longest_defaults_to_twice_evict_after() -> None:
    fleet = Fleet(20)
    fleet.run(STEP * 4)
    fleet.silence(ids(12))
    fleet.run(POLICY.unhealthy_after + POLICY.evict_after * 2 + 3 * STEP)
    (entered, ended) = fleet.of(SelfPreservationChanged)
    assert ended.at - entered.at == pytest.approx(2 * POLICY.evict_after, abs=STEP)  # type: ignore[attr-defined]
    assert fleet.registry.next_deadline() is not None


def test_a_scale_down_does_not_stick() -> None:
    fleet = Fleet(100)
    fleet.run(STEP * 4)
    for worker_id in ids(90):  # 100 -> 10: deregistrations, not silence
        fleet.events += fleet.registry.deregister(worker_id, now=fleet.now)
    fleet.silence(ids(90))
    fleet.run(POLICY.unhealthy_after * 4)
    assert fleet.preservation() == []
    # The windows since count the 10 live workers: 4 silent of 10 is a loss...
    fleet.silence(ids(4, 90))
    fleet.run(POLICY.evict_after * 1.5)
    assert fleet.preservation() == []
    assert len(fleet.of(WorkerEvicted)) == 4
    # ... and the threshold is theirs: 6 of 10 (were they 100: 6%) starts it.
    fleet2 = Fleet(100)
    fleet2.run(STEP * 4)
    for worker_id in ids(90):
        fleet2.registry.deregister(worker_id, now=fleet2.now)
    fleet2.silence(ids(90))
    fleet2.run(POLICY.unhealthy_after * 4)
    fleet2.silence(ids(6, 90))
    fleet2.run(POLICY.evict_after)
    assert fleet2.preservation() == [(True, "workers_fell_silent")]


def test_a_silent_scale_down_ends_by_the_cap_and_the_survivors_set_the_threshold() -> None:
    # 100 -> 10 by stopping 90 workers without a deregistration (Eureka's sticking
    # case): it starts, ends at its longest, the 90 are evicted, and it is over.
    fleet = Fleet(100)
    fleet.run(STEP * 4)
    fleet.silence(ids(90))
    fleet.run(POLICY.unhealthy_after + 2 * POLICY.evict_after + 2 * POLICY.evict_after)
    assert fleet.preservation() == [(True, "workers_fell_silent"), (False, "max_duration")]
    assert len(fleet.of(WorkerEvicted)) == 90 and len(fleet.registry) == 10
    fleet.run(POLICY.evict_after * 10)
    assert len(fleet.preservation()) == 2  # the 90 gone are never counted again
    # The windows since count the 10 left: 4 silent of them is a loss...
    fleet.silence(ids(4, 90))
    fleet.run(POLICY.evict_after * 1.5)
    assert len(fleet.preservation()) == 2
    assert len(fleet.registry) == 6
    # ... and 6 of 10 (6% of the fleet before) starts it again.
    survivors = Fleet(100)
    survivors.run(STEP * 4)
    survivors.silence(ids(90))
    survivors.run(POLICY.unhealthy_after + 4 * POLICY.evict_after + POLICY.evict_after * 10)
    survivors.silence(ids(6, 90))
    survivors.run(POLICY.evict_after)
    assert survivors.preservation()[2:] == [(True, "workers_fell_silent")]


def test_never_with_fewer_healthy_workers_than_min_workers() -> None:
    fleet = Fleet(9)
    fleet.run(STEP * 4)
    fleet.silence(ids(9))
    fleet.run(POLICY.evict_after * 1.5)
    assert fleet.preservation() == []
    assert len(fleet.registry) == 0
    small = Fleet(4, SelfPreservationSettings(min_workers=4))
    small.run(STEP * 4)
    small.silence(ids(3))
    small.run(POLICY.evict_after)
    assert small.preservation() == [(True, "workers_fell_silent")]


def test_threshold_zero_turns_it_off() -> None:
    fleet = Fleet(20, SelfPreservationSettings(threshold=0))
    fleet.run(STEP * 4)
    fleet.silence(ids(20))
    fleet.run(POLICY.evict_after * 1.5)
    assert fleet.preservation() == []
    assert len(fleet.registry) == 0
    assert fleet.registry._watch.unrouted == {}  # nothing kept to reinstate


def test_a_restart_does_not_inflate_it() -> None:
    restarted = Fleet(20)
    restarted.run(STEP * 4)
    # Down for longer than unhealthy_after: every restored worker is stale.
    restarted.now += POLICY.unhealthy_after * 1.5
    restarted.registry.restart(now=restarted.now)
    restarted.alive = []
    restarted.run(STEP)
    assert restarted.preservation() == []
    assert len(restarted.of(WorkerUnhealthy)) == 20


def test_the_journal_and_snapshots_carry_it_and_a_replica_routes_as_it_began() -> None:
    fleet = Fleet(20)
    fleet.run(STEP * 4)
    fleet.silence(ids(12))
    fleet.run(POLICY.unhealthy_after + 2 * STEP)
    since = fleet.registry.self_preservation
    assert since is not None
    changes, _ = fleet.registry.changes_since(0)
    replica = CapabilityRegistry(POLICY)
    assert replay([encode_event(change) for change in changes], replica).lines_skipped == 0
    assert replica.self_preservation == since
    restored = CapabilityRegistry(POLICY)
    replay(encode_snapshot(fleet.registry.snapshot()), restored)
    assert restored.self_preservation == since
    assert restored.snapshot() == fleet.registry.snapshot()
    # A replica routes to every worker it holds as routable, silent or not.
    routed = [replica.route("classify", "image.classify", now=fleet.now) for _ in range(40)]
    assert {endpoint.worker_id for endpoint in routed if endpoint is not None} == set(ids(20))


def test_the_workers_made_unhealthy_as_the_window_filled_are_reinstated_when_it_begins() -> None:
    fleet = Fleet(20, SelfPreservationSettings(threshold=0.3))
    fleet.run(STEP * 4)
    fleet.silence(ids(4))  # 4 of 20: an ordinary loss, unhealthy
    fleet.run(STEP * 2)
    fleet.silence(ids(6, 4))  # 6 more in the same window: 10 of 20 > 0.3
    fleet.run(POLICY.evict_after)
    assert len(fleet.of(WorkerUnhealthy)) == 4
    assert fleet.preservation() == [(True, "workers_fell_silent")]
    (entered,) = fleet.of(SelfPreservationChanged)
    assert isinstance(entered, SelfPreservationChanged)
    assert [r.worker_id for r in entered.reinstated] == ids(4)
    assert fleet.of(WorkerEvicted) == []  # the first 4 are past evict_after: kept
    assert fleet.routed(40) == set(ids(20))
    fleet.wake(ids(10))
    fleet.run(STEP * 2)
    assert fleet.of(WorkerHealthy) == []  # healthy already: their heartbeats are plain ones
    assert fleet.preservation()[-1] == (False, "heartbeats_returned")


def test_a_heartbeat_of_an_unhealthy_worker_in_self_preservation_makes_it_healthy() -> None:
    # Silent long before it began (more than unhealthy_after): not reinstated.
    fleet = Fleet(20, SelfPreservationSettings(threshold=0.3), policy=LONG_EVICTION)
    fleet.run(STEP * 4)
    fleet.silence(ids(4))
    fleet.run(LONG_EVICTION.unhealthy_after * 3)
    fleet.silence(ids(8, 4))  # 8 of the 16 watched since
    fleet.run(LONG_EVICTION.unhealthy_after * 2)
    assert len(fleet.of(WorkerUnhealthy)) == 4
    assert fleet.preservation() == [(True, "workers_fell_silent")]
    (entered,) = fleet.of(SelfPreservationChanged)
    assert isinstance(entered, SelfPreservationChanged) and entered.reinstated == ()
    assert fleet.routed(40) == set(ids(16, 4))
    fleet.wake(ids(12))
    fleet.run(STEP * 2)
    assert {e.worker_id for e in fleet.of(WorkerHealthy)} == set(ids(4))  # type: ignore[attr-defined]
    assert fleet.preservation()[-1] == (False, "heartbeats_returned")


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"threshold": 1.0}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"max_duration": 0}, "max_duration"),
        ({"min_workers": 0}, "min_workers"),
    ],
)
def test_settings_are_checked(fields: dict[str, float], named: str) -> None:
    with pytest.raises(ValidationError) as raised:
        SelfPreservationSettings(**fields)  # type: ignore[arg-type]
    assert raised.value.problems[0].path == named


def test_a_decided_entry_the_store_refused_is_decided_again() -> None:
    fleet = Fleet(20)
    fleet.run(STEP * 4)
    fleet.silence(ids(12))
    registry = fleet.registry
    decided: list[Event] = []
    while not decided:
        fleet.now += STEP
        for worker_id in fleet.alive:
            registry.heartbeat(worker_id, now=fleet.now)
        decided = list(registry.decide_sweep(now=fleet.now))
    (entered,) = decided
    assert isinstance(entered, SelfPreservationChanged) and entered.active
    assert registry.self_preservation is None  # pending, not applied
    registry.discard_pending()  # the journal refused it: nothing changed
    assert registry.pending == () and registry.self_preservation is None
    (again,) = registry.decide_sweep(now=fleet.now + 0.5)
    assert isinstance(again, SelfPreservationChanged) and again.active
    assert again.revision == entered.revision  # the refused one's revision, reused
    registry.confirm(again.revision)
    assert registry.self_preservation == fleet.now + 0.5


class SpreadFleet:
    """100 workers whose heartbeats are spread over the interval, swept every second.

    Worker ``n`` beats at ``n / size`` of the interval after each multiple
    of it, as real agents started at different moments do: a partition
    silences them one by one, over an interval.
    """

    def __init__(self, size: int, settings: SelfPreservationSettings | None = None) -> None:
        self.size = size
        self.registry = CapabilityRegistry(POLICY, self_preservation=settings)
        self.now = T0
        self.alive = set(ids(size))
        self.events: list[Event] = []
        for worker_id in ids(size):
            self.events += self.registry.register(
                worker_id, f"https://{worker_id}:8443", [capability()], now=self.now
            )

    def run(self, seconds: float, *, until: type[Event] | None = None) -> None:
        """A second at a time: the live workers due beat, then a sweep (stops after ``until``)."""
        for _ in range(int(seconds)):
            self.now += 1.0
            tick = round(self.now - T0) % STEP
            for n in range(self.size):
                worker_id = f"w{n}"
                if worker_id in self.alive and tick == n * STEP // self.size:
                    self.events += self.registry.heartbeat(worker_id, now=self.now)
            swept = self.registry.cleanup_stale(now=self.now)
            self.events += swept
            if until is not None and any(isinstance(event, until) for event in swept):
                return

    def of(self, kind: type[Event]) -> list[Event]:
        return [event for event in self.events if isinstance(event, kind)]

    def routed(self, count: int) -> set[str]:
        endpoints = [
            self.registry.route("classify", "image.classify", now=self.now) for _ in range(count)
        ]
        return {endpoint.worker_id for endpoint in endpoints if endpoint is not None}

    def silent_records(self) -> set[str]:
        """The workers held in a silent state (unhealthy), as a snapshot records them."""
        return {record.worker_id for record in self.registry.records() if record.silent}


def partitioned(offset: int, settings: SelfPreservationSettings | None = None) -> SpreadFleet:
    """A spread fleet cut off ``offset`` seconds into a window, run until it enters."""
    fleet = SpreadFleet(100, settings)
    fleet.run(POLICY.unhealthy_after * 3 + offset)  # windows have started, all beating
    assert fleet.of(WorkerUnhealthy) == []
    fleet.alive = set()  # the partition: no heartbeat arrives from now on
    fleet.run(POLICY.evict_after, until=SelfPreservationChanged)
    return fleet


# Where in a window the partition begins: its silences may straddle two windows.
OFFSETS = [0, 3, 5, 7, 12, 19, 24, 28]


@pytest.mark.parametrize("offset", OFFSETS)
def test_a_spread_partition_reinstates_the_workers_made_unhealthy_before_it_began(
    offset: int,
) -> None:
    fleet = partitioned(offset)
    (entered,) = fleet.of(SelfPreservationChanged)
    assert isinstance(entered, SelfPreservationChanged) and entered.active
    # The silences came one by one: about half were made unhealthy first...
    made_unhealthy = {event.worker_id for event in fleet.of(WorkerUnhealthy)}  # type: ignore[attr-defined]
    assert len(made_unhealthy) >= 30
    # ... and the change that starts it puts every one of them back, as it was.
    assert {r.worker_id for r in entered.reinstated} == made_unhealthy
    assert {r.state for r in entered.reinstated} == {HealthState.HEALTHY}
    # Counted among the watched too when they fell silent in the window before.
    assert entered.watched == 100 and 50 < entered.silent < 100
    # Every worker is routable again; none is held unhealthy, no heartbeat was faked.
    assert fleet.routed(300) == set(ids(100))
    assert fleet.silent_records() == set()
    unhealthy_at = {e.worker_id: e.last_heartbeat for e in fleet.of(WorkerUnhealthy)}  # type: ignore[attr-defined]
    for record in fleet.registry.records():
        if record.worker_id in unhealthy_at:
            assert record.last_heartbeat == unhealthy_at[record.worker_id]
    # While it lasts nobody is made unhealthy or evicted, and routing goes to all.
    fleet.run(POLICY.evict_after * 1.5)
    assert fleet.registry.self_preservation is not None
    assert len(fleet.of(WorkerUnhealthy)) == len(made_unhealthy)
    assert fleet.of(WorkerEvicted) == []
    assert fleet.routed(300) == set(ids(100)) and fleet.silent_records() == set()


def test_after_a_spread_partition_heartbeats_need_no_registration() -> None:
    fleet = partitioned(5)
    fleet.run(POLICY.evict_after * 1.2)  # past evict_after for every worker
    fleet.alive = set(ids(100))
    fleet.run(STEP * 2)  # heartbeat() would raise WorkerNotRegistered
    assert [(e.active, e.reason) for e in fleet.of(SelfPreservationChanged)] == [  # type: ignore[attr-defined]
        (True, "workers_fell_silent"),
        (False, "heartbeats_returned"),
    ]
    assert fleet.of(WorkerEvicted) == [] and fleet.of(WorkerHealthy) == []
    fleet.run(POLICY.evict_after * 2)
    assert fleet.routed(300) == set(ids(100)) and fleet.silent_records() == set()


def test_a_spread_partition_ended_by_its_cap_judges_the_reinstated_after_the_grace() -> None:
    fleet = partitioned(5, SelfPreservationSettings(max_duration=100))
    before = len(fleet.of(WorkerUnhealthy))
    fleet.run(300)
    (entered, ended) = fleet.of(SelfPreservationChanged)
    assert len(entered.reinstated) == before  # type: ignore[attr-defined]
    assert (ended.active, ended.reason) == (False, "max_duration")  # type: ignore[attr-defined]
    # Reinstated or held alike: unhealthy once the grace after it ended is over
    # (the first sweep after it), then evicted.
    grace_end = ended.at + POLICY.unhealthy_after  # type: ignore[attr-defined]
    judged = fleet.of(WorkerUnhealthy)[before:]
    assert {e.worker_id for e in judged} == set(ids(100))  # type: ignore[attr-defined]
    assert {e.at for e in judged} == {grace_end + 1}  # type: ignore[attr-defined]
    assert {e.worker_id for e in fleet.of(WorkerEvicted)} == set(ids(100))  # type: ignore[attr-defined]
    assert len(fleet.registry) == 0


def test_a_reinstated_worker_heard_or_gone_since_is_skipped() -> None:
    fleet = partitioned(5)
    (entered,) = fleet.of(SelfPreservationChanged)
    assert isinstance(entered, SelfPreservationChanged)
    first, second, third = entered.reinstated[:3]
    # The same change applied to a registry that has since heard from one,
    # lost another, and seen the third register again.
    replica = CapabilityRegistry(POLICY)
    changes, _ = fleet.registry.changes_since(0)
    before = [change for change in changes if change.revision < entered.revision]
    for change in before:
        replica.apply(change)
    at = entered.at
    replica.heartbeat(first.worker_id, now=at)
    replica.deregister(second.worker_id, now=at)
    replica.register(third.worker_id, f"https://{third.worker_id}:8443", [capability()], now=at)
    revision = replica.revision
    replica.apply(attrs.evolve(entered, revision=revision + 1))
    assert replica.self_preservation == at
    assert second.worker_id not in replica
    held = {record.worker_id: record for record in replica.records()}
    assert held[first.worker_id].last_heartbeat == at  # its own heartbeat, not the undone one
    assert held[third.worker_id].last_heartbeat == at
    assert {w for w, record in held.items() if record.silent} == set()
    assert replica.revision == revision + 1


@pytest.mark.parametrize("offset", [3, 19])
def test_replicas_fed_the_changes_end_equal(offset: int) -> None:
    fleet = partitioned(offset)
    fleet.run(POLICY.evict_after)
    changes, _ = fleet.registry.changes_since(0)
    assert any(isinstance(c, SelfPreservationChanged) and c.reinstated for c in changes)
    # A journal replay, and a follower fed the feed (no clock for health).
    replayed = CapabilityRegistry(POLICY)
    assert replay([encode_event(change) for change in changes], replayed).lines_skipped == 0
    follower = CapabilityRegistry(POLICY, routes_by_state=True)
    for change in changes:
        follower.apply(change)

    # Equal but for the heartbeats, which are not changes (a replica hears none).
    def states(replica: CapabilityRegistry) -> list[tuple[str, bool, bool]]:
        return [(r.worker_id, r.verified, r.silent) for r in replica.records()]

    assert states(replayed) == states(follower) == states(fleet.registry)
    assert replayed.self_preservation == follower.self_preservation
    assert fleet.registry.self_preservation is not None
    assert replayed.self_preservation == fleet.registry.self_preservation
    assert replayed.revision == follower.revision == fleet.registry.revision
    assert replayed._routable_count == follower._routable_count == 100
    # Both route to every worker, as the controller does.
    for replica in (replayed, follower):
        routed = [replica.route("classify", "image.classify", now=fleet.now) for _ in range(300)]
        assert {e.worker_id for e in routed if e is not None} == set(ids(100))


def test_a_worker_first_found_silent_by_the_sweep_that_ends_it_gets_the_grace_too() -> None:
    fleet = Fleet(20, SelfPreservationSettings(max_duration=100))
    fleet.run(STEP * 4)
    fleet.silence(ids(12))
    fleet.run(POLICY.unhealthy_after + 2 * STEP)
    assert fleet.preservation() == [(True, "workers_fell_silent")]
    # No sweep for a while (a busy sweeper): w19 falls silent meanwhile, and
    # the first sweep after finds it due as it ends self-preservation.
    fleet.silence(["w19"])
    for _ in range(12):
        fleet.now += STEP
        for worker_id in fleet.alive:
            fleet.events += fleet.registry.heartbeat(worker_id, now=fleet.now)
    fleet.events += fleet.registry.cleanup_stale(now=fleet.now)
    assert fleet.preservation()[-1] == (False, "max_duration")
    assert fleet.of(WorkerUnhealthy) == fleet.of(WorkerEvicted) == []  # all in the grace
    fleet.wake(["w19"])
    fleet.run(STEP)  # answered as a registered worker: it was not evicted
    assert "w19" not in fleet.silent_ids()


def test_workers_found_silent_after_a_restart_are_not_reinstated() -> None:
    fleet = Fleet(20, policy=LONG_EVICTION)
    fleet.run(STEP * 4)
    fleet.silence(ids(4))
    # Down before any sweep found them: at the restart w0-w3 are silent for
    # longer than unhealthy_after, the others were heard from 26 to 30 s before.
    heard = fleet.now + LONG_EVICTION.unhealthy_after
    for n, worker_id in enumerate(ids(16, 4)):
        fleet.events += fleet.registry.heartbeat(worker_id, now=heard + n % 5)
    fleet.now = heard + LONG_EVICTION.unhealthy_after
    fleet.registry.restart(now=fleet.now)
    fleet.alive = []  # restored: none is answered until it registers again
    fleet.events += fleet.registry.cleanup_stale(now=fleet.now)
    assert {e.worker_id for e in fleet.of(WorkerUnhealthy)} == set(ids(4))  # type: ignore[attr-defined]
    fleet.run(LONG_EVICTION.unhealthy_after)
    (entered,) = fleet.of(SelfPreservationChanged)
    assert isinstance(entered, SelfPreservationChanged) and entered.active
    # Silent before the restart: neither counted nor reinstated.
    assert entered.watched == 16
    assert not {r.worker_id for r in entered.reinstated} & set(ids(4))
    assert fleet.silent_ids() >= set(ids(4))
