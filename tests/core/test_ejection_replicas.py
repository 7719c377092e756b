"""Replicas fed the same changes, ejections among them, end equal.

A random run registers, heartbeats, deregisters, reports failed and
successful calls, lets another controller's ejections arrive (decided on
its own replica: the fold alone checks their cap), advances time and
sweeps, on one registry (the original). Its changes then build five
copies: applied one by one, replayed from their journal lines, loaded
from its snapshot, replayed from that snapshot's journal lines, and a
follower (``routes_by_state``) that loaded an empty snapshot and applied
them. Each holds the same records (ejections and streaks included; a
follower hears no heartbeats), revision and ejected count, routes to the
same workers, and the next sweeps restore the same workers.
"""

from __future__ import annotations

import contextlib
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from crank_registry import (
    CapabilityRegistry,
    Change,
    EjectionSettings,
    Event,
    HealthPolicy,
    RegistryError,
    UnknownCapability,
    WorkerEjected,
    WorkerRecord,
    WorkerRestored,
    encode_event,
    encode_snapshot,
    replay,
)
from tests.builders import capability
from tests.core.helpers import T0

POLICY = HealthPolicy(heartbeat_interval=30.0, unhealthy_after=60.0, evict_after=120.0)
EJECTION = EjectionSettings(after_failures=2, max_ejected_percent=40.0)
WORKER_IDS = ("w0", "w1", "w2", "w3", "w4")
KEYS = (("run", "a"), ("run", "b"))
CAPABILITY_SETS = ((capability("a", "run"),), (capability("a", "run"), capability("b", "run")))
STEPS = (0.5, 10.0, 29.5, 30.0, 31.0, 59.0, 90.0)

_register = st.tuples(st.just("register"), st.sampled_from(WORKER_IDS), st.integers(0, 1))
_fail = st.tuples(st.just("fail"), st.sampled_from(WORKER_IDS), st.sampled_from(KEYS))
# Registrations and failures more often than the rest: most runs eject.
operations = st.one_of(
    _register,
    _register,
    st.tuples(st.just("heartbeat"), st.sampled_from(WORKER_IDS)),
    st.tuples(st.just("heartbeat"), st.sampled_from(WORKER_IDS)),
    st.tuples(st.just("deregister"), st.sampled_from(WORKER_IDS)),
    _fail,
    _fail,
    _fail,
    st.tuples(st.just("succeed"), st.sampled_from(WORKER_IDS), st.sampled_from(KEYS)),
    st.tuples(st.just("foreign"), st.sampled_from(WORKER_IDS), st.sampled_from(KEYS)),
    st.tuples(st.just("advance"), st.sampled_from(STEPS)),
    st.tuples(st.just("sweep")),
)


def new_registry(**options: Any) -> CapabilityRegistry:
    return CapabilityRegistry(POLICY, ejection=EJECTION, **options)


def run(steps: list[tuple[Any, ...]]) -> tuple[CapabilityRegistry, list[Event], float]:
    """The original after ``steps``, the changes it applied, and the time."""
    registry = new_registry()
    events: list[Event] = []
    now = T0
    for step in steps:
        kind = step[0]
        with contextlib.suppress(RegistryError):  # refused: nothing changes
            if kind == "register":
                _, worker_id, caps = step
                url = f"https://{worker_id}:8443"
                events += registry.register(worker_id, url, CAPABILITY_SETS[caps], now=now)
            elif kind == "heartbeat":
                # Keep them alive through ejections (a heartbeat never ends one).
                events += registry.heartbeat(step[1], now=now)
            elif kind == "deregister":
                events += registry.deregister(step[1], now=now)
            elif kind in ("fail", "succeed"):
                _, worker_id, (verb, name) = step
                events += registry.report_outcome(
                    worker_id, verb, name, ok=kind == "succeed", now=now
                )
            elif kind == "foreign":
                # Another controller's ejection, decided on its replica: only the fold
                # checks its cap here (it may be dropped, or the worker ejected already).
                _, worker_id, (verb, name) = step
                change = WorkerEjected(
                    worker_id, now, now + 30.0, verb, name, 40.0, 1, revision=registry.revision + 1
                )
                registry.apply(change)
                events.append(change)
            elif kind == "advance":
                now += step[1]
            else:
                events += registry.cleanup_stale(now=now)
    # A last sweep: the follower, without a clock, then routes as the original at now.
    events += registry.cleanup_stale(now=now)
    return registry, events, now


def copies(original: CapabilityRegistry, events: list[Event]) -> list[CapabilityRegistry]:
    changes = [event for event in events if isinstance(event, Change)]
    applied = new_registry()
    for event in events:
        applied.apply(event)
    replayed = new_registry()
    result = replay([encode_event(event) for event in events], replayed)
    assert result.lines_skipped == 0, result.skipped
    loaded = new_registry()
    loaded.apply_snapshot(original.snapshot())
    compacted = new_registry()  # a journal compacted into its snapshot's lines
    lines = encode_snapshot(original.snapshot(), part_size=2)
    assert replay(lines, compacted).lines_skipped == 0
    follower = new_registry(routes_by_state=True)
    follower.apply_snapshot(new_registry().snapshot())
    for change in changes:
        with contextlib.suppress(RegistryError):  # refused alike by the original
            follower.apply(change)
    return [applied, replayed, loaded, compacted, follower]


def routed(registry: CapabilityRegistry, now: float) -> list[set[str | None]]:
    """The workers each pair routes to at ``now`` (enough routes to go round)."""
    answers = []
    for verb, name in KEYS:
        seen: set[str | None] = set()
        for _ in range(2 * len(WORKER_IDS) + 1):
            try:
                endpoint = registry.route(verb, name, now=now)
            except UnknownCapability:
                seen.add("<unknown>")
                continue
            seen.add(None if endpoint is None else endpoint.worker_id)
        answers.append(seen)
    return answers


def unheard(record: WorkerRecord) -> WorkerRecord:
    """``record`` without its last heartbeat (which only heartbeats move on)."""
    return attrs.evolve(record, last_heartbeat=0.0)


def restorations(registry: CapabilityRegistry, now: float) -> list[str]:
    return sorted(
        event.worker_id
        for event in registry.cleanup_stale(now=now)
        if isinstance(event, WorkerRestored)
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(operations, min_size=10, max_size=60))
def test_replicas_fed_the_same_changes_end_equal(steps: list[tuple[Any, ...]]) -> None:
    original, events, now = run(steps)
    replicas = copies(original, events)
    for replica in replicas[:4]:
        assert replica.records() == original.records()
    # A follower hears no heartbeats: the rest of each record is the same.
    assert [unheard(r) for r in replicas[4].records()] == [unheard(r) for r in original.records()]
    for replica in replicas:
        assert replica.revision == original.revision
        assert replica.ejected_count == original.ejected_count
    # Routes: a follower routes by state alone, so it is asked before any deadline.
    expected = routed(original, now)
    for replica in replicas:
        assert routed(replica, now) == expected
    # The next sweeps restore the same workers (the follower does not sweep).
    later = now + 30.0
    swept = restorations(original, later)
    for replica in replicas[:4]:
        assert restorations(replica, later) == swept
        assert replica.records() == original.records()
