"""The change feed over HTTP: ``GET /snapshot``, and ``GET /watch`` as a long poll or a stream.

The core keeps the window of recent changes (``crank_registry``'s
:class:`~crank_registry.ChangeLog`, fed by the one fold); this module
answers from it.

Many watchers cost little: a watcher with nothing to read waits on one
shared :class:`anyio.Event`, which :meth:`Broadcast.moved` sets once the
registry's revision has moved (after the changes are applied) and
replaces by a fresh one for the next change. There is no task, and no
polling loop, per watcher: a long poll is one request parked on the event
until it is set or its timeout passes.

``/snapshot`` copies the registry at one revision in one cheap step
(:class:`~crank_registry.SnapshotCopy`: each worker's fields, about 25 ms
at 100 000 workers), then makes, renders and sends the records in slices
with a yield to the event loop between two.

``GET /watch`` with ``Accept: text/event-stream`` is the same feed as
Server-Sent Events (:func:`stream`, sent by sse-starlette's
``EventSourceResponse``): one event per change, ``id: EPOCH:REVISION``,
so that a client's ``Last-Event-ID`` resumes it, and a ``bookmark`` every
:func:`bookmark_period` (one ticker for all streams, :func:`tick_every`).
A stream parks on the same :class:`Broadcast` as the long polls between
two changes. :meth:`Broadcast.close` (the server is
shutting down) ends the streams and answers the long polls at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import anyio
from prometheus_client import Gauge
from sse_starlette import ServerSentEvent

from crank_registry import (
    CapabilityRegistry,
    Change,
    HealthPolicy,
    RevisionCompacted,
    RevisionReset,
    SnapshotAnswer,
    SnapshotCopy,
    ValidationError,
    WatchAnswer,
    WatchQuery,
    unstructure,
    unstructure_event,
)

from .http import registry_error_body

__all__ = [
    "EVENT_ID_PATTERN",
    "MAX_BOOKMARK_PERIOD",
    "RENDER_STEP",
    "Broadcast",
    "bookmark_period",
    "check_start",
    "counted",
    "parse_event_id",
    "render_change",
    "snapshot_body",
    "stream",
    "tick_every",
    "wants_stream",
    "watch",
]

#: Workers rendered per slice of a snapshot's body.
RENDER_STEP = 200
#: The longest time between two ``bookmark`` events of a stream (DESIGN, "Long poll and bookmarks").
MAX_BOOKMARK_PERIOD = 15.0
_COMPACT = (",", ":")
#: An event's id, ``EPOCH:REVISION`` (what ``Last-Event-ID`` carries back).
EVENT_ID_PATTERN = r"([0-9A-Za-z_-]{1,64}):([0-9]{1,20})"
_EVENT_ID = re.compile(EVENT_ID_PATTERN)
# How many rendered events Broadcast.rendered_change keeps.
_RENDERED_CHANGES = 512


class Broadcast:
    """Wakes every waiter at once when the registry's revision moves.

    The event is made by the first waiter after a change (so a service
    nobody watches makes none) and dropped by :meth:`moved`, which sets it.
    """

    def __init__(self, registry: CapabilityRegistry) -> None:
        self.registry = registry
        self._seen = registry.revision
        self._event: anyio.Event | None = None
        #: Set by :meth:`close`: streams end, long polls answer without waiting.
        self.closed = False
        #: How many times :meth:`tick` woke the waiters.
        self.ticks = 0
        self._rendered_changes: dict[int, tuple[Change, str, bytes]] = {}
        #: How many times waiters were woken (one per move with waiters).
        self.wakeups = 0
        #: The last answer of /watch: ``(epoch, since, latest)`` and its JSON.
        self.rendered: tuple[tuple[str, int, int], bytes] | None = None

    def moved(self) -> None:
        """Wake the waiters if the revision moved since the last call (changes were applied)."""
        revision = self.registry.revision
        if revision == self._seen:
            return
        self._seen = revision
        event, self._event = self._event, None
        if event is not None:
            self.wakeups += 1
            event.set()

    def rendered_change(self, epoch: str, change: Change) -> bytes:
        """:func:`render_change` of ``change``, rendered once for every stream.

        The streams woken by one change send the same bytes: rendered once
        instead of once per stream, the wake-up of 1,000 streams costs the
        loop 33-41 ms of CPU instead of 58-64 (``benchmarks/feed.py``). The
        last few hundred changes stay rendered, for streams a little behind.
        """
        kept = self._rendered_changes.get(change.revision)
        if kept is not None and kept[0] is change and kept[1] == epoch:
            return kept[2]
        if len(self._rendered_changes) >= _RENDERED_CHANGES:
            self._rendered_changes.clear()
        encoded = render_change(epoch, change)
        self._rendered_changes[change.revision] = (change, epoch, encoded)
        return encoded

    def close(self) -> None:
        """The server is shutting down: wake every waiter, and let none wait again."""
        self.closed = True
        event, self._event = self._event, None
        if event is not None:
            event.set()

    def waiting(self) -> int:
        """How many waiters are parked on the event now."""
        return 0 if self._event is None else self._event.statistics().tasks_waiting

    def tick(self) -> None:
        """Wake every waiter without a change: the streams' bookmarks are due."""
        self.ticks += 1
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def wait_past(self, revision: int, timeout: float | None = None) -> None:
        """Return once the revision is beyond ``revision``, after ``timeout`` seconds, or closed.

        Without a ``timeout``, also at the next :meth:`tick`.
        """
        if timeout is None:
            ticks = self.ticks
            while self.registry.revision <= revision and not self.closed and self.ticks == ticks:
                await self._wait()
            return
        with anyio.move_on_after(timeout):
            while self.registry.revision <= revision and not self.closed:
                await self._wait()

    async def _wait(self) -> None:
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()


