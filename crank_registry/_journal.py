"""The journal codec: events and snapshots as JSON lines, and their replay into a registry.

Sans-IO: this module turns values into lines and lines back into values; it
opens no file. The service appends the lines to ``registry.jsonl``, fsyncs
them and, on start, hands the file's bytes to :func:`replay_bytes`, which
applies them to a registry with the registry's own fold
(:meth:`~crank_registry.CapabilityRegistry.apply` and
:meth:`~crank_registry.CapabilityRegistry.apply_snapshot`).

Every line is one JSON object with the format version ``"v"`` and a
``"type"``, ending in a newline:

* an event, as the converter writes it (:func:`~crank_registry.unstructure_event`)::

    {"v": 3, "type": "registered", "worker_id": "w1", "revision": 7, ...}

* a part of a snapshot, written by compaction: the registry at
  ``revision``. A snapshot is split in parts of at most
  :data:`SNAPSHOT_PART_SIZE` workers so that a damaged line loses a bounded
  number of workers, not the whole registry. Each distinct capability, and
  each distinct capability set, is numbered once per snapshot and written
  in the first part that uses it, and again in the part after it; a part
  says where the numbers it lists start (``first_capability``,
  ``first_set``: the previous part's new ones, then its own), and lists its
  workers column by column::

    {"v": 3, "type": "snapshot", "revision": 7, "part": 1, "parts": 3,
     "first_capability": 0, "capabilities": [{capability}, ...],
     "first_set": 0, "capability_sets": [[0, 1], [2]],
     "worker_ids": ["w1", ...], "worker_urls": ["https://w1:8443", ...],
     "last_heartbeats": [1700000000.5, ...], "worker_sets": [0, ...],
     "health": ["healthy", ...], "crc32": 123456789}

  A part whose workers include a draining one also has ``"draining"``, one
  boolean per worker (a part without it, as every part written before
  drain, has none draining). A part whose workers have been ejected
  (outlier ejection) adds ``"ejections": {"w1": [ejected_until or null,
  ejections, ejection_ended or null], ...}`` for those workers only (the
  records' fields of the same names).

  So one damaged part costs only its own workers: what it numbered is in
  the next part too, before any later part refers to it. The first part
  also holds the registry's settings when it has some: ``"access_policy"``
  (the built-in policy's rules) and ``"slos"`` (the SLO files) as the
  converter writes them, and ``"self_preservation"`` (when it began). A
  damaged first part loses them with its workers; the service decides the
  files' settings again at start. ``crc32`` is the
  CRC-32 of the line's bytes before ``,"crc32":``, checked before anything
  else is read from the line; a line whose checksum fails is skipped. A
  checksum detects damage, it does not vouch for content: every value read
  back passes the wire model's checks, through the converter, and a line
  holding one that does not is skipped (its workers with it). A reader may
  add a check of its own for capabilities (:data:`CapabilityCheck`: the
  service holds schemas to JSON Schema validity); a capability it refuses
  costs only the workers offering it.

Replay: a run of snapshot parts (consecutive parts of one revision) is
applied as one snapshot, then each event in order. The revision is the
snapshot's sequence: a run older than the revision the lines before it
reached is a stale copy, skipped and reported with its line numbers, never
rolled back to. A change
whose revision the registry already has (a line written after a
compaction that already holds it) is passed over; one the
registry refuses (it names a worker it does not hold: an earlier line was
damaged) is skipped and counted, as is a damaged or unknown-version line.
A torn last line (no newline, or not parseable: the process died while
writing it) is dropped.

* the registry's ``epoch``: the random name of its history (DESIGN,
  "Epochs"; the change feed's answers carry it)::

    {"v": 3, "type": "epoch", "epoch": "9f86d081884c7d65"}

  The service writes one when a journal starts (as its first line), at the
  top of every compacted file, and, for a journal that has none (written
  before epochs), as soon as it opens it: the history then starts there,
  and a follower of the older controller reloads its snapshot. Replay
  reports the last one it read.

Format 1, the previous release's, is read too: its changes carry no
revision (replay numbers them in order), its snapshots carry neither a
revision nor health (their workers are unverified), and an ``evicted`` of
format 1 stands for ``unhealthy`` then ``evicted``.

Format 2 is read as format 3, of which it holds a part: format 3 added the
changes ``draining``, ``undrained``, ``ejected``, ``restored``,
``slos_changed``, ``policy_changed`` and ``self_preservation``, and the
snapshot fields ``draining``, ``ejections``, ``access_policy``, ``slos``
and ``self_preservation``. A reader of
format 2 would skip those lines as damaged (and a snapshot part with a field
it does not know, workers and all); it meets ``"v": 3`` instead and refuses
the journal (:class:`NewerJournalFormat`), as this release refuses a newer
one. Every change of what a line may hold takes a new version.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ._converter import structure, structure_event, unstructure, unstructure_event
from ._errors import Problem, RegistryError, ValidationError
from ._events import (
    Change,
    Event,
    HeartbeatReceived,
    Snapshot,
    WorkerChange,
    WorkerEvicted,
    WorkerImported,
    WorkerRegistered,
    WorkerUnhealthy,
)
from ._health import Health
from ._models import _WORKER_ID, CapabilitySchema, WorkerRecord, is_worker_id
from ._policy import AccessRules
from ._slos import SloFile

if TYPE_CHECKING:
    from ._registry import CapabilityRegistry

__all__ = [
    "JOURNAL_FORMAT_VERSION",
    "SNAPSHOT_PART_SIZE",
    "CapabilityCheck",
    "JournalDecodeError",
    "JournalEntry",
    "JournalReader",
    "EpochLine",
    "NewerJournalFormat",
    "RefusedCapability",
    "ReplayResult",
    "SkippedLine",
    "SnapshotPart",
    "decode_heartbeat_line",
    "decode_line",
    "encode_epoch",
    "encode_event",
    "encode_snapshot",
    "replay",
    "replay_bytes",
]

#: The value of ``"v"`` in every line this codec writes.
JOURNAL_FORMAT_VERSION = 3
#: The versions it reads (the previous release wrote 1; format 2 is format 3
#: before its changes ``draining``, ``undrained``, ``ejected``, ``restored``,
#: ``slos_changed``, ``policy_changed`` and ``self_preservation``).
_READABLE_VERSIONS = (1, 2, 3)

#: The most workers one snapshot line holds.
SNAPSHOT_PART_SIZE = 4096

#: A check a reader adds to the wire model's for every capability it reads
#: back: the capability's problems (paths relative to it), none when it
#: passes. The service's holds the schemas to JSON Schema validity, which
#: the core cannot check (it does not depend on jsonschema).
CapabilityCheck = Callable[[CapabilitySchema], Sequence[Problem]]

_SNAPSHOT_TYPE = "snapshot"
_EPOCH_TYPE = "epoch"
_CRC_FIELD = b',"crc32":'
_SNAPSHOT_LISTS = (
    "capabilities",
    "capability_sets",
    "worker_ids",
    "worker_urls",
    "last_heartbeats",
    "worker_sets",
)
# The registry's settings, on a snapshot's first part.
_SNAPSHOT_SETTINGS = ("access_policy", "slos", "self_preservation")
_SNAPSHOT_FIELDS = frozenset(
    {
        "v",
        "type",
        "revision",
        "part",
        "parts",
        "first_capability",
        "first_set",
        "health",
        "draining",
        "ejections",
        "crc32",
    }
    | set(_SNAPSHOT_LISTS)
    | set(_SNAPSHOT_SETTINGS)
)


class JournalDecodeError(RegistryError):
    """A journal line that cannot be read: damaged, or written by an unknown format version."""

    code = "journal_corrupt"
    status_hint = 500

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class NewerJournalFormat(RegistryError):
    """A line of a format newer than this release writes: the journal is not ours to read.

    Replay stops at it (it is not skipped): a controller must not start on a
    journal written by a newer release and then overwrite it.
    """

    code = "journal_too_new"
    status_hint = 500

    def __init__(self, version: int) -> None:
        self.version = version
        super().__init__(
            f"written in journal format {version}; this release reads formats "
            f"{', '.join(map(str, _READABLE_VERSIONS))} and writes {JOURNAL_FORMAT_VERSION}"
            ": run the release that wrote it, or a newer one"
        )


@attrs.frozen
class SnapshotPart:
    """One line of a snapshot: some of the workers of the registry at ``revision``.

    ``dropped`` counts its workers left out because their capabilities were
    on an earlier part that could not be read, or were refused by the
    reader's :data:`CapabilityCheck` (``refused`` says which, and why). The
    first part (``part`` 0) carries the registry's settings,
    ``access_policy``, ``slos`` and ``self_preservation``.
    """

    revision: int
    records: tuple[WorkerRecord, ...]
    part: int = 0
    parts: int = 1
    dropped: int = 0
    access_policy: AccessRules | None = None
    slos: tuple[SloFile, ...] = ()
    self_preservation: float | None = None
    refused: tuple[str, ...] = ()


#: What an epoch is: the random name of a registry's history.
EPOCH_PATTERN = re.compile(r"[0-9A-Za-z_-]{1,64}")


@attrs.frozen
class EpochLine:
    """The line naming the registry's history: its ``epoch``."""

    epoch: str


