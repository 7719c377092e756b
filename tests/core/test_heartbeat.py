"""The heartbeat's fast path: the steady heartbeat and its event equal the plain path.

``CapabilityRegistry._steady_heartbeat`` decides and applies the common
heartbeat (a healthy worker before its deadline, nothing pending for it, no
self-preservation) without the state table's walk, and
``heartbeat_received`` makes its event without attrs' ``__init__``. Two
registries run the same random operations, one with the fast path and one
without it (every heartbeat through ``_decide`` and ``apply``); after each
operation both answer the same (events or refusal) and hold the same
workers, deadlines, routes and pending changes.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from crank_registry import (
    CapabilityRegistry,
    Event,
    HealthPolicy,
    HeartbeatReceived,
    LoadReport,
    RegistryError,
    SelfPreservationSettings,
)
from crank_registry._events import heartbeat_received
from tests.builders import capability
from tests.core.helpers import T0

POLICY = HealthPolicy(heartbeat_interval=30.0, unhealthy_after=60.0, evict_after=120.0)
WORKER_IDS = ("w0", "w1", "w2", "w3")
KEY = ("run", "a")
# Steps of time around the health boundaries (60, 120), and none (a heartbeat at
# the moment of the last one).
STEPS = (0.0, 0.0, 1.0, 30.0, 59.5, 60.0, 60.5, 119.5, 120.5)

_heartbeat = st.tuples(st.just("heartbeat"), st.sampled_from(WORKER_IDS), st.booleans())
operations = st.one_of(
    st.tuples(st.just("register"), st.sampled_from(WORKER_IDS)),
    _heartbeat,
    _heartbeat,
    _heartbeat,
    st.tuples(st.just("deregister"), st.sampled_from(WORKER_IDS)),
    st.tuples(st.just("advance"), st.sampled_from(STEPS)),
    st.tuples(st.just("sweep")),
    st.tuples(st.just("route"), st.sampled_from((0.0, 61.0))),  # later: parks the silent
    # Beside health: a drain, and failed calls (five in a row eject the worker).
    st.tuples(st.sampled_from(("drain", "undrain", "fail")), st.sampled_from(WORKER_IDS)),
    # Decided, not applied: a store's write in flight (confirmed or failed later).
    st.tuples(
        st.sampled_from(("decide_heartbeat", "decide_register", "decide_deregister")),
        st.sampled_from(WORKER_IDS),
    ),
    st.tuples(st.just("confirm")),
    st.tuples(st.just("discard")),
)


def plain(registry: CapabilityRegistry) -> CapabilityRegistry:
    """``registry`` with every heartbeat decided and applied the plain way."""
    registry._steady_heartbeat = lambda worker, now: ()  # type: ignore[method-assign]
    return registry


def state(registry: CapabilityRegistry) -> Any:
    """All a heartbeat may change, compared whole."""
    workers = {
        worker_id: (
            worker.health,
            worker.last_heartbeat,
            worker.deadline,
            worker.routable_until,
            worker.parked,
            worker.draining,
            worker.ejected_until,
            None if worker.load is None else (worker.load.report, worker.load.reported_at),
            tuple(member.slot for member in worker.members),
        )
        for worker_id, worker in registry._workers.items()
    }
    heap = sorted((deadline, order) for deadline, order, _ in registry._deadlines)
    watch = registry._watch
    return (
        workers,
        heap,
        (
            watch.window_end,
            watch.watched,
            watch.silenced,
            set(watch.held),
            watch.grace,
            watch.unrouted,
        ),
        registry.records(),
        registry.revision,
        registry.pending,
        registry.self_preservation,
        registry.next_deadline(),
    )


def act(registry: CapabilityRegistry, operation: tuple[Any, ...], now: float) -> Any:
    """Run one operation; what it answered (events, a route, or the refusal's type)."""
    kind = operation[0]
    try:
        if kind == "register":
            url = f"https://{operation[1]}:8443"
            return registry.register(operation[1], url, [capability("a", "run")], now=now)
        if kind == "heartbeat":
            load = LoadReport(in_flight=1) if operation[2] else None
            return registry.heartbeat(operation[1], now=now, load=load)
        if kind == "deregister":
            return registry.deregister(operation[1], now=now)
        if kind == "drain":
            return registry.drain(operation[1], now=now)
        if kind == "undrain":
            return registry.undrain(operation[1], now=now)
        if kind == "fail":
            return registry.report_outcome(operation[1], *KEY, ok=False, now=now)
        if kind == "sweep":
            return registry.cleanup_stale(now=now)
        if kind == "route":
            endpoint = registry.route(*KEY, now=now + operation[1])
            return None if endpoint is None else endpoint.worker_id
        if kind == "decide_heartbeat":
            return registry.decide_heartbeat(operation[1], now=now)
        if kind == "decide_register":
            url = f"https://{operation[1]}:8443"
            return registry.decide_register(operation[1], url, [capability("a", "run")], now=now)
        if kind == "decide_deregister":
            return registry.decide_deregister(operation[1], now=now)
        if kind == "confirm":
            registry.confirm(registry.pending[-1].revision if registry.pending else 0)
            return None
        return registry.discard_pending()
    except RegistryError as error:
        return type(error)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.lists(operations, min_size=5, max_size=60),
    st.sampled_from((None, SelfPreservationSettings(min_workers=1, threshold=0.5))),
)
# A heartbeat of a draining worker, and of an ejected one, later than the last.
@example([("register", "w1"), ("drain", "w1"), ("advance", 1.0), ("heartbeat", "w1", False)], None)
@example(
    [("register", "w1"), *[("fail", "w1")] * 5, ("advance", 1.0), ("heartbeat", "w1", False)], None
)
# Self-preservation reinstating workers the window's first silences made unhealthy
# (w0 and w3 here; in the window before it, w0 in the second), then a heartbeat of
# a reinstated worker held by the sweep, and of one past evict_after.
@example(
    [
        *[("register", worker_id) for worker_id in WORKER_IDS],
        ("advance", 1.0),
        ("sweep",),
        ("heartbeat", "w1", False),
        ("heartbeat", "w2", False),
        ("advance", 59.5),
        ("sweep",),
        ("advance", 1.0),
        ("sweep",),
        ("advance", 1.0),
        ("sweep",),
        ("heartbeat", "w0", True),
        ("route", 61.0),
        ("advance", 60.0),
        ("heartbeat", "w3", False),
        ("sweep",),
    ],
    SelfPreservationSettings(min_workers=1, threshold=0.5),
)
@example(
    [
        *[("register", worker_id) for worker_id in WORKER_IDS],
        ("sweep",),
        ("advance", 30.0),
        *[("heartbeat", worker_id, False) for worker_id in WORKER_IDS[1:]],
        ("advance", 30.5),
        ("sweep",),
        ("advance", 30.0),
        ("decide_heartbeat", "w0"),  # pending: its reinstatement is skipped
        ("sweep",),
        ("confirm",),
        ("heartbeat", "w1", False),
        ("advance", 119.5),
        ("sweep",),
        ("heartbeat", "w2", False),
    ],
    SelfPreservationSettings(min_workers=1, threshold=0.5),
)
@example(
    [
        *[("register", worker_id) for worker_id in WORKER_IDS],
        ("sweep",),
        ("advance", 30.0),
        *[("heartbeat", worker_id, False) for worker_id in WORKER_IDS[1:]],
        ("advance", 30.5),
        ("sweep",),
        ("advance", 30.0),
        ("sweep",),
        ("heartbeat", "w0", False),
        ("advance", 119.5),
        ("sweep",),
        ("heartbeat", "w1", False),
    ],
    SelfPreservationSettings(min_workers=1, threshold=0.5),
)
def test_the_steady_heartbeat_leaves_what_the_plain_path_leaves(
    run: list[tuple[Any, ...]], preservation: SelfPreservationSettings | None
) -> None:
    fast = CapabilityRegistry(POLICY, self_preservation=preservation)
    slow = plain(CapabilityRegistry(POLICY, self_preservation=preservation))
    now = T0
    for operation in run:
        if operation[0] == "advance":
            now += operation[1]
            continue
        answers = act(fast, operation, now), act(slow, operation, now)
        assert answers[0] == answers[1], operation
        assert state(fast) == state(slow), operation


