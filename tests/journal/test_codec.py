"""The journal codec: lines, snapshots and replay into a registry, without files."""

from __future__ import annotations

import io
import json
import pathlib
import zlib
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crank_registry import (
    JOURNAL_FORMAT_VERSION,
    CapabilityRegistry,
    Event,
    HealthState,
    HeartbeatReceived,
    JournalDecodeError,
    JournalReader,
    NewerJournalFormat,
    RegistryError,
    Reinstatement,
    SelfPreservationChanged,
    Snapshot,
    SnapshotPart,
    WorkerDeregistered,
    WorkerEvicted,
    WorkerHealthy,
    WorkerImported,
    WorkerRecord,
    WorkerRegistered,
    WorkerUnhealthy,
    decode_line,
    encode_event,
    encode_snapshot,
    structure,
    unstructure,
    unstructure_event,
)
from tests.builders import capability
from tests.journal.helpers import (
    T0,
    events,
    ids,
    normalized,
    records,
    replayed,
    replayed_bytes,
)


@given(events)
def test_every_event_round_trips(event: Event) -> None:
    line = encode_event(event)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert line.isascii()
    data = json.loads(line)
    assert data["v"] == JOURNAL_FORMAT_VERSION == 3
    assert isinstance(data["type"], str)
    if not isinstance(event, HeartbeatReceived):
        assert data["revision"] == event.revision
    assert decode_line(line) == (event,)
    assert decode_line(line.decode()) == (event,)