#: What one journal line holds.
JournalEntry = Event | SnapshotPart | EpochLine


@attrs.frozen
class SkippedLine:
    """A line replay could not use: its 1-based number and why."""

    line_number: int
    reason: str


@attrs.frozen
class RefusedCapability:
    """A capability of a snapshot line that the replay's check refused: its 1-based number and why.

    The line was used; the workers offering that capability were left out
    (counted in :attr:`ReplayResult.workers_dropped`).
    """

    line_number: int
    reason: str


@attrs.frozen
class ReplayResult:
    """What a replay did.

    ``lines_skipped`` counts damaged, unknown-version, refused and torn
    lines; ``skipped`` says which and why. ``workers_dropped`` counts the
    workers of readable snapshot parts left out because their capabilities
    were on a skipped part, or were refused by the replay's check
    (``refused`` says which).
    """

    lines_read: int
    lines_skipped: int
    torn_tail: bool
    skipped: tuple[SkippedLine, ...]
    workers_dropped: int = 0
    #: The epoch of the last epoch line read; ``None``: the journal has none.
    epoch: str | None = None
    refused: tuple[RefusedCapability, ...] = ()


# --------------------------------------------------------------------- encode


def _text(value: Any) -> str:
    # ASCII only, so that a line never holds a raw newline or a surrogate;
    # allow_nan=False: a non-finite number would not read back.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def encode_event(event: Event) -> bytes:
    """One journal line (ending in a newline) for ``event``."""
    return (_text({"v": JOURNAL_FORMAT_VERSION, **unstructure_event(event)}) + "\n").encode()