def test_the_steady_heartbeat_takes_the_common_case() -> None:
    """It is taken at all (else the test above compares the plain path with itself)."""
    registry = CapabilityRegistry(POLICY)
    registry.register("w1", "https://w1:8443", [capability("a", "run")], now=T0)
    worker = registry._workers["w1"]
    assert registry._steady_heartbeat(worker, T0 + 1) == (HeartbeatReceived("w1", T0 + 1),)
    assert (worker.last_heartbeat, worker.deadline, worker.routable_until) == (
        T0 + 1,
        T0 + 61,
        T0 + 61,
    )
    # Past its deadline the sweep's state matters: the plain path decides.
    assert registry._steady_heartbeat(worker, T0 + 62) == ()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.text(min_size=1, max_size=20),
    st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from((0.0, -0.0, T0)),
)
def test_heartbeat_received_is_the_event_attrs_makes(worker_id: str, at: float) -> None:
    made: Event = heartbeat_received(worker_id, at)
    expected = HeartbeatReceived(worker_id, at)
    assert type(made) is HeartbeatReceived
    assert made == expected
    assert hash(made) == hash(expected)
    assert repr(made) == repr(expected)
    assert (made.worker_id, made.at) == (worker_id, at)
    assert math.copysign(1, made.at) == math.copysign(1, at)
    with pytest.raises(AttributeError):
        made.at = 0.0  # type: ignore[misc]