@settings(max_examples=40)
@given(
    st.lists(records, max_size=12, unique_by=lambda r: r.worker_id),
    st.integers(1, 5),
    st.integers(0, 2**40),
)
def test_snapshot_round_trips_in_parts(
    workers: list[WorkerRecord], part_size: int, revision: int
) -> None:
    snapshot = Snapshot(revision, tuple(workers))
    lines = encode_snapshot(snapshot, part_size=part_size)
    assert len(lines) == max(1, -(-len(workers) // part_size))
    reader = JournalReader()
    parts = [entry for line in lines for entry in reader.decode(line)]
    assert all(isinstance(p, SnapshotPart) for p in parts)
    assert [p.part for p in parts] == list(range(len(lines)))  # type: ignore[union-attr]
    assert [p.revision for p in parts] == [revision] * len(lines)  # type: ignore[union-attr]
    # Read back whole: every worker in its health state, and the revision.
    for registry, result in (replayed(lines), replayed_bytes(b"".join(lines))):
        assert registry.records() == workers
        assert registry.revision == revision
        assert result.lines_skipped == 0
        assert registry.snapshot() == snapshot


def test_snapshot_writes_each_capability_once() -> None:
    shared = (capability(),)
    workers = tuple(WorkerRecord(f"w{i}", "http://h:1", shared, T0) for i in range(10))
    (line,) = encode_snapshot(Snapshot(3, workers))
    data = json.loads(line)
    assert (data["v"], data["revision"]) == (JOURNAL_FORMAT_VERSION, 3)
    assert data["capabilities"] == [unstructure(capability())]
    assert data["capability_sets"] == [[0]]
    assert data["worker_sets"] == [0] * 10
    assert data["health"] == ["healthy"] * 10
    # Equal lists held by distinct objects are shared too.
    copies = tuple(WorkerRecord(f"w{i}", "http://h:1", (capability(),), T0) for i in range(3))
    assert len(json.loads(encode_snapshot(Snapshot(0, copies))[0])["capability_sets"]) == 1
    # A part numbers what it uses first, and repeats what the part before
    # numbered (so a damaged part loses no number another part needs).
    other = capability("text.summarize")
    mixed = tuple(
        WorkerRecord(f"w{i}", "http://h:1", (capability(), other)[: 1 + i % 2], T0)
        for i in range(6)
    )
    first, second, third = map(json.loads, encode_snapshot(Snapshot(0, mixed), part_size=2))
    assert (first["first_capability"], len(first["capabilities"])) == (0, 2)
    assert first["capability_sets"] == [[0], [0, 1]]
    assert (second["first_capability"], second["capabilities"]) == (0, first["capabilities"])
    assert (second["first_set"], second["capability_sets"]) == (0, [[0], [0, 1]])
    assert second["worker_sets"] == [0, 1]
    assert (third["first_capability"], third["capabilities"]) == (2, [])
    assert (third["first_set"], third["capability_sets"]) == (2, [])


def test_snapshot_writes_each_workers_health() -> None:
    caps = (capability(),)
    workers = (
        WorkerRecord("h", "http://h:1", caps, T0),
        WorkerRecord("u", "http://h:1", caps, T0, silent=True),
        WorkerRecord("v", "http://h:1", caps, T0, verified=False),
        WorkerRecord("s", "http://h:1", caps, T0, verified=False, silent=True),
    )
    (line,) = encode_snapshot(Snapshot(9, workers))
    assert json.loads(line)["health"] == ["healthy", "unhealthy", "unverified", "unverified_silent"]
    registry, _ = replayed([line])
    assert registry.records() == list(workers)
    assert [view.is_healthy for view in registry.workers(now=T0)] == [True, False, True, False]


def test_a_replayed_snapshot_shares_each_capability_value() -> None:
    caps = (capability(), capability("text.summarize"))
    workers = tuple(WorkerRecord(f"w{i}", "http://h:1", caps, T0) for i in range(5))
    registry, _ = replayed(encode_snapshot(Snapshot(1, workers), part_size=2))
    assert registry.records() == list(workers)
    # Read once per snapshot, not once per worker: the registry holds two values.
    held = {id(c) for record in registry.records() for c in record.capabilities}
    assert len(held) == 2


def test_replayed_workers_are_unverified_after_a_restart() -> None:
    lines = [encode_event(WorkerRegistered("w1", "http://h:1", (capability(),), T0, revision=1))]
    registry, _ = replayed(lines)
    # Replay applies the change as it happened: the worker was registered.
    assert registry.records() == [WorkerRecord("w1", "http://h:1", (capability(),), T0)]
    # The restarted registry has not heard from it since.
    registry.restart()
    assert registry.records() == [
        WorkerRecord("w1", "http://h:1", (capability(),), T0, verified=False)
    ]
    assert registry.revision == 1


def test_replay_folds_events() -> None:
    caps = (capability(),)
    other = (capability("text.summarize", "run"),)
    lines = [
        encode_event(WorkerRegistered("a", "http://a:1", caps, T0, revision=1)),
        encode_event(WorkerRegistered("b", "http://b:1", caps, T0 + 1, revision=2)),
        encode_event(WorkerRegistered("c", "http://c:1", caps, T0 + 2, revision=3)),
        encode_event(HeartbeatReceived("a", T0 + 10)),
        encode_event(HeartbeatReceived("a", T0 + 5)),  # older: changes nothing
        encode_event(HeartbeatReceived("ghost", T0 + 5)),  # unknown: changes nothing
        encode_event(WorkerDeregistered("b", T0 + 11, revision=4)),
        encode_event(WorkerUnhealthy("c", T0 + 80, T0 + 2, revision=5)),
        encode_event(WorkerEvicted("c", T0 + 130, T0 + 2, revision=6)),
        encode_event(WorkerImported("d", "http://d:1", other, T0 + 3, "peer", revision=7)),
        encode_event(
            WorkerRegistered("a", "http://a:2", other, T0 + 13, replaced=True, revision=8)
        ),
    ]
    registry, result = replayed(lines)
    assert normalized(registry.records()) == [
        ("a", "http://a:2", other, T0 + 13),  # replaced in place: keeps its position
        ("d", "http://d:1", other, T0 + 3),
    ]
    assert [r.verified for r in registry.records()] == [True, False]
    assert registry.revision == 8
    assert (result.lines_read, result.lines_skipped, result.torn_tail) == (11, 0, False)


def test_unhealthy_and_healthy_lines_change_routability() -> None:
    lines = [
        encode_event(WorkerRegistered("a", "http://a:1", (capability(),), T0, revision=1)),
        encode_event(WorkerUnhealthy("a", T0 + 61, T0, revision=2)),
    ]
    registry, _ = replayed(lines)
    # No clock needed: the line says the worker is silent.
    assert registry.records()[0].silent
    assert registry.route("classify", "image.classify", now=T0) is None
    lines.append(encode_event(WorkerHealthy("a", T0 + 70, revision=3)))
    registry, _ = replayed(lines)
    (record,) = registry.records()
    assert (record.silent, record.last_heartbeat, registry.revision) == (False, T0 + 70, 3)
    endpoint = registry.route("classify", "image.classify", now=T0 + 70)
    assert endpoint is not None and endpoint.worker_id == "a"


def test_self_preservation_lines_reinstate_and_older_lines_without_it_still_load() -> None:
    caps = (capability(),)
    registered = [
        encode_event(WorkerRegistered(w, f"http://{w}:1", caps, T0, revision=n))
        for n, w in enumerate(("a", "b", "c"), start=1)
    ]
    silences = [
        encode_event(WorkerUnhealthy("a", T0 + 61, T0, revision=4)),
        encode_event(WorkerUnhealthy("b", T0 + 62, T0, revision=5)),
    ]
    entered = SelfPreservationChanged(
        T0 + 63,
        True,
        "workers_fell_silent",
        3,
        3,
        (Reinstatement("a", HealthState.HEALTHY, T0), Reinstatement("b", HealthState.HEALTHY, T0)),
        revision=6,
    )
    line = encode_event(entered)
    assert json.loads(line)["reinstated"] == [
        {"worker_id": "a", "state": "healthy", "last_heartbeat": T0},
        {"worker_id": "b", "state": "healthy", "last_heartbeat": T0},
    ]
    assert decode_line(line) == (entered,)
    registry, result = replayed([*registered, *silences, line])
    assert result.lines_skipped == 0 and registry.self_preservation == T0 + 63
    # Routable again, their last heartbeats as they were (none faked).
    assert [(r.silent, r.last_heartbeat) for r in registry.records()] == [(False, T0)] * 3
    # A line written before the field existed (or with none: it is left out),
    # as a reader from before it reads it: nothing reinstated, the rest as before.
    data = json.loads(line)
    del data["reinstated"]
    old = (json.dumps(data) + "\n").encode()
    assert decode_line(old) == (attrs.evolve(entered, reinstated=()),)
    assert encode_event(attrs.evolve(entered, reinstated=())) == encode_event(decode_line(old)[0])
    assert b"reinstated" not in encode_event(attrs.evolve(entered, reinstated=()))
    registry, result = replayed([*registered, *silences, old])
    assert result.lines_skipped == 0 and registry.self_preservation == T0 + 63
    assert [r.silent for r in registry.records()] == [True, True, False]


def test_a_change_the_registry_refuses_is_skipped_and_counted() -> None:
    caps = (capability(),)
    lines = [
        encode_event(WorkerRegistered("a", "http://a:1", caps, T0, revision=1)),
        # Names a worker the registry does not hold (its line was lost).
        encode_event(WorkerDeregistered("nobody", T0 + 1, revision=2)),
        # A transition the table does not list (evicted while healthy).
        encode_event(WorkerEvicted("a", T0 + 2, T0, revision=3)),
        encode_event(WorkerRegistered("b", "http://b:1", caps, T0 + 3, revision=4)),
    ]
    registry, result = replayed(lines)
    assert ids(registry) == ["a", "b"]
    assert registry.revision == 4
    assert result.lines_skipped == 2
    assert [s.line_number for s in result.skipped] == [2, 3]
    assert all(s.reason.startswith("not applied") for s in result.skipped)


def test_snapshot_part_zero_resets_and_later_parts_add() -> None:
    caps = (capability(),)
    before = encode_event(WorkerRegistered("old", "http://o:1", caps, T0, revision=1))
    workers = tuple(WorkerRecord(f"w{i}", "http://h:1", caps, T0 + i) for i in range(5))
    snapshot = encode_snapshot(Snapshot(5, workers), part_size=2)
    after = encode_event(WorkerDeregistered("w3", T0 + 9, revision=6))
    registry, result = replayed([before, *snapshot, after])
    assert ids(registry) == ["w0", "w1", "w2", "w4"]
    assert registry.revision == 6
    assert result.lines_skipped == 0


# ------------------------------------------------------------------ revisions


def test_the_revision_survives_a_replay() -> None:
    registry = CapabilityRegistry()
    lines: list[bytes] = []
    for i in range(5):
        lines += map(
            encode_event, registry.register(f"w{i}", "http://h:1", [capability()], now=T0 + i)
        )
    lines += map(encode_event, registry.heartbeat("w0", now=T0 + 10))
    lines += map(encode_event, registry.deregister("w2", now=T0 + 11))
    lines += map(encode_event, registry.cleanup_stale(now=T0 + 200))  # unhealthy, evicted
    assert registry.revision == 5 + 1 + 2 * 4
    restored, _ = replayed(lines)
    assert restored.revision == registry.revision
    # And through a snapshot, with changes after it.
    registry.register("late", "http://h:1", [capability()], now=T0 + 201)
    compacted = [
        *encode_snapshot(Snapshot(14, ())),
        encode_event(
            WorkerRegistered("late", "http://h:1", (capability(),), T0 + 201, revision=15)
        ),
    ]
    restored, _ = replayed(compacted)
    assert (restored.revision, ids(restored)) == (registry.revision, ["late"]) == (15, ["late"])


def test_a_change_the_snapshot_already_holds_is_passed_over_silently() -> None:
    """A line appended after a compaction began: the snapshot holds its change already."""
    registry = CapabilityRegistry()
    first = registry.register("a", "http://a:1", [capability()], now=T0)
    second = registry.register("b", "http://b:1", [capability()], now=T0 + 1)
    gone = registry.deregister("a", now=T0 + 2)
    snapshot = registry.snapshot()  # at revision 3: holds b only
    later = registry.register("c", "http://c:1", [capability()], now=T0 + 3)
    # The lines of revisions 1..3 were still pending when the snapshot was taken.
    lines = [
        *encode_snapshot(snapshot),
        *map(encode_event, first + second + gone),
        *map(encode_event, later),
    ]
    restored, result = replayed(lines)
    # "a" was not registered again by its old line, and nothing was counted as skipped.
    assert ids(restored) == ["b", "c"]
    assert (result.lines_skipped, result.skipped) == (0, ())
    assert restored.revision == 4 == registry.revision
    assert restored.records() == registry.records()


# ------------------------------------------------------------------ damage


def _three_workers() -> list[bytes]:
    caps = (capability(),)
    return [
        encode_event(WorkerRegistered(f"w{i}", "http://h:1", caps, T0 + i, revision=i + 1))
        for i in range(3)
    ]


def test_torn_last_line_without_newline_is_dropped() -> None:
    lines = _three_workers()
    torn = lines[2][: len(lines[2]) // 2]
    registry, result = replayed([lines[0], lines[1], torn])
    assert ids(registry) == ["w0", "w1"]
    assert registry.revision == 2
    assert result.torn_tail is True
    assert (result.lines_read, result.lines_skipped) == (3, 1)
    assert result.skipped[0].line_number == 3
    assert result.skipped[0].reason.startswith("torn")


def test_complete_last_line_without_newline_is_still_torn() -> None:
    # It was never acknowledged: the fsync that covers it did not finish.
    lines = _three_workers()
    registry, result = replayed([lines[0], lines[1], lines[2].rstrip(b"\n")])
    assert ids(registry) == ["w0", "w1"]
    assert result.torn_tail is True


def test_unparseable_last_line_is_torn() -> None:
    lines = _three_workers()
    registry, result = replayed([*lines, b'{"v":2,"type":"regis\x00\x00\n'])
    assert len(registry) == 3
    assert result.torn_tail is True
    assert result.lines_skipped == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x00\n",
        b"not json at all\n",
        b'{"v":2,"type":"registered","worker_id":"w9"\n',  # cut, then the next line followed
        b"[1, 2, 3]\n",
        b'{"v":2,"type":"registered","worker_id":"w9","worker_url":"http://h:1","capabilities":[],'
        b'"at":1}\n',  # no revision
        b'{"v":2,"type":"party","worker_id":"w9","revision":9}\n',
        b'{"v":2,"type":"heartbeat","worker_id":"w9","at":"soon"}\n',
        b'{"v":2,"type":"heartbeat","worker_id":"w9","at":1,"extra":true}\n',
        b'{"v":2,"type":"deregistered","worker_id":"w0","at":1}\n',  # no revision
        b'{"v":2,"type":"deregistered","worker_id":"w0","at":1,"revision":"9"}\n',
        b'{"v":2,"type":"deregistered","worker_id":"w0","at":1,"revision":true}\n',
        b'{"v":1,"type":"heartbeat","worker_id":"w9","at":1,"extra":true}\n',
        b'{"v":true,"type":"heartbeat","worker_id":"w9","at":1}\n',
        b'{"v":"2","type":"heartbeat","worker_id":"w9","at":1}\n',
        b'{"v":0,"type":"heartbeat","worker_id":"w9","at":1}\n',
        b'{"type":"heartbeat","worker_id":"w9","at":1}\n',
        b"\xff\xfe invalid utf-8\n",
        b"[" * 100_000 + b"\n",
        b'{"v":2,"type":"snapshot","part":0,"parts":1,"capability_sets":[],"workers":[["w",1,2,0]]}\n',
        b'{"v":2,"type":"snapshot","part":2,"parts":1,"capability_sets":[],"workers":[]}\n',
        b'{"v":1,"type":"snapshot","part":0,"parts":1,"capability_sets":[[]],'
        b'"workers":[["w","http://h:1",1.0,0]]}\n',
        b"\n",
    ],
)
def test_a_corrupted_line_in_the_middle_is_skipped_and_counted(garbage: bytes) -> None:
    lines = _three_workers()
    data = [lines[0], garbage, lines[1], lines[2]]
    registry, result = replayed(data)
    assert ids(registry) == ["w0", "w1", "w2"]
    assert registry.revision == 3
    assert result.torn_tail is False
    assert (result.lines_read, result.lines_skipped) == (4, 1)
    assert result.skipped[0].line_number == 2
    again, result_of_bytes = replayed_bytes(b"".join(data))
    assert (result_of_bytes, again.records()) == (result, registry.records())


def _change_line(kind: str = "registered", **fields: Any) -> bytes:
    """A ``registered`` (or ``imported``) line of revision 2, with ``fields`` changed."""
    body: dict[str, Any] = {
        "v": 2,
        "type": kind,
        "worker_id": "w9",
        "worker_url": "http://h:9",
        "capabilities": [unstructure(capability())],
        "revision": 2,
    }
    if kind == "registered":
        body.update(at=T0, replaced=False)
    else:
        body.update(last_heartbeat=T0, source="peer")
    return json.dumps({**body, **fields}).encode() + b"\n"


def test_the_change_lines_below_are_valid_as_they_start() -> None:
    (registered,) = decode_line(_change_line())
    (imported,) = decode_line(_change_line("imported"))
    assert isinstance(registered, WorkerRegistered) and isinstance(imported, WorkerImported)


@pytest.mark.parametrize(
    "line",
    [
        _change_line(worker_url="ftp://h:9"),
        _change_line(worker_id="not an id!"),
        _change_line(capabilities=[]),
        _change_line(capabilities=[unstructure(capability())] * 2),  # one key twice
        _change_line("imported", worker_url="gopher://h:9"),
    ],
)
def test_an_event_line_the_wire_model_refuses_is_skipped(line: bytes) -> None:
    """DESIGN, Targets: every value read back passes the wire model's checks."""
    lines = _three_workers()
    with pytest.raises(JournalDecodeError):
        decode_line(line)
    registry, result = replayed([lines[0], line, lines[1], lines[2]])
    assert ids(registry) == ["w0", "w1", "w2"]
    assert result.lines_skipped == 1


def _checksummed(version: int = 2, **fields: Any) -> bytes:
    """A snapshot line with these fields and a checksum that holds.

    Format 1 had neither ``revision`` nor ``health``.
    """
    body: dict[str, Any] = {
        "v": version,
        "type": "snapshot",
        **({"revision": 1} if version > 1 else {}),
        "part": 0,
        "parts": 1,
        "first_capability": 0,
        "capabilities": [unstructure(capability())],
        "first_set": 0,
        "capability_sets": [[0]],
        "worker_ids": ["w9"],
        "worker_urls": ["http://h:9"],
        "last_heartbeats": [T0],
        "worker_sets": [0],
        **({"health": ["healthy"]} if version > 1 else {}),
        **fields,
    }
    text = json.dumps(body, separators=(",", ":")).encode()[:-1]  # without its closing brace
    return text + b',"crc32":%d}\n' % zlib.crc32(text)


def test_a_checksummed_line_is_read_as_written() -> None:
    registry, _ = replayed([_checksummed()])
    assert registry.records() == [WorkerRecord("w9", "http://h:9", (capability(),), T0)]
    assert registry.revision == 1
    registry, _ = replayed([_checksummed(health=["unverified_silent"], revision=7)])
    assert registry.records() == [
        WorkerRecord("w9", "http://h:9", (capability(),), T0, verified=False, silent=True)
    ]
    assert registry.revision == 7
    # Format 1 had neither revision nor health: its workers are unverified.
    registry, _ = replayed([_checksummed(version=1)])
    assert registry.records() == [
        WorkerRecord("w9", "http://h:9", (capability(),), T0, verified=False)
    ]
    assert registry.revision == 0


def test_a_snapshot_line_that_fails_its_checksum_is_skipped() -> None:
    workers = (WorkerRecord("w9", "http://h:9", (capability(),), T0),)
    line = encode_snapshot(Snapshot(3, workers))[0]
    for damaged in (
        line.replace(b"w9", b"w8"),  # still valid JSON and a valid worker id
        line.replace(b"1.0.0", b"1.0.1"),
        line.replace(b'"revision":3', b'"revision":4'),
        line.replace(b'"healthy"', b'"unverified"'),
        line.replace(b'"crc32":', b'"crc32":1'),
        line.replace(b',"crc32":', b',"crc":'),
    ):
        assert damaged != line
        registry, result = replayed_bytes(b"".join([*_three_workers(), damaged]))
        assert ids(registry) == ["w0", "w1", "w2"]
        assert result.lines_skipped == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"worker_urls": []},
        {"capability_sets": [[]]},
        {"capability_sets": [0]},
        {"capability_sets": [[0, 0]]},  # one (verb, name) twice
        {"capabilities": [{"name": "x"}]},
        {"capabilities": [{**unstructure(capability()), "colour": "red"}]},
        {"capabilities": [{**unstructure(capability()), "name": ["x"]}]},
        {"capabilities": [[1]]},
        {"first_capability": -1},
        {"first_set": "0"},
        {"part": 1},
        {"revision": -1},
        {"revision": "1"},
        {"revision": True},
        {"health": []},
        {"health": ["sick"]},
        {"health": [None]},
        {"health": "healthy"},
        {"colour": "red"},
        {"worker_ids": None},
        {"worker_ids": [[1]]},
        {"worker_ids": ["not an id!"]},
        {"worker_ids": [7]},
        {"worker_urls": [None]},
        {"worker_urls": ["ftp://h:1"]},
        {"worker_ids": ["a\nb"]},
        {"worker_urls": ["http://h:1\nhttp://h:2"]},
        {"last_heartbeats": {}},
        {"last_heartbeats": ["x"]},
        {"last_heartbeats": [None]},
        {"last_heartbeats": [float("inf")]},
        {"last_heartbeats": [float("nan")]},
        {"capability_sets": [["0"]]},
    ],
)
def test_a_checksummed_line_of_the_wrong_shape_is_skipped(fields: dict[str, Any]) -> None:
    lines = _three_workers()
    data = [lines[0], _checksummed(**fields), lines[1], lines[2]]
    registry, result = replayed(data)
    assert ids(registry) == ["w0", "w1", "w2"]
    assert result.lines_skipped == 1
    again, result_of_bytes = replayed_bytes(b"".join(data))
    assert (result_of_bytes, again.records()) == (result, registry.records())


