"""The change feed: a bounded window of the registry's most recent changes.

:meth:`CapabilityRegistry.apply <crank_registry.CapabilityRegistry.apply>`,
the one fold every change passes through (the in-memory path, a journal
replay, a confirmed decision), records each :class:`~._events.Change` here.
A follower that holds the registry at revision ``R`` (from a snapshot, or
from the feed itself) asks :meth:`ChangeLog.since` for the changes after
``R`` and applies them with the same fold. Heartbeats are not changes and
never enter the window.

The window keeps the last ``capacity`` changes. ``oldest`` is the revision
a follower must hold at least to be answered: the revision just before the
first change kept (the changes after it are all here). A follower behind it
gets :class:`RevisionCompacted`; one ahead of the latest revision (it
followed another history, or one that was lost) gets :class:`RevisionReset`.
Both mean: load the snapshot again.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Sequence

from ._errors import RevisionCompacted, RevisionReset
from ._events import Change, Snapshot
from ._health import Health
from ._models import CapabilitySchema, WorkerRecord
from ._policy import AccessRules
from ._slos import SloFile

__all__ = ["DEFAULT_FEED_WINDOW", "MAX_FEED_PAGE", "ChangeLog", "SnapshotCopy", "WorkerRow"]

#: What a :class:`SnapshotCopy` keeps of a worker: id, URL, capabilities, last heartbeat,
#: state, draining, and its ejection: until when (``None``: not ejected), its streak, when
#: the last ended.
WorkerRow = tuple[
    str, str, tuple[CapabilitySchema, ...], float, Health, bool, float | None, int, float
]

#: How many changes a registry keeps for its feed unless told otherwise.
DEFAULT_FEED_WINDOW = 100_000
#: The most changes one answer of :meth:`ChangeLog.since` holds.
MAX_FEED_PAGE = 1000


class ChangeLog:
    """The last ``capacity`` changes of a registry, in revision order."""

    def __init__(self, capacity: int = DEFAULT_FEED_WINDOW) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self._changes: collections.deque[Change] = collections.deque(maxlen=capacity)
        self._oldest = 0
        self._latest = 0

    @property
    def oldest(self) -> int:
        """The lowest revision :meth:`since` answers: every change after it is kept."""
        return self._oldest

    @property
    def latest(self) -> int:
        """The revision of the last change recorded (or of the last :meth:`reset`)."""
        return self._latest

    def __len__(self) -> int:
        return len(self._changes)

    def record(self, change: Change) -> None:
        """Keep ``change``, the registry's next one; the oldest kept leaves when full."""
        changes = self._changes
        if len(changes) == self.capacity:
            self._oldest = changes[0].revision
        changes.append(change)
        self._latest = change.revision

    def reset(self, revision: int) -> None:
        """Forget every change: the registry was replaced by a snapshot at ``revision``."""
        self._changes.clear()
        self._oldest = self._latest = revision

    def since(self, revision: int, limit: int = MAX_FEED_PAGE) -> tuple[tuple[Change, ...], int]:
        """The changes after ``revision`` (at most ``limit``, oldest first) and the latest revision.

        Raises :class:`RevisionCompacted` when changes after ``revision``
        have left the window, :class:`RevisionReset` when ``revision`` is
        beyond the latest. No change after ``revision``: an empty tuple.
        """
        if not 1 <= limit <= MAX_FEED_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_FEED_PAGE}, got {limit}")
        if revision > self._latest:
            raise RevisionReset(revision, self._latest)
        if revision < self._oldest:
            raise RevisionCompacted(revision, self._oldest)
        # Revisions are consecutive from oldest + 1 within the window.
        start = revision - self._oldest
        changes = self._changes
        if start >= len(changes):
            return (), self._latest
        return tuple(itertools.islice(changes, start, start + limit)), self._latest


class SnapshotCopy:
    """The registry at ``revision``, copied in one cheap step; its records made a slice at a time.

    :meth:`CapabilityRegistry.snapshot
    <crank_registry.CapabilityRegistry.snapshot>` makes every record at
    once (a third of a second at 100 000 workers); a copy takes each
    worker's fields only (immutable values), so that a service can make and
    send the records in slices, yielding between two, while the registry
    changes: the copy stays the registry at ``revision``.
    """

    def __init__(
        self,
        revision: int,
        rows: Sequence[WorkerRow],
        *,
        access_policy: AccessRules | None = None,
        slos: tuple[SloFile, ...] = (),
        self_preservation: float | None = None,
    ) -> None:
        self.revision = revision
        self._rows = rows
        #: The registry's settings at ``revision`` (immutable values).
        self.access_policy = access_policy
        self.slos = slos
        #: When self-preservation began (``None``: not in it).
        self.self_preservation = self_preservation

    def __len__(self) -> int:
        return len(self._rows)

    def records(self, start: int, stop: int) -> tuple[WorkerRecord, ...]:
        """The records of the workers ``start`` to ``stop`` (registration order)."""
        return tuple(
            WorkerRecord(
                worker_id,
                worker_url,
                capabilities,
                last_heartbeat,
                verified=health.verified,
                silent=health.silent,
                draining=draining,
                ejected_until=ejected_until,
                ejections=ejections or None,
                ejection_ended=None if ended == -math.inf else ended,
            )
            for (
                worker_id,
                worker_url,
                capabilities,
                last_heartbeat,
                health,
                draining,
                ejected_until,
                ejections,
                ended,
            ) in self._rows[start:stop]
        )

    def snapshot(self) -> Snapshot:
        """All of it as one :class:`~crank_registry.Snapshot`."""
        return Snapshot(
            self.revision,
            self.records(0, len(self._rows)),
            access_policy=self.access_policy,
            slos=self.slos,
            self_preservation=self.self_preservation,
        )