def encode_epoch(epoch: str) -> bytes:
    """The journal line (ending in a newline) that names the registry's history ``epoch``."""
    if not EPOCH_PATTERN.fullmatch(epoch):
        raise ValueError(f"an epoch is 1 to 64 letters, digits, '_' or '-': {epoch!r}")
    return (
        _text({"v": JOURNAL_FORMAT_VERSION, "type": _EPOCH_TYPE, "epoch": epoch}) + "\n"
    ).encode()


def encode_snapshot(
    snapshot: Snapshot, *, part_size: int = SNAPSHOT_PART_SIZE
) -> tuple[bytes, ...]:
    """The lines of ``snapshot`` (at least one line, even when it holds no worker)."""
    if part_size < 1:
        raise ValueError("part_size must be >= 1")
    records = snapshot.workers
    chunks = [records[i : i + part_size] for i in range(0, len(records), part_size)] or [()]
    # A registry shares equal capability values: each is rendered once (by
    # identity), then numbered by its text.
    rendered: dict[int, str] = {}
    keep_alive: list[CapabilitySchema] = []  # so that the ids above stay unique
    numbers: dict[str, int] = {}
    texts: list[str] = []
    set_numbers: dict[tuple[int, ...], int] = {}
    sets: list[list[int]] = []
    lines: list[bytes] = []
    # Where the previous part's new numbers start: a part repeats them.
    previous_capability = previous_set = 0
    for index, chunk in enumerate(chunks):
        new_capability, new_set = len(texts), len(sets)
        worker_sets: list[int] = []
        for record in chunk:
            listed = []
            for capability in record.capabilities:
                text = rendered.get(id(capability))
                if text is None:
                    text = rendered[id(capability)] = _text(unstructure(capability))
                    keep_alive.append(capability)
                number = numbers.get(text)
                if number is None:
                    number = numbers[text] = len(texts)
                    texts.append(text)
                listed.append(number)
            capability_set = tuple(listed)
            set_number = set_numbers.get(capability_set)
            if set_number is None:
                set_number = set_numbers[capability_set] = len(sets)
                sets.append(listed)
            worker_sets.append(set_number)
        columns: dict[str, Any] = {
            "worker_ids": [r.worker_id for r in chunk],
            "worker_urls": [r.worker_url for r in chunk],
            "last_heartbeats": [float(r.last_heartbeat) for r in chunk],
            "worker_sets": worker_sets,
            "health": [Health.of(verified=r.verified, silent=r.silent).value for r in chunk],
        }
        if any(r.draining for r in chunk):
            columns["draining"] = [r.draining for r in chunk]
        ejections = {
            r.worker_id: [r.ejected_until, r.ejections, r.ejection_ended]
            for r in chunk
            if r.ejected_until is not None or r.ejections is not None
        }
        if ejections:
            columns["ejections"] = ejections
        body = (
            f'{{"v":{JOURNAL_FORMAT_VERSION},"type":"{_SNAPSHOT_TYPE}",'
            f'"revision":{snapshot.revision},"part":{index},"parts":{len(chunks)},'
            f'"first_capability":{previous_capability},'
            f'"capabilities":[{",".join(texts[previous_capability:])}],'
            f'"first_set":{previous_set},"capability_sets":{_text(sets[previous_set:])},'
            + ",".join(f'"{name}":{_text(column)}' for name, column in columns.items())
            + (_settings(snapshot) if index == 0 else "")
        ).encode()
        lines.append(b"%s%s%d}\n" % (body, _CRC_FIELD, zlib.crc32(body)))
        previous_capability, previous_set = new_capability, new_set
    return tuple(lines)


