"""Reading the snapshot key's hash (no Redis needed: the hash as HGETALL returns it)."""

from __future__ import annotations

import json
import logging

import pytest

from crank_registry import (
    JOURNAL_FORMAT_VERSION,
    AccessRules,
    NewerJournalFormat,
    Snapshot,
    WorkerRecord,
    encode_snapshot,
)
from crank_registry_asgi.redis_store import _read_snapshot
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
