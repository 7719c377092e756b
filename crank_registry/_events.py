"""Events: what happened to the registry, in the order it happened.

Every mutating call of the registry returns events, and every change of
the registry's state is made by applying an event
(:meth:`~crank_registry.CapabilityRegistry.apply`, the one fold). The
service journals them; the journal replays them through the same fold.

A heartbeat is not a change; a change is about one worker, or about the
whole registry::

    Event
    ├── HeartbeatReceived       a worker proved it is alive (not a change: no revision)
    └── Change                  revision: one more than the change before it
        ├── WorkerChange        worker_id: about one worker
        │   ├── WorkerRegistered    registered, or replaced its URL and capabilities
        │   ├── WorkerDeregistered  left on its own
        │   ├── WorkerUnhealthy     stopped being routable (silent past unhealthy_after)
        │   ├── WorkerHealthy       routable again (heard from after being unhealthy)
        │   ├── WorkerEvicted       removed for silence past evict_after
        │   ├── WorkerImported      taken from another controller's state, unverified
        │   ├── WorkerDraining      takes no new routes (drained), whatever its health
        │   ├── WorkerUndrained     takes routes again as its health allows
        │   ├── WorkerEjected       out of routing until a deadline: its calls kept failing
        │   └── WorkerRestored      back in routing: its ejection's deadline passed
        └── RegistryChange      about the whole registry, not one worker
            ├── SlosChanged         the SLO files in effect were replaced
            ├── PolicyChanged       the access policy's rules were replaced
            └── SelfPreservationChanged  self-preservation began (reinstating the
                                         workers its silences had just made
                                         unhealthy) or ended

A change carries all that is needed to apply it without a clock: the
sweep decides ``unhealthy``, ``evicted`` and ``restored`` at their deadlines, so whoever
applies the events (a journal replay, a replica) never compares times; a
registry-wide change carries the whole new value (every SLO file, every
rule), not a difference, so applying it needs nothing but the change.
"""

from __future__ import annotations

from typing import Final

import attrs

from ._errors import ValidationError
from ._models import JSON_SCHEMA, OMIT_IF_FALSE, CapabilitySchema, HealthState, WorkerRecord
from ._policy import AccessRules
from ._slos import SloFile

__all__ = [
    "Change",
    "Event",
    "HeartbeatReceived",
    "PolicyChanged",
    "RegistryChange",
    "Reinstatement",
    "SelfPreservationChanged",
    "SlosChanged",
    "Snapshot",
    "WorkerChange",
    "WorkerDeregistered",
    "WorkerDraining",
    "WorkerEjected",
    "WorkerEvicted",
    "WorkerHealthy",
    "WorkerImported",
    "WorkerRegistered",
    "WorkerUndrained",
    "WorkerRestored",
    "WorkerUnhealthy",
]


#: The ``reason`` of the :class:`SelfPreservationChanged` that starts it.
ENTERED: Final = "workers_fell_silent"
#: The ``reason`` of the one that ends it: heartbeats came back, it lasted its
#: longest, or its threshold is 0 (turned off while it lasted).
EXIT_REASONS: Final = ("heartbeats_returned", "max_duration", "turned_off")
_REASONS = (ENTERED, *EXIT_REASONS)


@attrs.frozen
class Event:
    """Base of all events."""


@attrs.frozen
class HeartbeatReceived(Event):
    """A registered worker proved it is alive at ``at``.

    Not a change of the registry (routability is unchanged; a heartbeat
    that makes a worker routable again comes with :class:`WorkerHealthy`).
    """

    worker_id: str
    at: float


_new = object.__new__
# The slots' own setters: a frozen class' __setattr__ refuses, as it should.
_set_worker_id = HeartbeatReceived.__dict__["worker_id"].__set__
_set_at = HeartbeatReceived.__dict__["at"].__set__


def heartbeat_received(worker_id: str, at: float) -> HeartbeatReceived:
    """``HeartbeatReceived(worker_id, at)``, made without attrs' ``__init__``.

    The registry makes one per heartbeat, and attrs' ``__init__`` of a
    frozen class (a Python frame that sets each field through
    ``object.__setattr__``) was a third of a heartbeat's cost
    (benchmarks/core.py): this sets the two slots directly. The values are
    the registry's own, already checked. tests/core/test_heartbeat.py
    checks that the two are equal.
    """
    beat = _new(HeartbeatReceived)
    _set_worker_id(beat, worker_id)
    _set_at(beat, at)
    return beat


@attrs.frozen
class Change(Event):
    """An event that changes the registry; ``revision`` numbers it (1, 2, 3, ...)."""

    revision: int = attrs.field(kw_only=True)


@attrs.frozen
class WorkerChange(Change):
    """A change of one worker, ``worker_id``."""

    worker_id: str


@attrs.frozen
class RegistryChange(Change):
    """A change of the whole registry (its settings), decided at ``at``; no worker's."""

    at: float


@attrs.frozen
class SlosChanged(RegistryChange):
    """The SLO files in effect are now ``slos`` (all of them, in the order of their names)."""

    slos: tuple[SloFile, ...]


@attrs.frozen
class PolicyChanged(RegistryChange):
    """The built-in access policy now routes under ``access_policy`` (its rules, all of them)."""

    access_policy: AccessRules