def _settings(snapshot: Snapshot) -> str:
    """The first part's fields for the registry's settings (none when it has none)."""
    fields = ""
    if snapshot.access_policy is not None:
        fields += f',"access_policy":{_text(unstructure(snapshot.access_policy))}'
    if snapshot.slos:
        fields += f',"slos":{_text(unstructure(snapshot.slos))}'
    if snapshot.self_preservation is not None:
        fields += f',"self_preservation":{_text(float(snapshot.self_preservation))}'
    return fields


# --------------------------------------------------------------------- decode


def decode_line(line: bytes | str) -> tuple[JournalEntry, ...]:
    """Read one line (with or without its newline) on its own.

    Raises :class:`JournalDecodeError` for anything that is not a line this
    codec writes: bytes that are not JSON, a wrong shape or type, an
    unknown ``"type"`` or ``"v"``, a value the wire model refuses, or a
    snapshot line whose checksum fails; :class:`NewerJournalFormat` for a
    line of a newer format. A snapshot part after the first
    may use capabilities numbered by the parts before it: read a journal's
    lines with one :class:`JournalReader`, as :func:`replay` does.
    """
    return JournalReader().decode(line)


# A heartbeat line exactly as encode_event writes it: the worker id as the
# model allows it (no character JSON escapes), the time as json writes a float.
_HEARTBEAT_LINE = re.compile(
    rb'\{"v":%d,"type":"heartbeat","worker_id":"(%s)","at":(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\}\n?'
    % (JOURNAL_FORMAT_VERSION, _WORKER_ID.pattern.encode())
)


def decode_heartbeat_line(line: bytes | str) -> HeartbeatReceived | None:
    """A heartbeat line as :func:`encode_event` writes it, read without the converter.

    ``None`` for any other line (which the converter then reads). Most lines
    of a journal are heartbeats, and this reads one in a fifth of the
    converter's time: it keeps the recovery of 100 000 workers within its
    2 s target (``benchmarks/journal_recovery.py``, the file before its next
    compaction). ``tests/journal/test_codec.py`` checks that it gives
    exactly what the converter gives.
    """
    raw = line.encode() if isinstance(line, str) else line
    match = _HEARTBEAT_LINE.fullmatch(raw)
    if match is None:
        return None
    at = float(match[2])
    if not math.isfinite(at):
        return None  # the converter's path says why it is refused
    return HeartbeatReceived(match[1].decode(), at)