@pytest.mark.parametrize(
    "fields",
    [
        {"worker_sets": [1]},
        {"worker_sets": [-1]},
        {"worker_sets": ["0"]},
        {"worker_sets": [[0]]},
        {"capability_sets": [[5]]},
        # Numbers that start far beyond the last part's: held by no memory.
        {"first_capability": 10**12},
        {"first_set": 10**12},
    ],
)
def test_a_checksummed_line_that_refers_to_unknown_numbers_drops_those_workers(
    fields: dict[str, Any],
) -> None:
    lines = _three_workers()
    data = [lines[0], _checksummed(**fields), lines[1], lines[2]]
    registry, result = replayed(data)
    # The part is read (part 0: it replaces w0); its one worker is dropped.
    assert ids(registry) == ["w1", "w2"]
    assert (result.lines_skipped, result.workers_dropped) == (0, 1)
    again, result_of_bytes = replayed_bytes(b"".join(data))
    assert (result_of_bytes, again.records()) == (result, registry.records())


def test_a_damaged_part_costs_only_its_own_workers() -> None:
    """DESIGN, Hardening: a damaged line costs at most the workers on that line."""
    first, second = capability(), capability("text.summarize")
    workers = (
        WorkerRecord("a0", "http://h:1", (first,), T0),
        WorkerRecord("a1", "http://h:1", (second,), T0),
        WorkerRecord("b0", "http://h:1", (first,), T0),
        WorkerRecord("b1", "http://h:1", (capability("audio.transcribe"),), T0),
        WorkerRecord("c0", "http://h:1", (second,), T0),
        WorkerRecord("c1", "http://h:1", (first, second), T0),
    )
    part0, part1, part2 = encode_snapshot(Snapshot(6, workers), part_size=2)
    for position in range(len(part0) - 1):  # every byte but the newline
        damaged = bytearray(part0)
        damaged[position] ^= 0x01  # a 1-bit flip
        registry, result = replayed_bytes(bytes(damaged) + part1 + part2)
        assert ids(registry) == ["b0", "b1", "c0", "c1"], position
        assert registry.revision == 6
        assert (result.lines_skipped, result.workers_dropped) == (1, 0)
    registry, result = replayed_bytes(part0 + part1.replace(b"b0", b"b9") + part2)
    assert ids(registry) == ["a0", "a1", "c0", "c1"]
    assert (result.lines_skipped, result.workers_dropped) == (1, 0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("verb", "a:b"),
        ("version", "not-semver"),
        ("max_concurrency", -5),
        ("requires_gpu", "yes"),
    ],
)
def test_a_checksummed_part_with_a_value_the_wire_refuses_costs_only_its_workers(
    field: str, value: Any
) -> None:
    """A checksum detects damage; it does not vouch for content."""
    workers = tuple(WorkerRecord(f"w{i}", "http://h:1", (capability(),), T0) for i in range(6))
    parts = encode_snapshot(Snapshot(6, workers), part_size=2)
    data = json.loads(parts[0])
    del data["crc32"]
    data["capabilities"][0][field] = value
    body = json.dumps(data, separators=(",", ":")).encode()[:-1]
    refused = body + b',"crc32":%d}\n' % zlib.crc32(body)
    with pytest.raises(JournalDecodeError, match=field):
        decode_line(refused)
    registry, result = replayed_bytes(refused + parts[1] + parts[2])
    assert ids(registry) == ["w2", "w3", "w4", "w5"]
    assert result.lines_skipped == 1 and result.skipped[0].line_number == 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            events.map(encode_event),
            st.sampled_from(
                [
                    b"\n",
                    b"garbage\n",
                    b'{"v":2,"type":"heartbeat","worker_id":"w1","at":1e999}\n',
                    b'{"v":2,"type":"heartbeat","worker_id":"w1","at":-0}\n',
                    _checksummed(),
                    _checksummed(worker_ids=["w1"]),
                    _checksummed(version=1),
                ]
            ),
        ),
        max_size=12,
    ),
    st.binary(max_size=20),
)
def test_replay_bytes_equals_replay_of_the_file(lines: list[bytes], tail: bytes) -> None:
    data = b"".join(lines) + tail
    from_bytes, result = replayed_bytes(data)
    from_file, result_of_file = replayed(io.BytesIO(data))
    assert result == result_of_file
    assert from_bytes.snapshot() == from_file.snapshot()


