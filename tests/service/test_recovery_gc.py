"""Recovery pauses the cyclic garbage collector, and freezes what it recovered, only when asked."""

from __future__ import annotations

import gc
import pathlib
from typing import Any

import pytest

from crank_registry import CapabilityRegistry, ReplayResult
from crank_registry_asgi import ServiceConfig, app
from tests.service.helpers import running

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("paused", [True, False])
async def test_the_collector_is_paused_during_the_replay_only_when_asked(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, paused: bool
) -> None:
    seen: list[bool] = []
    replay = app.replay_bytes

    def watched(data: bytes, registry: Any, **options: Any) -> ReplayResult:
        seen.append(gc.isenabled())
        return replay(data, registry, **options)

    monkeypatch.setattr(app, "replay_bytes", watched)
    assert gc.isenabled()
    config = ServiceConfig(state_dir=tmp_path, pause_gc_during_recovery=paused)
    async with running(config) as api:
        await api.register("w1")
        assert gc.isenabled()
    assert seen == [not paused]
    assert gc.isenabled()


@pytest.mark.parametrize("frozen", [True, False])
async def test_the_recovered_registry_is_frozen_only_when_asked(
    tmp_path: pathlib.Path, frozen: bool
) -> None:
    async with running(ServiceConfig(state_dir=tmp_path)) as api:
        await api.register("w1")
    assert gc.get_freeze_count() == 0
    registry = CapabilityRegistry()
    config = ServiceConfig(state_dir=tmp_path, freeze_gc_after_recovery=frozen)
    async with running(config, registry=registry):
        record = registry._workers["w1"]  # restored from the journal
        # A frozen object is in no generation the collector walks.
        walked = any(tracked is record for tracked in gc.get_objects())
        assert walked is not frozen
        assert (gc.get_freeze_count() > 0) is frozen
