"""Events: what happened to the registry, in the order it happened.

Every mutating call of the registry returns events, and every change of
the registry's state is made by applying an event
(:meth:`~crank_registry.CapabilityRegistry.apply`, the one fold). The
service journals them; the journal replays them through the same fold.

There are two kinds::

    Event                  worker_id
    ├── HeartbeatReceived  a worker proved it is alive (not a change: no revision)
    └── Change             revision: one more than the change before it
        ├── WorkerRegistered    registered, or replaced its URL and capabilities
        ├── WorkerDeregistered  left on its own
        ├── WorkerUnhealthy     stopped being routable (silent past unhealthy_after)
        ├── WorkerHealthy       routable again (heard from after being unhealthy)
        ├── WorkerEvicted       removed for silence past evict_after
        └── WorkerImported      taken from another controller's state, unverified

A change carries all that is needed to apply it without a clock: the
sweep decides ``unhealthy`` and ``evicted`` at their deadlines, so whoever
applies the events (a journal replay, a replica) never compares times.
"""

from __future__ import annotations

import attrs

from ._models import CapabilitySchema, WorkerRecord

__all__ = [
    "Change",
    "Event",
    "HeartbeatReceived",
    "Snapshot",
    "WorkerDeregistered",
    "WorkerEvicted",
    "WorkerHealthy",
    "WorkerImported",
    "WorkerRegistered",
    "WorkerUnhealthy",
]


@attrs.frozen
class Event:
    """Base of all events; ``worker_id`` says whom it concerns."""

    worker_id: str


@attrs.frozen
class HeartbeatReceived(Event):
    """A registered worker proved it is alive at ``at``.

    Not a change of the registry (routability is unchanged; a heartbeat
    that makes a worker routable again comes with :class:`WorkerHealthy`).
    """

    at: float


@attrs.frozen
class Change(Event):
    """An event that changes the registry; ``revision`` numbers it (1, 2, 3, ...)."""

    revision: int = attrs.field(kw_only=True)


@attrs.frozen
class WorkerRegistered(Change):
    """A worker registered at ``at`` (``replaced``: it was already known and is replaced)."""

    worker_url: str
    capabilities: tuple[CapabilitySchema, ...]
    at: float
    replaced: bool = False


@attrs.frozen
class WorkerDeregistered(Change):
    """A worker left on its own at ``at``."""

    at: float


@attrs.frozen
class WorkerUnhealthy(Change):
    """A worker stopped being routable at ``at``: silent since ``last_heartbeat``."""

    at: float
    last_heartbeat: float


@attrs.frozen
class WorkerHealthy(Change):
    """An unhealthy worker was heard from at ``at`` and is routable again."""

    at: float


@attrs.frozen
class WorkerEvicted(Change):
    """A worker was removed at ``at`` for silence since ``last_heartbeat``."""

    at: float
    last_heartbeat: float


@attrs.frozen
class WorkerImported(Change):
    """A record taken from another controller's state (``source``), unverified here."""

    worker_url: str
    capabilities: tuple[CapabilitySchema, ...]
    last_heartbeat: float
    source: str


@attrs.frozen
class Snapshot:
    """The whole registry at ``revision``: what :meth:`CapabilityRegistry.apply_snapshot` loads.

    ``workers`` are in registration order; a record that is not
    ``verified`` is held as ``unverified``.
    """

    revision: int
    workers: tuple[WorkerRecord, ...]
