"""The journal codec: events and snapshots as JSON lines, and their replay.

Sans-IO: this module turns values into lines and lines back into values; it
opens no file. The service appends the lines to ``registry.jsonl``, fsyncs
them and, on start, hands the file's bytes to :func:`replay_bytes`.

Every line is one JSON object with the format version ``"v"`` and a
``"type"``, ending in a newline:

* an event, as :func:`~crank_registry.unstructure_event` writes it::

    {"v": 1, "type": "registered", "worker_id": "w1", "worker_url": ..., ...}

* a part of a snapshot, written by compaction. A snapshot is split in parts
  of at most :data:`SNAPSHOT_PART_SIZE` workers so that a damaged line loses
  a bounded number of workers, not the whole registry. Each distinct
  capability, and each distinct capability set, is written once per
  snapshot, in the first part that uses it; both are numbered in the order
  they are written (a part says where its numbering starts), and a part
  lists its workers column by column::

    {"v": 1, "type": "snapshot", "part": 0, "parts": 3,
     "first_capability": 0, "capabilities": [{capability}, ...],
     "first_set": 0, "capability_sets": [[0, 1], [2]],
     "worker_ids": ["w1", ...], "worker_urls": ["https://w1:8443", ...],
     "last_heartbeats": [1700000000.5, ...], "worker_sets": [0, ...],
     "crc32": 123456789}

  Part 0 resets the state; the other parts add to it. ``crc32`` is the
  CRC-32 of the line's bytes before ``,"crc32":``: the values in a snapshot
  passed every model check when they were registered, so a line whose
  checksum holds is read without checking them again (which is what keeps
  recovering a large registry fast), and a line whose checksum fails is
  skipped. A worker whose capabilities were on a skipped part is dropped
  (and counted); its next heartbeat makes it register again.

Replay folds the lines into :class:`~crank_registry.WorkerRecord` values:
registered and imported set a record, a heartbeat moves its last heartbeat
forward, deregistered and evicted remove it. A damaged or unknown-version
line is skipped and counted; a torn last line (no newline, or not
parseable: the process died while writing it) is dropped.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import operator
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import attrs

from ._converter import (
    _TAG_OF,
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
from ._models import (
    _MAX_URL_LENGTH,
    _NOT_IN_URL_CHARACTERS,
    _WORKER_ID,
    CapabilitySchema,
    WorkerRecord,
)

__all__ = [
    "JOURNAL_FORMAT_VERSION",
    "SNAPSHOT_PART_SIZE",
    "JournalDecodeError",
    "JournalEntry",
    "JournalLines",
    "JournalReader",
    "JournalState",
    "ReplayResult",
    "SkippedLine",
    "SnapshotPart",
    "decode_line",
    "encode_event",
    "encode_snapshot",
    "replay",
    "replay_bytes",
]

#: The value of ``"v"`` in every line this codec writes; other values are skipped.
JOURNAL_FORMAT_VERSION = 1

#: The most workers one snapshot line holds.
SNAPSHOT_PART_SIZE = 4096

_SNAPSHOT_TYPE = "snapshot"
_DECODER = json.JSONDecoder()
_SNAPSHOT_FIELDS = frozenset(
    {
        "v",
        "type",
        "part",
        "parts",
        "first_capability",
        "capabilities",
        "first_set",
        "capability_sets",
        "worker_ids",
        "worker_urls",
        "last_heartbeats",
        "worker_sets",
        "crc32",
    }
)
_CRC_FIELD = b',"crc32":'


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
    ``dropped`` counts its workers left out because their capabilities were
    on an earlier part that could not be read.
    """

    records: tuple[WorkerRecord, ...]
    part: int = 0
    parts: int = 1
    dropped: int = 0


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
    ``workers_dropped`` counts the workers of readable snapshot parts left
    out because their capabilities were on a skipped part.
    """

    records: tuple[WorkerRecord, ...]
    lines_read: int
    lines_skipped: int
    torn_tail: bool
    skipped: tuple[SkippedLine, ...]
    workers_dropped: int = 0


@attrs.frozen
class JournalLines:
    """The lines for a batch of events; ``durable``: they must be fsynced before success."""

    lines: tuple[bytes, ...]
    durable: bool


# --------------------------------------------------------------------- encode


def _text(value: Any) -> str:
    # ASCII only, so that a line never holds a raw newline or a surrogate;
    # allow_nan=False: a non-finite number would not read back.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _dumps(value: Any) -> bytes:
    return _text(value).encode() + b"\n"


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


# Renderings of capability values kept at most (then forgotten at once).
_RENDERED_LIMIT = 1 << 16


def _encode_with_capabilities(
    event: WorkerRegistered | WorkerImported, capabilities: tuple[str, ...]
) -> bytes:
    """The line for ``event``, with its capabilities already rendered as JSON text."""
    body: dict[str, Any] = {"v": JOURNAL_FORMAT_VERSION, "type": _TAG_OF[type(event)]}
    for field in attrs.fields(type(event)):
        if field.name != "capabilities":
            # The other fields are strings, numbers and booleans.
            body[field.name] = getattr(event, field.name)
    listed = ",".join(capabilities).encode()
    return _dumps(body)[:-2] + b',"capabilities":[' + listed + b"]}\n"


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
    unknown ``"type"``, another ``"v"``, or a snapshot line whose checksum
    fails. (A snapshot line whose checksum holds is checked for its shape,
    worker ids, URLs, times and capability keys; a capability's other fields
    are taken as written.) A snapshot part after the first may use
    capabilities written by the parts before it: read a snapshot's lines
    with one :class:`JournalReader`, as :func:`replay` does.
    """
    return JournalReader().decode(line)


