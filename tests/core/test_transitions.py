"""Every (state, input) pair of one worker, as a table.

The worker ``w`` is put in each state; each input is applied at that
state's ``now``; the table says what the call answers and what state the
worker is in afterwards, as a user of the public API sees them. No sweep
runs unless the input is ``cleanup``. (``test_health.py`` checks the
registry against the core's own state table, pair by pair.)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest

from crank_registry import (
    CapabilityRegistry,
    HealthState,
    HeartbeatReceived,
    UnknownCapability,
    WorkerDeregistered,
    WorkerEvicted,
    WorkerHealthy,
    WorkerNotRegistered,
    WorkerRecord,
    WorkerRegistered,
    WorkerUnhealthy,
)
from tests.builders import capability
from tests.core.helpers import T0

KEY = ("classify", "image.classify")
HEALTHY, UNHEALTHY, UNVERIFIED = HealthState.HEALTHY, HealthState.UNHEALTHY, HealthState.UNVERIFIED
ABSENT = None


def _registered(registry: CapabilityRegistry) -> None:
    registry.register("w", "https://w:8443", [capability()], now=T0)


def _restored(registry: CapabilityRegistry) -> None:
    record = WorkerRecord("w", "https://w:8443", (capability(),), T0, verified=True)
    assert registry.restore([record], now=T0) == 1


def _deregistered(registry: CapabilityRegistry) -> None:
    _registered(registry)
    registry.deregister("w", now=T0 + 5)


# state -> (how to get there, the `now` at which inputs are applied)
STATES: dict[str, tuple[Callable[[CapabilityRegistry], None], float]] = {
    "unknown": (lambda registry: None, T0 + 10),
    "healthy": (_registered, T0 + 10),
    "unhealthy": (_registered, T0 + 61),  # silent for more than 60 s
    "unverified": (_restored, T0 + 10),
    "unverified-silent": (_restored, T0 + 61),
    "past-evict-not-swept": (_registered, T0 + 121),
    "deregistered": (_deregistered, T0 + 10),
}

INPUTS = ("register", "heartbeat", "deregister", "route", "cleanup")

# What each input answers: the types of the events it returns, an error
# type (UnknownCapability: a route to a pair no worker offers), or "endpoint"
# or None (route: no routable worker); then the worker's state afterwards
# (ABSENT: not listed) and whether it is routable.
TABLE: dict[tuple[str, str], tuple[Any, HealthState | None, bool]] = {
    ("unknown", "register"): ((WorkerRegistered,), HEALTHY, True),
    ("unknown", "heartbeat"): (WorkerNotRegistered, ABSENT, False),
    ("unknown", "deregister"): (WorkerNotRegistered, ABSENT, False),
    ("unknown", "route"): (UnknownCapability, ABSENT, False),
    ("unknown", "cleanup"): ((), ABSENT, False),
    ("healthy", "register"): ((WorkerRegistered,), HEALTHY, True),
    ("healthy", "heartbeat"): ((HeartbeatReceived,), HEALTHY, True),
    ("healthy", "deregister"): ((WorkerDeregistered,), ABSENT, False),
    ("healthy", "route"): ("endpoint", HEALTHY, True),
    ("healthy", "cleanup"): ((), HEALTHY, True),
    ("unhealthy", "register"): ((WorkerRegistered,), HEALTHY, True),
    ("unhealthy", "heartbeat"): ((HeartbeatReceived, WorkerHealthy), HEALTHY, True),
    ("unhealthy", "deregister"): ((WorkerDeregistered,), ABSENT, False),
    ("unhealthy", "route"): (None, UNHEALTHY, False),
    ("unhealthy", "cleanup"): ((WorkerUnhealthy,), UNHEALTHY, False),
    ("unverified", "register"): ((WorkerRegistered,), HEALTHY, True),
    ("unverified", "heartbeat"): (WorkerNotRegistered, UNVERIFIED, True),
    ("unverified", "deregister"): ((WorkerDeregistered,), ABSENT, False),
    ("unverified", "route"): ("endpoint", UNVERIFIED, True),
    ("unverified", "cleanup"): ((), UNVERIFIED, True),
    ("unverified-silent", "register"): ((WorkerRegistered,), HEALTHY, True),
    ("unverified-silent", "heartbeat"): (WorkerNotRegistered, UNVERIFIED, False),
    ("unverified-silent", "deregister"): ((WorkerDeregistered,), ABSENT, False),
    ("unverified-silent", "route"): (None, UNVERIFIED, False),
    ("unverified-silent", "cleanup"): ((WorkerUnhealthy,), UNVERIFIED, False),
    ("past-evict-not-swept", "register"): ((WorkerRegistered,), HEALTHY, True),
    ("past-evict-not-swept", "heartbeat"): (WorkerNotRegistered, UNHEALTHY, False),
    ("past-evict-not-swept", "deregister"): (WorkerNotRegistered, UNHEALTHY, False),
    ("past-evict-not-swept", "route"): (None, UNHEALTHY, False),
    ("past-evict-not-swept", "cleanup"): ((WorkerUnhealthy, WorkerEvicted), ABSENT, False),
    ("deregistered", "register"): ((WorkerRegistered,), HEALTHY, True),
    ("deregistered", "heartbeat"): (WorkerNotRegistered, ABSENT, False),
    ("deregistered", "deregister"): (WorkerNotRegistered, ABSENT, False),
    ("deregistered", "route"): (UnknownCapability, ABSENT, False),
    ("deregistered", "cleanup"): ((), ABSENT, False),
}


def test_the_table_covers_every_pair() -> None:
    assert set(TABLE) == set(itertools.product(STATES, INPUTS))


def apply(registry: CapabilityRegistry, action: str, now: float) -> Any:
    if action == "register":
        return registry.register("w", "https://w:9443", [capability()], now=now)
    if action == "heartbeat":
        return registry.heartbeat("w", now=now)
    if action == "deregister":
        return registry.deregister("w", now=now)
    if action == "route":
        return registry.route(*KEY, now=now)
    return registry.cleanup_stale(now=now)


@pytest.mark.parametrize(("state", "action"), sorted(TABLE))
def test_transition(state: str, action: str) -> None:
    setup, now = STATES[state]
    registry = CapabilityRegistry()
    # A bystander on another capability, so the registry is never empty.
    registry.register("other", "https://other:1", [capability("other.cap")], now=now)
    setup(registry)
    answer, after, routable = TABLE[(state, action)]

    if isinstance(answer, type) and issubclass(answer, Exception):
        before = registry.export_state()
        with pytest.raises(answer):
            apply(registry, action, now)
        assert registry.export_state() == before, "a refused call must change nothing"
    else:
        result = apply(registry, action, now)
        if answer == "endpoint":
            assert result is not None and result.worker_id == "w"
        elif answer is None:
            assert result is None
        else:
            assert tuple(type(event) for event in result) == answer
            assert all(event.worker_id == "w" for event in result)
            if answer == (WorkerRegistered,):
                assert result[0].replaced == (state not in ("unknown", "deregistered"))

    view = registry.get_worker("w", now=now)
    assert (None if view is None else view.state) == after
    assert (view is not None and view.is_healthy) == routable
    # The pair is known exactly while the worker is held, in any state.
    try:
        endpoint = registry.route(*KEY, now=now)
    except UnknownCapability:
        endpoint = None
        assert after is None
    else:
        assert after is not None
    assert (endpoint is not None and endpoint.worker_id == "w") == routable
    assert ("w" in registry) == (after is not None)
    assert registry.get_worker("other", now=now) is not None
