"""The journal codec: lines, snapshots and replay, without files."""

from __future__ import annotations

import io
import json
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crank_registry import (
    JOURNAL_FORMAT_VERSION,
    CapabilityRegistry,
    Event,
    HeartbeatReceived,
    JournalDecodeError,
    JournalReader,
    JournalState,
    RegistryError,
    SnapshotPart,
    WorkerDeregistered,
    WorkerEvicted,
    WorkerImported,
    WorkerRecord,
    WorkerRegistered,
    decode_line,
    encode_event,
    encode_snapshot,
    replay,
    replay_bytes,
    unstructure,
    unstructure_event,
)
from tests.journal.helpers import T0, capability, capability_lists, events, normalized


@given(events)
def test_every_event_round_trips(event: Event) -> None:
    line = encode_event(event)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert line.isascii()
    data = json.loads(line)
    assert data["v"] == JOURNAL_FORMAT_VERSION
    assert isinstance(data["type"], str)
    assert decode_line(line) == event
    assert decode_line(line.decode()) == event


@settings(max_examples=40)
@given(
    st.lists(st.tuples(capability_lists, st.floats(T0, T0 + 1e6)), max_size=12), st.integers(1, 5)
)
def test_snapshot_round_trips_in_parts(
    rows: list[tuple[tuple[object, ...], float]], part_size: int
) -> None:
    records = [
        WorkerRecord(f"w{i}", f"http://10.0.0.{i}:80", caps, at, False)  # type: ignore[arg-type]
        for i, (caps, at) in enumerate(rows)
    ]
    lines = encode_snapshot(records, part_size=part_size)
    assert len(lines) == max(1, -(-len(records) // part_size))
    reader = JournalReader()
    parts = [reader.decode(line) for line in lines]
    assert all(isinstance(p, SnapshotPart) for p in parts)
    assert [p.part for p in parts] == list(range(len(lines)))  # type: ignore[union-attr]
    assert replay(lines).records == tuple(records)
    assert replay_bytes(b"".join(lines)).records == tuple(records)


def test_snapshot_writes_each_capability_once() -> None:
    shared = (capability(),)
    records = [WorkerRecord(f"w{i}", "http://h:1", shared, T0) for i in range(10)]
    (line,) = encode_snapshot(records)
    data = json.loads(line)
    assert data["capabilities"] == [unstructure(capability())]
    assert data["capability_sets"] == [[0]]
    assert data["worker_sets"] == [0] * 10
    # Equal lists held by distinct objects are shared too.
    copies = [WorkerRecord(f"w{i}", "http://h:1", (capability(),), T0) for i in range(3)]
    assert len(json.loads(encode_snapshot(copies)[0])["capability_sets"]) == 1
    # Later parts refer to the capabilities of the first by number.
    other = capability("text.summarize")
    mixed = [
        WorkerRecord(f"w{i}", "http://h:1", (capability(), other)[: 1 + i % 2], T0)
        for i in range(6)
    ]
    first, second, third = map(json.loads, encode_snapshot(mixed, part_size=2))
    assert (first["first_capability"], len(first["capabilities"])) == (0, 2)
    assert first["capability_sets"] == [[0], [0, 1]]
    assert (second["first_capability"], second["capabilities"]) == (2, [])
    assert (second["first_set"], second["capability_sets"]) == (2, [])
    assert second["worker_sets"] == [0, 1]
    assert (third["first_capability"], third["first_set"]) == (2, 2)


def test_replayed_snapshot_shares_one_tuple_per_capability_set() -> None:
    caps = (capability(), capability("text.summarize"))
    records = [WorkerRecord(f"w{i}", "http://h:1", tuple(caps), T0) for i in range(5)]
    replayed = replay_bytes(b"".join(encode_snapshot(records, part_size=2))).records
    assert replayed == tuple(
        WorkerRecord(r.worker_id, r.worker_url, caps, T0, False) for r in records
    )
    assert len({id(r.capabilities) for r in replayed}) == 1


def test_replayed_records_are_unverified() -> None:
    lines = [encode_event(WorkerRegistered("w1", "http://h:1", (capability(),), T0))]
    (record,) = replay(lines).records
    assert record.verified is False
    assert record == WorkerRecord("w1", "http://h:1", (capability(),), T0, verified=False)


def test_replay_folds_events() -> None:
    caps = (capability(),)
    other = (capability("text.summarize", "run"),)
    lines = [
        encode_event(WorkerRegistered("a", "http://a:1", caps, T0)),
        encode_event(WorkerRegistered("b", "http://b:1", caps, T0 + 1)),
        encode_event(WorkerRegistered("c", "http://c:1", caps, T0 + 2)),
        encode_event(HeartbeatReceived("a", T0 + 10)),
        encode_event(HeartbeatReceived("a", T0 + 5)),  # older: ignored
        encode_event(HeartbeatReceived("ghost", T0 + 5)),  # unknown: ignored
        encode_event(WorkerDeregistered("b", T0 + 11)),
        encode_event(WorkerEvicted("c", T0 + 12, T0 + 2)),
        encode_event(WorkerImported("d", "http://d:1", other, T0 + 3, "peer")),
        encode_event(WorkerRegistered("a", "http://a:2", other, T0 + 13, replaced=True)),
        encode_event(WorkerDeregistered("nobody", T0 + 14)),
    ]
    result = replay(lines)
    assert normalized(result.records) == [
        ("a", "http://a:2", other, T0 + 13),  # replaced in place: keeps its position
        ("d", "http://d:1", other, T0 + 3),
    ]
    assert (result.lines_read, result.lines_skipped, result.torn_tail) == (11, 0, False)


def test_snapshot_part_zero_resets_and_later_parts_add() -> None:
    caps = (capability(),)
    before = encode_event(WorkerRegistered("old", "http://o:1", caps, T0))
    records = [WorkerRecord(f"w{i}", "http://h:1", caps, T0 + i) for i in range(5)]
    snapshot = encode_snapshot(records, part_size=2)
    after = encode_event(WorkerDeregistered("w3", T0 + 9))
    result = replay([before, *snapshot, after])
    assert [r.worker_id for r in result.records] == ["w0", "w1", "w2", "w4"]


# ------------------------------------------------------------------ damage


def _three_workers() -> list[bytes]:
    caps = (capability(),)
    return [encode_event(WorkerRegistered(f"w{i}", "http://h:1", caps, T0 + i)) for i in range(3)]


def test_torn_last_line_without_newline_is_dropped() -> None:
    lines = _three_workers()
    torn = lines[2][: len(lines[2]) // 2]
    result = replay([lines[0], lines[1], torn])
    assert [r.worker_id for r in result.records] == ["w0", "w1"]
    assert result.torn_tail is True
    assert (result.lines_read, result.lines_skipped) == (3, 1)
    assert result.skipped[0].line_number == 3
    assert result.skipped[0].reason.startswith("torn")


def test_complete_last_line_without_newline_is_still_torn() -> None:
    # It was never acknowledged: the fsync that covers it did not finish.
    lines = _three_workers()
    result = replay([lines[0], lines[1], lines[2].rstrip(b"\n")])
    assert [r.worker_id for r in result.records] == ["w0", "w1"]
    assert result.torn_tail is True


def test_unparseable_last_line_is_torn() -> None:
    lines = _three_workers()
    result = replay([*lines, b'{"v":1,"type":"regis\x00\x00\n'])
    assert len(result.records) == 3
    assert result.torn_tail is True
    assert result.lines_skipped == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x00\n",
        b"not json at all\n",
        b'{"v":1,"type":"registered","worker_id":"w9"\n',  # cut, then the next line followed
        b"[1, 2, 3]\n",
        b'{"v":1,"type":"registered","worker_id":"w9","worker_url":"ftp://x","capabilities":[],"at":1}\n',
        b'{"v":1,"type":"party","worker_id":"w9"}\n',
        b'{"v":1,"type":"heartbeat","worker_id":"w9","at":"soon"}\n',
        b'{"v":1,"type":"heartbeat","worker_id":"w9","at":1,"extra":true}\n',
        b'{"v":true,"type":"heartbeat","worker_id":"w9","at":1}\n',
        b'{"type":"heartbeat","worker_id":"w9","at":1}\n',
        b"\xff\xfe invalid utf-8\n",
        b"[" * 100_000 + b"\n",
        b'{"v":1,"type":"snapshot","part":0,"parts":1,"capability_sets":[],"workers":[["w",1,2,0]]}\n',
        b'{"v":1,"type":"snapshot","part":2,"parts":1,"capability_sets":[],"workers":[]}\n',
        b'{"v":1,"type":"snapshot","part":0,"parts":1,"capability_sets":[[]],'
        b'"workers":[["w","http://h:1",1.0,0]]}\n',
        b"\n",
    ],
)
def test_a_corrupted_line_in_the_middle_is_skipped_and_counted(garbage: bytes) -> None:
    lines = _three_workers()
    result = replay([lines[0], garbage, lines[1], lines[2]])
    assert [r.worker_id for r in result.records] == ["w0", "w1", "w2"]
    assert result.torn_tail is False
    assert (result.lines_read, result.lines_skipped) == (4, 1)
    assert result.skipped[0].line_number == 2
    assert replay_bytes(b"".join([lines[0], garbage, lines[1], lines[2]])) == result


def _checksummed(**fields: Any) -> bytes:
    """A snapshot line with these fields and a checksum that holds."""
    body: dict[str, Any] = {
        "v": 1,
        "type": "snapshot",
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
        **fields,
    }
    text = json.dumps(body, separators=(",", ":")).encode()[:-1]  # without its closing brace
    return text + b',"crc32":%d}\n' % zlib.crc32(text)


def test_a_checksummed_line_is_read_as_written() -> None:
    (record,) = replay([_checksummed()]).records
    assert record == WorkerRecord("w9", "http://h:9", (capability(),), T0, verified=False)


def test_a_snapshot_line_that_fails_its_checksum_is_skipped() -> None:
    line = encode_snapshot([WorkerRecord("w9", "http://h:9", (capability(),), T0)])[0]
    for damaged in (
        line.replace(b"w9", b"w8"),  # still valid JSON and a valid worker id
        line.replace(b"1.2.3", b"1.2.4"),
        line.replace(b'"crc32":', b'"crc32":1'),
        line.replace(b',"crc32":', b',"crc":'),
    ):
        assert damaged != line
        result = replay_bytes(b"".join([*_three_workers(), damaged]))
        assert [r.worker_id for r in result.records] == ["w0", "w1", "w2"]
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
        {
            "last_heartbeats": [1e308, 1e308],
            "worker_ids": ["a", "b"],
            "worker_urls": ["http://h:1"] * 2,
            "worker_sets": [0, 0],
        },
        {"worker_sets": [[0]]},
    ],
)
def test_a_checksummed_line_of_the_wrong_shape_is_skipped(fields: dict[str, Any]) -> None:
    lines = _three_workers()
    data = [lines[0], _checksummed(**fields), lines[1], lines[2]]
    result = replay(data)
    assert [r.worker_id for r in result.records] == ["w0", "w1", "w2"]
    assert result.lines_skipped == 1
    assert replay_bytes(b"".join(data)) == result


