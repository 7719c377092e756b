"""Health: the state table of a worker, and the one place that does its time arithmetic.

A worker the registry holds is in one of four states; a worker it does not
hold (never registered, left, evicted) is ``None``::

    state               routable                     heartbeat answered
    HEALTHY             while heard from recently    acknowledged
    UNHEALTHY           no                           acknowledged (-> HEALTHY)
    UNVERIFIED          while heard from recently    worker_not_registered
    UNVERIFIED_SILENT   no                           worker_not_registered

``UNVERIFIED`` is a worker this registry restored after a restart (or took
from another controller) and has not heard from itself: it keeps routing
alive across a restart, and must register again to be trusted.

:data:`TRANSITIONS` maps ``(state, input)`` to the next state and the
events the change emits, or to a refusal; a pair it does not list is a bug
(:class:`TransitionError`), never a silent no-op. :func:`transition` is the
interpreter. The inputs ``SILENCE`` and ``EXPIRY`` are time passing: the
sweep feeds them at the deadlines :func:`deadline` computes, and
:func:`state_at` applies them to tell the state at any ``now``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from types import MappingProxyType

import attrs

from ._errors import RegistryError
from ._events import (
    Change,
    HeartbeatReceived,
    WorkerDeregistered,
    WorkerEvicted,
    WorkerHealthy,
    WorkerImported,
    WorkerRegistered,
    WorkerUnhealthy,
)
from ._models import HealthPolicy, HealthState

__all__ = [
    "CAUSES",
    "ROUTABLE",
    "TRANSITIONS",
    "Health",
    "HealthInput",
    "Refusal",
    "Transition",
    "TransitionError",
    "deadline",
    "due_input",
    "no_deadline",
    "routable_until",
    "shown_state",
    "shown_state_if",
    "state_at",
    "transition",
]


class Health(enum.Enum):
    """The state of a worker the registry holds."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    UNVERIFIED = "unverified"
    UNVERIFIED_SILENT = "unverified_silent"

    # Members are singletons, so identity hashing keys the table exactly as
    # Enum's own __hash__ does, without its Python-level call: a quarter of a
    # heartbeat's cost (benchmarks/core.py, heartbeat target 1.5 us).
    __hash__ = object.__hash__

    @property
    def reported(self) -> HealthState:
        """What ``/workers`` shows as ``state`` (an unverified worker stays ``unverified``)."""
        return _REPORTED[self]

    @property
    def verified(self) -> bool:
        """The worker registered with this registry (a record's ``verified``)."""
        return self in (Health.HEALTHY, Health.UNHEALTHY)

    @property
    def silent(self) -> bool:
        """The sweep found the worker silent (a record's ``silent``)."""
        return self in (Health.UNHEALTHY, Health.UNVERIFIED_SILENT)

    @classmethod
    def of(cls, *, verified: bool, silent: bool) -> Health:
        """The state a record's two flags describe."""
        if verified:
            return cls.UNHEALTHY if silent else cls.HEALTHY
        return cls.UNVERIFIED_SILENT if silent else cls.UNVERIFIED


_REPORTED = {
    Health.HEALTHY: HealthState.HEALTHY,
    Health.UNHEALTHY: HealthState.UNHEALTHY,
    Health.UNVERIFIED: HealthState.UNVERIFIED,
    Health.UNVERIFIED_SILENT: HealthState.UNVERIFIED,
}

#: The states in which a worker is routable (while its last heartbeat is recent).
ROUTABLE = frozenset({Health.HEALTHY, Health.UNVERIFIED})


class HealthInput(enum.Enum):
    """What can happen to a worker."""

    REGISTER = "register"
    HEARTBEAT = "heartbeat"
    DEREGISTER = "deregister"
    #: Silent for more than ``unhealthy_after``.
    SILENCE = "silence"
    #: Silent for more than ``evict_after``.
    EXPIRY = "expiry"
    #: This registry restarted: it has heard from nobody since.
    RESTART = "restart"
    #: A record taken from another controller.
    IMPORT = "import"

    __hash__ = object.__hash__  # as Health's


@attrs.frozen
class Transition:
    """The next state (``None``: no longer held) and the events the change emits, in order."""

    to: Health | None
    emits: tuple[type[HeartbeatReceived] | type[Change], ...] = ()


@attrs.frozen
class Refusal:
    """The input is refused: the worker must register (again)."""


class TransitionError(RegistryError):
    """A ``(state, input)`` pair the table does not list: a bug in the caller."""

    code = "invalid_transition"
    status_hint = 500

    def __init__(self, state: Health | None, given: HealthInput) -> None:
        self.state = state
        self.input = given
        name = "absent" if state is None else state.name
        super().__init__(f"no transition for a worker {name} on {given.name}")


_H, _U = Health.HEALTHY, Health.UNHEALTHY
_V, _VS = Health.UNVERIFIED, Health.UNVERIFIED_SILENT
_LIVE = (_H, _U, _V, _VS)
_NOT_REGISTERED = Refusal()

