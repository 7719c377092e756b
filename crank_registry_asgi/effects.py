"""What the registry's events do to the outside world.

The core returns events; this module turns each into I/O: a journal
line (before the answer is sent, so an acknowledged registration is on
disk), an event on the current span, a counter, and for every change one
structured log line (``key=value`` fields on the ``crank_registry_asgi``
logger). Heartbeats and routes are counted but not logged: they are the
steady traffic.

What the journal gets: every change, fsynced before the answer; a
heartbeat only when the worker's last journaled heartbeat is at least half
``unhealthy_after`` old, without an fsync (a lost heartbeat costs nothing
that the next one does not repair, and a restored worker's last heartbeat
stays within that much of the truth).

Decide, make durable, apply: the endpoints and the sweeper have the
registry *decide* a change (``registry.decide_register``...), which holds
it pending; :meth:`Effects.commit` appends its lines to the journal and,
when the journal says the batch is fsynced, has the registry apply it
(:meth:`~crank_registry.CapabilityRegistry.confirm`), or drop it when the
write failed (:meth:`~crank_registry.CapabilityRegistry.discard_pending`).
Both run in the journal's ``settled`` call, in the order the lines were
appended, which is revision order. So a write answered 503 changes nothing
in memory, and what is listed, routed and restored after a restart agree.
Without a state directory the changes are applied at once.

The file journal is the default store. Another (the shared registry on
Redis, :mod:`crank_registry_asgi.redis_store`) plugs in as
:attr:`Effects.store`, a :class:`ChangeStore`: it makes the decided changes
durable, gives them their revisions and has the registry apply them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from opentelemetry import trace

from crank_registry import (
    CapabilityRegistry,
    Change,
    Event,
    HeartbeatReceived,
    PolicyChanged,
    SelfPreservationChanged,
    SlosChanged,
    WorkerDeregistered,
    WorkerDraining,
    WorkerEjected,
    WorkerEvicted,
    WorkerHealthy,
    WorkerImported,
    WorkerRegistered,
    WorkerRestored,
    WorkerUndrained,
    WorkerUnhealthy,
    capability_label,
    encode_epoch,
    encode_event,
    encode_snapshot,
    iso_utc,
)

from .http import ApiError
from .journal import JournalUnavailable
from .metrics import Metrics

__all__ = [
    "ChangeStore",
    "Effects",
    "LineJournal",
    "RegistrySnapshots",
    "log_fields",
    "logger",
]

#: The service's logger.
logger = logging.getLogger("crank_registry_asgi")


class LineJournal(Protocol):
    """Where lines are made durable (:class:`~crank_registry_asgi.journal.Journal`)."""

    async def append(
        self,
        lines: Sequence[bytes],
        *,
        durable: bool,
        settled: Callable[[OSError | None], None] | None = None,
    ) -> None:
        """Append ``lines``; with ``durable``, return once they are fsynced.

        ``settled`` is called with the batch's outcome as soon as it is known.
        """


class ChangeStore(Protocol):
    """Where the registry's changes become durable and get their revisions, instead of the journal.

    :class:`~crank_registry_asgi.redis_store.RedisStore` is one.
    """

    #: Whether the store takes writes now (``GET /ready``'s ``store``).
    available: bool

    def check_writable(self) -> None:
        """Raise :class:`ApiError` (503) when no change can be written now."""

    async def commit(self, events: Sequence[Event]) -> tuple[Event, ...]:
        """Make the changes of ``events`` (just decided) durable and have them applied.

        Returns the events as written: the changes with the revisions the
        store gave them, less those it dropped (a decision that lost a
        race). Raises :class:`ApiError` (503) when they could not be
        written: nothing is applied then.
        """

    def may_sweep(self) -> bool:
        """Whether this controller may write time-driven changes now."""


class RegistrySnapshots:
    """The journal's snapshots of a registry, rendered with the core's codec."""

    def __init__(self, registry: CapabilityRegistry, epoch: str | None = None) -> None:
        self.registry = registry
        #: The registry's epoch, written at the top of every compacted file (when set).
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.registry)

    def capture(self) -> Callable[[], bytes]:
        """The registry's snapshot now; the function returned renders it (in a thread).

        Only the cheap copy is taken here, on the event loop (about 25 ms at
        100 000 workers, where making every record takes a third of a
        second); the records are made with the rendering, off the loop.
        """
        copy = self.registry.snapshot_copy()
        epoch = b"" if self.epoch is None else encode_epoch(self.epoch)
        return lambda: epoch + b"".join(encode_snapshot(copy.snapshot()))


def _nothing() -> None:
    pass


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

    ``registry`` is the one whose decisions :meth:`commit` applies.
    ``journal_expected`` says that the service was configured with a state
    directory: while the journal is not open (the lifespan is not running),
    writes are refused with ``journal_unavailable`` rather than acknowledged
    without being durable. ``retry_after`` is the ``Retry-After`` of that
    answer (whole seconds).
    """

    def __init__(
        self,
        registry: CapabilityRegistry,
        *,
        metrics: Metrics,
        journal_expected: bool,
        heartbeat_line_every: float,
        retry_after: str = "1",
    ) -> None:
        self.registry = registry
        self.retry_after = retry_after
        self.metrics = metrics
        self.journal: LineJournal | None = None
        self.journal_expected = journal_expected
        self.heartbeat_line_every = heartbeat_line_every
        # worker id -> the time of its last heartbeat in the journal
        self._journaled: dict[str, float] = {}
        #: Called after changes were applied (the change feed wakes its watchers).
        self.applied: Callable[[], None] = _nothing
        #: Why the journal's last write failed; ``None`` once a write succeeds again.
        self.journal_failure: str | None = None
        #: Where changes become durable instead of the journal (the shared registry).
        self.store: ChangeStore | None = None

    async def commit(self, events: Sequence[Event]) -> tuple[Event, ...]:
        """Make the changes of ``events`` durable, apply them, then trace, count and log.

        ``events`` were just decided by the registry (its ``decide_*``
        methods, after :meth:`check_writable`), so its changes are pending.
        Raises :class:`ApiError` ``journal_unavailable`` (503, with
        ``Retry-After``) when they could not be made durable: none of them
        is then applied. Heartbeats (applied when decided) are written
        without waiting for an fsync, and a failure to write them is not an
        error. With a :attr:`store`, it writes them (its errors are 503 too).
        Returns the events as applied: with a store, the changes carry the
        revisions it gave, and those it dropped are left out.
        """
        if self.store is not None:
            # The store's own reader calls applied() as it applies them.
            written = await self.store.commit(events) if events else ()
            for event in written:
                self._observe(event)
            return written
        registry = self.registry
        changes = [event for event in events if isinstance(event, Change)]
        if not self.journal_expected:
            if changes:
                registry.confirm(changes[-1].revision)
        elif events:
            self.check_writable()
            assert self.journal is not None
            lines = [encode_event(event) for event in events if self._worth_a_line(event)]
            if changes:
                await self._make_durable(self.journal, lines, changes[-1].revision)
            else:
                try:
                    # No line (a coalesced heartbeat) is no write: it tells nothing of the store.
                    noted = self._note_outcome if lines else None
                    await self.journal.append(lines, durable=False, settled=noted)
                except JournalUnavailable as error:
                    logger.warning("heartbeat not journaled %s", log_fields(error=str(error)))
        if changes:
            self.applied()
        self.observe(events)
        return tuple(events)

    async def _make_durable(self, journal: LineJournal, lines: list[bytes], last: int) -> None:
        """Append ``lines``; apply the pending changes up to revision ``last`` once durable."""
        registry = self.registry
        told = False

        def settled(error: OSError | None) -> None:
            nonlocal told
            told = True
            self._note_outcome(error)
            if error is None:
                registry.confirm(last)
            else:
                # The journal failed this batch and every one queued behind it.
                registry.discard_pending()

        try:
            await journal.append(lines, durable=True, settled=settled)
        except JournalUnavailable as error:
            if not told:  # refused before the lines joined a batch (a closed journal)
                registry.discard_pending()
            raise ApiError(
                error.status_hint,
                error.code,
                f"{error}; nothing was changed, retry later",
                headers={"Retry-After": self.retry_after},
            ) from None

    def _note_outcome(self, error: OSError | None) -> None:
        """Remember whether the journal's last write succeeded (:meth:`store_available`)."""
        self.journal_failure = None if error is None else str(error)

    def store_available(self) -> bool:
        """Whether the journal takes writes: open, and its last write did not fail.

        Always, without a journal (a registry in memory only). With a
        :attr:`store` (the shared registry), whether it reaches Redis.
        """
        if self.store is not None:
            return self.store.available
        if not self.journal_expected:
            return True
        return self.journal is not None and self.journal_failure is None

    def check_writable(self) -> None:
        """Refuse a change up front when the journal that must record it is not open.

        Called before the registry decides, so that a refused write changes
        nothing and leaves nothing pending.
        """
        if self.store is not None:
            self.store.check_writable()
        elif self.journal_expected and self.journal is None:
            raise ApiError(
                503,
                "journal_unavailable",
                "the journal is not open (the application's lifespan is not running)",
                headers={"Retry-After": self.retry_after},
            )

    def may_sweep(self) -> bool:
        """Whether this controller writes time-driven changes now (with a store: its lease)."""
        return self.store is None or self.store.may_sweep()

    def _worth_a_line(self, event: Event) -> bool:
        """Every change; a heartbeat once per ``heartbeat_line_every`` per worker."""
        journaled = self._journaled
        if isinstance(event, HeartbeatReceived):
            last = journaled.get(event.worker_id)
            if last is not None and event.at - last < self.heartbeat_line_every:
                return False
            journaled[event.worker_id] = event.at
        elif isinstance(event, WorkerRegistered):
            journaled[event.worker_id] = event.at
        elif isinstance(event, WorkerImported):
            journaled[event.worker_id] = event.last_heartbeat
        elif isinstance(event, (WorkerDeregistered, WorkerEvicted)):
            journaled.pop(event.worker_id, None)
        return True

    def observe(self, events: Sequence[Event]) -> None:
        """Trace, count and log ``events``, which the registry has applied."""
        for event in events:
            self._observe(event)

    def _observe(self, event: Event) -> None:
        span = trace.get_current_span()
        if isinstance(event, HeartbeatReceived):
            self.metrics.heartbeats.inc()
            self.metrics.recent_heartbeats.add(event.at)
            return
        if isinstance(event, WorkerRegistered):
            self.metrics.registered[event.replaced].inc()
            labels = ",".join(capability_label(c.key) for c in event.capabilities)
            fields: dict[str, object] = {
                "worker_id": event.worker_id,
                "worker_url": event.worker_url,
                "capabilities": labels,
                "replaced": str(event.replaced).lower(),
            }
            message = "worker registered"
        elif isinstance(event, WorkerDeregistered):
            self.metrics.deregistrations.inc()
            fields = {"worker_id": event.worker_id}
            message = "worker deregistered"
        elif isinstance(event, (WorkerEvicted, WorkerUnhealthy)):
            evicted = isinstance(event, WorkerEvicted)
            (self.metrics.evictions if evicted else self.metrics.unhealthy_transitions).inc()
            fields = {
                "worker_id": event.worker_id,
                "last_heartbeat": iso_utc(event.last_heartbeat),
                "silent_s": f"{event.at - event.last_heartbeat:.3f}",
            }
            message = "worker evicted" if evicted else "worker unhealthy"
        elif isinstance(event, WorkerHealthy):
            fields = {"worker_id": event.worker_id}
            message = "worker healthy again"
        elif isinstance(event, WorkerImported):
            fields = {"worker_id": event.worker_id, "source": event.source}
            message = "worker imported"
        elif isinstance(event, (WorkerDraining, WorkerUndrained)):
            draining = isinstance(event, WorkerDraining)
            self.metrics.drain_changes.labels(draining=str(draining).lower()).inc()
            fields = {"worker_id": event.worker_id}
            message = "worker draining" if draining else "worker undrained"
        elif isinstance(event, WorkerEjected):
            fields = {
                "worker_id": event.worker_id,
                "capability": capability_label((event.verb, event.capability)),
                "until": iso_utc(event.until),
                "ejections": event.ejections,
            }
            if self.registry.ejected_until(event.worker_id) == event.until:
                self.metrics.ejections.inc()
                message = "worker ejected: its calls kept failing, it takes no routes until then"
            else:
                # Every replica's fold dropped it alike (over the cap, or ejected already).
                fields["max_ejected_percent"] = f"{event.max_ejected_percent:g}"
                message = "worker ejection dropped: over the ejected share's cap"
        elif isinstance(event, WorkerRestored):
            fields = {"worker_id": event.worker_id}
            message = "worker restored after its ejection"
        elif isinstance(event, SlosChanged):
            fields = {"files": ",".join(slo.file for slo in event.slos) or "none"}
            message = "SLO files changed"
        elif isinstance(event, SelfPreservationChanged):
            self.metrics.self_preservation_changes[event.active].inc()
            fields = {"reason": event.reason, "silent": event.silent, "watched": event.watched}
            if event.active:
                fields["reinstated"] = len(event.reinstated)
                self.metrics.reinstated.inc(len(event.reinstated))
                message = (
                    "self-preservation entered: most workers fell silent at once, so this "
                    "controller takes it that it is cut off; no worker is made unhealthy or "
                    "evicted, routes go to the last known workers (reinstated "
                    f"{len(event.reinstated)} workers its sweep had just made unhealthy)"
                )
            else:
                message = "self-preservation ended"
        elif isinstance(event, PolicyChanged):
            policy = event.access_policy
            fields = {
                "rules": len(policy.rules),
                "default": policy.default,
                "trust_domain": policy.trust_domain,
            }
            message = "access policy changed"
        else:
            raise TypeError(f"not a registry event: {event!r}")
        if isinstance(event, Change):
            fields["revision"] = event.revision
        if span.is_recording():
            span.add_event(message, {f"crank.{key}": str(value) for key, value in fields.items()})
        # Entering self-preservation is what an operator must see.
        level = (
            logging.WARNING
            if isinstance(event, SelfPreservationChanged) and event.active
            else logging.INFO
        )
        logger.log(level, "%s %s", message, log_fields(**fields), extra={"crank": fields})

    def routed(self) -> None:
        """Count a route answered with a worker."""
        self.metrics.routed.inc()

    def no_worker(self) -> None:
        """Count a route answered ``no_worker_available``."""
        self.metrics.no_worker.inc()

    def unknown_capability(self) -> None:
        """Count a route answered ``unknown_capability`` (a pair no worker offers)."""
        self.metrics.unknown_capability.inc()
