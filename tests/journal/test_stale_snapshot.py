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


def test_a_stale_snapshot_of_several_parts_is_skipped_even_without_its_first_part() -> None:
    old = CapabilityRegistry()
    for worker in ("a", "b", "c", "d"):
        old.register(worker, f"https://{worker}:1", [capability()], now=T0)
    stale = encode_snapshot(old.snapshot(), part_size=2)  # revision 4, two parts
    registry = CapabilityRegistry()
    lines = []
    for worker in ("a", "b", "c", "d", "e"):
        lines += [
            encode_event(e)
            for e in registry.register(worker, f"https://{worker}:2", [capability()], now=T0)
        ]
    lines += [encode_event(e) for e in registry.deregister("a", now=T0 + 1)]  # revision 6
    for first in (stale[0], stale[0].replace(b'"a"', b'"x"')):  # intact, or its checksum fails
        restored = CapabilityRegistry()
        result = replay_bytes(b"".join([*lines, first, stale[1]]), restored)
        assert [r.worker_id for r in restored.records()] == ["b", "c", "d", "e"]
        assert {r.worker_url for r in restored.records()} == {
            "https://b:2",
            "https://c:2",
            "https://d:2",
            "https://e:2",
        }
        assert [s.line_number for s in result.skipped] == [len(lines) + 1, len(lines) + 2]
        assert "stale snapshot: revision 4" in result.skipped[-1].reason
