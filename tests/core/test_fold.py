"""One fold: replaying a journal, applying a snapshot, applying events one by one agree.

A random sequence of registrations, heartbeats, deregistrations, imports,
drains and undrains, steps of time and sweeps runs on one registry (the original), collecting
every event it returns. Then three fresh registries are built from it:

(i) the journal lines of those events (``encode_event`` each) replayed;
(ii) ``apply_snapshot`` of the original's ``snapshot()``;
(iii) the same event objects applied one by one with ``apply``.

Each must equal the original: the same ``records()``, the same
``revision``, a ``next_deadline()`` that is never late, the same events
from the next sweeps, and the same routes. A snapshot does not carry the
rotation cursors (nor the order a rotation has after routes parked
workers), so routes are compared call by call for (i) and (iii), from the
same point as the original (no route ran on any of them before), and for
(ii) as the set of workers routed to. A journal made of a snapshot taken
midway and the events after it replays to the original too.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from crank_registry import (
    CapabilityRegistry,
    Event,
    HealthPolicy,
    RegistryError,
    Snapshot,
    UnknownCapability,
    WorkerRecord,
    encode_event,
    encode_snapshot,
    replay,
    unstructure,
)
from tests.builders import capability
from tests.core.helpers import T0, UNKNOWN

POLICY = HealthPolicy(heartbeat_interval=30.0, unhealthy_after=60.0, evict_after=120.0)
WORKER_IDS = ("w0", "w1", "w2", "w3", "w4")
KEYS = (("run", "a"), ("run", "b"), ("stop", "a"))
CAPABILITY_SETS = (
    (capability("a", "run"),),
    (capability("a", "run"), capability("b", "run", version="2.0.0")),
    (capability("a", "stop"), capability("a", "run", version="1.1.0")),
)
# Steps of time around the health boundaries (60, 120).
STEPS = (0.0, 0.5, 10.0, 30.0, 59.5, 60.0, 60.5, 119.5, 120.5, 250.0)

_register = st.tuples(
    st.just("register"),
    st.sampled_from(WORKER_IDS),
    st.integers(0, len(CAPABILITY_SETS) - 1),
    st.integers(1, 3),
)
_heartbeat = st.tuples(st.just("heartbeat"), st.sampled_from(WORKER_IDS))
# Registrations and heartbeats more often than the rest, so that the
# registry holds workers in every state.
operations = st.one_of(
    _register,
    _register,
    _heartbeat,
    _heartbeat,
    st.tuples(st.just("deregister"), st.sampled_from(WORKER_IDS)),
    st.tuples(st.just("drain"), st.sampled_from(WORKER_IDS)),
    st.tuples(st.just("undrain"), st.sampled_from(WORKER_IDS)),
    st.tuples(st.just("advance"), st.sampled_from(STEPS)),
    st.tuples(st.just("sweep")),
    st.tuples(
        st.just("import"),
        st.sampled_from(WORKER_IDS),
        st.integers(0, len(CAPABILITY_SETS) - 1),
        st.sampled_from((-5.0, 0.0, 30.0, 61.0, 130.0)),
    ),
)
runs = st.lists(operations, min_size=10, max_size=60)


def run(operations: list[tuple[Any, ...]]) -> tuple[CapabilityRegistry, list[Event], float]:
    """The original registry after ``operations``, every event it returned, and the time."""
    registry = CapabilityRegistry(POLICY)
    events: list[Event] = []
    now = T0
    for operation in operations:
        kind = operation[0]
        with contextlib.suppress(RegistryError):  # refused: nothing changes
            if kind == "register":
                _, worker_id, caps, port = operation
                url = f"https://{worker_id}:{port}"
                events += registry.register(worker_id, url, CAPABILITY_SETS[caps], now=now)
            elif kind == "heartbeat":
                events += registry.heartbeat(operation[1], now=now)
            elif kind == "deregister":
                events += registry.deregister(operation[1], now=now)
            elif kind == "drain":
                events += registry.drain(operation[1], now=now)
            elif kind == "undrain":
                events += registry.undrain(operation[1], now=now)
            elif kind == "advance":
                now += operation[1]
            elif kind == "sweep":
                events += registry.cleanup_stale(now=now)
            else:
                _, worker_id, caps, age = operation
                record = WorkerRecord(worker_id, "http://peer:1", CAPABILITY_SETS[caps], now - age)
                state = {"format_version": 1, "workers": unstructure([record])}
                events += registry.import_remote_state("peer", state, now=now)
    return registry, events, now


def from_lines(lines: list[bytes]) -> CapabilityRegistry:
    registry = CapabilityRegistry(POLICY)
    result = replay(lines, registry)
    assert result.lines_skipped == 0, result.skipped
    return registry


def from_snapshot(snapshot: Snapshot) -> CapabilityRegistry:
    registry = CapabilityRegistry(POLICY)
    registry.apply_snapshot(snapshot)
    return registry


def from_events(events: list[Event]) -> CapabilityRegistry:
    registry = CapabilityRegistry(POLICY)
    for event in events:
        registry.apply(event)
    return registry


def true_deadline(registry: CapabilityRegistry) -> float:
    """The next moment time changes a worker's state, from its records alone."""
    return min(
        (
            record.last_heartbeat
            + (POLICY.evict_after if record.silent else POLICY.unhealthy_after)
            for record in registry.records()
        ),
        default=math.inf,
    )