async def tick_every(broadcast: Broadcast, period: float) -> None:
    """Tick ``broadcast`` every ``period`` seconds, until cancelled: the streams' bookmarks.

    One timer for every stream: a timer of its own per stream and per wait
    would cost each wake-up of 1,000 streams more than the rest of it.
    """
    while True:
        await anyio.sleep(period)
        broadcast.tick()


async def watch(
    registry: CapabilityRegistry, broadcast: Broadcast, epoch: str, query: WatchQuery
) -> bytes:
    """The answer to ``GET /watch`` (a :class:`~crank_registry.WatchAnswer` as JSON).

    The changes after ``query.since``, waiting for one if there is none.
    Watchers woken by one change ask the same question: the last answer
    rendered is kept and handed to each of them, rendered once.

    Raises :class:`~crank_registry.RevisionReset` for another epoch or a
    ``since`` beyond the latest revision, and
    :class:`~crank_registry.RevisionCompacted` for a ``since`` older than
    the window (410 both: read ``/snapshot`` again).
    """
    check_epoch(registry, epoch, query.epoch, query.since)
    changes, latest = registry.changes_since(query.since)
    if not changes:
        await broadcast.wait_past(query.since, query.timeout)
        changes, latest = registry.changes_since(query.since)
    key = (epoch, query.since, latest)
    if broadcast.rendered is not None and broadcast.rendered[0] == key:
        return broadcast.rendered[1]
    answer = WatchAnswer(
        epoch=epoch, revision=latest, events=tuple(map(unstructure_event, changes))
    )
    body = json.dumps(unstructure(answer), separators=_COMPACT).encode()
    broadcast.rendered = (key, body)
    return body


def check_epoch(registry: CapabilityRegistry, epoch: str, asked: str | None, since: int) -> None:
    """Raise :class:`~crank_registry.RevisionReset` when ``asked`` is another history's epoch."""
    if asked is not None and asked != epoch:
        raise RevisionReset(
            since,
            registry.revision,
            f"epoch={asked} is not this registry's history (its epoch is {epoch}): "
            "load GET /snapshot again and follow from its epoch and revision",
        )


def check_start(registry: CapabilityRegistry, epoch: str, asked: str | None, since: int) -> None:
    """Raise the 410 a feed from ``since`` of history ``asked`` would meet, before it starts.

    :class:`~crank_registry.RevisionReset` for another epoch or a ``since``
    beyond the latest revision, :class:`~crank_registry.RevisionCompacted`
    for a ``since`` older than the window.
    """
    check_epoch(registry, epoch, asked, since)
    registry.changes_since(since, 1)


def parse_event_id(text: str) -> tuple[str, int]:
    """The epoch and revision of an event id ``EPOCH:REVISION`` (a ``Last-Event-ID`` header).

    Raises :class:`~crank_registry.ValidationError` naming the header.
    """
    match = _EVENT_ID.fullmatch(text)
    if match is None:
        raise ValidationError.single(
            "Last-Event-ID",
            f"must be the id of an event of this feed, EPOCH:REVISION, got {text!r}; "
            "drop the header to start from since",
        )
    return match[1], int(match[2])