def test_a_newer_version_stops_the_replay_naming_both_versions() -> None:
    lines = _three_workers()
    future = json.loads(lines[1])
    future["v"] = 4
    with pytest.raises(
        NewerJournalFormat, match="format 4; this release reads formats 1, 2, 3 and writes 3"
    ):
        replayed([lines[0], json.dumps(future).encode() + b"\n", lines[2]])
    with pytest.raises(NewerJournalFormat) as caught:
        decode_line(json.dumps(future))
    assert caught.value.version == 4


@pytest.mark.parametrize("version", [0, -1, "2", None, True, 2.0])
def test_a_version_that_cannot_be_read_is_a_damaged_line(version: Any) -> None:
    lines = _three_workers()
    damaged = json.loads(lines[1])
    damaged["v"] = version
    registry, result = replayed([lines[0], json.dumps(damaged).encode() + b"\n", lines[2]])
    assert ids(registry) == ["w0", "w2"]
    (skipped,) = result.skipped
    assert "unsupported format version" in skipped.reason


def test_decode_error_is_a_registry_error_with_a_code() -> None:
    with pytest.raises(RegistryError) as caught:
        decode_line(b"{")
    assert isinstance(caught.value, JournalDecodeError)
    assert caught.value.code == "journal_corrupt"


def test_empty_journal() -> None:
    registry, result = replayed([])
    assert (len(registry), registry.revision) == (0, 0)
    assert (result.lines_read, result.lines_skipped, result.torn_tail) == (0, 0, False)