class JournalReader:
    """Decodes the lines of one journal in order.

    It remembers the capabilities and capability sets numbered by the
    snapshot parts it has read, which the parts after them refer to, and
    the last revision, which numbers the changes of format 1.

    ``capability_check`` (see :data:`CapabilityCheck`) is held to every
    capability read back, after the wire model's checks: a change whose
    capability it refuses is a line that cannot be read, as one failing
    those checks is; in a snapshot part, only the workers offering that
    capability are left out (the part's ``refused`` and ``dropped``).
    """

    def __init__(self, capability_check: CapabilityCheck | None = None) -> None:
        self._capability_check = capability_check
        # The current snapshot's capabilities and capability sets by number
        # (numbers written only on parts that could not be read are missing;
        # a set with a missing capability is None), and the next numbers.
        self._capabilities: dict[int, CapabilitySchema] = {}
        self._sets: dict[int, tuple[CapabilitySchema, ...] | None] = {}
        # The current snapshot's capabilities the check refused, by number.
        self._refused: set[int] = set()
        self._next_capability = 0
        self._next_set = 0
        self._revision = 0

    def decode(self, line: bytes | str) -> tuple[JournalEntry, ...]:
        """The entries ``line`` holds (one, or two for an ``evicted`` of format 1)."""
        heartbeat = decode_heartbeat_line(line)
        if heartbeat is not None:
            return (heartbeat,)
        try:
            data = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
            raise JournalDecodeError("not a JSON line") from None
        if not isinstance(data, dict):
            raise JournalDecodeError("not a JSON object")
        if "crc32" in data:
            # Checked before anything is read from it: a flipped bit in a
            # checksummed line's version is damage, not a newer format.
            _check_crc(line.encode() if isinstance(line, str) else line, data["crc32"])
        version = data.pop("v", None)
        if _is_int(version) and version > JOURNAL_FORMAT_VERSION:
            raise NewerJournalFormat(version)
        if not _is_int(version) or version not in _READABLE_VERSIONS:
            raise JournalDecodeError(
                f"unsupported format version {version!r} (this release reads "
                f"{', '.join(map(str, _READABLE_VERSIONS))})"
            )
        if data.get("type") == _SNAPSHOT_TYPE:
            raw = line.encode() if isinstance(line, str) else line
            try:
                return (self._snapshot(raw, data, version),)
            except (TypeError, ValueError, IndexError, KeyError, RecursionError):
                raise JournalDecodeError("snapshot: malformed") from None
        if data.get("type") == _EPOCH_TYPE:
            epoch = data.get("epoch")
            if data.keys() != {"type", "epoch"} or not (
                isinstance(epoch, str) and EPOCH_PATTERN.fullmatch(epoch)
            ):
                raise JournalDecodeError("epoch: not exactly an epoch of 1 to 64 letters or digits")
            return (EpochLine(epoch),)
        if version == 1 and data.get("type") not in ("heartbeat", None):
            data["revision"] = self._revision + 1
        try:
            event = structure_event(data)
            _check_read_back(event)
            self._check_capabilities(event)
        except ValidationError as error:
            raise JournalDecodeError(f"invalid {data.get('type')!r} line: {error}") from None
        if isinstance(event, Change):
            self._revision = max(self._revision, event.revision)
            if version == 1 and isinstance(event, WorkerEvicted):
                self._revision += 1
                unhealthy = WorkerUnhealthy(
                    event.worker_id, event.at, event.last_heartbeat, revision=event.revision
                )
                return unhealthy, attrs.evolve(event, revision=self._revision)
        return (event,)

    def _snapshot(self, raw: bytes, data: dict[str, Any], version: int) -> SnapshotPart:
        unknown = sorted(data.keys() - _SNAPSHOT_FIELDS)
        if unknown:
            raise JournalDecodeError(f"snapshot: unknown field {unknown[0]!r}")
        _check_crc(raw, data.get("crc32"))
        part, parts = data["part"], data["parts"]
        if not (_is_int(part) and _is_int(parts) and 0 <= part < parts):
            raise JournalDecodeError("snapshot: part and parts must be integers, 0 <= part < parts")
        revision = data["revision"] if version > 1 else self._revision
        if not (_is_int(revision) and revision >= 0):
            raise JournalDecodeError("snapshot: revision must be an integer >= 0")
        columns: list[Any] = [data[name] for name in _SNAPSHOT_LISTS]
        if not all(type(column) is list for column in columns):
            raise JournalDecodeError(f"snapshot: {', '.join(_SNAPSHOT_LISTS)} must be lists")
        capabilities, raw_sets, worker_ids, worker_urls, last_heartbeats, worker_sets = columns
        states = data["health"] if version > 1 else [Health.UNVERIFIED.value] * len(worker_ids)
        if not len(worker_ids) == len(worker_urls) == len(last_heartbeats) == len(worker_sets):
            raise JournalDecodeError("snapshot: the worker columns differ in length")
        if type(states) is not list or len(states) != len(worker_ids):
            raise JournalDecodeError("snapshot: health must be a list, one per worker")
        drains = data.get("draining", [False] * len(worker_ids))
        if type(drains) is not list or len(drains) != len(worker_ids):
            raise JournalDecodeError("snapshot: draining must be a list, one per worker")
        if part == 0:
            self._capabilities, self._sets, self._refused = {}, {}, set()
            self._next_capability = self._next_set = 0
        # Format 2 repeats the previous part's numbers (it starts earlier).
        first_capability = _first_number(
            data, "first_capability", 0 if version > 1 else self._next_capability
        )
        first_set = _first_number(data, "first_set", 0 if version > 1 else self._next_set)
        known, refused = self._capabilities, []
        for number, raw_capability in zip(itertools.count(first_capability), capabilities):
            if number in known or number in self._refused:
                continue  # read on the part before, and checked there
            index = number - first_capability
            capability = self._capability(raw_capability, index)
            problems = self._capability_problems(capability)
            if problems:
                # Left out like a capability on a lost part: its sets' workers are dropped.
                self._refused.add(number)
                refused.append(str(ValidationError(problems).prefixed(f"capabilities[{index}]")))
            else:
                known[number] = capability
        self._next_capability = max(self._next_capability, first_capability + len(capabilities))
        for number, raw_set in zip(itertools.count(first_set), raw_sets):
            if number not in self._sets or self._sets[number] is None:
                self._sets[number] = self._capability_set(raw_set)
        self._next_set = max(self._next_set, first_set + len(raw_sets))
        ejections = data.get("ejections", {})
        if type(ejections) is not dict or not all(
            type(value) is list and len(value) == 3 for value in ejections.values()
        ):
            raise JournalDecodeError("snapshot: ejections must map worker ids to 3 values")
        records = []
        dropped = 0
        sets = self._sets
        for worker_id, worker_url, last_heartbeat, set_number, state, draining in zip(
            worker_ids, worker_urls, last_heartbeats, worker_sets, states, drains, strict=True
        ):
            # A set number that is unknown (or on a lost part): the worker is dropped.
            # (Exactly an int: True would find set 1.)
            worker_capabilities = sets.get(set_number) if type(set_number) is int else None
            if worker_capabilities is None:
                dropped += 1
                continue
            ejection = ejections.get(worker_id) if isinstance(worker_id, str) else None
            records.append(
                _snapshot_record(
                    worker_id,
                    worker_url,
                    worker_capabilities,
                    last_heartbeat,
                    state,
                    draining=draining,
                    ejection=(None, None, None) if ejection is None else ejection,
                )
            )
        self._revision = max(self._revision, revision)
        settings = self._settings(data) if part == 0 else (None, (), None)
        return SnapshotPart(
            revision, tuple(records), part, parts, dropped, *settings, refused=tuple(refused)
        )

    def _settings(
        self, data: dict[str, Any]
    ) -> tuple[AccessRules | None, tuple[SloFile, ...], float | None]:
        """A first part's settings, checked as the wire checks them."""
        try:
            raw_policy = data.get("access_policy")
            access_policy = None if raw_policy is None else structure(raw_policy, AccessRules)
            slos = structure(data.get("slos", []), tuple[SloFile, ...])
            since = data.get("self_preservation")
            preserving = None if since is None else structure(since, float)
        except ValidationError as error:
            raise JournalDecodeError(f"snapshot: settings: {error}") from None
        return access_policy, slos, preserving

    def _capability(self, raw: Any, index: int) -> CapabilitySchema:
        """The capability ``raw`` (the ``index``-th of its part), checked as the wire checks it."""
        try:
            return structure(raw, CapabilitySchema)
        except ValidationError as error:
            reason = error.prefixed(f"capabilities[{index}]")
            raise JournalDecodeError(f"snapshot: {reason}") from None

    def _capability_problems(self, capability: CapabilitySchema) -> Sequence[Problem]:
        return () if self._capability_check is None else self._capability_check(capability)

    def _check_capabilities(self, event: Event) -> None:
        """Hold a change's capabilities to the reader's check (raises :class:`ValidationError`)."""
        if not isinstance(event, (WorkerRegistered, WorkerImported)):
            return
        problems: list[Problem] = []
        for index, capability in enumerate(event.capabilities):
            found = self._capability_problems(capability)
            if found:
                problems += ValidationError(found).prefixed(f"capabilities[{index}]").problems
        if problems:
            raise ValidationError(problems)

    def _capability_set(self, numbers: Any) -> tuple[CapabilitySchema, ...] | None:
        """The capabilities a set numbers; ``None``: one was on a part that could not be read.

        Or the reader's check refused it.
        """
        if type(numbers) is not list or not numbers or not all(map(_is_int, numbers)):
            raise JournalDecodeError(
                "snapshot: a capability set is not a non-empty list of numbers"
            )
        found = [self._capabilities.get(number) for number in numbers]
        if any(capability is None for capability in found):
            return None
        return tuple(capability for capability in found if capability is not None)


