"""Recovery holds capabilities read back to a check: the service's, JSON Schema validity.

A journal written before /register checked schemas may hold a capability
whose schema is not a valid JSON Schema: its worker is left out, the rest
recover, and the start goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from crank_registry import (
    CapabilityRegistry,
    CapabilitySchema,
    Problem,
    RefusedCapability,
    Snapshot,
    WorkerImported,
    WorkerRecord,
    WorkerRegistered,
    encode_event,
    encode_snapshot,
    replay_bytes,
)
from crank_registry_asgi.schemas import capability_schema_problems
from tests.builders import capability
from tests.journal.helpers import T0, ids

GOOD = capability("good")
BAD = capability("bad", input_schema={"type": 12})
REASON = (
    "capabilities[{index}].input_schema.type: 12 is not valid under any of the given schemas; "
    "a capability's input_schema must be a valid JSON Schema (Draft 2020-12, or the draft its "
    "$schema names): fix the schema"
)


def _replayed(data: bytes, check: Any = capability_schema_problems) -> tuple[Any, Any]:
    registry = CapabilityRegistry()
    return registry, replay_bytes(data, registry, capability_check=check)


def _registered(worker_id: str, revision: int, *capabilities: CapabilitySchema) -> bytes:
    return encode_event(
        WorkerRegistered(worker_id, "http://h:1", capabilities, T0, revision=revision)
    )


def test_a_registration_line_with_an_invalid_schema_is_skipped_naming_the_place() -> None:
    data = (
        _registered("w1", 1, GOOD)
        + _registered("w2", 2, GOOD, BAD)
        + _registered("w3", 3, GOOD)
        + encode_event(WorkerImported("w4", "http://h:1", (BAD,), T0, "elsewhere", revision=4))
    )
    registry, result = _replayed(data)
    assert ids(registry) == ["w1", "w3"]
    assert [skipped.line_number for skipped in result.skipped] == [2, 4]
    assert result.skipped[0].reason.startswith(
        "invalid 'registered' line: " + REASON.format(index=1)
    )
    assert REASON.format(index=0) in result.skipped[1].reason
    # Without the check, the core holds them to the wire model only, which they pass.
    registry, result = _replayed(data, check=None)
    assert ids(registry) == ["w1", "w2", "w3", "w4"]
    assert result.lines_skipped == 0


def test_a_snapshot_capability_with_an_invalid_schema_costs_only_the_workers_offering_it() -> None:
    workers = (
        WorkerRecord("a0", "http://h:1", (GOOD,), T0),
        WorkerRecord("a1", "http://h:1", (BAD,), T0),
        WorkerRecord("b0", "http://h:1", (GOOD, BAD), T0),
        WorkerRecord("b1", "http://h:1", (GOOD,), T0),
        WorkerRecord("c0", "http://h:1", (BAD,), T0),
        WorkerRecord("c1", "http://h:1", (GOOD,), T0),
    )
    data = b"".join(encode_snapshot(Snapshot(6, workers), part_size=2))
    registry, result = _replayed(data)
    assert ids(registry) == ["a0", "b1", "c1"]
    assert registry.revision == 6
    assert (result.lines_skipped, result.workers_dropped) == (0, 3)
    # Reported once, on the line that numbers it first (the next part repeats it).
    assert result.refused == (RefusedCapability(1, REASON.format(index=1)),)
    registry, result = _replayed(data, check=None)
    assert len(registry) == 6 and result.refused == ()


def test_the_check_sees_each_capability_of_a_snapshot_once() -> None:
    seen: list[CapabilitySchema] = []

    def check(capability: CapabilitySchema) -> Sequence[Problem]:
        seen.append(capability)
        return ()

    workers = tuple(
        WorkerRecord(f"w{n}", "http://h:1", (GOOD,) if n % 2 else (GOOD, BAD), T0)
        for n in range(10)
    )
    registry, _ = _replayed(b"".join(encode_snapshot(Snapshot(10, workers), part_size=3)), check)
    assert len(registry) == 10
    assert seen == [GOOD, BAD]
