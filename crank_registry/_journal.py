"""The journal codec: events and snapshots as JSON lines, and their replay.

Sans-IO: this module turns values into lines and lines back into values; it
opens no file. The service appends the lines to ``registry.jsonl``, fsyncs
them and, on start, hands the file's lines to :func:`replay`.

Every line is one JSON object with the format version ``"v"`` and a
``"type"``, ending in a newline:

* an event, as :func:`~crank_registry.unstructure_event` writes it::

    {"v": 1, "type": "registered", "worker_id": "w1", "worker_url": ..., ...}

* a part of a snapshot, written by compaction. A snapshot is split in parts
  of at most :data:`SNAPSHOT_PART_SIZE` workers so that a damaged line loses
  a bounded number of workers, not the whole registry. Identical capability
  lists (replicas of one service) are written once per part and referred to
  by index::

    {"v": 1, "type": "snapshot", "part": 0, "parts": 3,
     "capability_sets": [[{capability}, ...], ...],
     "workers": [["w1", "https://w1:8443", 1700000000.5, 0], ...]}

  Part 0 resets the state; the other parts add to it.

Replay folds the lines into :class:`~crank_registry.WorkerRecord` values:
registered and imported set a record, a heartbeat moves its last heartbeat
forward, deregistered and evicted remove it. A damaged or unknown-version
line is skipped and counted; a torn last line (no newline, or not
parseable: the process died while writing it) is dropped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from typing import Any

import attrs

from ._converter import (
    EVENT_TYPES,
    structure,
    structure_event,
    unstructure,
    unstructure_event,
)
from ._errors import RegistryError, ValidationError
from ._events import (
    Event,
    HeartbeatReceived,
    WorkerDeregistered,
    WorkerEvicted,
    WorkerImported,
    WorkerRegistered,
)
from ._models import _WORKER_ID, CapabilitySchema, WorkerRecord

__all__ = [
    "JOURNAL_FORMAT_VERSION",
    "SNAPSHOT_PART_SIZE",
    "JournalDecodeError",
    "JournalEntry",
    "JournalLines",
    "JournalState",
    "ReplayResult",
    "SkippedLine",
    "SnapshotPart",
    "decode_line",
    "encode_event",
    "encode_snapshot",
    "replay",
]

#: The value of ``"v"`` in every line this codec writes; other values are skipped.
JOURNAL_FORMAT_VERSION = 1

#: The most workers one snapshot line holds.
SNAPSHOT_PART_SIZE = 4096

_SNAPSHOT_TYPE = "snapshot"
_DECODER = json.JSONDecoder()
_SNAPSHOT_FIELDS = frozenset({"v", "type", "part", "parts", "capability_sets", "workers"})


class JournalDecodeError(RegistryError):
    """A journal line that cannot be read: damaged, or written by another format version."""

    code = "journal_corrupt"
    status_hint = 500

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@attrs.frozen
class SnapshotPart:
    """One line of a snapshot: some of the workers live when it was written.

    Part 0 replaces whatever came before it; the parts after it add to it.
    """

    records: tuple[WorkerRecord, ...]
    part: int = 0
    parts: int = 1


#: What one journal line holds.
JournalEntry = Event | SnapshotPart


@attrs.frozen
class SkippedLine:
    """A line replay could not use: its 1-based number and why."""

    line_number: int
    reason: str


@attrs.frozen
class ReplayResult:
    """What a journal adds up to.

    ``records`` are in registration order and ``unverified``: the process
    that replays them has not heard from those workers. Hand them to
    :meth:`CapabilityRegistry.restore`. ``lines_skipped`` counts damaged,
    unknown-version and torn lines; ``skipped`` says which and why.
    """

    records: tuple[WorkerRecord, ...]
    lines_read: int
    lines_skipped: int
    torn_tail: bool
    skipped: tuple[SkippedLine, ...]


@attrs.frozen
class JournalLines:
    """The lines for a batch of events; ``durable``: they must be fsynced before success."""

    lines: tuple[bytes, ...]
    durable: bool


# --------------------------------------------------------------------- encode


def _dumps(value: Any) -> bytes:
    # ASCII only, so that a line never holds a raw newline or a surrogate;
    # allow_nan=False: a non-finite number would not read back.
    return (
        json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
        + b"\n"
    )


def encode_event(event: Event) -> bytes:
    """One journal line (ending in a newline) for ``event``."""
    if type(event) is HeartbeatReceived:
        line = _encode_heartbeat(event)
        if line is not None:
            return line
    return _dumps({"v": JOURNAL_FORMAT_VERSION, **unstructure_event(event)})


def _encode_heartbeat(event: HeartbeatReceived) -> bytes | None:
    """The same line as the converter's, in a fifth of the time: most lines are heartbeats.

    A valid worker id needs no JSON escaping and ``repr`` of a finite float
    is what :mod:`json` writes; anything else takes the general path.
    """
    at = event.at
    if type(at) is not float or not math.isfinite(at) or not _WORKER_ID.fullmatch(event.worker_id):
        return None
    return (
        f'{{"v":{JOURNAL_FORMAT_VERSION},"type":"heartbeat",'
        f'"worker_id":"{event.worker_id}","at":{at!r}}}\n'
    ).encode()


_TAGS: dict[type[Event], str] = {cls: tag for tag, cls in EVENT_TYPES.items()}
# Renderings of capability values kept at most (then forgotten at once).
_RENDERED_LIMIT = 1 << 16


def _encode_with_capabilities(event: WorkerRegistered | WorkerImported, capabilities: str) -> bytes:
    """The line for ``event``, with its capability list already rendered as JSON text."""
    body: dict[str, Any] = {"v": JOURNAL_FORMAT_VERSION, "type": _TAGS[type(event)]}
    for field in attrs.fields(type(event)):
        if field.name != "capabilities":
            # The other fields are strings, numbers and booleans.
            body[field.name] = getattr(event, field.name)
    return _dumps(body)[:-2] + b',"capabilities":' + capabilities.encode() + b"}\n"


def _text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def encode_snapshot(
    records: Iterable[WorkerRecord], *, part_size: int = SNAPSHOT_PART_SIZE
) -> tuple[bytes, ...]:
    """The lines of a snapshot holding ``records`` (at least one line, even when empty)."""
    return JournalState(records).snapshot(part_size=part_size)


# --------------------------------------------------------------------- decode


def decode_line(line: bytes | str) -> JournalEntry:
    """Read one line (with or without its newline).

    Raises :class:`JournalDecodeError` for anything that is not a line this
    format version wrote: bytes that are not JSON, a wrong shape or type, an
    unknown ``"type"``, or another ``"v"``.
    """
    return _Reader().decode(line)


# A heartbeat line exactly as encode_event writes it, read without json:
# most lines of a journal are heartbeats.
_HEARTBEAT_LINE = re.compile(
    rb'\{"v":%d,"type":"heartbeat","worker_id":"([A-Za-z0-9._-]{1,128})",'
    rb'"at":(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\}\n?' % JOURNAL_FORMAT_VERSION
)


class _Reader:
    """Decodes lines, sharing equal capability values between the lines it reads.

    Sharing makes a replayed registry hold one object per distinct
    capability (as a live one does) and saves structuring the same JSON
    again for every snapshot part.
    """

    def __init__(self) -> None:
        self._capabilities: dict[tuple[Any, ...], list[tuple[Any, CapabilitySchema]]] = {}
        self._sets: dict[tuple[int, ...], tuple[CapabilitySchema, ...]] = {}

    def decode(self, line: bytes | str) -> JournalEntry:
        raw = line.encode() if isinstance(line, str) else line
        match = _HEARTBEAT_LINE.fullmatch(raw)
        if match is not None:
            at = float(match[2])
            if math.isfinite(at):
                return HeartbeatReceived(match[1].decode(), at)
        try:
            data = _DECODER.decode(raw.decode())
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
            raise JournalDecodeError("not a JSON line") from None
        if not isinstance(data, dict):
            raise JournalDecodeError("not a JSON object")
        version = data.get("v")
        if version != JOURNAL_FORMAT_VERSION or isinstance(version, bool):
            raise JournalDecodeError(
                f"unsupported format version {version!r} (expected {JOURNAL_FORMAT_VERSION})"
            )
        if data.get("type") == _SNAPSHOT_TYPE:
            return self._snapshot(data)
        body = {key: value for key, value in data.items() if key != "v"}
        try:
            event = structure_event(body)
            # Events are plain values; hold them to the model's rules too.
            if isinstance(event, WorkerRegistered):
                WorkerRecord(event.worker_id, event.worker_url, event.capabilities, event.at)
            elif isinstance(event, WorkerImported):
                WorkerRecord(
                    event.worker_id, event.worker_url, event.capabilities, event.last_heartbeat
                )
            elif not _WORKER_ID.fullmatch(event.worker_id):
                raise ValidationError.single("worker_id", "not a valid worker id")
        except ValidationError as error:
            raise JournalDecodeError(f"invalid {data.get('type')!r} line: {error}") from None
        return event

    def _capability_set(self, raw: Any) -> tuple[CapabilitySchema, ...]:
        if not isinstance(raw, list) or not raw:
            raise JournalDecodeError("snapshot: a capability set must be a non-empty list")
        capabilities = []
        for item in raw:
            if not isinstance(item, dict):
                raise JournalDecodeError("snapshot: a capability must be an object")
            # Parts repeat the capabilities they share: structure each once.
            # (dict equality is C-speed; rendering a key for it was not. It
            # takes 1 for true, which this codec never writes for a bool.)
            seen = self._capabilities.setdefault(
                (item.get("verb"), item.get("name"), item.get("version")), []
            )
            capability = next((c for data, c in seen if data == item), None)
            if capability is None:
                try:
                    capability = structure(item, CapabilitySchema)
                except ValidationError as error:
                    raise JournalDecodeError(f"snapshot: invalid capability: {error}") from None
                seen.append((item, capability))
            capabilities.append(capability)
        identity = tuple(map(id, capabilities))
        shared = self._sets.get(identity)
        if shared is None:
            if len({c.key for c in capabilities}) != len(capabilities):
                raise JournalDecodeError("snapshot: a capability set names a pair twice")
            shared = self._sets[identity] = tuple(capabilities)
        return shared

    def _snapshot(self, data: dict[str, Any]) -> SnapshotPart:
        unknown = sorted(data.keys() - _SNAPSHOT_FIELDS)
        if unknown:
            raise JournalDecodeError(f"snapshot: unknown field {unknown[0]!r}")
        part: Any = data.get("part")
        parts: Any = data.get("parts")
        if not (_is_int(part) and _is_int(parts) and 0 <= part < parts):
            raise JournalDecodeError("snapshot: part and parts must be integers, 0 <= part < parts")
        raw_sets, rows = data.get("capability_sets"), data.get("workers")
        if not isinstance(raw_sets, list) or not isinstance(rows, list):
            raise JournalDecodeError("snapshot: capability_sets and workers must be lists")
        sets = [self._capability_set(raw) for raw in raw_sets]
        records: list[WorkerRecord] = []
        for position, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) == 4):
                raise JournalDecodeError(f"snapshot: workers[{position}] is not a 4-item list")
            worker_id, worker_url, last_heartbeat, set_index = row
            # Shape and types only: these values passed every model check
            # when they were registered, and the line is intact JSON.
            if not (
                isinstance(worker_id, str)
                and _WORKER_ID.fullmatch(worker_id)
                and isinstance(worker_url, str)
                and worker_url.startswith(("http://", "https://"))
                and type(last_heartbeat) in (float, int)
                and math.isfinite(last_heartbeat)
                and _is_int(set_index)
                and 0 <= set_index < len(sets)
            ):
                raise JournalDecodeError(f"snapshot: workers[{position}] is malformed")
            records.append(_record(worker_id, worker_url, sets[set_index], float(last_heartbeat)))
        return SnapshotPart(tuple(records), part, parts)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _record(
    worker_id: str,
    worker_url: str,
    capabilities: tuple[CapabilitySchema, ...],
    last_heartbeat: float,
) -> WorkerRecord:
    """An unverified record from values that were validated when they were registered.

    Replay builds one record per worker; running the model's checks again
    (a URL parse each) would triple the recovery time of a large registry,
    for values that this codec wrote itself and read back intact. The slots
    are filled through their descriptors (the class is frozen).
    """
    record: WorkerRecord = _new_record(WorkerRecord)
    _set_worker_id(record, worker_id)
    _set_worker_url(record, worker_url)
    _set_capabilities(record, capabilities)
    _set_last_heartbeat(record, last_heartbeat)
    _set_verified(record, False)
    return record


_new_record = object.__new__
_set_worker_id = WorkerRecord.__dict__["worker_id"].__set__
_set_worker_url = WorkerRecord.__dict__["worker_url"].__set__
_set_capabilities = WorkerRecord.__dict__["capabilities"].__set__
_set_last_heartbeat = WorkerRecord.__dict__["last_heartbeat"].__set__
_set_verified = WorkerRecord.__dict__["verified"].__set__


# --------------------------------------------------------------------- replay


class JournalState:
    """The workers a journal describes: the fold of its lines.

    :func:`replay` uses it to read a journal; a writer uses it to turn
    events into lines (:meth:`encode`, which also decides which heartbeats
    are worth a line) and to write the snapshot that replaces the journal
    when it is compacted (:meth:`snapshot`). Records are kept
    ``unverified``: whoever replays them has not heard from the workers.
    """

    def __init__(self, records: Iterable[WorkerRecord] = ()) -> None:
        # Each worker's record as registered (or snapshotted); its heartbeats
        # since then are kept apart, so that a heartbeat line costs a float.
        self._records: dict[str, WorkerRecord] = {}
        self._heartbeats: dict[str, float] = {}
        # worker id -> its capability list as JSON text, when encode() has
        # already rendered it: a snapshot reuses it instead of rendering again.
        self._capability_texts: dict[str, str] = {}
        self._rendered: dict[int, tuple[CapabilitySchema, str]] = {}
        self._records.update((r.worker_id, _unverified(r)) for r in records)

    def apply(self, entry: JournalEntry) -> None:
        """Fold one entry into the state."""
        worker_id = entry.worker_id if isinstance(entry, Event) else ""
        if isinstance(entry, HeartbeatReceived):
            self.heartbeat(worker_id, entry.at)
        elif isinstance(entry, WorkerRegistered):
            self._set(_record(worker_id, entry.worker_url, entry.capabilities, entry.at))
        elif isinstance(entry, WorkerImported):
            self._set(
                _record(worker_id, entry.worker_url, entry.capabilities, entry.last_heartbeat)
            )
        elif isinstance(entry, (WorkerDeregistered, WorkerEvicted)):
            self._forget(worker_id)
        elif isinstance(entry, SnapshotPart):
            if entry.part == 0:
                self._records.clear()
                self._heartbeats.clear()
                self._capability_texts.clear()
            records = self._records
            if self._heartbeats or self._capability_texts:
                for record in entry.records:
                    self._set(_unverified(record))
            else:
                for record in entry.records:
                    records[record.worker_id] = _unverified(record)
        else:
            raise TypeError(f"not a journal entry: {entry!r}")

    def heartbeat(self, worker_id: str, at: float) -> bool:
        """Fold a journaled heartbeat; ``False`` (nothing done) for a non-finite ``at``."""
        if not math.isfinite(at):
            return False
        record = self._records.get(worker_id)
        if record is not None and at > self._heartbeats.get(worker_id, record.last_heartbeat):
            self._heartbeats[worker_id] = at
        return True

    def _set(self, record: WorkerRecord) -> None:
        worker_id = record.worker_id
        self._records[worker_id] = record
        if self._heartbeats:
            self._heartbeats.pop(worker_id, None)
        if self._capability_texts:
            self._capability_texts.pop(worker_id, None)

    def _forget(self, worker_id: str) -> None:
        self._records.pop(worker_id, None)
        self._heartbeats.pop(worker_id, None)
        self._capability_texts.pop(worker_id, None)

    def encode(self, events: Iterable[Event], *, heartbeat_every: float = 0.0) -> JournalLines:
        """The lines for ``events``, folding them into the state.

        A heartbeat gets a line only when the worker is known and its last
        journaled heartbeat is at least ``heartbeat_every`` seconds older
        (a lost heartbeat costs nothing the next one does not repair); every
        other event gets a line and makes the batch ``durable``.
        """
        lines: list[bytes] = []
        durable = False
        for event in events:
            if isinstance(event, HeartbeatReceived):
                record = self._records.get(event.worker_id)
                if record is None:
                    continue
                last = self._heartbeats.get(event.worker_id, record.last_heartbeat)
                if event.at - last < heartbeat_every:
                    continue
                lines.append(encode_event(event))
                self.apply(event)
                continue
            durable = True
            if isinstance(event, (WorkerRegistered, WorkerImported)):
                capabilities = self._render(event.capabilities)
                lines.append(_encode_with_capabilities(event, capabilities))
                self.apply(event)
                self._capability_texts[event.worker_id] = capabilities
            else:
                lines.append(encode_event(event))
                self.apply(event)
        return JournalLines(tuple(lines), durable)

    def _render(self, capabilities: tuple[CapabilitySchema, ...]) -> str:
        """``capabilities`` as JSON text.

        A registry hands out one shared value per distinct capability, so
        each is rendered once and its text reused (the value is kept with
        its text: an ``id`` is only unique while the object lives).
        """
        rendered = self._rendered
        texts = []
        for capability in capabilities:
            known = rendered.get(id(capability))
            if known is None or known[0] is not capability:
                if len(rendered) >= _RENDERED_LIMIT:
                    rendered.clear()
                known = rendered[id(capability)] = (capability, _text(unstructure(capability)))
            texts.append(known[1])
        return f"[{','.join(texts)}]"

    def snapshot(self, *, part_size: int = SNAPSHOT_PART_SIZE) -> tuple[bytes, ...]:
        """The lines of a snapshot of the state (at least one line, even when empty)."""
        if part_size < 1:
            raise ValueError("part_size must be >= 1")
        records = tuple(self._records.values())
        heartbeats = self._heartbeats
        chunks = [records[i : i + part_size] for i in range(0, len(records), part_size)] or [()]
        # Records restored from a snapshot share their capability tuple per
        # set: render each tuple object once.
        rendered: dict[int, str] = {}
        texts = self._capability_texts
        lines: list[bytes] = []
        for index, chunk in enumerate(chunks):
            set_index: dict[str, int] = {}
            rows: list[list[Any]] = []
            for record in chunk:
                worker_id = record.worker_id
                text = texts.get(worker_id)
                if text is None:
                    text = rendered.get(id(record.capabilities))
                    if text is None:
                        text = rendered[id(record.capabilities)] = self._render(record.capabilities)
                position = set_index.setdefault(text, len(set_index))
                last_heartbeat = heartbeats.get(worker_id, record.last_heartbeat)
                rows.append([worker_id, record.worker_url, last_heartbeat, position])
            head = _dumps({"v": JOURNAL_FORMAT_VERSION, "type": _SNAPSHOT_TYPE, "part": index})[:-2]
            lines.append(
                head
                + f',"parts":{len(chunks)},"capability_sets":[{",".join(set_index)}],'
                f'"workers":{_text(rows)}}}\n'.encode()
            )
        return tuple(lines)

    def copy(self) -> JournalState:
        """An independent copy (cheap: the records and texts are shared, not copied).

        A writer snapshots the copy in another thread while it goes on
        encoding events into the original.
        """
        twin = JournalState()
        twin._records = dict(self._records)
        twin._heartbeats = dict(self._heartbeats)
        twin._capability_texts = dict(self._capability_texts)
        return twin

    def records(self) -> tuple[WorkerRecord, ...]:
        """Every worker, in registration order, with its last journaled heartbeat."""
        heartbeats = self._heartbeats
        if not heartbeats:
            return tuple(self._records.values())
        return tuple(
            record
            if (beat := heartbeats.get(record.worker_id)) is None
            else _record(record.worker_id, record.worker_url, record.capabilities, beat)
            for record in self._records.values()
        )

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._records


def _unverified(record: WorkerRecord) -> WorkerRecord:
    if not record.verified:
        return record
    return _record(record.worker_id, record.worker_url, record.capabilities, record.last_heartbeat)


def replay(lines: Iterable[bytes | str]) -> ReplayResult:
    """Fold journal lines (each ending in a newline, as a file yields them).

    A last line without its newline, or that cannot be read, is torn: the
    process died while writing it, so it was never acknowledged and is
    dropped. Any other line that cannot be read is skipped. Both are counted
    in ``lines_skipped``.
    """
    state = JournalState()
    reader = _Reader()
    skipped: list[SkippedLine] = []
    read = 0
    torn = False
    heartbeat_line = _HEARTBEAT_LINE.fullmatch
    for number, line, is_last in _numbered(lines):
        read = number
        if isinstance(line, bytes) and line.endswith(b"\n"):
            # Most lines are heartbeats: fold them without building an event.
            match = heartbeat_line(line)
            if match is not None and state.heartbeat(match[1].decode(), float(match[2])):
                continue
        complete = line.endswith(b"\n") if isinstance(line, bytes) else line.endswith("\n")
        if not complete:
            # Only the last line of a file can lack its newline.
            skipped.append(SkippedLine(number, "torn: no newline at the end"))
            torn = True
            continue
        if not line.strip():
            skipped.append(SkippedLine(number, "blank line"))
            continue
        try:
            entry = reader.decode(line)
        except JournalDecodeError as error:
            reason = f"torn: {error.reason}" if is_last else error.reason
            skipped.append(SkippedLine(number, reason))
            torn = torn or is_last
            continue
        state.apply(entry)
    return ReplayResult(
        records=state.records(),
        lines_read=read,
        lines_skipped=len(skipped),
        torn_tail=torn,
        skipped=tuple(skipped),
    )


def _numbered(lines: Iterable[bytes | str]) -> Iterator[tuple[int, bytes | str, bool]]:
    """``(number, line, is_last)`` for each line, looking one line ahead."""
    iterator = iter(lines)
    try:
        current = next(iterator)
    except StopIteration:
        return
    number = 1
    for following in iterator:
        yield number, current, False
        current = following
        number += 1
    yield number, current, True
