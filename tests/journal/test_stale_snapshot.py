"""A snapshot older than the journal before it is reported and ignored, never rolled back to."""

from __future__ import annotations

from crank_registry import CapabilityRegistry, encode_event, encode_snapshot, replay_bytes
from tests.core.helpers import T0, capability


def test_a_stale_snapshot_appended_after_newer_state_is_skipped_and_counted() -> None:
    registry = CapabilityRegistry()
    lines = [encode_event(e) for e in registry.register("a", "https://a:1", [capability()], now=T0)]
    stale = encode_snapshot(registry.snapshot())  # revision 1: worker a only
    for worker in ("b", "c"):
        events = registry.register(worker, f"https://{worker}:1", [capability()], now=T0 + 1)
        lines += [encode_event(e) for e in events]
    lines += [encode_event(e) for e in registry.deregister("a", now=T0 + 2)]
    journal = b"".join([*lines, *stale])

    restored = CapabilityRegistry()
    result = replay_bytes(journal, restored)
    assert [r.worker_id for r in restored.records()] == ["b", "c"]
    assert restored.revision == registry.revision == 4
    (skipped,) = result.skipped
    assert skipped.line_number == len(lines) + 1
    assert "stale snapshot: revision 1" in skipped.reason


def test_a_snapshot_at_the_journal_revision_or_later_is_applied() -> None:
    registry = CapabilityRegistry()
    lines = [encode_event(e) for e in registry.register("a", "https://a:1", [capability()], now=T0)]
    journal = b"".join([*lines, *encode_snapshot(registry.snapshot())])
    restored = CapabilityRegistry()
    result = replay_bytes(journal, restored)
    assert result.lines_skipped == 0
    assert restored.records() == registry.records()
