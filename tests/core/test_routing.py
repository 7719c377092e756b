"""Routing options in the core: each filter, the strategies, idempotency and ``explain``."""

from __future__ import annotations

import collections
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crank_registry import (
    CapabilityRegistry,
    HealthPolicy,
    RemovedWorker,
    RouteExplanation,
    RouteOptions,
    RoutingSettings,
    UnknownCapability,
    ValidationError,
    WorkerRecord,
    WorkerRegistered,
    encode_event,
    rendezvous_weight,
    replay_bytes,
    structure,
)
from crank_registry._models import (
    _MAX_VERDICTS,
    parse_specifier,
    parse_version,
    version_matches,
    version_verdicts,
)
from tests.builders import capability, capability_payload
from tests.core.helpers import T0, registry_with, routes

KEY = ("classify", "image.classify")
POLICY = HealthPolicy(heartbeat_interval=10, unhealthy_after=60, evict_after=120)


def fleet(*workers: tuple[str, dict[str, Any]], now: float = T0) -> CapabilityRegistry:
    """A registry where each ``(worker_id, fields)`` offers ``classify:image.classify``."""
    registry = CapabilityRegistry(POLICY)
    for worker_id, fields in workers:
        registry.register(worker_id, f"https://{worker_id}:8443", [capability(**fields)], now=now)
    return registry


def chosen(registry: CapabilityRegistry, count: int = 1, **options: Any) -> list[str | None]:
    """The worker ids of ``count`` successive routes with ``options``."""
    answers: list[str | None] = []
    for _ in range(count):
        endpoint = registry.route(*KEY, now=T0, options=RouteOptions(**options))
        answers.append(None if endpoint is None else endpoint.worker_id)
    return answers


def explained(registry: CapabilityRegistry, now: float = T0, **options: Any) -> RouteExplanation:
    return registry.explain_route(*KEY, now=now, options=RouteOptions(**options))[1]


def removed(explanation: RouteExplanation) -> dict[str, str]:
    return {entry.worker_id: entry.reason for entry in explanation.removed}


# ------------------------------------------------------------------- version

VERSIONED = fleet(
    ("old", {"version": "1.1.9"}),
    ("mid", {"version": "1.4.2"}),
    ("rc", {"version": "2.0rc1"}),
    ("new", {"version": "2.1.0"}),
)


@pytest.mark.parametrize(
    ("specifier", "matching"),
    [
        (">=1.2,<2", {"mid"}),
        ("~=1.4", {"mid"}),
        ("==2.*", {"rc", "new"}),  # a pre-release is a version like any other
        (">=2.0rc1", {"rc", "new"}),
        ("!=1.4.2", {"old", "rc", "new"}),
        ("<1", set()),
    ],
)
def test_version_keeps_the_workers_whose_version_is_in_the_specifier_set(
    specifier: str, matching: set[str]
) -> None:
    explanation = explained(VERSIONED, version=specifier)
    assert set(explanation.candidates) == matching
    assert removed(explanation) == dict.fromkeys({"old", "mid", "rc", "new"} - matching, "version")
    picks = set(chosen(VERSIONED, 4, version=specifier))
    assert picks == (matching or {None})


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    specifier=st.sampled_from([">=1.2,<2", "~=1.0", "==2.*", "!=1.5.3", ">=2.0rc1"]),
    versions=st.lists(
        st.sampled_from(["0.9.0", "1.2.0", "1.5.3", "2.0.0", "2.0rc1", "1.2.3-beta", "x"])
    ),
)
def test_the_version_filters_table_of_verdicts_answers_as_version_matches(
    specifier: str, versions: list[str]
) -> None:
    verdicts = version_verdicts(specifier)
    assert [verdicts[version] for version in versions] == [
        version_matches(specifier, version) for version in versions
    ]