# A heartbeat line exactly as encode_event writes it, read without json:
# most lines of a journal are heartbeats.
_HEARTBEAT_LINE = re.compile(
    rb'\{"v":%d,"type":"heartbeat","worker_id":"(%s)",'
    rb'"at":(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\}\n?'
    % (JOURNAL_FORMAT_VERSION, _WORKER_ID.pattern.encode())
)


class JournalReader:
    """Decodes the lines of one journal in order.

    It remembers the capabilities and capability sets of the snapshot parts
    it has read, which the parts after them refer to by number. The workers
    of one set share one tuple (as a live registry shares its values, and so
    that :meth:`CapabilityRegistry.restore` works out each set once).
    """

    def __init__(self) -> None:
        # The current snapshot's capabilities and capability sets by number
        # (numbers written on a part that could not be read are missing; a
        # set with a missing capability is None), and the next numbers.
        self._capabilities: dict[int, CapabilitySchema] = {}
        self._sets: dict[int, tuple[CapabilitySchema, ...] | None] = {}
        self._next_capability = 0
        self._next_set = 0

    def decode(self, line: bytes | str) -> JournalEntry:
        """The entry ``line`` holds; raises :class:`JournalDecodeError` as :func:`decode_line`."""
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
            try:
                return self._snapshot(raw, data)
            except (TypeError, ValueError, IndexError, RecursionError):
                # A line with a good checksum that this writer cannot have written.
                raise JournalDecodeError("snapshot: malformed") from None
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

    def _snapshot(self, raw: bytes, data: dict[str, Any]) -> SnapshotPart:
        unknown = sorted(data.keys() - _SNAPSHOT_FIELDS)
        if unknown:
            raise JournalDecodeError(f"snapshot: unknown field {unknown[0]!r}")
        checksum = data.get("crc32")
        end = raw.rfind(_CRC_FIELD)
        if not _is_int(checksum) or end < 0 or zlib.crc32(raw[:end]) != checksum:
            raise JournalDecodeError("snapshot: the checksum does not match the line")
        # The checksum holds: the line is as the writer wrote it, from values
        # that passed every model check when they were registered. What is
        # checked again is what the registry's own structures rely on (the
        # shape, worker ids, URLs, finite times, capability keys), by
        # column, at C speed; a capability's other fields are taken as they
        # are.
        part: Any = data.get("part")
        parts: Any = data.get("parts")
        if not (_is_int(part) and _is_int(parts) and 0 <= part < parts):
            raise JournalDecodeError("snapshot: part and parts must be integers, 0 <= part < parts")
        columns: list[Any] = [data.get(name) for name in _SNAPSHOT_LISTS]
        if not all(type(column) is list for column in columns):
            raise JournalDecodeError(f"snapshot: {', '.join(_SNAPSHOT_LISTS)} must be lists")
        capabilities, raw_sets, worker_ids, worker_urls, last_heartbeats, worker_sets = columns
        if not len(worker_ids) == len(worker_urls) == len(last_heartbeats) == len(worker_sets):
            raise JournalDecodeError("snapshot: the worker columns differ in length")
        ids, urls = "\n".join(worker_ids), "\n".join(worker_urls)  # TypeError: not strings
        if worker_ids and not (
            _WORKER_IDS.fullmatch(ids)
            and _WORKER_URLS.fullmatch(urls)
            # No newline within a value (the patterns would read it as two).
            and ids.count("\n") == urls.count("\n") == len(worker_ids) - 1
            # A string or None raises TypeError; inf or nan makes the sum so.
            and math.isfinite(sum(last_heartbeats, 0.0))
        ):
            raise JournalDecodeError("snapshot: a worker's id, URL or last heartbeat is malformed")
        if part == 0:
            self._capabilities, self._sets = {}, {}
            self._next_capability = self._next_set = 0
        first_capability = _first_number(data, "first_capability", self._next_capability)
        first_set = _first_number(data, "first_set", self._next_set)
        table = self._capabilities
        table.update(zip(itertools.count(first_capability), map(_trusted_capability, capabilities)))
        self._next_capability = first_capability + len(capabilities)
        sets = self._sets
        sets.update(zip(itertools.count(first_set), map(self._capability_set, raw_sets)))
        self._next_set = first_set + len(raw_sets)
        # A set number that is unknown (or on a lost part) gives None: dropped.
        worker_capabilities = list(map(sets.get, worker_sets))
        dropped = 0
        if None in worker_capabilities:
            kept = [i for i, found in enumerate(worker_capabilities) if found is not None]
            dropped = len(worker_sets) - len(kept)
            worker_ids = [worker_ids[i] for i in kept]
            worker_urls = [worker_urls[i] for i in kept]
            last_heartbeats = [last_heartbeats[i] for i in kept]
            worker_capabilities = [worker_capabilities[i] for i in kept]
        records = tuple(
            map(_record, worker_ids, worker_urls, worker_capabilities, last_heartbeats)  # type: ignore[arg-type]
        )
        return SnapshotPart(records, part, parts, dropped)

    def _capability_set(self, numbers: Any) -> tuple[CapabilitySchema, ...] | None:
        """The capabilities a set numbers; ``None``: one was on a part that could not be read."""
        if type(numbers) is not list or not numbers:
            raise JournalDecodeError("snapshot: a capability set is not a non-empty list")
        capabilities = list(map(self._capabilities.get, numbers))
        if None in capabilities:
            return None
        if len({c.key for c in capabilities}) < len(capabilities):  # type: ignore[union-attr]
            raise JournalDecodeError("snapshot: a capability set names a (verb, name) twice")
        return tuple(capabilities)  # type: ignore[arg-type]