def wants_stream(accept: str | None) -> bool:
    """Whether an ``Accept`` header asks for Server-Sent Events rather than JSON.

    ``text/event-stream`` must be named, and not ranked below ``application/json``;
    ``*/*`` (or no header) gets the long poll's JSON.
    """
    if not accept:
        return False
    quality: dict[str, float] = {}
    for member in accept.split(","):
        media_type, _, parameters = member.partition(";")
        weight = 1.0
        for parameter in parameters.split(";"):
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        key = media_type.strip().lower()
        quality[key] = max(weight, quality.get(key, 0.0))
    wanted = quality.get("text/event-stream", 0.0)
    return wanted > 0 and wanted >= quality.get("application/json", 0.0)


def render_change(epoch: str, change: Change) -> bytes:
    """``change`` as one Server-Sent Event: ``id: EPOCH:REVISION``, its type, its JSON."""
    data = unstructure_event(change)
    event = ServerSentEvent(_dumps(data), event=data["type"], id=f"{epoch}:{change.revision}")
    return event.encode()


def bookmark_period(policy: HealthPolicy) -> float:
    """Seconds between two ``bookmark`` events: ``min(15 s, heartbeat_interval / 2)``."""
    return min(MAX_BOOKMARK_PERIOD, policy.heartbeat_interval / 2)


def _dumps(value: object) -> str:
    return json.dumps(value, separators=_COMPACT)


async def stream(
    registry: CapabilityRegistry,
    broadcast: Broadcast,
    epoch: str,
    since: int,
    *,
    ends_at: float | None = None,
) -> AsyncIterator[bytes]:
    """The changes after ``since`` as Server-Sent Events, as they come (encoded).

    Each change is an event ``id: EPOCH:REVISION``, ``event:`` its type,
    ``data:`` its JSON (as in a long poll's ``events``). At every tick of
    the broadcast (:func:`tick_every`), a ``bookmark`` event (``data:`` the
    epoch and the revision the stream has reached, which is its id too). A
    reader too slow for the window (its next change left it) gets one
    ``error`` event, whose data is the 410 body a request from there would
    get, and the stream ends. It also ends at ``ends_at`` (``anyio``'s
    clock) and when the broadcast is closed. Call :func:`check_start` first:
    errors known before the stream starts are answers, not events.
    """
    ticks = broadcast.ticks
    while True:
        try:
            changes, latest = registry.changes_since(since)
        except (RevisionCompacted, RevisionReset) as error:
            yield ServerSentEvent(_dumps(registry_error_body(error)), event="error").encode()
            return
        if changes:
            # Every change waiting for this reader, in one chunk.
            yield b"".join(broadcast.rendered_change(epoch, change) for change in changes)
            since = changes[-1].revision
            if since < latest:  # a full page: the rest at once
                continue
        if broadcast.ticks != ticks:
            ticks = broadcast.ticks
            yield ServerSentEvent(
                _dumps({"epoch": epoch, "revision": since}),
                event="bookmark",
                id=f"{epoch}:{since}",
            ).encode()
        if broadcast.closed:
            return
        if ends_at is None:
            await broadcast.wait_past(since)
            continue
        left = ends_at - anyio.current_time()
        if left <= 0:
            return
        with anyio.move_on_after(left):
            await broadcast.wait_past(since)


async def counted(events: AsyncIterator[bytes], gauge: Gauge) -> AsyncIterator[bytes]:
    """``events``, with ``gauge`` one higher from the first until the stream ends.

    It ends when ``events`` does, or when the client leaves (the server
    cancels the task sending it).
    """
    gauge.inc()
    try:
        async for chunk in events:
            yield chunk
    finally:
        gauge.dec()


async def snapshot_body(
    snapshot: SnapshotCopy, epoch: str, policy: HealthPolicy
) -> AsyncIterator[bytes]:
    """The JSON of a :class:`~crank_registry.SnapshotAnswer` of ``snapshot``, in slices.

    Each slice makes :data:`RENDER_STEP` records and renders them with the
    converter; the loop runs other work between two slices.
    """
    head = unstructure(
        SnapshotAnswer(
            epoch=epoch,
            revision=snapshot.revision,
            health_policy=policy,
            access_policy=snapshot.access_policy,
            slos=snapshot.slos,
            self_preservation=snapshot.self_preservation is not None,
            self_preservation_since=snapshot.self_preservation,
            workers=(),
        )
    )
    del head["workers"]  # streamed below, a slice at a time
    yield json.dumps(head, separators=_COMPACT)[:-1].encode() + b',"workers":['
    for start in range(0, len(snapshot), RENDER_STEP):
        if start:
            await anyio.sleep(0)
        records = snapshot.records(start, start + RENDER_STEP)
        rendered = ",".join(json.dumps(unstructure(r), separators=_COMPACT) for r in records)
        yield (b"," if start else b"") + rendered.encode()
    yield b"]}"