def test_the_table_of_verdicts_is_bounded_and_still_right_once_it_starts_again() -> None:
    verdicts = version_verdicts(">=1.5")
    versions = [f"1.{minor}.0" for minor in range(_MAX_VERDICTS + 10)]
    assert [verdicts[version] for version in versions] == [
        minor >= 5 for minor in range(_MAX_VERDICTS + 10)
    ]
    assert len(verdicts) <= _MAX_VERDICTS


def test_an_invalid_specifier_is_refused_naming_version() -> None:
    with pytest.raises(ValidationError) as caught:
        RouteOptions(version="latest")
    assert [p.path for p in caught.value.problems] == ["version"]
    assert "PEP 440 specifier set" in str(caught.value)


def test_a_record_of_an_older_journal_with_a_non_pep440_version_loads_and_never_matches() -> None:
    legacy = structure(capability_payload(version="1.0.0-x.7.z.92"), type(capability()))
    registry = CapabilityRegistry(POLICY)
    record = WorkerRecord("legacy", "https://legacy:1", (legacy,), T0)
    assert registry.restore([record], now=T0) == 1
    registry.register("w1", "https://w1:1", [capability(version="1.0.0")], now=T0)
    assert registry.route(*KEY, now=T0) is not None  # routable without a constraint
    explanation = explained(registry, version=">=0")
    assert explanation.candidates == ("w1",)
    assert removed(explanation) == {"legacy": "version"}


def test_a_journal_line_of_an_older_release_with_a_semver_version_replays_and_never_matches() -> (
    None
):
    legacy = structure(capability_payload(version="1.0.0-beta.foo"), type(capability()))
    line = encode_event(WorkerRegistered("legacy", "https://legacy:1", (legacy,), T0, revision=1))
    registry = CapabilityRegistry(POLICY)
    result = replay_bytes(line, registry)
    assert result.lines_skipped == 0 and "legacy" in registry
    assert chosen(registry, 1) == ["legacy"]
    assert chosen(registry, 1, version=">=0") == [None]
    assert removed(explained(registry, version=">=0")) == {"legacy": "version"}


# ------------------------------------------------------------------- exclude


def test_exclude_skips_the_named_workers() -> None:
    registry = registry_with("w1", "w2", "w3")
    assert chosen(registry, 4, exclude=["w1", "w3"]) == ["w2"] * 4
    assert chosen(registry, 1, exclude={"w1", "w2", "w3"}) == [None]
    assert removed(explained(registry, exclude=["w2", "nobody"])) == {"w2": "excluded"}


def test_exclude_names_a_worker_whatever_its_registrations() -> None:
    # The filter compares the registered worker itself, not its id: a worker
    # that registered again (a new record) is still the one excluded.
    registry = registry_with("w1", "w2")
    registry.register("w1", "https://w1-moved:8443", [capability()], now=T0 + 1)
    assert chosen(registry, 3, exclude=["w1"]) == ["w2"] * 3
    assert chosen(registry, 2, exclude=["nobody"]) == ["w1", "w2"]
    registry.deregister("w2", now=T0 + 2)
    assert chosen(registry, 1, exclude=["w2"]) == ["w1"]


def test_exclude_must_name_worker_ids() -> None:
    with pytest.raises(ValidationError) as caught:
        RouteOptions(exclude=["w1", "not an id"])
    assert [p.path for p in caught.value.problems] == ["exclude[1]"]
    with pytest.raises(ValidationError):
        RouteOptions(exclude="w1")  # a string is not a list of ids


# ------------------------------------------------------------------- budget


