"""The journal reports how long its appends and fsyncs take."""

from __future__ import annotations

import pathlib

import pytest

from crank_registry import CapabilityRegistry
from crank_registry_asgi.effects import RegistrySnapshots
from crank_registry_asgi.journal import Journal

pytestmark = pytest.mark.anyio


class Recorded:
    def __init__(self) -> None:
        self.appends: list[float] = []
        self.fsyncs: list[float] = []

    def appended(self, seconds: float) -> None:
        self.appends.append(seconds)

    def fsynced(self, seconds: float) -> None:
        self.fsyncs.append(seconds)


@pytest.mark.parametrize("fsync", [True, False])
async def test_every_append_and_every_batch_fsync(tmp_path: pathlib.Path, fsync: bool) -> None:
    timings = Recorded()
    journal = Journal.open(
        tmp_path, snapshots=RegistrySnapshots(CapabilityRegistry()), fsync=fsync, timings=timings
    )
    journal.read()
    try:
        await journal.append([b'{"a": 1}\n'], durable=True)
        await journal.append([b'{"b": 2}\n'], durable=False)
        await journal.append([], durable=True)  # nothing to write: not an append
    finally:
        await journal.aclose()
    assert len(timings.appends) == 2
    assert all(seconds >= 0 for seconds in timings.appends)
    # Only a durable batch is fsynced, and only when the journal fsyncs at all.
    assert len(timings.fsyncs) == (1 if fsync else 0)
    assert all(seconds >= 0 for seconds in timings.fsyncs)