# ------------------------------------------------------------------ format 1


def test_format_1_event_lines_are_numbered_in_order() -> None:
    caps = [unstructure(capability())]
    lines = [
        json.dumps(
            {
                "v": 1,
                "type": "registered",
                "worker_id": w,
                "worker_url": "http://h:1",
                "at": T0,
                "replaced": False,
                "capabilities": caps,
            }
        ).encode()
        + b"\n"
        for w in ("a", "b")
    ]
    lines.append(b'{"v":1,"type":"heartbeat","worker_id":"a","at":%r}\n' % (T0 + 5))
    lines.append(b'{"v":1,"type":"deregistered","worker_id":"b","at":%r}\n' % (T0 + 6))
    reader = JournalReader()
    entries = [entry for line in lines for entry in reader.decode(line)]
    assert [getattr(e, "revision", None) for e in entries] == [1, 2, None, 3]
    registry, result = replayed(lines)
    assert normalized(registry.records()) == [("a", "http://h:1", (capability(),), T0 + 5)]
    assert (registry.revision, result.lines_skipped) == (3, 0)
    # A line of the new format written after them goes on from there.
    lines.append(encode_event(WorkerDeregistered("a", T0 + 7, revision=4)))
    registry, result = replayed(lines)
    assert (len(registry), registry.revision, result.lines_skipped) == (0, 4, 0)


