"""The change feed's window: its bounds, its 410s, and a follower built from it.

A follower loads the snapshot at some revision, then applies the feed's
changes after it, page by page, with the one fold; it must end equal to
the original: the same revision, and the same workers with the same
URLs, capabilities and states. Only ``last_heartbeat`` may be older:
heartbeats are not changes, so they are not on the feed (DESIGN, "Followers
keep no clock for health": a follower's states come from events).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crank_registry import (
    MAX_FEED_PAGE,
    CapabilityRegistry,
    Change,
    ChangeLog,
    HeartbeatReceived,
    RevisionCompacted,
    RevisionReset,
    Snapshot,
    WorkerDeregistered,
    WorkerRecord,
    WorkerRegistered,
    structure_event,
    unstructure_event,
)
from tests.builders import capability
from tests.core.helpers import T0
from tests.core.test_fold import POLICY, run, runs


def _registered(revision: int) -> WorkerRegistered:
    return WorkerRegistered(
        f"w{revision}", "https://w:1", (capability("a", "run"),), T0, revision=revision
    )


def test_since_answers_the_changes_after_a_revision_and_the_latest() -> None:
    log = ChangeLog(10)
    changes = [_registered(revision) for revision in range(1, 6)]
    for change in changes:
        log.record(change)
    assert log.since(0) == (tuple(changes), 5)
    assert log.since(3) == (tuple(changes[3:]), 5)
    assert log.since(5) == ((), 5)
    assert log.since(1, limit=2) == (tuple(changes[1:3]), 5)


def test_the_window_keeps_the_last_capacity_changes() -> None:
    log = ChangeLog(3)
    changes = [_registered(revision) for revision in range(1, 8)]
    for change in changes:
        log.record(change)
    assert len(log) == 3
    assert log.oldest == 4  # changes 5, 6, 7 are kept
    assert log.since(4) == (tuple(changes[4:]), 7)
    with pytest.raises(RevisionCompacted) as compacted:
        log.since(3)
    assert compacted.value.oldest == 4
    assert (compacted.value.code, compacted.value.status_hint) == ("revision_compacted", 410)


def test_a_revision_beyond_the_latest_is_a_reset() -> None:
    log = ChangeLog(3)
    log.record(_registered(1))
    with pytest.raises(RevisionReset) as reset:
        log.since(2)
    assert (reset.value.code, reset.value.status_hint, reset.value.latest) == (
        "revision_reset",
        410,
        1,
    )


def test_bad_capacity_and_limit_are_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ChangeLog(0)
    with pytest.raises(ValueError, match="limit"):
        ChangeLog(3).since(0, limit=MAX_FEED_PAGE + 1)


def test_the_registry_feeds_every_change_and_no_heartbeat() -> None:
    registry = CapabilityRegistry(POLICY, feed_window=4)
    events = registry.register("w1", "https://w1:1", [capability("a", "run")], now=T0)
    events += registry.heartbeat("w1", now=T0 + 1)
    events += registry.deregister("w1", now=T0 + 2)
    assert any(isinstance(event, HeartbeatReceived) for event in events)
    changes, latest = registry.changes_since(0)
    assert [type(change) for change in changes] == [WorkerRegistered, WorkerDeregistered]
    assert latest == registry.revision == 2
    for change in changes:  # the wire form is the journal codec's
        assert structure_event(unstructure_event(change)) == change


def test_a_snapshot_restarts_the_window_at_its_revision() -> None:
    original = CapabilityRegistry(POLICY)
    for worker_id in ("w0", "w1", "w2", "w3", "w4"):
        original.register(worker_id, f"https://{worker_id}:1", [capability("a", "run")], now=T0)
    follower = CapabilityRegistry(POLICY)
    follower.apply_snapshot(original.snapshot())
    assert (follower.feed.oldest, follower.feed.latest) == (5, 5)
    with pytest.raises(RevisionCompacted):
        follower.changes_since(4)
    assert follower.changes_since(5) == ((), 5)


def follow(original: CapabilityRegistry, snapshot: Snapshot, page: int) -> CapabilityRegistry:
    """A follower: ``snapshot``, then the original's feed after it, ``page`` changes at a time."""
    follower = CapabilityRegistry(POLICY)
    follower.apply_snapshot(snapshot)
    while True:
        changes, latest = original.changes_since(follower.revision, limit=page)
        for change in changes:
            # Through the wire form, as a follower receives it.
            event = structure_event(unstructure_event(change))
            assert isinstance(event, Change)
            follower.apply(event)
        if follower.revision == latest:
            return follower


@settings(max_examples=100, deadline=None)
@given(runs, st.data())
def test_a_snapshot_then_the_feed_gives_the_original(
    operations: list[tuple[Any, ...]], data: st.DataObject
) -> None:
    split = data.draw(st.integers(0, len(operations)), label="split")
    page = data.draw(st.integers(1, 5), label="page")
    midway = run(operations[:split])[0]
    original = run(operations)[0]
    assert_same_state(original, follow(original, midway.snapshot(), page))
    # The same from revision 0 (an empty registry), while the window holds it all.
    assert_same_state(original, follow(original, CapabilityRegistry(POLICY).snapshot(), page))


def assert_same_state(original: CapabilityRegistry, follower: CapabilityRegistry) -> None:
    """Equal but for heartbeats: revision, workers in order, URLs, capabilities, states."""
    assert follower.revision == original.revision
    assert [_state(record) for record in follower.records()] == [
        _state(record) for record in original.records()
    ]
    assert [w.worker_id for w in follower.records()] == [w.worker_id for w in original.records()]
    for copy, record in zip(follower.records(), original.records(), strict=True):
        assert copy.last_heartbeat <= record.last_heartbeat


def _state(record: WorkerRecord) -> tuple[Any, ...]:
    return (
        record.worker_id,
        record.worker_url,
        record.capabilities,
        record.verified,
        record.silent,
    )


def test_a_snapshot_copy_stays_the_registry_at_its_revision() -> None:
    registry = CapabilityRegistry(POLICY)
    for index in range(5):
        registry.register(f"w{index}", "https://w:1", [capability("a", "run")], now=T0)
    registry.cleanup_stale(now=T0 + 61)  # all silent: unhealthy
    expected = registry.snapshot()
    copy = registry.snapshot_copy()
    registry.deregister("w0", now=T0 + 62)
    registry.heartbeat("w1", now=T0 + 63)
    assert (copy.revision, len(copy)) == (expected.revision, 5)
    assert copy.records(1, 3) == expected.workers[1:3]
    assert copy.snapshot() == expected


def test_the_window_keeps_the_stored_capabilities_not_each_registrations_copy() -> None:
    # Equal capabilities from two workers, each its own objects (as decoded from two bodies).
    registry = CapabilityRegistry(POLICY)
    registry.register("w1", "https://w1:8443", [capability()], now=T0)
    registry.register("w2", "https://w2:8443", [capability()], now=T0)
    changes, _ = registry.changes_since(0)
    first, second = (change for change in changes if isinstance(change, WorkerRegistered))
    # One stored value for both: the window holds no copy of its own per registration.
    assert second.capabilities[0] is first.capabilities[0]
    assert second.capabilities[0] == capability()