def _first_number(data: dict[str, Any], name: str, expected: int) -> int:
    """A part's first number: where the part before it stopped, or later.

    Later: the numbers between were on parts that could not be read (what
    refers to them is dropped).
    """
    first: Any = data.get(name)
    if not (_is_int(first) and first >= expected):
        raise JournalDecodeError(f"snapshot: {name} does not follow the part before")
    return int(first)


# Values joined by newlines, each as the model requires. URLs: absolute
# http(s), without the characters a URL may not hold (the model also parses
# them; the writer wrote parsed ones).
_WORKER_IDS = re.compile(rf"(?:{_WORKER_ID.pattern}\n)*{_WORKER_ID.pattern}")
_URL = rf"https?://[^{_NOT_IN_URL_CHARACTERS}]{{1,{_MAX_URL_LENGTH - len('http://')}}}"
_WORKER_URLS = re.compile(rf"(?:{_URL}\n)*{_URL}")


_SNAPSHOT_LISTS = (
    "capabilities",
    "capability_sets",
    "worker_ids",
    "worker_urls",
    "last_heartbeats",
    "worker_sets",
)


def _capability_constructor() -> Callable[[Any], CapabilitySchema]:
    """Builds a :class:`CapabilitySchema` from a checksummed snapshot, without its checks.

    The values passed every check when they were registered and come back
    exactly as they were unstructured (JSON keeps ints, floats and
    booleans apart); running the validators again would cost a
    registration's worth of time per distinct capability. Only the shape
    is checked (an object with every required field and no unknown one) and
    that verb, name and version are strings, which the registry indexes by.
    """
    fields: tuple[attrs.Attribute[Any], ...] = attrs.fields(CapabilitySchema)
    required = frozenset(f.name for f in fields if f.default is attrs.NOTHING)
    known = frozenset(f.name for f in fields)
    slots = [
        (
            f.name,
            None if f.default is attrs.NOTHING else f.default,
            cast("Callable[[Any], Any] | None", f.converter),
            CapabilitySchema.__dict__[f.name].__set__,
        )
        for f in fields
    ]
    new = object.__new__

    def trusted_capability(item: Any) -> CapabilitySchema:
        if type(item) is not dict or not required <= item.keys() or not item.keys() <= known:
            raise JournalDecodeError("snapshot: a capability is not an object of its fields")
        # The registry indexes capabilities by these: they must be strings.
        if not (type(item["verb"]) is type(item["name"]) is type(item["version"]) is str):
            raise JournalDecodeError("snapshot: a capability's verb, name or version is malformed")
        capability: CapabilitySchema = new(CapabilitySchema)
        for name, default, converter, set_slot in slots:
            value = item.get(name, default)
            if converter is not None and value is not None:
                value = converter(value)
            set_slot(capability, value)
        return capability

    return trusted_capability