def test_a_format_1_eviction_is_unhealthy_then_evicted() -> None:
    (unhealthy, evicted) = JournalReader().decode(
        b'{"v":1,"type":"evicted","worker_id":"a","at":%r,"last_heartbeat":%r}\n' % (T0 + 130, T0)
    )
    assert unhealthy == WorkerUnhealthy("a", T0 + 130, T0, revision=1)
    assert evicted == WorkerEvicted("a", T0 + 130, T0, revision=2)


# ------------------------------------------------------------------ the writer's side


def test_a_registrys_snapshot_replays_to_what_its_lines_replay_to() -> None:
    registry = CapabilityRegistry()
    lines: list[bytes] = []
    for i in range(30):
        events_ = registry.register(f"w{i}", f"http://h:{i + 1}", [capability()], now=T0 + i)
        lines += map(encode_event, events_)
    for i in range(0, 30, 3):
        lines += map(encode_event, registry.deregister(f"w{i}", now=T0 + 40))
    from_snapshot, _ = replayed(encode_snapshot(registry.snapshot(), part_size=7))
    from_lines, _ = replayed(lines)
    assert from_snapshot.records() == from_lines.records() == registry.records()
    assert from_snapshot.revision == from_lines.revision == registry.revision == 40


def test_a_snapshot_is_a_value_later_changes_do_not_touch() -> None:
    """The service takes the snapshot on the event loop and renders it in a thread."""
    registry = CapabilityRegistry()
    registry.register("a", "http://h:1", [capability()], now=T0)
    snapshot = registry.snapshot()
    registry.register("b", "http://h:1", [capability()], now=T0)
    registry.heartbeat("a", now=T0 + 40)
    registry.deregister("a", now=T0 + 41)
    restored, _ = replayed(encode_snapshot(snapshot))
    assert restored.records() == [WorkerRecord("a", "http://h:1", (capability(),), T0)]
    assert restored.revision == 1