def test_budget_keeps_the_cheapest_tier_within_it_round_robin_among_equal_cost() -> None:
    registry = fleet(
        ("free", {}),  # no cost declared: 0
        ("cheap1", {"cost_tokens_per_invocation": 2.0}),
        ("cheap2", {"cost_tokens_per_invocation": 2}),
        ("dear", {"cost_tokens_per_invocation": 9.5}),
    )
    assert chosen(registry, 2, budget_tokens=0) == ["free", "free"]
    registry.deregister("free", now=T0)
    assert chosen(registry, 4, budget_tokens=5) == ["cheap1", "cheap2", "cheap1", "cheap2"]
    assert chosen(registry, 1, budget_tokens=1.5) == [None]
    assert removed(explained(registry, budget_tokens=10)) == {"dear": "budget"}
    assert removed(explained(registry, budget_tokens=1)) == {
        "cheap1": "budget",
        "cheap2": "budget",
        "dear": "budget",
    }


def test_round_robin_among_equal_cost_is_fair() -> None:
    registry = fleet(*((f"w{i}", {"cost_tokens_per_invocation": 1.0}) for i in range(7)))
    registry.register("dear", "https://dear:1", [capability(cost_tokens_per_invocation=3)], now=T0)
    counts = collections.Counter(chosen(registry, 7 * 100, budget_tokens=5))
    assert counts == {f"w{i}": 100 for i in range(7)}


# ---------------------------------------------------------------------- slo


def test_slo_constraints_bound_the_declared_slo_and_a_missing_value_removes() -> None:
    registry = fleet(
        ("fast", {"slo": {"latency_p95_ms": 80, "availability": 0.999}}),
        ("slow", {"slo": {"latency_p95_ms": 250, "availability": 0.9999}}),
        ("flaky", {"slo": {"latency_p95_ms": 50, "availability": 0.9}}),
        ("silent", {"slo": {"error_budget_pct": 1}}),
        ("none", {}),
    )
    assert set(chosen(registry, 4, slo_constraints={"latency_p95_ms": 100})) == {"fast", "flaky"}
    assert set(chosen(registry, 4, slo_constraints={"availability": 0.99})) == {"fast", "slow"}
    both = explained(registry, slo_constraints={"latency_p95_ms": 100, "availability": 0.99})
    assert both.candidates == ("fast",)
    assert removed(both) == {"slow": "slo", "flaky": "slo", "silent": "slo", "none": "slo"}
    # A bound equal to the offered value is met.
    assert chosen(registry, 1, slo_constraints={"latency_p95_ms": 250, "availability": 0.9999}) == [
        "slow"
    ]


@pytest.mark.parametrize(
    ("constraints", "path"),
    [
        ({}, "slo_constraints"),
        ({"latency_p99_ms": 5}, "slo_constraints.latency_p99_ms"),
        ({"availability": 1.5}, "slo_constraints.availability"),
        ({"latency_p95_ms": -1}, "slo_constraints.latency_p95_ms"),
        ({"latency_p95_ms": "100"}, "slo_constraints.latency_p95_ms"),
    ],
)
def test_slo_constraints_are_checked(constraints: dict[str, Any], path: str) -> None:
    with pytest.raises(ValidationError) as caught:
        RouteOptions(slo_constraints=constraints)
    assert [p.path for p in caught.value.problems] == [path]


# -------------------------------------------------------------- strategies


def test_round_robin_with_options_shares_the_cursor_of_the_plain_path() -> None:
    registry = registry_with("w1", "w2", "w3")
    plain = registry_with("w1", "w2", "w3")
    mixed = [
        routes(registry, 1, now=T0)[0] if index % 2 else chosen(registry)[0] for index in range(9)
    ]
    assert mixed == routes(plain, 9, now=T0)


def test_affinity_sends_a_key_to_the_same_worker_while_it_stays_a_candidate() -> None:
    registry = registry_with(*(f"w{i}" for i in range(5)))
    first = chosen(registry, 1, strategy="affinity", affinity_key="user-42")[0]
    assert chosen(registry, 5, strategy="affinity", affinity_key="user-42") == [first] * 5
    expected = max((f"w{i}" for i in range(5)), key=lambda w: rendezvous_weight("user-42", w))
    assert first == expected
    other = chosen(registry, 1, strategy="affinity", affinity_key="user-42", exclude=[first])[0]
    assert other not in (first, None)


