"""Deciding and applying are separate: decisions wait for ``confirm`` or ``discard_pending``."""

from __future__ import annotations

import pytest

from crank_registry import (
    CapabilityRegistry,
    HealthPolicy,
    UnknownCapability,
    WorkerDeregistered,
    WorkerEvicted,
    WorkerNotRegistered,
    WorkerRegistered,
    WorkerUnhealthy,
)
from tests.core.helpers import T0, capability

POLICY = HealthPolicy(heartbeat_interval=10, unhealthy_after=20, evict_after=40)


def kinds(events: object) -> list[tuple[str, str, int]]:
    return [(type(e).__name__, e.worker_id, e.revision) for e in events]  # type: ignore[attr-defined]


def test_decisions_reserve_revisions_and_apply_only_when_confirmed() -> None:
    registry = CapabilityRegistry(POLICY)
    (a,) = registry.decide_register("a", "http://h:1", [capability()], now=T0)
    (b,) = registry.decide_register("b", "http://h:2", [capability()], now=T0)
    assert (a.revision, b.revision) == (1, 2)  # type: ignore[attr-defined]
    assert registry.pending == (a, b)
    assert (len(registry), registry.revision) == (0, 0)
    with pytest.raises(UnknownCapability):  # not registered until confirmed
        registry.route("classify", "image.classify", now=T0)
    registry.confirm(1)
    assert ("a" in registry, "b" in registry, registry.revision) == (True, False, 1)
    registry.confirm(2)
    assert ("b" in registry, registry.revision, registry.pending) == (True, 2, ())


def test_a_decision_sees_the_changes_decided_before_it() -> None:
    registry = CapabilityRegistry(POLICY)
    registry.decide_register("w", "http://h:1", [capability()], now=T0)
    # Heard before its registration is applied: decided on the pending one.
    assert registry.decide_heartbeat("w", now=T0 + 1)
    (left,) = registry.decide_deregister("w", now=T0 + 2)
    assert isinstance(left, WorkerDeregistered) and left.revision == 2
    with pytest.raises(WorkerNotRegistered):
        registry.decide_heartbeat("w", now=T0 + 3)
    with pytest.raises(WorkerNotRegistered):
        registry.decide_deregister("w", now=T0 + 3)
    (again,) = registry.decide_register("w", "http://h:9", [capability()], now=T0 + 4)
    assert isinstance(again, WorkerRegistered) and not again.replaced and again.revision == 3
    registry.confirm(3)
    assert [r.worker_url for r in registry.records()] == ["http://h:9"]
    assert registry.revision == 3


def test_discarding_drops_every_pending_change_and_frees_their_revisions() -> None:
    registry = CapabilityRegistry(POLICY)
    registry.register("a", "http://h:1", [capability()], now=T0)
    registry.decide_deregister("a", now=T0 + 1)
    registry.decide_register("b", "http://h:2", [capability()], now=T0 + 1)
    dropped = registry.discard_pending()
    assert kinds(dropped) == [("WorkerDeregistered", "a", 2), ("WorkerRegistered", "b", 3)]
    assert ([r.worker_id for r in registry.records()], registry.revision) == (["a"], 1)
    assert registry.pending == ()
    # Decided again on what is applied: a is still there; revision 2 is free.
    (left,) = registry.decide_deregister("a", now=T0 + 2)
    assert left.revision == 2  # type: ignore[attr-defined]


def test_the_sweep_leaves_pending_workers_and_decides_again_after_a_discard() -> None:
    registry = CapabilityRegistry(POLICY)
    registry.register("a", "http://h:1", [capability()], now=T0)
    registry.register("b", "http://h:1", [capability()], now=T0)
    registry.decide_deregister("b", now=T0 + 1)
    swept = registry.decide_sweep(now=T0 + 50)  # both past evict_after
    assert kinds(swept) == [("WorkerUnhealthy", "a", 4), ("WorkerEvicted", "a", 5)]
    assert "a" in registry  # not applied
    assert registry.decide_sweep(now=T0 + 51) == ()  # a's changes are pending
    registry.discard_pending()
    again = registry.decide_sweep(now=T0 + 52)
    assert [(type(e), e.worker_id) for e in again] == [
        (WorkerUnhealthy, "a"),
        (WorkerUnhealthy, "b"),
        (WorkerEvicted, "a"),
        (WorkerEvicted, "b"),
    ]
    registry.confirm(again[-1].revision)  # type: ignore[attr-defined]
    assert len(registry) == 0 and registry.revision == 6
    assert registry.decide_sweep(now=T0 + 53) == ()
    assert registry.next_deadline() is None
    assert registry.cleanup_stale(now=T0 + 60) == ()


def test_a_heartbeat_is_applied_at_once_and_its_change_waits() -> None:
    registry = CapabilityRegistry(POLICY)
    registry.register("a", "http://h:1", [capability()], now=T0)
    registry.cleanup_stale(now=T0 + 21)  # unhealthy
    _, healthy = registry.decide_heartbeat("a", now=T0 + 22)
    assert (registry.records()[0].last_heartbeat, registry.records()[0].silent) == (T0 + 22, True)
    assert registry.route("classify", "image.classify", now=T0 + 22) is None
    registry.confirm(healthy.revision)  # type: ignore[attr-defined]
    assert registry.route("classify", "image.classify", now=T0 + 22) is not None
    assert isinstance(registry.cleanup_stale(now=T0 + 100)[-1], WorkerEvicted)