def test_a_non_event_and_a_bad_part_size_are_refused() -> None:
    with pytest.raises(TypeError):
        CapabilityRegistry().apply("registered")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="part_size"):
        encode_snapshot(Snapshot(0, ()), part_size=0)


@given(
    st.sampled_from(["w1", "worker-000123", "a.b_c-D", "x" * 128]),
    st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**60), 2**60),
)
def test_heartbeat_lines_are_what_the_converter_writes(worker_id: str, at: float) -> None:
    event = HeartbeatReceived(worker_id, at)
    general = {"v": JOURNAL_FORMAT_VERSION, **unstructure_event(event)}
    assert encode_event(event) == json.dumps(general, separators=(",", ":")).encode() + b"\n"
    assert decode_line(encode_event(event)) == (HeartbeatReceived(worker_id, float(at)),)


@pytest.mark.parametrize("at", [float("nan"), float("inf")])
def test_a_non_finite_moment_is_refused(at: float) -> None:
    with pytest.raises(ValueError):
        encode_event(HeartbeatReceived("w1", at))


def test_an_empty_snapshot_is_one_line_and_resets() -> None:
    before = encode_event(WorkerRegistered("a", "http://h:1", (capability(),), T0, revision=1))
    (empty,) = encode_snapshot(Snapshot(1, ()))
    registry, _ = replayed([before, empty])
    assert (len(registry), registry.revision) == (0, 1)