def test_the_rendezvous_weight_is_stable_across_processes() -> None:
    # Fixed values: a salted hash (Python's hash of str) would differ per process.
    assert rendezvous_weight("user-42", "w1") == 0x754F_4CE5_5693_5EAF
    assert rendezvous_weight("ab", "c") != rendezvous_weight("a", "bc")


@pytest.mark.parametrize("n", [5, 10])
def test_when_one_of_n_workers_leaves_only_its_keys_move(n: int) -> None:
    workers = [f"w{i}" for i in range(n)]
    registry = registry_with(*workers)
    keys = [f"key-{i}" for i in range(10_000)]

    def assignment() -> dict[str, str | None]:
        return {key: chosen(registry, 1, strategy="affinity", affinity_key=key)[0] for key in keys}

    before = assignment()
    registry.deregister("w3", now=T0)
    after = assignment()
    moved = {key for key in keys if before[key] != after[key]}
    # Exactly the keys of the worker that left, about 1/n of them.
    assert moved == {key for key in keys if before[key] == "w3"}
    assert 0.5 / n * len(keys) <= len(moved) <= 2 / n * len(keys)
    # And a worker that joins takes only keys, about 1/n of them, from the others.
    registry.register("w3", "https://w3:8443", [capability()], now=T0)
    assert assignment() == before


def test_affinity_spreads_keys_evenly_over_the_candidates() -> None:
    workers = [f"w{i}" for i in range(10)]
    registry = registry_with(*workers)
    tally = collections.Counter(
        chosen(registry, 1, strategy="affinity", affinity_key=f"key-{i}")[0] for i in range(10_000)
    )
    # 1 000 keys a worker expected; a binomial's spread is about 30.
    assert set(tally) == set(workers)
    assert all(850 <= count <= 1_150 for count in tally.values()), tally


def test_affinity_key_goes_with_strategy_affinity_only() -> None:
    with pytest.raises(ValidationError) as caught:
        RouteOptions(strategy="affinity")
    assert str(caught.value) == "affinity_key: is required by strategy 'affinity'"
    with pytest.raises(ValidationError) as caught:
        RouteOptions(affinity_key="k")
    assert [p.path for p in caught.value.problems] == ["affinity_key"]
    with pytest.raises(ValidationError) as caught:
        RouteOptions(strategy="fastest")
    assert [p.path for p in caught.value.problems] == ["strategy"]


# ------------------------------------------------------------- idempotency


def test_an_idempotency_key_returns_the_same_worker_until_its_ttl() -> None:
    registry = CapabilityRegistry(POLICY, RoutingSettings(idempotency_ttl=30))
    for worker_id in ("w1", "w2", "w3"):
        registry.register(worker_id, f"https://{worker_id}:1", [capability()], now=T0)
    options = RouteOptions(idempotency_key="order-7")
    first = registry.route(*KEY, now=T0, options=options)
    assert first is not None
    for step in range(1, 6):
        registry.route(*KEY, now=T0 + step)  # plain routes move the rotation on
        again = registry.route(*KEY, now=T0 + step, options=options)
        assert again is not None and again.worker_id == first.worker_id
    # Another capability with the same key is another entry.
    registry.register("x1", "https://x1:1", [capability("other")], now=T0)
    other = registry.route("classify", "other", now=T0 + 5, options=options)
    assert other is not None and other.worker_id == "x1"
    # Past the TTL: a fresh choice (the rotation's next), then remembered.
    assert routes(registry, 1, now=T0 + 30) == ["w1"]  # five plain routes came round to w1
    fresh = registry.route(*KEY, now=T0 + 30, options=options)
    assert first.worker_id == "w1"
    assert fresh is not None and fresh.worker_id == "w2"
    later = registry.route(*KEY, now=T0 + 59, options=options)
    assert later is not None and later.worker_id == fresh.worker_id