_trusted_capability = _capability_constructor()


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
# _record sets every field: a field added to WorkerRecord must be set there too.
_RECORD_FIELDS = ("worker_id", "worker_url", "capabilities", "last_heartbeat", "verified")
if tuple(field.name for field in attrs.fields(WorkerRecord)) != _RECORD_FIELDS:
    raise ImportError("WorkerRecord's fields changed: _journal._record must set them all")


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
        # worker id -> its capabilities as JSON texts, when encode() has
        # already rendered them: a snapshot reuses them instead of rendering again.
        self._capability_texts: dict[str, tuple[str, ...]] = {}
        self._rendered: dict[int, tuple[CapabilitySchema, str]] = {}
        self._add(records)

    def _add(self, records: Iterable[WorkerRecord]) -> None:
        """Add records of workers that have no heartbeat or text kept apart."""
        if not isinstance(records, (list, tuple)):
            records = list(records)
        if any(map(_verified, records)):
            self._records.update((r.worker_id, _unverified(r)) for r in records)
        else:
            # A replayed registry's records, all unverified already: in bulk.
            self._records.update(zip(map(_worker_id, records), records, strict=True))

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
            if self._heartbeats or self._capability_texts:
                for record in entry.records:
                    self._set(_unverified(record))
            else:
                self._add(entry.records)
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

    def _render(self, capabilities: tuple[CapabilitySchema, ...]) -> tuple[str, ...]:
        """Each of ``capabilities`` as JSON text.

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
        return tuple(texts)

    def snapshot(self, *, part_size: int = SNAPSHOT_PART_SIZE) -> tuple[bytes, ...]:
        """The lines of a snapshot of the state (at least one line, even when empty)."""
        if part_size < 1:
            raise ValueError("part_size must be >= 1")
        records = tuple(self._records.values())
        heartbeats = self._heartbeats
        texts = self._capability_texts
        chunks = [records[i : i + part_size] for i in range(0, len(records), part_size)] or [()]
        # Capability text -> its number in the snapshot; capability set (as
        # numbers) -> its number; capability tuple (records restored from a
        # snapshot share one per set) -> its set's number.
        numbers: dict[str, int] = {}
        set_numbers: dict[tuple[int, ...], int] = {}
        numbered: dict[int, tuple[tuple[CapabilitySchema, ...], int]] = {}
        lines: list[bytes] = []
        for index, chunk in enumerate(chunks):
            first_capability, first_set = len(numbers), len(set_numbers)
            new_texts: list[str] = []
            new_sets: list[tuple[int, ...]] = []
            worker_ids: list[str] = []
            worker_urls: list[str] = []
            last_heartbeats: list[float] = []
            worker_sets: list[int] = []
            for record in chunk:
                worker_id = record.worker_id
                capabilities = record.capabilities
                known = numbered.get(id(capabilities))
                if known is not None and known[0] is capabilities:
                    set_number = known[1]
                else:
                    capability_texts = texts.get(worker_id) or self._render(capabilities)
                    listed = []
                    for text in capability_texts:
                        number = numbers.get(text)
                        if number is None:
                            number = numbers[text] = len(numbers)
                            new_texts.append(text)
                        listed.append(number)
                    capability_set = tuple(listed)
                    set_number = set_numbers.get(capability_set, -1)
                    if set_number < 0:
                        set_number = set_numbers[capability_set] = len(set_numbers)
                        new_sets.append(capability_set)
                    numbered[id(capabilities)] = (capabilities, set_number)
                worker_ids.append(worker_id)
                worker_urls.append(record.worker_url)
                last_heartbeats.append(float(heartbeats.get(worker_id, record.last_heartbeat)))
                worker_sets.append(set_number)
            body = (
                f'{{"v":{JOURNAL_FORMAT_VERSION},"type":"{_SNAPSHOT_TYPE}","part":{index},'
                f'"parts":{len(chunks)},"first_capability":{first_capability},'
                f'"capabilities":[{",".join(new_texts)}],"first_set":{first_set},'
                f'"capability_sets":{_text(list(map(list, new_sets)))},'
                f'"worker_ids":{_text(worker_ids)},"worker_urls":{_text(worker_urls)},'
                f'"last_heartbeats":{_text(last_heartbeats)},"worker_sets":{_text(worker_sets)}'
            ).encode()
            lines.append(b"%s%s%d}\n" % (body, _CRC_FIELD, zlib.crc32(body)))
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
    in ``lines_skipped``. :func:`replay_bytes` does the same for a whole
    journal in memory, faster.
    """
    replayer = _Replayer()
    read = 0
    heartbeat_line = _HEARTBEAT_LINE.fullmatch
    for number, line, is_last in _numbered(lines):
        read = number
        match = heartbeat_line(line) if isinstance(line, bytes) and line.endswith(b"\n") else None
        if match is not None:
            # Most lines are heartbeats: fold them without building an event.
            replayer.heartbeats(number - 1, [(match[1], match[2])], ends_file=is_last)
        else:
            replayer.line(number, line, is_last)
    return replayer.result(read)


