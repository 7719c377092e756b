"""The access policy: least privilege, the file's rules in order, the default, ``explain``."""

from __future__ import annotations

import fnmatch
import re
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crank_registry import (
    BuiltinPolicy,
    CapabilityRegistry,
    Decision,
    HealthPolicy,
    PolicyDenied,
    PolicyFileError,
    PolicyRule,
    PolicyRules,
    RouteOptions,
    _policy,
    parse_policy,
)
from tests.builders import capability
from tests.core.helpers import T0

POLICY = HealthPolicy(heartbeat_interval=10, unhealthy_after=60, evict_after=120)
CLIENT = "spiffe://crank.local/client/web"
WORKER = "spiffe://crank.local/worker/caller"

RULES = """
default = "deny"

[[rule]]
identity = "spiffe://crank.local/client/admin"
allow = ["*"]

[[rule]]
identity = "spiffe://crank.local/client/*"
deny = ["classify:image.secret"]
allow = ["classify:image.*"]

[[rule]]
identity = "*"
allow = ["health:*"]
"""


def registry_with(rules: PolicyRules, **callers: tuple[str, ...] | None) -> CapabilityRegistry:
    """Workers offering ``classify:image.classify``, ``classify:image.secret`` and
    ``health:ping``; each of ``callers`` a worker with those ``required_capabilities``."""
    registry = CapabilityRegistry(POLICY)
    registry.register(
        "server",
        "https://server:8443",
        [
            capability(verb="classify", name="image.classify"),
            capability(verb="classify", name="image.secret"),
            capability(verb="health", name="ping"),
        ],
        now=T0,
    )
    for worker_id, required in callers.items():
        registry.register(
            worker_id,
            f"https://{worker_id}:8443",
            [capability(verb="call", name=worker_id, required_capabilities=required)],
            now=T0,
        )
    registry.set_access_policy(BuiltinPolicy(rules, registry.required_targets))
    return registry


def decide(registry: CapabilityRegistry, requester: str | None, label: str) -> Decision:
    policy = registry.access_policy
    assert policy is not None
    verb, _, name = label.partition(":")
    return policy.decide(requester, verb, name)


# ---------------------------------------------------------- (1) least privilege


@pytest.mark.parametrize(
    ("required", "label", "allowed"),
    [
        (("classify:image.classify",), "classify:image.classify", True),
        (("classify:image.classify",), "classify:image.secret", False),
        (("classify:image.classify",), "health:ping", False),
        ((), "classify:image.classify", False),  # declared empty: may route nowhere
        (None, "classify:image.secret", True),  # declared on none: no restriction
    ],
)
def test_a_worker_with_required_capabilities_routes_only_to_them(
    required: tuple[str, ...] | None, label: str, allowed: bool
) -> None:
    registry = registry_with(PolicyRules(), caller=required)
    decision = decide(registry, WORKER, label)
    assert decision.allowed is allowed
    if not allowed:
        assert "required_capabilities" in decision.reason


def test_required_capabilities_are_the_union_over_the_workers_capabilities() -> None:
    registry = CapabilityRegistry(POLICY)
    registry.register(
        "caller",
        "https://caller:8443",
        [
            capability(verb="a", name="x", required_capabilities=("classify:image.classify",)),
            capability(verb="b", name="y", required_capabilities=("health:ping",)),
            capability(verb="c", name="z"),
        ],
        now=T0,
    )
    assert registry.required_targets("caller") == {"classify:image.classify", "health:ping"}
    assert registry.required_targets("nobody") is None


def test_least_privilege_comes_before_the_rules() -> None:
    everyone = PolicyRules(rules=(PolicyRule(identity="*", allow=("*",)),))
    registry = registry_with(everyone, caller=("health:ping",))
    assert not decide(registry, WORKER, "classify:image.classify").allowed
    # A worker id of an unregistered worker, and a worker of another trust domain: rules only.
    assert decide(registry, "spiffe://crank.local/worker/gone", "classify:image.classify").allowed
    assert decide(registry, "spiffe://other/worker/caller", "classify:image.classify").allowed


# ------------------------------------------------------------------ (2) rules


@pytest.mark.parametrize(
    ("requester", "label", "allowed", "reason"),
    [
        # The first rule whose identity and target match decides.
        ("spiffe://crank.local/client/admin", "classify:image.secret", True, "rule[0]"),
        (CLIENT, "classify:image.secret", False, "rule[1] denies"),
        (CLIENT, "classify:image.classify", True, "rule[1] allows"),
        # A rule matching the identity but not the target does not decide: the next may.
        (CLIENT, "health:ping", True, "rule[2]"),
        # No rule matches: default deny.
        (CLIENT, "other:thing", False, "default deny"),
        ("spiffe://crank.local/worker/w", "classify:image.classify", False, "default deny"),
        # Anonymous matches only identity globs that match "", i.e. "*".
        (None, "health:ping", True, "rule[2]"),
        (None, "classify:image.classify", False, "default deny"),
    ],
)
def test_rules_first_match_wins_then_the_default(
    requester: str | None, label: str, allowed: bool, reason: str
) -> None:
    registry = registry_with(parse_policy(RULES, "policy.toml"))
    decision = decide(registry, requester, label)
    assert decision.allowed is allowed
    assert reason in decision.reason