def test_an_idempotency_key_whose_worker_is_no_candidate_gets_a_fresh_remembered_choice() -> None:
    registry = registry_with("w1", "w2", "w3")
    first = chosen(registry, 1, idempotency_key="k")[0]
    assert first is not None
    moved = chosen(registry, 1, idempotency_key="k", exclude=[first])[0]
    assert moved not in (first, None)
    # Remembered: the new worker stays, even without the exclusion.
    assert chosen(registry, 3, idempotency_key="k") == [moved] * 3
    registry.deregister(moved, now=T0)
    assert chosen(registry, 1, idempotency_key="k")[0] not in (moved, None)


def test_an_idempotency_key_keeps_its_worker_when_it_registers_again() -> None:
    # The remembered worker is found by its record, whichever record it has now.
    registry = registry_with("w1", "w2", "w3")
    first = chosen(registry, 1, idempotency_key="k")[0]
    assert first is not None
    registry.register(first, f"https://{first}-moved:8443", [capability()], now=T0)
    assert chosen(registry, 3, idempotency_key="k") == [first] * 3


def test_the_idempotency_memory_is_bounded_and_forgets_the_oldest_first() -> None:
    registry = CapabilityRegistry(POLICY, RoutingSettings(idempotency_keys=3))
    for worker_id in ("w1", "w2", "w3", "w4"):
        registry.register(worker_id, f"https://{worker_id}:1", [capability()], now=T0)
    given = {key: chosen(registry, 1, idempotency_key=key)[0] for key in ("a", "b", "c", "d")}
    assert given == {"a": "w1", "b": "w2", "c": "w3", "d": "w4"}
    assert len(registry._idempotency) == 3
    # "a" was forgotten: a fresh round-robin choice (w1 comes round again).
    assert chosen(registry, 1, idempotency_key="b") == ["w2"]
    assert chosen(registry, 1, idempotency_key="a") == ["w1"]
    assert chosen(registry, 1, idempotency_key="a") == ["w1"]
    # "a" came back as the newest: the oldest, "b", was forgotten; "c" is kept.
    assert chosen(registry, 1, idempotency_key="c") == ["w3"]
    assert routes(registry, 1, now=T0) == ["w2"]
    assert chosen(registry, 1, idempotency_key="b") == ["w3"]  # fresh: the rotation's next
    assert len(registry._idempotency) == 3


def test_expired_idempotency_keys_are_dropped_by_time() -> None:
    registry = CapabilityRegistry(POLICY, RoutingSettings(idempotency_ttl=10))
    registry.register("w1", "https://w1:1", [capability()], now=T0)
    for index in range(50):
        registry.route(*KEY, now=T0 + index / 10, options=RouteOptions(idempotency_key=f"k{index}"))
    assert len(registry._idempotency) == 50
    # Given at T0 + 0.0 .. T0 + 4.9: at T0 + 12 those given up to T0 + 2.0 have expired.
    registry.route(*KEY, now=T0 + 12, options=RouteOptions(idempotency_key="late"))
    assert len(registry._idempotency) == 50 - 21 + 1
    registry.route(*KEY, now=T0 + 15, options=RouteOptions(idempotency_key="later"))
    assert len(registry._idempotency) == 2


@pytest.mark.parametrize(
    ("fields", "path"),
    [({"idempotency_ttl": 0}, "idempotency_ttl"), ({"idempotency_keys": 0}, "idempotency_keys")],
)
def test_routing_settings_are_checked(fields: dict[str, Any], path: str) -> None:
    with pytest.raises(ValidationError) as caught:
        RoutingSettings(**fields)
    assert [p.path for p in caught.value.problems] == [path]


# ----------------------------------------------------------------- explain