def _reason(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in _REASONS:
        raise ValidationError.single(attribute.name, f"must be one of {', '.join(_REASONS)}")


def _count(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValidationError.single(attribute.name, "must be >= 0")


#: The states a reinstated worker returns to: the routable ones its silence left.
_RETURNS_TO = (HealthState.HEALTHY, HealthState.UNVERIFIED)


def _returns_to(_: object, attribute: attrs.Attribute[HealthState], value: HealthState) -> None:
    if value not in _RETURNS_TO:
        raise ValidationError.single(
            attribute.name, f"must be one of {', '.join(state.value for state in _RETURNS_TO)}"
        )


@attrs.frozen
class Reinstatement:
    """A worker made unhealthy by its silence, put back as it was when self-preservation began.

    ``state``: the routable state the silence took it from (``healthy``, or
    ``unverified`` after a restart); ``last_heartbeat``: the heartbeat that
    silence was decided on. The fold reinstates the worker only while it is
    still in that silence (the silent state of ``state``, with that last
    heartbeat): one heard from, gone or registered again since is skipped.
    """

    worker_id: str
    state: HealthState = attrs.field(
        validator=_returns_to,
        metadata={JSON_SCHEMA: {"enum": [state.value for state in _RETURNS_TO]}},
    )
    last_heartbeat: float


@attrs.frozen
class SelfPreservationChanged(RegistryChange):
    """Self-preservation began (``active``) or ended at ``at`` (:mod:`._preservation`).

    ``reason``: ``workers_fell_silent`` when it begins; ``heartbeats_returned``,
    ``max_duration`` or ``turned_off`` when it ends. ``silent`` of the
    ``watched`` workers (routable at the window's start) were silent then.
    While it lasts the registry decides no ``unhealthy`` nor ``evicted``,
    and routes to every worker it holds as routable, silent or not.

    ``reinstated`` (when it begins): the workers whose silences, in the
    ``unhealthy_after`` before it, were decided ``unhealthy`` one by one
    until their number started it (a partition silences a fleet over a
    heartbeat interval). Each goes back to the routable state it had,
    its last heartbeat unchanged (no heartbeat is faked), so routing
    continues to all the last known workers, not only to those that fell
    silent last. Empty when it ends, and in changes written before it existed.
    """

    active: bool
    reason: str = attrs.field(validator=_reason)
    silent: int = attrs.field(validator=_count)
    watched: int = attrs.field(validator=_count)
    # Left out when empty: a reader from before it reads every other such change.
    reinstated: tuple[Reinstatement, ...] = attrs.field(default=(), metadata={OMIT_IF_FALSE: True})


@attrs.frozen
class WorkerRegistered(WorkerChange):
    """A worker registered at ``at`` (``replaced``: it was already known and is replaced)."""

    worker_url: str
    capabilities: tuple[CapabilitySchema, ...]
    at: float
    replaced: bool = False


@attrs.frozen
class WorkerDeregistered(WorkerChange):
    """A worker left on its own at ``at``."""

    at: float


@attrs.frozen
class WorkerUnhealthy(WorkerChange):
    """A worker stopped being routable at ``at``: silent since ``last_heartbeat``."""

    at: float
    last_heartbeat: float


@attrs.frozen
class WorkerHealthy(WorkerChange):
    """An unhealthy worker was heard from at ``at`` and is routable again."""

    at: float


@attrs.frozen
class WorkerEvicted(WorkerChange):
    """A worker was removed at ``at`` for silence since ``last_heartbeat``."""

    at: float
    last_heartbeat: float


@attrs.frozen
class WorkerImported(WorkerChange):
    """A record taken from another controller's state (``source``), unverified here."""

    worker_url: str
    capabilities: tuple[CapabilitySchema, ...]
    last_heartbeat: float
    source: str


@attrs.frozen
class WorkerDraining(WorkerChange):
    """A worker was drained at ``at``: it takes no new routes until undrained or registered again.

    Beside its health, not a health state: a draining worker keeps
    heartbeating and its registration while its calls in flight finish.
    """

    at: float


@attrs.frozen
class WorkerUndrained(WorkerChange):
    """A draining worker was undrained at ``at``: it takes routes again as its health allows."""

    at: float


@attrs.frozen
class WorkerEjected(WorkerChange):
    """A gateway's calls to the worker kept failing: it takes no routes until ``until``.

    Outlier ejection (:mod:`._ejection`), decided at ``at`` by the
    controller whose calls failed: the worker (all its capabilities), the
    ``ejections``-th ejection of its streak. ``verb`` and ``capability`` are the failing
    call's: the fold applies it only while the ejected share of that pair's
    workers stays within ``max_ejected_percent`` (at least one worker), and
    drops it otherwise, or when the worker is ejected already. So every
    registry that applies the same changes in the same order ejects the
    same workers.
    """

    at: float
    until: float
    verb: str
    capability: str
    max_ejected_percent: float
    ejections: int = attrs.field(validator=_count)


@attrs.frozen
class WorkerRestored(WorkerChange):
    """The ejection that lasted until ``until`` ended at ``at``: the worker takes routes again.

    Decided by the sweep at that deadline; the fold drops it when the
    worker's ejection is not that one any longer (it ended already).
    """

    at: float
    until: float


@attrs.frozen
class Snapshot:
    """The whole registry at ``revision``: what :meth:`CapabilityRegistry.apply_snapshot` loads.

    ``workers`` are in registration order; a record that is not
    ``verified`` is held as ``unverified``. ``access_policy`` and ``slos``
    are what the last :class:`PolicyChanged` and :class:`SlosChanged` put
    in effect (``None``, ``()``: none yet); ``self_preservation`` is when
    self-preservation began (``None``: the registry is not in it).
    """

    revision: int
    workers: tuple[WorkerRecord, ...]
    access_policy: AccessRules | None = attrs.field(default=None, kw_only=True)
    slos: tuple[SloFile, ...] = attrs.field(default=(), kw_only=True)
    self_preservation: float | None = attrs.field(default=None, kw_only=True)