def _check_crc(raw: bytes, checksum: Any) -> None:
    """Refuse a line whose ``crc32`` is not the CRC-32 of its bytes before ``,"crc32":``."""
    end = raw.rfind(_CRC_FIELD)
    if not _is_int(checksum) or end < 0 or zlib.crc32(raw[:end]) != checksum:
        raise JournalDecodeError("snapshot: the checksum does not match the line")


def _check_read_back(event: Event) -> None:
    """Hold an event read back to the wire model's rules (events themselves have no checks).

    A worker's are a record's: a registration's, except that a capability
    version of an older release's rule (a semantic version outside PEP 440)
    still loads (DESIGN, "Versions").
    """
    if isinstance(event, WorkerRegistered):
        WorkerRecord(event.worker_id, event.worker_url, event.capabilities, event.at)
    elif isinstance(event, WorkerImported):
        WorkerRecord(event.worker_id, event.worker_url, event.capabilities, event.last_heartbeat)
    elif isinstance(event, (WorkerChange, HeartbeatReceived)) and not is_worker_id(event.worker_id):
        raise ValidationError.single("worker_id", "not a valid worker id")
    # A registry-wide change's values (rules, SLO files) are checked by their models.


# A snapshot's health value -> the record's (verified, silent).
_FLAGS_BY_HEALTH = {health.value: (health.verified, health.silent) for health in Health}