# ------------------------------------------------------------------ the previous release's journal

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def test_the_previous_releases_journal_replays_to_the_workers_it_restored() -> None:
    """A journal of format 1, as the previous release left it on disk.

    ``fixtures/journal-format-1.jsonl`` was written by the previous release's
    service journal (``Journal.open``, ``recover``, ``record`` the events of
    its registry, ``compact``) with snapshot parts of 2 workers: five
    registrations, heartbeats and a deregistration folded into a compaction
    snapshot of two parts, then after it a registration, heartbeats (one
    coalesced away), a re-registration, a deregistration, an import and an
    eviction. ``fixtures/journal-format-1.restored.json`` holds the records
    the previous release's ``replay_bytes`` gave for it (its ``recover``
    restored the same workers).
    """
    data = (FIXTURES / "journal-format-1.jsonl").read_bytes()
    assert {json.loads(line)["v"] for line in data.splitlines()} == {1}
    expected = structure(
        json.loads((FIXTURES / "journal-format-1.restored.json").read_text()),
        tuple[WorkerRecord, ...],
    )
    registry, result = replayed_bytes(data)
    assert (result.lines_read, result.lines_skipped, result.workers_dropped) == (13, 0, 0)
    assert not result.torn_tail
    assert normalized(registry.records()) == normalized(expected)
    assert ids(registry) == ["a", "b", "e", "f"]
    # Its changes are numbered in order: registered e, registered b, deregistered d,
    # imported f, and the eviction of c as unhealthy then evicted.
    assert registry.revision == 6
    # After the restart, as the previous release restored them: all unverified.
    registry.restart()
    assert registry.records() == list(expected)
    # A compaction writes the new format, which replays to the same.
    lines = encode_snapshot(registry.snapshot())
    assert {json.loads(line)["v"] for line in lines} == {JOURNAL_FORMAT_VERSION}
    again, _ = replayed(lines)
    assert (again.records(), again.revision) == (registry.records(), 6)


def test_a_journal_of_format_2_replays_to_the_workers_its_writer_restored() -> None:
    """A journal of format 2, as the release before format 3's changes left it on disk.

    ``fixtures/journal-format-2.jsonl`` was written by the service at commit
    9ec7ec4 (format 2, before ``slos_changed`` and the other changes format 3
    adds), in-process on a fake clock, with snapshot parts of 2 workers:
    four registrations, heartbeats and a deregistration folded into a
    compaction (its epoch line, then a snapshot of two parts), then a
    registration, heartbeats, a worker unhealthy and healthy again, another
    unhealthy then evicted, and a re-registration.
    ``fixtures/journal-format-2.restored.json`` holds the records that
    release's ``replay_bytes`` and ``restart`` gave for it.
    """
    data = (FIXTURES / "journal-format-2.jsonl").read_bytes()
    assert {json.loads(line)["v"] for line in data.splitlines()} == {2}
    expected = structure(
        json.loads((FIXTURES / "journal-format-2.restored.json").read_text()),
        tuple[WorkerRecord, ...],
    )
    registry, result = replayed_bytes(data)
    assert (result.lines_read, result.lines_skipped, result.workers_dropped) == (15, 0, 0)
    assert not result.torn_tail
    assert result.epoch is not None
    assert registry.revision == 11
    registry.restart()
    assert registry.records() == list(expected)
    assert ids(registry) == ["a", "c", "e"]
    # A compaction writes format 3, which replays to the same.
    lines = encode_snapshot(registry.snapshot())
    assert {json.loads(line)["v"] for line in lines} == {JOURNAL_FORMAT_VERSION} == {3}
    again, _ = replayed(lines)
    assert (again.records(), again.revision) == (registry.records(), 11)