@pytest.mark.parametrize(
    "fields",
    [
        {"worker_sets": [1]},
        {"worker_sets": [-1]},
        {"worker_sets": ["0"]},
        {"capability_sets": [[5]]},
        {"capability_sets": [["0"]]},
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
    result = replay(data)
    # The part is read (part 0: it replaces w0); its one worker is dropped.
    assert [r.worker_id for r in result.records] == ["w1", "w2"]
    assert (result.lines_skipped, result.workers_dropped) == (0, 1)
    assert replay_bytes(b"".join(data)) == result


def test_workers_whose_capabilities_were_on_a_skipped_part_are_dropped() -> None:
    first, second = capability(), capability("text.summarize")
    records = [
        WorkerRecord("a0", "http://h:1", (first,), T0),
        WorkerRecord("a1", "http://h:1", (second,), T0),
        WorkerRecord("b0", "http://h:1", (first,), T0),  # part 1: uses part 0's numbers
        WorkerRecord("b1", "http://h:1", (capability("audio.transcribe"),), T0),
        WorkerRecord("c0", "http://h:1", (second,), T0),
        WorkerRecord("c1", "http://h:1", (capability("audio.transcribe"),), T0),
    ]
    part0, part1, part2 = encode_snapshot(records, part_size=2)
    result = replay_bytes(part0.replace(b"a0", b"a9") + part1 + part2)
    assert [r.worker_id for r in result.records] == ["b1", "c1"]
    assert result.workers_dropped == 2
    assert result.lines_skipped == 1
    # A lost later part loses only its own workers and capabilities.
    result = replay_bytes(part0 + part1.replace(b"b0", b"b9") + part2)
    assert [r.worker_id for r in result.records] == ["a0", "a1", "c0"]
    assert result.workers_dropped == 1


@settings(max_examples=60)
@given(
    st.lists(
        st.one_of(
            events.map(encode_event),
            st.sampled_from(
                [
                    b"\n",
                    b"garbage\n",
                    b'{"v":1,"type":"heartbeat","worker_id":"w1","at":1e999}\n',
                    b'{"v":1,"type":"heartbeat","worker_id":"w1","at":-0}\n',
                    _checksummed(),
                    _checksummed(worker_ids=["w1"]),
                ]
            ),
        ),
        max_size=12,
    ),
    st.binary(max_size=20),
)
def test_replay_bytes_equals_replay_of_the_file(lines: list[bytes], tail: bytes) -> None:
    data = b"".join(lines) + tail
    assert replay_bytes(data) == replay(io.BytesIO(data))


def test_unknown_version_is_skipped_with_its_reason() -> None:
    lines = _three_workers()
    future = json.loads(lines[1])
    future["v"] = 2
    result = replay([lines[0], json.dumps(future).encode() + b"\n", lines[2]])
    assert [r.worker_id for r in result.records] == ["w0", "w2"]
    assert "unsupported format version 2" in result.skipped[0].reason
    with pytest.raises(JournalDecodeError, match="version 2"):
        decode_line(json.dumps(future))


def test_decode_error_is_a_registry_error_with_a_code() -> None:
    with pytest.raises(RegistryError) as caught:
        decode_line(b"{")
    assert isinstance(caught.value, JournalDecodeError)
    assert caught.value.code == "journal_corrupt"


def test_empty_journal() -> None:
    result = replay([])
    assert (result.records, result.lines_read, result.lines_skipped) == ((), 0, 0)


# ------------------------------------------------------------------ writer


def test_state_coalesces_heartbeats() -> None:
    state = JournalState()
    registry = CapabilityRegistry()
    first = state.encode(registry.register("w1", "http://h:1", [capability()], now=T0))
    assert first.durable and len(first.lines) == 1
    every = registry.policy.unhealthy_after / 2
    quiet = state.encode(registry.heartbeat("w1", now=T0 + every - 1), heartbeat_every=every)
    assert quiet.lines == () and not quiet.durable
    due = state.encode(registry.heartbeat("w1", now=T0 + every), heartbeat_every=every)
    assert len(due.lines) == 1 and not due.durable
    # The state is exactly what the lines say: the skipped heartbeat is not in it.
    assert state.records()[0].last_heartbeat == T0 + every
    unknown = state.encode([HeartbeatReceived("ghost", T0 + 100)], heartbeat_every=every)
    assert unknown.lines == ()
    gone = state.encode(registry.deregister("w1", now=T0 + 100))
    assert gone.durable and len(state) == 0


def test_state_snapshot_equals_its_lines() -> None:
    state = JournalState()
    registry = CapabilityRegistry()
    lines: list[bytes] = []
    for i in range(30):
        lines += state.encode(
            registry.register(f"w{i}", f"http://h:{i + 1}", [capability()], now=T0 + i)
        ).lines
    for i in range(0, 30, 3):
        lines += state.encode(registry.deregister(f"w{i}", now=T0 + 40)).lines
    assert replay(state.snapshot(part_size=7)).records == replay(lines).records
    assert normalized(replay(lines).records) == normalized(registry.records())


def test_state_rejects_a_non_entry() -> None:
    with pytest.raises(TypeError):
        JournalState().apply("registered")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="part_size"):
        encode_snapshot([], part_size=0)


@given(
    st.sampled_from(["w1", "worker-000123", "a.b_c-D", "x" * 128]),
    st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**60), 2**60),
)
def test_heartbeat_lines_are_what_the_converter_writes(worker_id: str, at: float) -> None:
    event = HeartbeatReceived(worker_id, at)
    general = {"v": JOURNAL_FORMAT_VERSION, **unstructure_event(event)}
    assert encode_event(event) == json.dumps(general, separators=(",", ":")).encode() + b"\n"
    assert decode_line(encode_event(event)) == HeartbeatReceived(worker_id, float(at))