def _snapshot_record(
    worker_id: Any,
    worker_url: Any,
    capabilities: tuple[CapabilitySchema, ...],
    last_heartbeat: Any,
    state: Any,
    *,
    draining: Any,
    ejection: Any,
) -> WorkerRecord:
    """A snapshot's worker; the record's checks are the wire model's."""
    flags = _FLAGS_BY_HEALTH.get(state) if type(state) is str else None
    if flags is None:
        raise JournalDecodeError(f"snapshot: unknown health {state!r}")
    verified, silent = flags
    ejected_until, ejections, ejection_ended = ejection
    try:
        return WorkerRecord(
            worker_id,
            worker_url,
            capabilities,
            last_heartbeat,
            verified=verified,
            silent=silent,
            draining=draining,
            ejected_until=ejected_until,
            ejections=ejections,
            ejection_ended=ejection_ended,
        )
    except ValidationError as error:
        raise JournalDecodeError(f"snapshot: worker {worker_id!r}: {error}") from None


def _first_number(data: dict[str, Any], name: str, lowest: int) -> int:
    """A part's first number: an integer, at least ``lowest``.

    In format 1, ``lowest`` is where the part before stopped (later: the
    numbers between were on parts that could not be read, and what refers
    to them is dropped); format 2 starts where the part before started.
    """
    first: Any = data.get(name)
    if not (_is_int(first) and first >= lowest):
        raise JournalDecodeError(f"snapshot: {name} does not follow the part before")
    return int(first)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------- replay


