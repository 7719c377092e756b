"""The change feed over HTTP: ``GET /snapshot`` and the long poll ``GET /watch``.

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
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio

from crank_registry import (
    CapabilityRegistry,
    HealthPolicy,
    RevisionReset,
    SnapshotAnswer,
    SnapshotCopy,
    WatchAnswer,
    WatchQuery,
    unstructure,
    unstructure_event,
)

__all__ = ["RENDER_STEP", "Broadcast", "snapshot_body", "watch"]

#: Workers rendered per slice of a snapshot's body.
RENDER_STEP = 200
_COMPACT = (",", ":")


class Broadcast:
    """Wakes every waiter at once when the registry's revision moves.

    The event is made by the first waiter after a change (so a service
    nobody watches makes none) and dropped by :meth:`moved`, which sets it.
    """

    def __init__(self, registry: CapabilityRegistry) -> None:
        self.registry = registry
        self._seen = registry.revision
        self._event: anyio.Event | None = None
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

    def waiting(self) -> int:
        """How many waiters are parked on the event now."""
        return 0 if self._event is None else self._event.statistics().tasks_waiting

    async def wait_past(self, revision: int, timeout: float) -> None:
        """Return once the revision is beyond ``revision``, or after ``timeout`` seconds."""
        with anyio.move_on_after(timeout):
            while self.registry.revision <= revision:
                if self._event is None:
                    self._event = anyio.Event()
                await self._event.wait()


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
    if query.epoch is not None and query.epoch != epoch:
        raise RevisionReset(
            query.since,
            registry.revision,
            f"epoch={query.epoch} is not this registry's history (its epoch is {epoch}): "
            "load GET /snapshot again and follow from its epoch and revision",
        )
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