def test_explain_names_the_first_rule_that_removed_each_worker() -> None:
    registry = fleet(
        ("gone", {"version": "1.5.0"}),
        ("v1", {"version": "1.0.0"}),
        ("ex", {"version": "1.5.0"}),
        ("slow", {"version": "1.5.0", "slo": {"latency_p95_ms": 500}}),
        (
            "dear",
            {"version": "1.5.0", "slo": {"latency_p95_ms": 50}, "cost_tokens_per_invocation": 9},
        ),
        (
            "ok",
            {"version": "1.5.0", "slo": {"latency_p95_ms": 50}, "cost_tokens_per_invocation": 4},
        ),
    )
    registry.heartbeat("v1", now=T0 + 30)
    registry.heartbeat("ex", now=T0 + 30)
    registry.heartbeat("slow", now=T0 + 30)
    registry.heartbeat("dear", now=T0 + 30)
    registry.heartbeat("ok", now=T0 + 30)
    now = T0 + 61  # "gone" is silent past unhealthy_after
    endpoint, explanation = registry.explain_route(
        *KEY,
        now=now,
        options=RouteOptions(
            version=">=1.2,<2",
            exclude=["ex", "v1"],
            slo_constraints={"latency_p95_ms": 100},
            budget_tokens=5,
        ),
    )
    assert endpoint is not None and endpoint.worker_id == "ok"
    assert endpoint.explain == explanation
    assert explanation == RouteExplanation(
        strategy="round_robin",
        candidates=("ok",),
        removed=(
            RemovedWorker(worker_id="gone", reason="unhealthy"),
            RemovedWorker(worker_id="v1", reason="version"),  # before its exclusion
            RemovedWorker(worker_id="ex", reason="excluded"),
            RemovedWorker(worker_id="slow", reason="slo"),
            RemovedWorker(worker_id="dear", reason="budget"),
        ),
    )


def test_explain_with_no_candidate_left_still_explains() -> None:
    registry = registry_with("w1", "w2")
    endpoint, explanation = registry.explain_route(
        *KEY, now=T0, options=RouteOptions(exclude=["w1", "w2"], strategy="round_robin")
    )
    assert endpoint is None
    assert explanation.candidates == ()
    assert removed(explanation) == {"w1": "excluded", "w2": "excluded"}
    plain = registry.explain_route(*KEY, now=T0)[1]
    assert plain == RouteExplanation(strategy="round_robin", candidates=("w1", "w2"), removed=())


def test_options_on_an_unknown_capability_raise_unknown_capability() -> None:
    registry = registry_with("w1")
    with pytest.raises(UnknownCapability):
        registry.route("classify", "typo", now=T0, options=RouteOptions(budget_tokens=1))
    with pytest.raises(UnknownCapability):
        registry.explain_route("classify", "typo", now=T0)


# ---------------------------------------------------- options compose (property)

worker_versions = st.sampled_from(["0.9.0", "1.0.0", "1.2.0", "1.5.3", "2.0.0", "2.0rc1"])
worker_specs = st.fixed_dictionaries(
    {
        "version": worker_versions,
        "silent": st.booleans(),
        "cost": st.none() | st.sampled_from([0.0, 1.0, 2.5, 5.0, 8.0]),
        "slo": st.none()
        | st.fixed_dictionaries(
            {},
            optional={
                "latency_p95_ms": st.sampled_from([20.0, 100.0, 300.0]),
                "availability": st.sampled_from([0.9, 0.99, 0.999]),
            },
        ),
    }
)
route_options = st.fixed_dictionaries(
    {},
    optional={
        "version": st.sampled_from([">=1.2,<2", "~=1.0", "==2.*", "!=1.5.3", ">=2.0rc1"]),
        "exclude": st.lists(st.sampled_from([f"w{i}" for i in range(8)]), max_size=4),
        "slo_constraints": st.sampled_from(
            [
                {"latency_p95_ms": 100.0},
                {"availability": 0.99},
                {"latency_p95_ms": 300, "availability": 0.9},
            ]
        ),
        "budget_tokens": st.sampled_from([0.0, 2.0, 5.0, 100.0]),
        "idempotency_key": st.sampled_from(["k1", "k2"]),
        "strategy": st.sampled_from(["round_robin", "affinity"]),
    },
)