def replay(
    lines: Iterable[bytes | str],
    registry: CapabilityRegistry,
    *,
    capability_check: CapabilityCheck | None = None,
) -> ReplayResult:
    """Apply journal lines (each ending in a newline, as a file yields them) to ``registry``.

    A last line without its newline, or that cannot be read, is torn: the
    process died while writing it, so it was never acknowledged and is
    dropped. Any other line that cannot be read or applied is skipped.
    Both are counted in ``lines_skipped``. Raises :class:`NewerJournalFormat`
    at a line of a newer format. ``capability_check``: see :class:`JournalReader`.
    """
    reader = JournalReader(capability_check)
    skipped: list[SkippedLine] = []
    refused: list[RefusedCapability] = []
    torn = False
    dropped = 0
    # The run of snapshot parts being read, with their line numbers.
    parts: list[tuple[int, SnapshotPart]] = []
    read = 0
    epoch: str | None = None

    def apply_parts() -> None:
        if not parts:
            return
        revision = parts[0][1].revision  # one run has one revision
        if revision < registry.revision:
            # Older than what the lines before it gave: a stale copy, not ours to roll back to.
            for number, _ in parts:
                skipped.append(
                    SkippedLine(
                        number,
                        f"stale snapshot: revision {revision}, older than the journal's "
                        f"{registry.revision} before it",
                    )
                )
        else:
            workers = tuple(record for _, part in parts for record in part.records)
            first = parts[0][1]
            settings = first if first.part == 0 else SnapshotPart(revision, ())
            registry.apply_snapshot(
                Snapshot(
                    revision,
                    workers,
                    access_policy=settings.access_policy,
                    slos=settings.slos,
                    self_preservation=settings.self_preservation,
                )
            )
        parts.clear()

    for number, line, is_last in _numbered(lines):
        read = number
        complete = line.endswith(b"\n") if isinstance(line, bytes) else line.endswith("\n")
        if not complete:
            # Only the last line of a file can lack its newline.
            skipped.append(SkippedLine(number, "torn: no newline at the end"))
            torn = True
            continue
        if line.isspace():
            skipped.append(SkippedLine(number, "blank line"))
            continue
        try:
            entries = reader.decode(line)
        except JournalDecodeError as error:
            skipped.append(
                SkippedLine(number, f"torn: {error.reason}" if is_last else error.reason)
            )
            torn = torn or is_last
            continue
        for entry in entries:
            if isinstance(entry, SnapshotPart):
                if parts and (
                    entry.part <= parts[-1][1].part or entry.revision != parts[-1][1].revision
                ):
                    apply_parts()  # another snapshot starts
                parts.append((number, entry))
                dropped += entry.dropped
                refused.extend(RefusedCapability(number, reason) for reason in entry.refused)
                continue
            apply_parts()
            if isinstance(entry, EpochLine):
                epoch = entry.epoch
                continue
            if isinstance(entry, Change) and entry.revision <= registry.revision:
                continue  # written after a compaction that already holds it
            try:
                registry.apply(entry)
            except RegistryError as error:
                skipped.append(SkippedLine(number, f"not applied: {error}"))
    apply_parts()
    return ReplayResult(
        lines_read=read,
        lines_skipped=len(skipped),
        torn_tail=torn,
        skipped=tuple(skipped),
        workers_dropped=dropped,
        epoch=epoch,
        refused=tuple(refused),
    )


def replay_bytes(
    data: bytes,
    registry: CapabilityRegistry,
    *,
    capability_check: CapabilityCheck | None = None,
) -> ReplayResult:
    """:func:`replay` of a whole journal in memory (the file's bytes)."""
    return replay(_lines(data), registry, capability_check=capability_check)


def _lines(data: bytes) -> Iterator[bytes]:
    """The lines of ``data``, each with its newline (the last may lack one)."""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start) + 1 or len(data)
        yield data[start:end]
        start = end


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