# A heartbeat line exactly as encode_event writes it, as (worker id, time),
# at the start of a line (^ in MULTILINE mode).
_HEARTBEAT = rb"^" + _HEARTBEAT_LINE.pattern[:-3] + rb"\n"
_HEARTBEATS = re.compile(_HEARTBEAT, re.MULTILINE)
_HEARTBEAT_PREFIX = b'{"v":%d,"type":"heartbeat",' % JOURNAL_FORMAT_VERSION
# The end of a run of heartbeat lines: a newline not followed by another.
_END_OF_HEARTBEATS = re.compile(rb"\n(?!" + re.escape(_HEARTBEAT_PREFIX) + rb")")
# Every line: a heartbeat as (worker id, time, b""), any other as (b"", b"", line).
_LINES = re.compile(_HEARTBEAT + rb"|([^\n]*\n)", re.MULTILINE)
# Runs shorter than this are folded line by line: the bulk path's setup
# costs more than it saves.
_BULK_RUN = 32
# The most of a run of heartbeat lines read at once.
_SLICE_BYTES = 1 << 18
_last_heartbeat = operator.attrgetter("last_heartbeat")
_verified = operator.attrgetter("verified")
_worker_id = operator.attrgetter("worker_id")


def replay_bytes(data: bytes) -> ReplayResult:
    """:func:`replay` for a whole journal in memory (the file's bytes).

    Equal to ``replay(io.BytesIO(data))``, in a fraction of the time: a run
    of heartbeat lines (most of a journal) is read by one regular
    expression and, when its times go forward as a writer writes them,
    folded in one step.
    """
    replayer = _Replayer()
    complete = data.rfind(b"\n") + 1
    ends_complete = complete == len(data)
    number = 0
    position = 0
    while position < complete:
        if data.startswith(_HEARTBEAT_PREFIX, position):
            # A slice of the run at a time, so that its temporary values stay
            # few (fresh memory costs page faults). A slice may also end
            # where the window cuts a line: the next one starts there.
            window = min(complete, position + _SLICE_BYTES)
            found = _END_OF_HEARTBEATS.search(data, position, window)
            if found is not None:
                end = found.end()
            else:
                end = data.rfind(b"\n", position, window) + 1
                if end <= position:  # a line longer than the window: not a heartbeat
                    end = data.index(b"\n", position) + 1
            pairs = _HEARTBEATS.findall(data, position, end)
            if len(pairs) == data.count(b"\n", position, end):
                replayer.heartbeats(number, pairs, ends_file=ends_complete and end == complete)
                number += len(pairs)
                position = end
                continue
            # A damaged line among them: read them one at a time.
        else:
            end = data.index(b"\n", position) + 1
            number += 1
            replayer.line(number, data[position:end], ends_complete and end == complete)
            position = end
            continue
        lines = _LINES.findall(data, position, end)
        final = ends_complete and end == complete
        for index, (worker_id, at, line) in enumerate(lines, 1):
            number += 1
            is_last = final and index == len(lines)
            if line:
                replayer.line(number, line, is_last)
            else:
                replayer.heartbeats(number - 1, [(worker_id, at)], ends_file=is_last)
        position = end
    if not ends_complete:
        number += 1
        replayer.line(number, data[complete:], True)
    return replayer.result(number)