def routes(registry: CapabilityRegistry, now: float, count: int) -> list[list[str | None]]:
    """``count`` routes for every ``(verb, name)``, at ``now``: the worker ids answered."""
    answers = []
    for verb, name in KEYS:
        answered = []
        for _ in range(count):
            try:
                endpoint = registry.route(verb, name, now=now)
            except UnknownCapability:
                answered.append(UNKNOWN)
                continue
            answered.append(None if endpoint is None else endpoint.worker_id)
        answers.append(answered)
    return answers


def unnumbered(events: tuple[Event, ...]) -> list[tuple[Any, ...]]:
    """Events without their revisions, in a fixed order."""
    return sorted(
        (type(event).__name__, *sorted(attrs.asdict(event, recurse=False).items()))
        for event in (attrs.evolve(event, revision=0) for event in events)
    )


def assert_same_state(original: CapabilityRegistry, copy: CapabilityRegistry) -> None:
    assert copy.records() == original.records()
    assert copy.revision == original.revision
    assert len(copy) == len(original)


@settings(max_examples=150, deadline=None)
@given(runs)
def test_replay_snapshot_and_events_give_the_original(operations: list[tuple[Any, ...]]) -> None:
    original, events, now = run(operations)
    replayed = from_lines([encode_event(event) for event in events])
    loaded = from_snapshot(original.snapshot())
    applied = from_events(events)
    copies = (replayed, loaded, applied)
    for copy in copies:
        assert_same_state(original, copy)
    # The deadline: never late on any; exact where the heap holds no stale
    # entry (a snapshot loads one entry per worker).
    deadline = true_deadline(original)
    for registry in (original, *copies):
        reported = registry.next_deadline()
        assert (math.inf if reported is None else reported) <= deadline
    assert loaded.next_deadline() == (None if deadline == math.inf else deadline)
    assert replayed.next_deadline() == applied.next_deadline()
    # Routes, at now and later (past deadlines no sweep has acted on yet).
    count = 2 * len(WORKER_IDS) + 1
    for at in (now, now + POLICY.unhealthy_after / 2, now + POLICY.unhealthy_after + 1):
        expected = routes(original, at, count)
        assert routes(replayed, at, count) == expected
        assert routes(applied, at, count) == expected
        assert [set(answers) for answers in routes(loaded, at, count)] == [
            set(answers) for answers in expected
        ]
    # The next sweeps decide the same changes. (Workers whose deadlines tie
    # may come in another order, and so with each other's revisions.)
    for _ in range(3):
        deadline = true_deadline(original)
        if deadline == math.inf:
            break
        swept = original.cleanup_stale(now=deadline + 0.25)
        assert swept
        for copy in copies:
            assert unnumbered(copy.cleanup_stale(now=deadline + 0.25)) == unnumbered(swept)
            assert_same_state(original, copy)


@settings(max_examples=100, deadline=None)
@given(runs, st.data())
def test_a_snapshot_then_later_events_replay_to_the_original(
    operations: list[tuple[Any, ...]], data: st.DataObject
) -> None:
    split = data.draw(st.integers(0, len(operations)), label="split")
    part_size = data.draw(st.integers(1, 4), label="part_size")
    midway, events_before, _ = run(operations[:split])
    original, events, now = run(operations)
    # The same run, cut where the compaction took its snapshot.
    assert events[: len(events_before)] == events_before
    assert midway.records() == run(operations[:split])[0].records()
    later = events[len(events_before) :]
    lines = [
        *encode_snapshot(midway.snapshot(), part_size=part_size),
        *(encode_event(event) for event in later),
    ]
    restored = from_lines(lines)
    assert_same_state(original, restored)
    count = 2 * len(WORKER_IDS) + 1
    assert [set(answers) for answers in routes(restored, now, count)] == [
        set(answers) for answers in routes(original, now, count)
    ]
    # The lines of the whole run, after that snapshot, replay to it too: the
    # changes the snapshot holds already are passed over.
    overlapping = [
        *encode_snapshot(midway.snapshot(), part_size=part_size),
        *(encode_event(event) for event in events),
    ]
    assert_same_state(original, from_lines(overlapping))