def model_reason(spec: dict[str, Any], worker_id: str, options: dict[str, Any]) -> str | None:
    """The first rule that removes a worker, written out plainly (``None``: a candidate so far)."""
    if spec["silent"]:
        return "unhealthy"
    if "version" in options:
        version = parse_version(spec["version"])
        if version is None or not parse_specifier(options["version"]).contains(
            version, prereleases=True
        ):
            return "version"
    if worker_id in options.get("exclude", ()):
        return "excluded"
    bounds = options.get("slo_constraints")
    if bounds:
        slo = spec["slo"] or {}
        if (
            "latency_p95_ms" in bounds
            and not slo.get("latency_p95_ms", float("inf")) <= bounds["latency_p95_ms"]
        ):
            return "slo"
        if "availability" in bounds and not slo.get("availability", -1.0) >= bounds["availability"]:
            return "slo"
    if "budget_tokens" in options and (spec["cost"] or 0.0) > options["budget_tokens"]:
        return "budget"
    return None


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    specs=st.lists(worker_specs, min_size=1, max_size=8),
    asked=st.lists(route_options, min_size=1, max_size=4),
    key_chars=st.text(string.ascii_lowercase, min_size=1, max_size=5),
)
def test_options_compose_every_answer_satisfies_every_filter(
    specs: list[dict[str, Any]], asked: list[dict[str, Any]], key_chars: str
) -> None:
    registry = CapabilityRegistry(POLICY)
    for index, spec in enumerate(specs):
        fields: dict[str, Any] = {"version": spec["version"]}
        if spec["cost"] is not None:
            fields["cost_tokens_per_invocation"] = spec["cost"]
        if spec["slo"] is not None:
            fields["slo"] = spec["slo"]
        registry.register(f"w{index}", f"https://w{index}:1", [capability(**fields)], now=T0)
    now = T0 + 30
    for index, spec in enumerate(specs):
        if not spec["silent"]:
            registry.heartbeat(f"w{index}", now=now)
    now = T0 + 61  # the silent ones are past unhealthy_after
    by_id = {f"w{index}": spec for index, spec in enumerate(specs)}
    for drawn in asked:
        options = dict(drawn)
        if options.get("strategy") == "affinity":
            options["affinity_key"] = key_chars
        endpoint, explanation = registry.explain_route(
            *KEY, now=now, options=RouteOptions(**options)
        )
        # Every worker exactly once, candidates or removed, in registration order.
        listed = list(explanation.candidates) + [entry.worker_id for entry in explanation.removed]
        assert sorted(listed) == sorted(by_id)
        reasons = {w: model_reason(spec, w, options) for w, spec in by_id.items()}
        passed = {w for w, reason in reasons.items() if reason is None}
        if "budget_tokens" in options and passed:
            cheapest = min(by_id[w]["cost"] or 0.0 for w in passed)
            for w in passed:
                if (by_id[w]["cost"] or 0.0) > cheapest:
                    reasons[w] = "budget"
        assert removed(explanation) == {w: r for w, r in reasons.items() if r is not None}
        assert set(explanation.candidates) == {w for w, r in reasons.items() if r is None}
        if endpoint is None:
            assert explanation.candidates == ()
        else:
            assert endpoint.worker_id in explanation.candidates
            assert endpoint.version == by_id[endpoint.worker_id]["version"]
        # route() with the same options answers from the same candidates.
        plain = registry.route(*KEY, now=now, options=RouteOptions(**options))
        assert (plain is None) == (endpoint is None)
        if plain is not None:
            assert plain.worker_id in explanation.candidates
            assert plain.explain is None