@pytest.mark.parametrize("at", [float("nan"), float("inf")])
def test_a_non_finite_moment_is_refused(at: float) -> None:
    with pytest.raises(ValueError):
        encode_event(HeartbeatReceived("w1", at))


@given(events)
def test_state_writes_lines_that_read_back_as_the_event(event: Event) -> None:
    state = JournalState()
    # A heartbeat gets a line only for a known worker.
    state.encode([WorkerRegistered(event.worker_id, "http://h:1", (capability(),), 0.0)])
    (line,) = state.encode([event]).lines
    assert json.loads(line)["v"] == JOURNAL_FORMAT_VERSION
    assert decode_line(line) == event


def test_state_copy_is_independent() -> None:
    state = JournalState()
    registry = CapabilityRegistry()
    state.encode(registry.register("a", "http://h:1", [capability()], now=T0))
    twin = state.copy()
    state.encode(registry.register("b", "http://h:1", [capability()], now=T0))
    state.encode(registry.heartbeat("a", now=T0 + 40), heartbeat_every=30)
    assert [r.worker_id for r in twin.records()] == ["a"]
    assert twin.records()[0].last_heartbeat == T0
    assert replay(twin.snapshot()).records == twin.records()


# Between two runs of heartbeats, so that they stay two.
_SEPARATOR = encode_event(WorkerDeregistered("nobody", T0))


