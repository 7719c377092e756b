"""The registry follows the state table of ``_health``, pair by pair.

For every ``(state, input)`` pair: a pair the table lists is driven
through a real registry (the worker put in that state, the input made by
the public call that makes it) and must give the table's events and next
state; a pair it does not list must be refused by the interpreter.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from crank_registry import (
    TRANSITIONS,
    CapabilityRegistry,
    Event,
    Health,
    HealthInput,
    HealthPolicy,
    Refusal,
    Transition,
    TransitionError,
    WorkerEvicted,
    WorkerNotRegistered,
    WorkerRecord,
    unstructure,
)
from tests.builders import capability
from tests.core.helpers import T0

POLICY = HealthPolicy()  # 30, 60, 120
URL = "https://w:8443"
SILENT_AT = T0 + 61  # past unhealthy_after, not past evict_after


def _put(registry: CapabilityRegistry, state: Health | None) -> float:
    """Put worker ``w`` in ``state``; returns the time it is in it."""
    if state in (Health.HEALTHY, Health.UNHEALTHY):
        registry.register("w", URL, [capability()], now=T0)
    elif state in (Health.UNVERIFIED, Health.UNVERIFIED_SILENT):
        assert registry.restore([WorkerRecord("w", URL, (capability(),), T0)], now=T0) == 1
    if state in (Health.UNHEALTHY, Health.UNVERIFIED_SILENT):
        registry.cleanup_stale(now=SILENT_AT)
        return SILENT_AT
    return T0 + 1


def _state_of(registry: CapabilityRegistry) -> Health | None:
    for record in registry.records():
        if record.worker_id == "w":
            return Health.of(verified=record.verified, silent=record.silent)
    return None


def _make(registry: CapabilityRegistry, given: HealthInput, at: float) -> tuple[Event, ...]:
    """Make ``given`` happen to ``w`` through the public API."""
    calls: dict[HealthInput, Callable[[], tuple[Event, ...]]] = {
        HealthInput.REGISTER: lambda: registry.register("w", URL, [capability()], now=at + 1),
        HealthInput.HEARTBEAT: lambda: registry.heartbeat("w", now=at + 1),
        HealthInput.DEREGISTER: lambda: registry.deregister("w", now=at + 1),
        # The sweep just past the deadline the state has.
        HealthInput.SILENCE: lambda: registry.cleanup_stale(now=T0 + POLICY.unhealthy_after + 1),
        HealthInput.EXPIRY: lambda: registry.cleanup_stale(now=T0 + POLICY.evict_after + 1),
        HealthInput.IMPORT: lambda: registry.import_remote_state(
            "peer",
            {
                "format_version": 1,
                "workers": [
                    {
                        "worker_id": "w",
                        "worker_url": "https://peer-view:1",
                        "capabilities": [{**_payload()}],
                        "last_heartbeat": at + 1,
                    }
                ],
            },
            now=at + 1,
        ),
    }
    if given is HealthInput.RESTART:
        registry.restart()
        return ()
    return calls[given]()


def _payload() -> dict[str, object]:
    payload: dict[str, object] = unstructure(capability())
    return payload


STATES = [None, *Health]
PAIRS = list(itertools.product(STATES, HealthInput))


def _name(pair: tuple[Health | None, HealthInput]) -> str:
    state, given = pair
    return f"{'absent' if state is None else state.name}-{given.name}"


@pytest.mark.parametrize("pair", PAIRS, ids=_name)
def test_the_registry_follows_the_table(pair: tuple[Health | None, HealthInput]) -> None:
    state, given = pair
    entry = TRANSITIONS.get(pair)
    if entry is None:
        return  # see test_an_event_the_table_does_not_allow_is_refused
    registry = CapabilityRegistry(POLICY)
    at = _put(registry, state)
    assert _state_of(registry) is state
    if isinstance(entry, Refusal):
        before = registry.records(), registry.revision
        with pytest.raises(WorkerNotRegistered):
            _make(registry, given, at)
        assert (registry.records(), registry.revision) == before, "a refusal changes nothing"
        return
    assert isinstance(entry, Transition)
    revision = registry.revision
    events = _make(registry, given, at)
    assert tuple(type(event) for event in events) == entry.emits
    assert _state_of(registry) is entry.to
    changes = [event for event in events if hasattr(event, "revision")]
    assert registry.revision == revision + len(changes)


def test_every_input_is_listed_for_some_state() -> None:
    assert {given for _, given in TRANSITIONS} == set(HealthInput)


def test_an_event_the_table_does_not_allow_is_refused() -> None:
    # (HEALTHY, EXPIRY) is not in the table: a worker is unhealthy before it is evicted.
    assert (Health.HEALTHY, HealthInput.EXPIRY) not in TRANSITIONS
    registry = CapabilityRegistry(POLICY)
    registry.register("w", URL, [capability()], now=T0)
    before = registry.records(), registry.revision
    with pytest.raises(TransitionError):
        registry.apply(WorkerEvicted("w", T0 + 200, T0, revision=registry.revision + 1))
    assert (registry.records(), registry.revision) == before


def test_the_table_lists_a_refusal_or_a_transition_for_each_state_and_call() -> None:
    # The calls a worker makes are decided for every state, present or not.
    for state in STATES:
        for given in (HealthInput.REGISTER, HealthInput.HEARTBEAT, HealthInput.DEREGISTER):
            assert (state, given) in TRANSITIONS