def test_an_empty_policy_allows_everyone() -> None:
    registry = registry_with(parse_policy("", "policy.toml"))
    assert decide(registry, None, "classify:image.secret").allowed
    assert decide(registry, CLIENT, "classify:image.secret").allowed


# --------------------------------------------------------------- parsing


def test_the_parsed_policy_is_a_value() -> None:
    assert parse_policy(RULES, "a.toml") == parse_policy(RULES, "b.toml")
    assert parse_policy(RULES, "a.toml").rules[1] == PolicyRule(
        identity="spiffe://crank.local/client/*",
        allow=("classify:image.*",),
        deny=("classify:image.secret",),
    )


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("default = 'maybe'", "default"),
        ("defualt = 'deny'", "defualt"),
        ("[rule]\nidentity = '*'\nallow = ['*']", "array of tables"),
        ("[[rule]]\nallow = ['*']", "rule[0].identity"),
        ("[[rule]]\nidentity = 5\nallow = ['*']", "rule[0].identity"),
        ("[[rule]]\nidentity = '*'", "rule[0] needs allow or deny"),
        (
            "[[rule]]\nidentity = '*'\nallow = ['*']\n[[rule]]\nidentity = '*'\nallow = 'x'",
            "rule[1].allow",
        ),
        ("[[rule]]\nidentity = '*'\ndeny = []", "rule[0].deny"),
        ("[[rule]]\nidentity = '*'\nalow = ['*']", "rule[0].alow"),
        ("[[rule", "not valid TOML"),
    ],
)
def test_an_invalid_policy_is_refused_naming_file_rule_and_field(text: str, names: str) -> None:
    with pytest.raises(PolicyFileError) as refused:
        parse_policy(text, "/etc/crank/policy.toml")
    assert str(refused.value).startswith("/etc/crank/policy.toml: ")
    assert names in str(refused.value)


# ----------------------------------------------------------------- routing


def route(registry: CapabilityRegistry, requester: str | None, **options: Any) -> str | None:
    endpoint = registry.route(
        "classify",
        "image.classify",
        now=T0,
        options=RouteOptions(requester_identity=requester, **options),
    )
    return None if endpoint is None else endpoint.worker_id


def test_a_denied_route_raises_policy_denied_with_the_reason() -> None:
    registry = registry_with(parse_policy(RULES, "policy.toml"))
    assert route(registry, CLIENT) == "server"
    for options in ({}, {"exclude": ("nobody",)}):
        with pytest.raises(PolicyDenied) as denied:
            route(registry, "spiffe://crank.local/worker/w", **options)
        assert denied.value.code == "policy_denied"
        assert denied.value.status_hint == 403
        assert denied.value.requester == "spiffe://crank.local/worker/w"
        assert "default deny" in denied.value.reason
    with pytest.raises(PolicyDenied):  # anonymous, on the plain path
        registry.route("classify", "image.classify", now=T0)


def test_without_a_policy_every_requester_routes() -> None:
    registry = registry_with(PolicyRules(rules=(), default="deny"))
    registry.set_access_policy(None)
    assert route(registry, CLIENT) == "server"


def test_explain_names_policy_for_the_workers_the_earlier_rules_left() -> None:
    registry = registry_with(parse_policy(RULES, "policy.toml"))
    registry.register(
        "second",
        "https://second:8443",
        [capability(verb="classify", name="image.classify")],
        now=T0,
    )
    with pytest.raises(PolicyDenied) as denied:
        registry.explain_route(
            "classify",
            "image.classify",
            now=T0,
            options=RouteOptions(requester_identity=WORKER, exclude=("second",)),
        )
    explanation = denied.value.explain
    assert explanation is not None
    assert explanation.candidates == ()
    assert {entry.worker_id: entry.reason for entry in explanation.removed} == {
        "server": "policy",
        "second": "excluded",
    }
    # Allowed: the policy removes nobody.
    _, allowed = registry.explain_route(
        "classify", "image.classify", now=T0, options=RouteOptions(requester_identity=CLIENT)
    )
    assert set(allowed.candidates) == {"server", "second"}
    assert allowed.removed == ()


def test_a_route_asking_only_for_the_requester_stays_round_robin() -> None:
    registry = registry_with(PolicyRules())
    for worker_id in ("second", "third"):
        registry.register(
            worker_id,
            f"https://{worker_id}:8443",
            [capability(verb="classify", name="image.classify")],
            now=T0,
        )
    plain = [route(registry, None) for _ in range(6)]
    assert plain == ["server", "second", "third"] * 2
    assert [route(registry, CLIENT) for _ in range(3)] == ["server", "second", "third"]