class _Replayer:
    """The fold of :func:`replay` and :func:`replay_bytes`, for the lines not folded inline."""

    def __init__(self) -> None:
        self.state = JournalState()
        self.reader = JournalReader()
        self.skipped: list[SkippedLine] = []
        self.torn = False
        self.dropped = 0
        # No time in the state is later than this: a run of heartbeats from
        # here on, in order, moves every worker it names forward.
        self.latest = -math.inf

    def heartbeats(self, before: int, pairs: list[tuple[bytes, bytes]], *, ends_file: bool) -> None:
        """Fold heartbeat lines given as (worker id, time), numbered from ``before + 1``."""
        records = self.state._records
        beats = self.state._heartbeats
        if len(pairs) >= _BULK_RUN:
            worker_ids, ats = zip(*pairs, strict=True)
            times = list(map(float, ats))
            if times[0] > self.latest and all(map(math.isfinite, times)) and times == sorted(times):
                # Each worker's last time wins, and it is later than any it had.
                latest = dict(zip(map(bytes.decode, worker_ids), times, strict=True))
                # Set on the records in place (they are this replay's own, see
                # result()), in a loop in C; & walks the smaller side.
                known = latest.keys() & records.keys()
                if beats:  # heartbeats folded one by one, now older: forget them
                    for worker in known & beats.keys():
                        del beats[worker]
                collections.deque(
                    map(
                        _set_last_heartbeat,
                        map(records.__getitem__, known),
                        map(latest.__getitem__, known),
                    ),
                    maxlen=0,
                )
                self.latest = times[-1]
                return
        fold = self.state.heartbeat
        for number, (worker_id, at) in enumerate(pairs, before + 1):
            beat = float(at)
            if fold(worker_id.decode(), beat):
                if beat > self.latest:  # noqa: PLR1730 (max() is a call: slower per line)
                    self.latest = beat
            else:  # not finite: read as any other line, which says why it is skipped
                line = b'{"v":%d,"type":"heartbeat","worker_id":"%s","at":%s}\n' % (
                    JOURNAL_FORMAT_VERSION,
                    worker_id,
                    at,
                )
                self.line(number, line, ends_file and number == before + len(pairs))

    def line(self, number: int, line: bytes | str, is_last: bool) -> None:
        complete = line.endswith(b"\n") if isinstance(line, bytes) else line.endswith("\n")
        if not complete:
            # Only the last line of a file can lack its newline.
            self.skipped.append(SkippedLine(number, "torn: no newline at the end"))
            self.torn = True
            return
        if not line.strip():
            self.skipped.append(SkippedLine(number, "blank line"))
            return
        try:
            entry = self.reader.decode(line)
        except JournalDecodeError as error:
            reason = f"torn: {error.reason}" if is_last else error.reason
            self.skipped.append(SkippedLine(number, reason))
            self.torn = self.torn or is_last
            return
        if isinstance(entry, SnapshotPart):
            self.dropped += entry.dropped
            if entry.records:
                self.latest = max(self.latest, *map(_last_heartbeat, entry.records))
        elif isinstance(entry, (WorkerRegistered, HeartbeatReceived)):
            self.latest = max(self.latest, entry.at)
        elif isinstance(entry, WorkerImported):
            self.latest = max(self.latest, entry.last_heartbeat)
        self.state.apply(entry)

    def result(self, lines_read: int) -> ReplayResult:
        # Every record here was built by this replay and is not yet shared:
        # its last heartbeat is set in place rather than by a new record.
        records = self.state._records
        beats = self.state._heartbeats
        # (A loop in C: deque(maxlen=0) consumes the map without keeping it.)
        collections.deque(
            map(_set_last_heartbeat, map(records.__getitem__, beats), beats.values()), maxlen=0
        )
        return ReplayResult(
            records=tuple(records.values()),
            lines_read=lines_read,
            lines_skipped=len(self.skipped),
            torn_tail=self.torn,
            skipped=tuple(self.skipped),
            workers_dropped=self.dropped,
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
