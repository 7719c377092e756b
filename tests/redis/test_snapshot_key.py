"""Reading the snapshot key's hash and stream changes (no Redis needed: the values as read)."""

from __future__ import annotations

import json
import logging

import pytest

from crank_registry import (
    JOURNAL_FORMAT_VERSION,
    AccessRules,
    CapabilityRegistry,
    NewerJournalFormat,
    Snapshot,
    WorkerRecord,
    WorkerRegistered,
    encode_event,
    encode_snapshot,
)
from crank_registry_asgi.redis_store import RedisStore, _read_snapshot
from tests.builders import capability
from tests.core.helpers import T0


def stored_hash(records: bytes | None = None, **fields: bytes) -> dict[bytes, bytes]:
    """The snapshot hash of three workers, as the lease holder writes it."""
    workers = tuple(
        WorkerRecord(
            f"w{n}", f"https://w{n}:8443", (capability(),), T0 + n, verified=n != 1, silent=n == 2
        )
        for n in range(3)
    )
    lines = b"".join(
        encode_snapshot(Snapshot(7, workers, access_policy=AccessRules()), part_size=2)
    )
    default_records = json.dumps({"w0": 1, "w1": 2, "w2": 7}).encode()
    return {
        b"v": str(JOURNAL_FORMAT_VERSION).encode(),
        b"revision": b"7",
        b"entry": b"5-0",
        b"lines": lines,
        b"records": default_records if records is None else records,
        **{name.encode(): value for name, value in fields.items()},
    }


def test_the_hash_reads_back_as_written() -> None:
    snapshot, records, position = _read_snapshot(stored_hash())
    assert snapshot is not None
    assert snapshot.revision == 7 and position == b"5-0"
    assert [(r.worker_id, r.verified, r.silent) for r in snapshot.workers] == [
        ("w0", True, False),
        ("w1", False, False),
        ("w2", True, True),
    ]
    assert snapshot.access_policy == AccessRules()
    assert records == {"w0": 1, "w1": 2, "w2": 7}


@pytest.mark.parametrize(
    ("damaged", "kept", "reason"),
    [
        (b'{"w0": 1, "w1": ', {}, "not a JSON object"),
        (b"[1, 2]", {}, "not a JSON object"),
        (b'{"w0": 1, "w1": "2", "w2": 7.5}', {"w0": 1}, "count=2 reason=not an integer revision"),
    ],
)
def test_damaged_records_are_left_out_and_logged_and_the_workers_load(
    damaged: bytes, kept: dict[str, int], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="crank_registry_asgi.redis"):
        snapshot, records, _ = _read_snapshot(stored_hash(damaged))
    assert snapshot is not None and len(snapshot.workers) == 3
    assert records == kept
    assert reason in caplog.text


def test_a_newer_snapshot_format_is_refused() -> None:
    with pytest.raises(NewerJournalFormat) as refused:
        _read_snapshot(stored_hash(v=str(JOURNAL_FORMAT_VERSION + 1).encode()))
    assert refused.value.version == JOURNAL_FORMAT_VERSION + 1


def test_no_hash_is_no_snapshot() -> None:
    assert _read_snapshot({}) == (None, {}, b"0-0")


def test_a_capability_with_an_invalid_schema_costs_only_its_workers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A snapshot written by a release that did not check schemas still loads."""
    bad = capability("bad", input_schema={"type": 12})
    workers = tuple(
        WorkerRecord(
            f"w{n}", f"https://w{n}:8443", (capability(), bad) if n == 1 else (capability(),), T0
        )
        for n in range(3)
    )
    lines = b"".join(encode_snapshot(Snapshot(7, workers), part_size=2))
    with caplog.at_level(logging.WARNING, logger="crank_registry_asgi.redis"):
        snapshot, _, _ = _read_snapshot(stored_hash(lines=lines))
    assert snapshot is not None
    assert [record.worker_id for record in snapshot.workers] == ["w0", "w2"]
    assert "capability refused" in caplog.text
    assert "capabilities[1].input_schema.type: 12 is not valid" in caplog.text


def test_a_stream_registration_with_an_invalid_schema_is_skipped_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = RedisStore(
        CapabilityRegistry(), url="redis://unused", prefix="p", controller_id="c", clock=lambda: T0
    )
    bad = capability(output_schema={"$schema": "unknown"})
    lines = [
        encode_event(WorkerRegistered("w1", "https://w1:8443", (capability(),), T0, revision=1)),
        encode_event(WorkerRegistered("w2", "https://w2:8443", (bad,), T0, revision=2)),
    ]
    with caplog.at_level(logging.WARNING, logger="crank_registry_asgi.redis"):
        store._apply_changes(lines, 1, b"9-0")
    assert "w1" in store.registry and "w2" not in store.registry
    assert "stream change skipped entry=9-0 revision=2" in caplog.text
    assert "capabilities[0].output_schema.$schema: 'unknown' is not a JSON Schema dialect" in (
        caplog.text
    )
