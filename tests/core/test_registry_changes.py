"""Changes of the whole registry: the SLO files and the access policy.

Each is a change with a revision (``slos_changed``, ``policy_changed``),
applied by the one fold, kept in the feed's window, journalled, replayed,
and held in snapshots; a registry built from them (a follower) answers
``policy_denied`` and the ``slo_constraints`` filter as the original does.
"""

from __future__ import annotations

import json

import pytest

from crank_registry import (
    AccessRules,
    CapabilityRegistry,
    Decision,
    PolicyChanged,
    PolicyDenied,
    PolicyRule,
    PolicyRules,
    RouteOptions,
    SlosChanged,
    ValidationError,
    WorkerRegistered,
    encode_event,
    encode_snapshot,
    replay,
    structure_event,
    unstructure_event,
)
from tests.builders import capability
from tests.core.helpers import T0
from tests.core.test_slos import slo_file

RULES = AccessRules(
    rules=(
        PolicyRule(identity="spiffe://crank.local/client/web", allow=("classify:image.*",)),
        PolicyRule(identity="*", deny=("classify:image.secret",)),
    ),
    default="deny",
)
CALLERS = (
    None,
    "spiffe://crank.local/client/web",
    "spiffe://crank.local/client/other",
    "spiffe://crank.local/worker/caller",
)
LABELS = ("classify:image.classify", "classify:image.secret")
FAST = {"latency_p95_ms": 100}


def controller() -> CapabilityRegistry:
    """Workers of two capabilities, a caller with ``required_capabilities``, rules, SLO files."""
    registry = CapabilityRegistry()
    registry.set_access_rules(RULES, now=T0)
    registry.register(
        "fast",
        "https://fast:8443",
        [capability("image.classify"), capability("image.secret")],
        now=T0,
    )
    registry.register("slow", "https://slow:8443", [capability("image.classify")], now=T0)
    registry.register(
        "caller",
        "https://caller:8443",
        [capability("call", "run", required_capabilities=["classify:image.secret"])],
        now=T0,
    )
    # The operator says only "fast" meets 100 ms (the declared SLOs say nothing).
    registry.set_slos(
        [
            slo_file("fast.yaml", version="==1.2.3", latency_p95_ms=50),
        ],
        now=T0 + 1,
    )
    return registry


def answers(registry: CapabilityRegistry) -> list[object]:
    """What every caller is answered for every label, plain and with an SLO constraint."""
    seen: list[object] = []
    for requester in CALLERS:
        for label in LABELS:
            verb, _, name = label.partition(":")
            for slo in (None, FAST):
                options = RouteOptions(requester_identity=requester, slo_constraints=slo)
                try:
                    endpoint = registry.route(verb, name, now=T0 + 2, options=options)
                except PolicyDenied as denied:
                    seen.append(("denied", denied.reason))
                else:
                    seen.append(None if endpoint is None else endpoint.worker_id)
    return seen


def test_settings_are_changes_with_revisions_in_the_feed() -> None:
    registry = CapabilityRegistry()
    (policy,) = registry.set_access_rules(RULES, now=T0)
    assert policy == PolicyChanged(T0, RULES, revision=1)
    assert registry.set_access_rules(RULES, now=T0 + 1) == ()  # the same rules: no change
    registry.register("w1", "https://w1:8443", [capability()], now=T0)
    (slos,) = registry.set_slos([slo_file("a.yaml", latency_p95_ms=90)], now=T0 + 2)
    assert isinstance(slos, SlosChanged) and slos.revision == 3
    assert registry.set_slos([slo_file("a.yaml", latency_p95_ms=90)], now=T0 + 3) == ()
    assert registry.access_rules == RULES
    assert [f.file for f in registry.slos] == ["a.yaml"]
    changes, latest = registry.changes_since(0)
    assert [type(change) for change in changes] == [PolicyChanged, WorkerRegistered, SlosChanged]
    assert latest == registry.revision == 3


def test_their_wire_form_round_trips() -> None:
    registry = controller()
    changes, _ = registry.changes_since(0)
    for change in changes:
        data = json.loads(json.dumps(unstructure_event(change)))
        assert structure_event(data) == change
    policy = unstructure_event(changes[0])
    assert policy["type"] == "policy_changed"
    assert policy["access_policy"] == {
        "rules": [
            {"identity": "spiffe://crank.local/client/web", "allow": ["classify:image.*"]},
            {"identity": "*", "deny": ["classify:image.secret"]},
        ],
        "default": "deny",
        "trust_domain": "crank.local",
    }


