"""What the registry's events do to the outside world.

The core returns events; this module turns each into I/O: a journal
append (before the answer is sent, so an acknowledged registration is on
disk), an event on the current span, a counter, and for registrations,
deregistrations and evictions one structured log line (``key=value``
fields on the ``crank_registry_asgi`` logger). Heartbeats and routes are
counted but not logged: they are the steady traffic.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Protocol

from opentelemetry import trace

from crank_registry import (
    Event,
    HeartbeatReceived,
    WorkerDeregistered,
    WorkerEvicted,
    WorkerImported,
    WorkerRegistered,
    capability_label,
    iso_utc,
)

from .http import ApiError
from .journal import JournalUnavailable
from .telemetry import Metrics

__all__ = ["Effects", "EventJournal", "log_fields", "logger"]

#: The service's logger.
logger = logging.getLogger("crank_registry_asgi")


class EventJournal(Protocol):
    """Where events are made durable (the journal on disk)."""

    async def record(self, events: Sequence[Event]) -> None:
        """Append ``events``; return once they are as durable as the journal promises."""


def _field_value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    # Quote anything a key=value reader would split on.
    if not text or any(ch.isspace() or ch in '"=' for ch in text):
        return json.dumps(text)
    return text


def log_fields(**fields: object) -> str:
    """``key=value`` pairs, values quoted when they hold spaces, quotes or ``=``."""
    return " ".join(f"{key}={_field_value(value)}" for key, value in fields.items())


class Effects:
    """Turns events into journal lines, span events, counters and log lines.

    ``journal_expected`` says that the service was configured with a state
    directory: while the journal is not open (the lifespan is not running),
    writes are refused with ``journal_unavailable`` rather than acknowledged
    without being durable.
    """

    def __init__(
        self,
        *,
        metrics: Metrics,
        journal_expected: bool,
    ) -> None:
        self.metrics = metrics
        self.journal: EventJournal | None = None
        self.journal_expected = journal_expected

    async def apply(self, events: Sequence[Event]) -> None:
        """Make ``events`` durable, then trace, count and log them.

        Raises :class:`ApiError` ``journal_unavailable`` (503) when they
        could not be made durable.
        """
        await self._record(events)
        for event in events:
            self._observe(event)

    def check_writable(self) -> None:
        """Refuse a change up front when the journal that must record it is not open.

        Called before the registry is touched, so that a refused write
        changes nothing. (A write that fails on disk is known only after the
        change; it is answered 503 and repaired by the worker's retry.)
        """
        if self.journal_expected and self.journal is None:
            raise ApiError(
                503,
                "journal_unavailable",
                "the journal is not open (the application's lifespan is not running)",
            )

    async def _record(self, events: Sequence[Event]) -> None:
        if not self.journal_expected or not events:
            return
        self.check_writable()
        assert self.journal is not None
        try:
            await self.journal.record(events)
        except JournalUnavailable as error:
            raise ApiError(error.status_hint, error.code, str(error)) from None

    def _observe(self, event: Event) -> None:
        span = trace.get_current_span()
        if isinstance(event, HeartbeatReceived):
            self.metrics.heartbeats.add(1)
            return
        if isinstance(event, WorkerRegistered):
            self.metrics.registrations.add(1, {"crank.replaced": event.replaced})
            labels = ",".join(capability_label(c.key) for c in event.capabilities)
            fields: dict[str, object] = {
                "worker_id": event.worker_id,
                "worker_url": event.worker_url,
                "capabilities": labels,
                "replaced": str(event.replaced).lower(),
            }
            message = "worker registered"
        elif isinstance(event, WorkerDeregistered):
            self.metrics.deregistrations.add(1)
            fields = {"worker_id": event.worker_id}
            message = "worker deregistered"
        elif isinstance(event, WorkerEvicted):
            self.metrics.evictions.add(1)
            fields = {
                "worker_id": event.worker_id,
                "last_heartbeat": iso_utc(event.last_heartbeat),
                "silent_s": f"{event.at - event.last_heartbeat:.3f}",
            }
            message = "worker evicted"
        elif isinstance(event, WorkerImported):
            fields = {"worker_id": event.worker_id, "source": event.source}
            message = "worker imported"
        else:
            fields = {"worker_id": event.worker_id, "event": type(event).__name__}
            message = "registry event"
        if span.is_recording():
            span.add_event(message, {f"crank.{key}": str(value) for key, value in fields.items()})
        logger.info("%s %s", message, log_fields(**fields), extra={"crank": fields})

    def routed(self) -> None:
        """Count a route answered with a worker."""
        self.metrics.routes.add(1)

    def no_worker(self) -> None:
        """Count a route answered ``no_worker_available``."""
        self.metrics.no_worker.add(1)