_TABLE: dict[tuple[Health | None, HealthInput], Transition | Refusal] = {
    # Registering (again) always makes a worker healthy, with what it says now.
    (None, HealthInput.REGISTER): Transition(_H, (WorkerRegistered,)),
    **{(state, HealthInput.REGISTER): Transition(_H, (WorkerRegistered,)) for state in _LIVE},
    (None, HealthInput.HEARTBEAT): _NOT_REGISTERED,
    (_H, HealthInput.HEARTBEAT): Transition(_H, (HeartbeatReceived,)),
    (_U, HealthInput.HEARTBEAT): Transition(_H, (HeartbeatReceived, WorkerHealthy)),
    # Restored: the worker must register again, with its current capabilities.
    (_V, HealthInput.HEARTBEAT): _NOT_REGISTERED,
    (_VS, HealthInput.HEARTBEAT): _NOT_REGISTERED,
    (None, HealthInput.DEREGISTER): _NOT_REGISTERED,
    **{(state, HealthInput.DEREGISTER): Transition(None, (WorkerDeregistered,)) for state in _LIVE},
    (_H, HealthInput.SILENCE): Transition(_U, (WorkerUnhealthy,)),
    (_V, HealthInput.SILENCE): Transition(_VS, (WorkerUnhealthy,)),
    (_U, HealthInput.EXPIRY): Transition(None, (WorkerEvicted,)),
    (_VS, HealthInput.EXPIRY): Transition(None, (WorkerEvicted,)),
    (_H, HealthInput.RESTART): Transition(_V),
    (_U, HealthInput.RESTART): Transition(_VS),
    (_V, HealthInput.RESTART): Transition(_V),
    (_VS, HealthInput.RESTART): Transition(_VS),
    (None, HealthInput.IMPORT): Transition(_V, (WorkerImported,)),
    **{(state, HealthInput.IMPORT): Transition(_V, (WorkerImported,)) for state in _LIVE},
}
#: The state table: ``(state, input) -> Transition | Refusal``.
TRANSITIONS: Mapping[tuple[Health | None, HealthInput], Transition | Refusal] = MappingProxyType(
    _TABLE
)

#: The input whose transition emits each kind of change: applying a change
#: replays that transition (:meth:`CapabilityRegistry.apply`).
CAUSES: Mapping[type[Change], HealthInput] = MappingProxyType(
    {
        WorkerRegistered: HealthInput.REGISTER,
        WorkerHealthy: HealthInput.HEARTBEAT,
        WorkerDeregistered: HealthInput.DEREGISTER,
        WorkerUnhealthy: HealthInput.SILENCE,
        WorkerEvicted: HealthInput.EXPIRY,
        WorkerImported: HealthInput.IMPORT,
    }
)


def transition(state: Health | None, given: HealthInput) -> Transition | Refusal:
    """The table's entry for ``(state, given)``; raises :class:`TransitionError` if it has none."""
    step = _TABLE.get((state, given))
    if step is None:
        raise TransitionError(state, given)
    return step


# ------------------------------------------------------------ time arithmetic


def deadline(state: Health, last_heartbeat: float, policy: HealthPolicy) -> float:
    """When time next changes ``state``: silence for routable states, expiry for the others.

    The state changes for any ``now`` strictly after this moment.
    """
    if state in ROUTABLE:
        return last_heartbeat + policy.unhealthy_after
    return last_heartbeat + policy.evict_after


def no_deadline(state: Health, last_heartbeat: float, policy: HealthPolicy) -> float:
    """:func:`deadline` on a replica that routes by state: time never changes its states.

    A follower hears no heartbeats, so its states change only by the
    controller's events (DESIGN, "Followers keep no clock for health"):
    a routable state stays routable until an event says otherwise.
    """
    return math.inf


def routable_until(state: Health, state_deadline: float) -> float:
    """When a worker in ``state`` stops being routable, given its :func:`deadline` (-inf: never)."""
    return state_deadline if state in ROUTABLE else -math.inf


def due_input(
    state: Health, last_heartbeat: float, now: float, policy: HealthPolicy
) -> HealthInput | None:
    """The time input that applies to ``state`` at ``now``, if one does."""
    if now > deadline(state, last_heartbeat, policy):
        return HealthInput.SILENCE if state in ROUTABLE else HealthInput.EXPIRY
    return None


def state_at(
    state: Health, last_heartbeat: float, now: float, policy: HealthPolicy
) -> Health | None:
    """The state at ``now``: ``state`` with the time inputs due by then applied."""
    current: Health | None = state
    while current is not None:
        due = due_input(current, last_heartbeat, now, policy)
        if due is None:
            break
        step = transition(current, due)
        assert isinstance(step, Transition)  # time is never refused
        current = step.to
    return current


def shown_state(state: Health, last_heartbeat: float, now: float, policy: HealthPolicy) -> Health:
    """The state a listing shows at ``now``: :func:`state_at`, short of leaving.

    A worker past ``evict_after`` that no sweep has removed yet is still
    listed, in the state it left from.
    """
    current = state
    while (due := due_input(current, last_heartbeat, now, policy)) is not None:
        step = transition(current, due)
        assert isinstance(step, Transition)  # time is never refused
        if step.to is None:
            break
        current = step.to
    return current


def shown_state_if(state: Health, *, routable: bool) -> Health:
    """:func:`shown_state` of a worker in ``state``, knowing only whether it is routable.

    Enough to tell the shown state without the time: a routable state
    (``HEALTHY``, ``UNVERIFIED``) that is no longer routable has fallen
    silent; a state that is never routable shows as itself until it leaves.
    """
    if routable or state not in ROUTABLE:
        return state
    step = transition(state, HealthInput.SILENCE)
    assert isinstance(step, Transition) and step.to is not None  # silence keeps a worker
    return step.to
