"""Replaying the journal gives the same state: a state machine over a live registry.

Every mutation's events go through the journal codec; at every step the
replayed lines must equal the registry's records, including after any
number of compactions (a snapshot replacing the lines so far).
"""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from crank_registry import (
    CapabilityRegistry,
    HealthPolicy,
    JournalState,
    RegistryError,
    WorkerRecord,
    replay,
    replay_bytes,
    unstructure,
)
from tests.journal.helpers import T0, capability, normalized, urls, worker_ids

POLICY = HealthPolicy(heartbeat_interval=10, unhealthy_after=20, evict_after=40)
CAPABILITY_SETS = [
    (capability(),),
    (capability(), capability("text.summarize", "run")),
    (capability("text.summarize", "run", runtime="python3.11"),),
]


class JournalReplay(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.registry = CapabilityRegistry(POLICY)
        self.writer = JournalState()
        self.lines: list[bytes] = []

    def _journal(self, events: Any) -> None:
        self.lines.extend(self.writer.encode(events).lines)

    @rule(worker_id=worker_ids, url=urls, caps=st.sampled_from(CAPABILITY_SETS))
    def register(self, worker_id: str, url: str, caps: Any) -> None:
        self._journal(self.registry.register(worker_id, url, caps, now=self.now))

    @rule(worker_id=worker_ids)
    def heartbeat(self, worker_id: str) -> None:
        with contextlib.suppress(RegistryError):
            self._journal(self.registry.heartbeat(worker_id, now=self.now))

    @rule(worker_id=worker_ids)
    def deregister(self, worker_id: str) -> None:
        with contextlib.suppress(RegistryError):
            self._journal(self.registry.deregister(worker_id, now=self.now))

    @rule(seconds=st.floats(min_value=0, max_value=50))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def sweep(self) -> None:
        self._journal(self.registry.cleanup_stale(now=self.now))

    @rule(
        worker_id=worker_ids,
        url=urls,
        caps=st.sampled_from(CAPABILITY_SETS),
        age=st.floats(min_value=-5, max_value=60),
    )
    def import_from_peer(self, worker_id: str, url: str, caps: Any, age: float) -> None:
        record = WorkerRecord(worker_id, url, caps, self.now - age)
        state = {"format_version": 1, "workers": unstructure([record])}
        self._journal(self.registry.import_remote_state("peer", state, now=self.now))

    @rule()
    def compact(self) -> None:
        self.lines = list(self.writer.snapshot(part_size=3))

    @precondition(lambda self: len(self.registry) > 0)
    @rule()
    def restart(self) -> None:
        """A new registry from the journal (what a controller does on start)."""
        restored = CapabilityRegistry(POLICY)
        restored.restore(replay_bytes(b"".join(self.lines)).records, now=self.now)
        self.registry = restored
        # The registry dropped workers already past evict_after; so does the writer.
        self.writer = JournalState(r for r in replay(self.lines).records if r.worker_id in restored)
        self.lines = list(self.writer.snapshot())

    @invariant()
    def replay_equals_the_live_state(self) -> None:
        result = replay(self.lines)
        assert replay_bytes(b"".join(self.lines)) == result
        assert result.lines_skipped == 0
        assert normalized(result.records) == normalized(self.registry.records())
        assert normalized(self.writer.records()) == normalized(self.registry.records())


JournalReplay.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_replay_equals_the_live_state = JournalReplay.TestCase


class CoalescedHeartbeats(RuleBasedStateMachine):
    """With coalescing, a replayed heartbeat lags the live one by less than the period."""

    EVERY = POLICY.unhealthy_after / 2

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.registry = CapabilityRegistry(POLICY)
        self.writer = JournalState()
        self.lines: list[bytes] = []

    @rule(worker_id=worker_ids)
    def register(self, worker_id: str) -> None:
        events = self.registry.register(worker_id, "http://h:1", CAPABILITY_SETS[0], now=self.now)
        self.lines += self.writer.encode(events, heartbeat_every=self.EVERY).lines

    @rule(worker_id=worker_ids)
    def heartbeat(self, worker_id: str) -> None:
        try:
            events = self.registry.heartbeat(worker_id, now=self.now)
        except RegistryError:
            return
        self.lines += self.writer.encode(events, heartbeat_every=self.EVERY).lines

    @rule(seconds=st.floats(min_value=0, max_value=15))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @invariant()
    def heartbeats_lag_by_less_than_the_period(self) -> None:
        replayed = {r.worker_id: r for r in replay(self.lines).records}
        live = {r.worker_id: r for r in self.registry.records()}
        assert replayed.keys() == live.keys()
        for worker_id, record in live.items():
            lag = record.last_heartbeat - replayed[worker_id].last_heartbeat
            assert 0 <= lag < self.EVERY


CoalescedHeartbeats.TestCase.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None
)
test_coalesced_heartbeats = CoalescedHeartbeats.TestCase