def test_a_follower_applying_the_feed_answers_as_the_controller() -> None:
    original = controller()
    follower = CapabilityRegistry()
    changes, _ = original.changes_since(0)
    for change in changes:
        follower.apply(change)
    expected = answers(original)
    assert ("denied", "no rule matches 'classify:image.classify'; default deny") in expected
    assert any(
        isinstance(answer, tuple) and "required_capabilities" in answer[1] for answer in expected
    )
    assert "fast" in expected
    assert answers(follower) == expected


def test_the_journal_and_snapshots_carry_them() -> None:
    original = controller()
    changes, _ = original.changes_since(0)
    replayed = CapabilityRegistry()
    result = replay([encode_event(change) for change in changes], replayed)
    assert result.lines_skipped == 0
    assert (replayed.access_rules, replayed.slos) == (original.access_rules, original.slos)
    # Each compared with a registry that has not routed yet (round-robin cursors).
    expected = answers(controller())
    assert answers(replayed) == expected
    # A compacted journal: the settings ride on the snapshot's first part.
    lines = encode_snapshot(original.snapshot(), part_size=1)
    assert b'"access_policy"' in lines[0] and b'"slos"' in lines[0]
    assert not any(b'"access_policy"' in line for line in lines[1:])
    restored = CapabilityRegistry()
    assert replay(lines, restored).lines_skipped == 0
    assert restored.snapshot() == original.snapshot()
    assert answers(restored) == expected
    # And apply_snapshot itself.
    copied = CapabilityRegistry()
    copied.apply_snapshot(original.snapshot_copy().snapshot())
    assert answers(copied) == expected


def test_a_snapshot_without_settings_leaves_none() -> None:
    registry = controller()
    registry.apply_snapshot(CapabilityRegistry().snapshot())
    assert (registry.access_rules, registry.access_policy, registry.slos) == (None, None, ())


def test_a_decided_setting_waits_for_confirm_and_a_discard_drops_it() -> None:
    registry = CapabilityRegistry()
    (decided,) = registry.decide_access_rules(RULES, now=T0)
    assert registry.access_rules is None and registry.pending == (decided,)
    # Decided again while pending: the pending rules count, no second change.
    assert registry.decide_access_rules(RULES, now=T0) == ()
    registry.discard_pending()
    assert registry.access_rules is None and registry.revision == 0
    (decided,) = registry.decide_slos([slo_file("a.yaml", availability=0.9)], now=T0)
    assert isinstance(decided, SlosChanged)
    registry.confirm(decided.revision)
    assert [f.file for f in registry.slos] == ["a.yaml"] and registry.revision == 1


def test_conflicting_slo_files_are_refused_before_anything_is_decided() -> None:
    registry = CapabilityRegistry()
    with pytest.raises(ValidationError, match="states already"):
        registry.decide_slos(
            [slo_file("a.yaml", availability=0.9), slo_file("b.yaml", availability=0.8)],
            now=T0,
        )
    assert registry.pending == () and registry.revision == 0


class Everyone:
    """A custom policy: code, which cannot travel."""

    def decide(self, requester: str | None, verb: str, capability: str) -> Decision:
        return Decision(True, "custom")


def test_a_custom_policy_is_not_a_change_and_not_in_snapshots() -> None:
    registry = controller()
    revision = registry.revision
    registry.set_access_policy(Everyone())
    assert registry.revision == revision
    assert registry.access_rules is None
    assert registry.snapshot().access_policy is None


def test_access_rules_of_a_policy_file() -> None:
    rules = PolicyRules(rules=(PolicyRule(identity="*", allow=("*",)),), default="deny")
    made = AccessRules.of(rules, "example.org")
    assert (made.rules, made.default, made.trust_domain) == (rules.rules, "deny", "example.org")
    with pytest.raises(ValidationError, match="trust domain"):
        AccessRules(trust_domain="Not A Domain")
    with pytest.raises(ValidationError, match="allow or deny"):
        PolicyRule(identity="*")


def test_a_journal_line_with_invalid_rules_is_skipped_not_fatal() -> None:
    registry = CapabilityRegistry()
    (change,) = registry.set_access_rules(RULES, now=T0)
    line = encode_event(change).replace(b'"default":"deny"', b'"default":"maybe"')
    restored = CapabilityRegistry()
    result = replay([line], restored)
    assert result.lines_skipped == 1
    assert "default" in result.skipped[0].reason
    assert restored.access_rules is None
