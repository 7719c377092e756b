"""A worker record that leaves the registry is freed by reference counting alone.

A worker and its members refer to each other; every path by which a
record leaves (eviction, deregistration, a registration replacing it, a
snapshot replacing the registry, an import replacing it) must break that
cycle. Otherwise a record the service froze after recovery
(``gc.freeze()``) would never be freed. The records take no weak
references (``__slots__``, no room for one per worker), so the tests ask
which objects still refer to the record and to its member once it left:
none may but the test itself, and the last reference frees them.
"""

from __future__ import annotations

import gc
import types
from collections.abc import Callable

import pytest

from crank_registry import CapabilityRegistry
from tests.builders import capability
from tests.core.helpers import T0

#: Past every deadline of a record made at ``T0`` (``evict_after`` is 120 s).
LATER = T0 + 200


def _referrers(held: object) -> list[object]:
    """What refers to ``held``, but this test's frames (its locals)."""
    return [
        referrer for referrer in gc.get_referrers(held) if not isinstance(referrer, types.FrameType)
    ]


def _fleet() -> CapabilityRegistry:
    """``w1`` (the one that leaves) and ``w2``, offering the same capability."""
    registry = CapabilityRegistry()
    for worker_id in ("w1", "w2"):
        registry.register(worker_id, f"https://{worker_id}:8443", [capability()], now=T0)
    return registry


def _evict(registry: CapabilityRegistry) -> None:
    registry.heartbeat("w2", now=T0 + 100)
    registry.cleanup_stale(now=T0 + 121)
    assert "w1" not in registry


def _deregister(registry: CapabilityRegistry) -> None:
    registry.deregister("w1", now=T0 + 1)


def _register_other_capabilities(registry: CapabilityRegistry) -> None:
    registry.register("w1", "https://w1:8443", [capability("text.embed", "embed")], now=T0 + 1)


def _register_same(registry: CapabilityRegistry) -> None:
    registry.register("w1", "https://w1:8443", [capability()], now=T0 + 1)


def _apply_snapshot(registry: CapabilityRegistry) -> None:
    source = CapabilityRegistry()
    source.register("w1", "https://w1:8443", [capability()], now=T0 + 1)
    registry.apply_snapshot(source.snapshot())


def _import(registry: CapabilityRegistry) -> None:
    remote = CapabilityRegistry()
    remote.register("w1", "https://w1-elsewhere:8443", [capability()], now=T0 + 5)
    [event] = registry.import_remote_state("ctl-b", remote.export_state(), now=T0 + 5)
    assert event.worker_id == "w1"


@pytest.mark.parametrize(
    "leave",
    [
        _evict,
        _deregister,
        _register_other_capabilities,
        _register_same,
        _apply_snapshot,
        _import,
    ],
)
def test_a_record_that_leaves_is_freed_without_the_collector(
    leave: Callable[[CapabilityRegistry], None],
) -> None:
    registry = _fleet()
    record = registry._workers["w1"]
    [seat] = record.members
    leave(registry)
    assert _referrers(seat) == []
    del seat  # it refers to the record
    # A heap entry of the old record goes when it comes due: the sweep skips
    # it (it is not the record held now). The workers held register again
    # (they would be long silent by then).
    for worker_id in ("w1", "w2"):
        if worker_id in registry:
            registry.register(worker_id, "https://any:8443", [capability()], now=LATER - 1)
    registry.cleanup_stale(now=LATER)
    assert _referrers(record) == []
