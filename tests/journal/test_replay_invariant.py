"""Replaying the journal gives the same state: a state machine over a live registry.

Every mutation's events go through the journal codec; at every step the
lines replayed into a fresh registry must give the live registry's records
and revision, including after any number of compactions (a snapshot
replacing the lines so far) and restarts (a registry replayed from the
lines, as a controller starts, which then goes on appending to them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import attrs
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from crank_registry import (
    CapabilityRegistry,
    Event,
    HealthPolicy,
    RegistryError,
    WorkerRecord,
    encode_event,
    encode_snapshot,
    replay,
    replay_bytes,
    unstructure,
)
from crank_registry_asgi.effects import Effects
from crank_registry_asgi.metrics import Metrics
from tests.builders import capability
from tests.journal.helpers import T0, replayed, urls, worker_ids

POLICY = HealthPolicy(heartbeat_interval=10, unhealthy_after=20, evict_after=40)
CAPABILITY_SETS = [
    (capability(),),
    (capability(), capability("text.summarize", "run")),
    (capability("text.summarize", "run", runtime="python3.11"),),
]


def restarted(records: Sequence[WorkerRecord]) -> list[WorkerRecord]:
    """What records become when their registry restarts: nobody is verified."""
    return [attrs.evolve(record, verified=False) for record in records]


class JournalReplay(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.registry = CapabilityRegistry(POLICY)
        self.lines: list[bytes] = []
        # True while the lines say every worker's health exactly: no restart
        # since the last compaction (a restart is not a change, so no line).
        self.exact = True

    def _journal(self, events: Sequence[Event]) -> None:
        self.lines.extend(map(encode_event, events))

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

    @rule(seconds=st.sampled_from([0.0, 0.5, 5.0, 19.5, 20.0, 20.5, 39.5, 40.5, 50.0]))
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
        self.lines = list(encode_snapshot(self.registry.snapshot(), part_size=3))
        self.exact = True

    @precondition(lambda self: len(self.registry) > 0)
    @rule()
    def restart(self) -> None:
        """A new registry from the journal (what a controller does on start)."""
        restored = CapabilityRegistry(POLICY)
        result = replay_bytes(b"".join(self.lines), restored)
        assert result.lines_skipped == 0
        restored.restart()
        assert restored.records() == restarted(self.registry.records())
        assert restored.revision == self.registry.revision
        self.registry = restored
        self.exact = False

    @invariant()
    def replay_equals_the_live_state(self) -> None:
        registry, result = replayed(self.lines, POLICY)
        assert result.lines_skipped == 0, result.skipped
        assert registry.revision == self.registry.revision
        if self.exact:
            assert registry.records() == self.registry.records()
        registry.restart()
        assert registry.records() == restarted(self.registry.records())
        from_bytes = CapabilityRegistry(POLICY)
        assert replay_bytes(b"".join(self.lines), from_bytes) == result


JournalReplay.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_replay_equals_the_live_state = JournalReplay.TestCase


class _Lines:
    """A journal that keeps the lines the effects append."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    async def append(
        self,
        lines: Sequence[bytes],
        *,
        durable: bool,
        settled: Callable[[OSError | None], None] | None = None,
    ) -> None:
        self.lines.extend(lines)
        if settled is not None:
            settled(None)


class CoalescedHeartbeats(RuleBasedStateMachine):
    """Coalesced by the service, a replayed heartbeat lags the live one by less than a period."""

    EVERY = POLICY.unhealthy_after / 2

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.registry = CapabilityRegistry(POLICY)
        self.journal = _Lines()
        self.effects = Effects(
            self.registry, metrics=Metrics(), journal_expected=True, heartbeat_line_every=self.EVERY
        )
        self.effects.journal = self.journal

    def _record(self, events: Sequence[Event]) -> None:
        anyio.run(self.effects.commit, events)

    @rule(worker_id=worker_ids)
    def register(self, worker_id: str) -> None:
        self._record(
            self.registry.register(worker_id, "http://h:1", CAPABILITY_SETS[0], now=self.now)
        )

    @rule(worker_id=worker_ids)
    def heartbeat(self, worker_id: str) -> None:
        with contextlib.suppress(RegistryError):
            self._record(self.registry.heartbeat(worker_id, now=self.now))

    @rule(worker_id=worker_ids)
    def deregister(self, worker_id: str) -> None:
        with contextlib.suppress(RegistryError):
            self._record(self.registry.deregister(worker_id, now=self.now))

    @rule(seconds=st.floats(min_value=0, max_value=15))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def sweep(self) -> None:
        self._record(self.registry.cleanup_stale(now=self.now))

    @invariant()
    def heartbeats_lag_by_less_than_the_period(self) -> None:
        registry = CapabilityRegistry(POLICY)
        result = replay(self.journal.lines, registry)
        assert result.lines_skipped == 0, result.skipped
        assert registry.revision == self.registry.revision
        replayed_records = {r.worker_id: r for r in registry.records()}
        live = {r.worker_id: r for r in self.registry.records()}
        assert replayed_records.keys() == live.keys()
        for worker_id, record in live.items():
            kept = replayed_records[worker_id]
            assert (kept.worker_url, kept.capabilities) == (record.worker_url, record.capabilities)
            # Health comes from changes, which are never coalesced.
            assert (kept.verified, kept.silent) == (record.verified, record.silent)
            lag = record.last_heartbeat - kept.last_heartbeat
            assert 0 <= lag < self.EVERY


CoalescedHeartbeats.TestCase.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None
)
test_coalesced_heartbeats = CoalescedHeartbeats.TestCase