def _heartbeat_run(worker_times: list[tuple[str, float]]) -> bytes:
    return b"".join(encode_event(HeartbeatReceived(w, at)) for w, at in worker_times)


_beats = st.tuples(st.sampled_from(["w0", "w1", "w2", "ghost"]), st.floats(T0 - 50, T0 + 50))
# Short runs are folded line by line, long ones (32 lines and more) in bulk.
_runs = st.lists(_beats, max_size=8) | st.lists(_beats, min_size=32, max_size=60)
_sorted_runs = _runs.map(lambda run: sorted(run, key=lambda pair: pair[1]))


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.one_of(
            _runs.map(_heartbeat_run),
            _sorted_runs.map(_heartbeat_run),
            events.map(encode_event),
            st.just(
                b"".join(encode_snapshot([WorkerRecord("w1", "http://h:1", (capability(),), T0)]))
            ),
            st.sampled_from(
                [
                    b"garbage\n",
                    b'{"v":1,"type":"heartbeat","worker_id":"w1","at":1e999}\n',
                    # A damaged line holding a heartbeat line's text.
                    b'{"v":1,"type":"heartbeat",'
                    b'{"v":1,"type":"heartbeat","worker_id":"w2","at":1700000099.0}\n',
                ]
            ),
        ),
        max_size=8,
    ).map(lambda chunks: [line for chunk in chunks for line in (chunk, _SEPARATOR)]),
)
def test_replay_bytes_folds_runs_of_heartbeats_as_replay_does(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    assert replay_bytes(data) == replay(io.BytesIO(data))


def test_a_long_run_of_heartbeats_moves_known_workers_forward_only() -> None:
    registered = [
        encode_event(WorkerRegistered(w, "http://h:1", (capability(),), T0 + 100))
        for w in ("a", "b")
    ]
    # In order but older than the registrations: nothing moves.
    older = _heartbeat_run([("a", T0 + i) for i in range(50)])
    # In order and later: the last of each worker wins; unknown workers are ignored.
    later = _heartbeat_run([("b" if i % 2 else "ghost", T0 + 200 + i) for i in range(50)])
    between = encode_event(WorkerDeregistered("nobody", T0 + 150))
    data = b"".join([*registered, older, between, later])
    result = replay_bytes(data)
    assert [(r.worker_id, r.last_heartbeat) for r in result.records] == [
        ("a", T0 + 100),
        ("b", T0 + 249),
    ]
    assert result.lines_read == 103
    assert result == replay(io.BytesIO(data))


def test_a_long_run_in_order_does_not_undo_a_later_heartbeat() -> None:
    registered = encode_event(WorkerRegistered("a", "http://h:1", (capability(),), T0))
    separator = encode_event(WorkerDeregistered("nobody", T0))
    for before in (
        _heartbeat_run([("a", T0 + 300)]),  # one line: folded alone
        _heartbeat_run([("a", T0 + 260 + i) for i in range(41)]),  # a run folded in bulk
    ):
        run = _heartbeat_run([("a", T0 + 200 + i) for i in range(50)])  # in order, but older
        data = b"".join([registered, before, separator, run])
        (record,) = replay_bytes(data).records
        assert record.last_heartbeat == T0 + 300
    # Out of order within the run: the latest time wins, not the last line.
    run = _heartbeat_run([("a", T0 + 200 + (i * 7) % 50) for i in range(50)])
    (record,) = replay_bytes(registered + separator + run).records
    assert record.last_heartbeat == T0 + 249


def test_runs_longer_than_a_slice_and_lines_longer_than_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from crank_registry import _journal

    monkeypatch.setattr(_journal, "_SLICE_BYTES", 100)  # about one heartbeat line
    registered = encode_event(WorkerRegistered("a", "http://h:1", (capability(),), T0))
    long_damaged = b'{"v":1,"type":"heartbeat",' + b"x" * 500 + b"\n"
    data = b"".join(
        [
            registered,
            _heartbeat_run([("a", T0 + i) for i in range(40)]),
            long_damaged,
            _heartbeat_run([("a", T0 + 100 + i) for i in range(40)]),
        ]
    )
    result = replay_bytes(data)
    assert result == replay(io.BytesIO(data))
    assert (result.lines_read, result.lines_skipped) == (82, 1)
    assert result.records[0].last_heartbeat == T0 + 139


def test_a_long_run_after_a_single_heartbeat_moves_the_worker_to_its_own_last_time() -> None:
    registered = encode_event(WorkerRegistered("a", "http://h:1", (capability(),), T0))
    separator = encode_event(WorkerDeregistered("nobody", T0))
    single = _heartbeat_run([("a", T0 + 10)])  # folded alone
    run = _heartbeat_run([("a", T0 + 20 + i) for i in range(40)])  # folded in bulk
    data = b"".join([registered, single, separator, run])
    (record,) = replay_bytes(data).records
    assert record.last_heartbeat == T0 + 59
    assert replay_bytes(data) == replay(io.BytesIO(data))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            # Short runs are folded one by one, long ones in bulk.
            st.lists(st.sampled_from(["w0", "w1", "w2", "ghost"]), max_size=5)
            | st.lists(st.sampled_from(["w0", "w1", "w2", "ghost"]), min_size=32, max_size=40),
            st.sampled_from(["w0", "w1", "w2"]),
            st.sampled_from(["register", "deregister"]),
        ),
        max_size=6,
    )
)
def test_replay_bytes_equals_replay_on_a_journal_written_in_time_order(
    steps: list[tuple[list[str], str, str]],
) -> None:
    # Times only go forward, as a writer writes them: the bulk fold is taken
    # whenever a run is long enough, after lines folded one by one.
    now = T0
    lines = [
        encode_event(WorkerRegistered(w, "http://h:1", (capability(),), now))
        for w in ("w0", "w1", "w2")
    ]
    for beating, worker_id, action in steps:
        for beating_id in beating:
            now += 0.5
            lines.append(encode_event(HeartbeatReceived(beating_id, now)))
        now += 1
        if action == "register":
            lines.append(
                encode_event(WorkerRegistered(worker_id, "http://h:1", (capability(),), now))
            )
        else:
            lines.append(encode_event(WorkerDeregistered(worker_id, now)))
    data = b"".join(lines)
    assert replay_bytes(data) == replay(io.BytesIO(data))