def test_a_long_list_of_required_capabilities_is_shortened_in_the_reason() -> None:
    required = tuple(f"ocr:page-{n}" for n in range(40))
    registry = registry_with(PolicyRules(), caller=required)
    reason = decide(registry, WORKER, "classify:image.classify").reason
    assert reason == (
        "worker 'caller' declared required_capabilities without 'classify:image.classify' "
        "(least privilege: it may route only to ocr:page-0, ocr:page-1, ocr:page-10, "
        "ocr:page-11, ocr:page-12 and 35 more)"
    )


@pytest.mark.parametrize(
    "text",
    ["", 'default = "deny"', RULES, '[[rule]]\nidentity = "*"\ndeny = ["health:*"]'],
    ids=["no file", "default deny", "rules", "anonymous denied one label"],
)
def test_a_plain_route_answers_as_the_built_in_policy_decides(text: str) -> None:
    # A plain route asks the built-in policy only when it may deny an
    # anonymous caller: either way, the route's answer is the policy's.
    registry = registry_with(parse_policy(text, "policy.toml"))
    policy = registry.access_policy
    assert isinstance(policy, BuiltinPolicy)
    assert policy.allows_anonymous == (text == "")
    for label in ("classify:image.classify", "classify:image.secret", "health:ping"):
        verb, _, name = label.partition(":")
        decision = policy.decide(None, verb, name)
        if decision.allowed:
            assert registry.route(verb, name, now=T0) is not None
        else:
            with pytest.raises(PolicyDenied, match=re.escape(decision.reason)):
                registry.route(verb, name, now=T0)


def test_a_custom_policy_is_asked_for_every_plain_route() -> None:
    asked: list[tuple[str | None, str, str]] = []

    class Closed:
        def decide(self, requester: str | None, verb: str, capability: str) -> Decision:
            asked.append((requester, verb, capability))
            return Decision(False, "closed for maintenance")

    registry = registry_with(PolicyRules())
    registry.set_access_policy(Closed())
    with pytest.raises(PolicyDenied, match="closed for maintenance"):
        registry.route("health", "ping", now=T0)
    assert asked == [(None, "health", "ping")]


# ------------------------------------------ the decision equals the rules as stated

IDENTITY_GLOBS = (
    "*",
    "spiffe://crank.local/client/*",
    "spiffe://crank.local/client/web",
    "spiffe://crank.local/*",
    "*/admin",
)
LABEL_GLOBS = ("classify:*", "classify:image.secret", "health:*", "*:ping", "classify:image.[cs]*")
REQUESTERS = (
    None,
    CLIENT,
    "spiffe://crank.local/client/admin",
    WORKER,
    "spiffe://other.org/client/web",
)
LABELS = ("classify:image.classify", "classify:image.secret", "health:ping", "call:caller")


def stated(rules: PolicyRules, requester: str | None, label: str) -> Decision:
    """The file's rules as the module states them: one glob at a time, in order."""
    if requester is None and not rules.rules and rules.default == "allow":
        return Decision(True, "no rule applies to an anonymous caller; default allow")
    identity = requester or ""
    for index, rule in enumerate(rules.rules):
        if not fnmatch.fnmatchcase(identity, rule.identity):
            continue
        for glob in rule.deny or ():
            if fnmatch.fnmatchcase(label, glob):
                return Decision(False, f"rule[{index}] denies {glob!r} to {rule.identity!r}")
        for glob in rule.allow or ():
            if fnmatch.fnmatchcase(label, glob):
                return Decision(True, f"rule[{index}] allows {glob!r} to {rule.identity!r}")
    allowed = rules.default == "allow"
    return Decision(allowed, f"no rule matches {label!r}; default {rules.default}")


GLOBS = st.lists(st.sampled_from(LABEL_GLOBS), min_size=1, max_size=3).map(tuple)


@st.composite
def policy_rules(draw: st.DrawFn) -> PolicyRules:
    rules = []
    for _ in range(draw(st.integers(0, 5))):
        allow, deny = draw(st.none() | GLOBS), draw(st.none() | GLOBS)
        if allow is None and deny is None:
            allow = draw(GLOBS)
        rules.append(
            PolicyRule(identity=draw(st.sampled_from(IDENTITY_GLOBS)), allow=allow, deny=deny)
        )
    return PolicyRules(rules=tuple(rules), default=draw(st.sampled_from(("allow", "deny"))))


@settings(max_examples=200, deadline=None)
@given(
    rules=policy_rules(),
    asked=st.lists(st.tuples(st.sampled_from(REQUESTERS), st.sampled_from(LABELS)), max_size=12),
    kept=st.integers(1, 3),
)
def test_decisions_are_the_rules_as_stated(
    rules: PolicyRules, asked: list[tuple[str | None, str]], kept: int
) -> None:
    # The policy keeps each requester's matching rules (at most `kept` of
    # them here, the oldest forgotten): its decisions stay those of the rules.
    policy = BuiltinPolicy(rules, lambda _: None)
    with mock.patch.object(_policy, "_REQUESTERS_KEPT", kept):
        for requester, label in asked:
            verb, _, name = label.partition(":")
            assert policy.decide(requester, verb, name) == stated(rules, requester, label)
