"""Values shared by the journal's tests."""

from __future__ import annotations

import errno
import os
import pathlib
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import strategies as st

from crank_registry import (
    CapabilityRegistry,
    Event,
    HealthPolicy,
    HealthState,
    HeartbeatReceived,
    Reinstatement,
    ReplayResult,
    SelfPreservationChanged,
    WorkerDeregistered,
    WorkerEvicted,
    WorkerHealthy,
    WorkerImported,
    WorkerRecord,
    WorkerRegistered,
    WorkerUnhealthy,
    replay,
    replay_bytes,
)
from tests.builders import capability

T0 = 1_700_000_000.0


def normalized(records: Iterable[WorkerRecord]) -> list[tuple[Any, ...]]:
    """Records as comparable tuples: what a worker is, without its health flags."""
    return [(r.worker_id, r.worker_url, r.capabilities, r.last_heartbeat) for r in records]


def replayed(
    lines: Iterable[bytes | str], policy: HealthPolicy | None = None
) -> tuple[CapabilityRegistry, ReplayResult]:
    """A fresh registry with ``lines`` replayed into it, and the replay's result."""
    registry = CapabilityRegistry(policy)
    return registry, replay(lines, registry)


def replayed_bytes(
    data: bytes, policy: HealthPolicy | None = None
) -> tuple[CapabilityRegistry, ReplayResult]:
    """A fresh registry with the journal ``data`` replayed into it, and the replay's result."""
    registry = CapabilityRegistry(policy)
    return registry, replay_bytes(data, registry)


def ids(registry: CapabilityRegistry) -> list[str]:
    """The registry's worker ids, in registration order."""
    return [record.worker_id for record in registry.records()]


worker_ids = st.sampled_from([f"w{i}" for i in range(6)] + ["worker.a-1", "B_2"])
urls = st.sampled_from(["http://10.0.0.1:8080", "https://w.example:8443/api", "http://[::1]:9"])
moments = st.floats(min_value=T0, max_value=T0 + 10_000, allow_nan=False)
revisions = st.integers(min_value=1, max_value=2**53)

capabilities = st.builds(
    capability,
    name=st.sampled_from(["image.classify", "text.summarize", "audio.ü"]),
    verb=st.sampled_from(["classify", "run"]),
    version=st.sampled_from(["1.0.0", "1.2.3"]),
    input_schema=st.sampled_from(
        [{"type": "object"}, {"type": "object", "properties": {"image": {"type": "string"}}}]
    ),
    runtime=st.none() | st.just("python3.11"),
    constraints=st.none() | st.just({"gpu_memory_gb": 16, "labels": ["a", "é"]}),
    slo=st.none() | st.just({"latency_p95_ms": 120.5, "availability": 0.999}),
    required_capabilities=st.none() | st.just(["classify:image.decode"]),
    cost_tokens_per_invocation=st.none() | st.floats(min_value=0, max_value=1e6),
)
capability_lists = st.lists(capabilities, min_size=1, max_size=3, unique_by=lambda c: c.key).map(
    tuple
)

#: Every kind of event, each change with a revision.
events: st.SearchStrategy[Event] = st.one_of(
    st.builds(
        WorkerRegistered,
        worker_id=worker_ids,
        worker_url=urls,
        capabilities=capability_lists,
        at=moments,
        replaced=st.booleans(),
        revision=revisions,
    ),
    st.builds(HeartbeatReceived, worker_id=worker_ids, at=moments),
    st.builds(WorkerDeregistered, worker_id=worker_ids, at=moments, revision=revisions),
    st.builds(
        WorkerUnhealthy,
        worker_id=worker_ids,
        at=moments,
        last_heartbeat=moments,
        revision=revisions,
    ),
    st.builds(WorkerHealthy, worker_id=worker_ids, at=moments, revision=revisions),
    st.builds(
        WorkerEvicted, worker_id=worker_ids, at=moments, last_heartbeat=moments, revision=revisions
    ),
    st.builds(
        WorkerImported,
        worker_id=worker_ids,
        worker_url=urls,
        capabilities=capability_lists,
        last_heartbeat=moments,
        source=st.sampled_from(["controller-b", "ctl.2"]),
        revision=revisions,
    ),
    st.builds(
        SelfPreservationChanged,
        at=moments,
        active=st.booleans(),
        reason=st.sampled_from(["workers_fell_silent", "heartbeats_returned", "max_duration"]),
        silent=st.integers(0, 10**6),
        watched=st.integers(0, 10**6),
        reinstated=st.lists(
            st.builds(
                Reinstatement,
                worker_id=worker_ids,
                state=st.sampled_from((HealthState.HEALTHY, HealthState.UNVERIFIED)),
                last_heartbeat=moments,
            ),
            max_size=3,
        ).map(tuple),
        revision=revisions,
    ),
)

#: A worker's record in every health state a snapshot holds.
records = st.builds(
    WorkerRecord,
    worker_id=worker_ids,
    worker_url=urls,
    capabilities=capability_lists,
    last_heartbeat=moments,
    verified=st.booleans(),
    silent=st.booleans(),
)


class DiskFull:
    """Makes every write and fsync of one file fail with ENOSPC while :attr:`full` is set.

    Patches ``os.write`` and ``os.fsync`` (through ``monkeypatch``) for the
    file at ``path`` only, found by its inode once it exists: other files
    and descriptors are written as usual.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: pathlib.Path) -> None:
        self.path = path
        self.full = False
        self.refused = 0
        real_write, real_fsync = os.write, os.fsync

        def write(fd: int, data: Any) -> int:
            self._check(fd)
            return real_write(fd, data)

        def fsync(fd: Any) -> None:
            self._check(fd)
            real_fsync(fd)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fsync", fsync)

    def _check(self, fd: Any) -> None:
        if not self.full or not isinstance(fd, int):
            return
        try:
            ours = os.fstat(fd).st_ino == self.path.stat().st_ino
        except FileNotFoundError:
            ours = False
        if ours:
            self.refused += 1
            raise OSError(errno.ENOSPC, "No space left on device")
