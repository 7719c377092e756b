"""Events: what a mutating call of the registry did, in the order it did it.

The service turns events into I/O (journal lines, spans, metrics, logs);
the journal stores them and replays them. Each is a small frozen value.
"""

from __future__ import annotations

import attrs

from ._models import CapabilitySchema

__all__ = [
    "Event",
    "HeartbeatReceived",
    "WorkerDeregistered",
    "WorkerEvicted",
    "WorkerImported",
    "WorkerRegistered",
]


@attrs.frozen
class Event:
    """Base of all events; ``worker_id`` says whom it concerns."""

    worker_id: str


@attrs.frozen
class WorkerRegistered(Event):
    """A worker registered (``replaced``: it was already known and is replaced)."""

    worker_url: str
    capabilities: tuple[CapabilitySchema, ...]
    at: float
    replaced: bool = False


@attrs.frozen
class HeartbeatReceived(Event):
    """A registered worker proved it is alive at ``at``."""

    at: float


@attrs.frozen
class WorkerDeregistered(Event):
    """A worker left on its own at ``at``."""

    at: float


@attrs.frozen
class WorkerEvicted(Event):
    """A worker was removed at ``at`` for silence since ``last_heartbeat``."""

    at: float
    last_heartbeat: float


@attrs.frozen
class WorkerImported(Event):
    """A record taken from another controller's state (``source``), unverified here."""

    worker_url: str
    capabilities: tuple[CapabilitySchema, ...]
    last_heartbeat: float
    source: str
