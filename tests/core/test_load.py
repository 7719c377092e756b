"""Load reports in the core: kept per worker, ``least_loaded``, ``at_capacity``, observed SLO."""

from __future__ import annotations

import collections
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crank_registry import (
    CapabilityRegistry,
    HealthPolicy,
    HeartbeatRequest,
    LoadReport,
    RouteOptions,
    ValidationError,
    WorkerNotRegistered,
    effective_slo,
    structure,
)
from tests.builders import capability
from tests.core.helpers import T0
from tests.core.test_routing import model_reason, route_options, worker_specs

KEY = ("classify", "image.classify")
POLICY = HealthPolicy(heartbeat_interval=10, unhealthy_after=60, evict_after=120)
LEAST_LOADED = RouteOptions(strategy="least_loaded")


def fleet(*worker_ids: str, seed: int = 0, **fields: Any) -> CapabilityRegistry:
    """A registry with a seeded ``Random`` where each worker offers ``classify:image.classify``."""
    registry = CapabilityRegistry(POLICY, rng=random.Random(seed))
    for worker_id in worker_ids:
        registry.register(worker_id, f"https://{worker_id}:8443", [capability(**fields)], now=T0)
    return registry


def report(registry: CapabilityRegistry, worker_id: str, now: float = T0, **load: Any) -> None:
    registry.heartbeat(worker_id, now=now, load=LoadReport(**load))


def least_loaded(registry: CapabilityRegistry, count: int, now: float = T0) -> list[str | None]:
    answers: list[str | None] = []
    for _ in range(count):
        endpoint = registry.route(*KEY, now=now, options=LEAST_LOADED)
        answers.append(None if endpoint is None else endpoint.worker_id)
    return answers


# ------------------------------------------------------------- load reports


def test_a_heartbeat_keeps_its_load_report_with_its_time_until_the_next_report() -> None:
    registry = fleet("w1", "w2")
    report(registry, "w1", in_flight=3, latency_p95_ms=41.5, error_rate=0.02)
    view = registry.get_worker("w1", now=T0)
    assert view is not None
    assert view.load == LoadReport(in_flight=3, latency_p95_ms=41.5, error_rate=0.02)
    assert view.load_reported_at == T0
    # A heartbeat without load leaves the report as it was.
    registry.heartbeat("w1", now=T0 + 5)
    view = registry.get_worker("w1", now=T0 + 5)
    assert view is not None and (view.load, view.load_reported_at) == (
        LoadReport(in_flight=3, latency_p95_ms=41.5, error_rate=0.02),
        T0,
    )
    # A new report replaces it whole.
    report(registry, "w1", now=T0 + 10, in_flight=1)
    view = registry.get_worker("w1", now=T0 + 10)
    assert view is not None
    assert (view.load, view.load_reported_at) == (LoadReport(in_flight=1), T0 + 10)
    other = registry.get_worker("w2", now=T0)
    assert other is not None and (other.load, other.load_reported_at) == (None, None)


def test_a_load_report_of_an_unknown_worker_is_refused_like_its_heartbeat() -> None:
    registry = fleet("w1")
    with pytest.raises(WorkerNotRegistered):
        report(registry, "ghost", in_flight=1)


def test_a_load_report_is_not_a_change_and_not_journalled() -> None:
    registry = fleet("w1")
    revision = registry.revision
    events = registry.heartbeat("w1", now=T0 + 1, load=LoadReport(in_flight=2))
    assert registry.revision == revision
    assert all("load" not in repr(event) for event in events)


@pytest.mark.parametrize(
    ("load", "path", "message"),
    [
        ({"in_flight": -1}, "load.in_flight", ">= 0"),
        ({"in_flight": 1.5}, "load.in_flight", "integer"),
        ({"in_flight": True}, "load.in_flight", "integer"),
        ({"latency_p95_ms": -0.1}, "load.latency_p95_ms", ">= 0"),
        ({"latency_p95_ms": "5"}, "load.latency_p95_ms", "number"),
        ({"error_rate": 1.5}, "load.error_rate", "between 0 and 1"),
        ({"queue": 3}, "load.queue", "unknown field"),
        ([1], "load", "object"),
    ],
)
def test_a_bad_load_is_refused_naming_its_field(load: Any, path: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        structure({"worker_id": "w1", "load": load}, HeartbeatRequest)
    (problem,) = caught.value.problems
    assert (problem.path, message in problem.message) == (path, True)


def test_every_load_field_is_optional() -> None:
    beat = structure({"worker_id": "w1", "load": {}}, HeartbeatRequest)
    assert beat.load == LoadReport()
    assert structure({"worker_id": "w1"}, HeartbeatRequest).load is None


# ------------------------------------------------------------- least_loaded


def test_least_loaded_sends_at_least_twice_as_much_to_the_least_loaded_third() -> None:
    workers = [f"w{index}" for index in range(10)]
    registry = fleet(*workers, seed=12, max_concurrency=100)
    counts: collections.Counter[str | None] = collections.Counter()
    now = T0
    for _ in range(300):
        # Each worker reports its (unequal) load every round; ten routes per round.
        now += 1
        for index, worker_id in enumerate(workers):
            report(registry, worker_id, now=now, in_flight=3 * index)
        counts.update(least_loaded(registry, 10, now=now))
    least, most = workers[:3], workers[-3:]
    to_least = sum(counts[w] for w in least)
    to_most = sum(counts[w] for w in most)
    assert sum(counts.values()) == 3000
    assert to_least >= 2 * to_most, (to_least, to_most, counts)


def test_routes_handed_out_count_toward_the_load_until_the_next_report() -> None:
    registry = fleet("a", "b")
    report(registry, "a", in_flight=0)
    report(registry, "b", in_flight=0)
    # Two candidates: both are drawn; each hand-out tips the balance. Ties go to "a".
    assert least_loaded(registry, 4) == ["a", "b", "a", "b"]
    # a reports 3 in flight, which includes what it was given: a's count restarts
    # at 3, b's stays 0 + its 2 hand-outs, so b first, then a tie (3 each): a.
    report(registry, "a", in_flight=3)
    assert least_loaded(registry, 4) == ["b", "a", "b", "a"]
    # b reports 0: its hand-outs are gone; a stands at 3 + 2, so b takes five in a row.
    report(registry, "b", in_flight=0)
    assert least_loaded(registry, 6) == ["b"] * 5 + ["a"]


def test_hand_outs_to_a_worker_without_in_flight_fade_after_a_heartbeat_interval() -> None:
    registry = fleet("a", "b")
    report(registry, "b", in_flight=1)
    assert least_loaded(registry, 3) == ["a", "a", "b"]  # a: 0, then 1 (tie: a), then 2
    # Past one heartbeat interval a's hand-outs no longer count; b's do (no report since).
    later = T0 + POLICY.heartbeat_interval + 1
    assert least_loaded(registry, 1, now=later) == ["a"]


def test_a_gateways_counted_calls_do_not_fade_and_are_not_added_to_a_report() -> None:
    registry = fleet("a", "b")
    registry.count_calls("a", 3)
    later = T0 + 5 * POLICY.heartbeat_interval  # long past any hand-out's fading
    assert least_loaded(registry, 3, now=later) == ["b", "b", "b"]
    # A report of 3 counts the same calls: a stands at max(3, 3), b at 3 hand-outs: a tie, a.
    report(registry, "a", now=later, in_flight=3)
    assert least_loaded(registry, 1, now=later) == ["a"]
    registry.count_calls("a", 0)
    report(registry, "a", now=later, in_flight=0)
    assert least_loaded(registry, 1, now=later) == ["a"]


def test_counted_calls_outlast_the_workers_registering_again() -> None:
    # A worker registers again (a restarted controller asked it to, or it
    # changed its capabilities) while this process has calls in flight to
    # it: those calls are still in flight, and least_loaded still counts them.
    registry = fleet("a", "b")
    registry.count_calls("a", 3)
    registry.register("a", "https://a:8443", [capability()], now=T0 + 1)
    later = T0 + 5 * POLICY.heartbeat_interval  # long past any hand-out's fading
    assert least_loaded(registry, 3, now=later) == ["b", "b", "b"]
    registry.count_calls("a", 0)
    assert least_loaded(registry, 1, now=later) == ["a"]


def test_counted_calls_of_an_unknown_worker_are_ignored_and_a_bad_count_refused() -> None:
    registry = fleet("a")
    registry.count_calls("gone", 2)
    registry.count_calls("a", 0)  # nothing to count: no load record made
    assert registry.get_worker("a", now=T0).load is None  # type: ignore[union-attr]
    with pytest.raises(ValidationError, match="calls"):
        registry.count_calls("a", -1)


def test_the_concurrency_limits_are_each_capabilitys() -> None:
    registry = CapabilityRegistry(POLICY)
    both = [capability(max_concurrency=2), capability("text.embed", "embed", max_concurrency=8)]
    registry.register("w1", "https://w1:8443", both, now=T0)
    assert registry.concurrency_limits("w1") == ((KEY, 2), (("embed", "text.embed"), 8))
    assert registry.concurrency_limits("gone") == ()


def test_a_workers_capability_is_its_own_registration_of_the_pair() -> None:
    registry = CapabilityRegistry(POLICY)
    old = capability(version="1.0.0", input_schema={"type": "object", "required": ["url"]})
    new = capability(version="2.0.0", input_schema={"type": "object", "required": ["png"]})
    embed = capability("text.embed", "embed")
    registry.register("w1", "https://w1:8443", [embed, old], now=T0)
    registry.register("w2", "https://w2:8443", [new], now=T0)
    assert registry.capability_of("w1", *KEY) == old
    assert registry.capability_of("w2", *KEY) == new
    assert registry.capability_of("w1", "embed", "text.embed") == embed
    assert registry.capability_of("w2", "embed", "text.embed") is None
    assert registry.capability_of("gone", *KEY) is None


def test_least_loaded_is_deterministic_for_a_seed() -> None:
    loads = {f"w{index}": index % 4 for index in range(8)}

    def run(seed: int) -> list[str | None]:
        registry = fleet(*loads, seed=seed, max_concurrency=100)
        for worker_id, in_flight in loads.items():
            report(registry, worker_id, in_flight=in_flight)
        return least_loaded(registry, 50)

    assert run(3) == run(3)
    assert run(3) != run(4)


@pytest.mark.parametrize("seed", range(20))
def test_the_sampled_path_chooses_only_among_the_full_paths_candidates(seed: int) -> None:
    # A route with no other option draws from the ring (sample_least_loaded); explain
    # takes the full path. Fleets with silent workers and some at capacity.
    draw = random.Random(seed)
    workers = [f"w{index}" for index in range(draw.randint(2, 12))]
    registry = fleet(*workers, seed=seed, max_concurrency=3)
    later = T0 + 61  # past unhealthy_after for the workers not heard since T0
    for worker_id in workers:
        if draw.random() < 0.7:
            report(registry, worker_id, now=T0 + 30, in_flight=draw.randint(0, 4))
    explanation = registry.explain_route(*KEY, now=later, options=LEAST_LOADED)[1]
    allowed: set[str | None] = set(explanation.candidates) if explanation.candidates else {None}
    assert set(least_loaded(registry, 30, now=later)) <= allowed


def test_least_loaded_with_one_candidate_returns_it() -> None:
    registry = fleet("only")
    assert least_loaded(registry, 2) == ["only", "only"]


# -------------------------------------------------------------- at_capacity


def test_a_worker_at_capacity_is_not_a_candidate_while_another_is_not() -> None:
    registry = fleet("full", "busy", "idle", max_concurrency=4)
    report(registry, "full", in_flight=4)
    report(registry, "busy", in_flight=3)
    endpoint, explanation = registry.explain_route(*KEY, now=T0, options=LEAST_LOADED)
    assert explanation.strategy == "least_loaded"
    assert set(explanation.candidates) == {"busy", "idle"}
    assert [(r.worker_id, r.reason) for r in explanation.removed] == [("full", "at_capacity")]
    assert endpoint is not None and endpoint.worker_id in {"busy", "idle"}
    assert "full" not in least_loaded(registry, 20)


def test_when_every_candidate_is_at_capacity_they_all_stay() -> None:
    registry = fleet("a", "b", max_concurrency=2)
    report(registry, "a", in_flight=2)
    report(registry, "b", in_flight=5)
    explanation = registry.explain_route(*KEY, now=T0, options=LEAST_LOADED)[1]
    assert (set(explanation.candidates), explanation.removed) == ({"a", "b"}, ())
    assert least_loaded(registry, 1) == ["a"]


def test_at_capacity_uses_the_routed_capabilitys_max_concurrency() -> None:
    registry = CapabilityRegistry(POLICY, rng=random.Random(0))
    both = [capability(max_concurrency=2), capability("text.embed", "embed", max_concurrency=8)]
    registry.register("w1", "https://w1:8443", both, now=T0)
    registry.register("w2", "https://w2:8443", both, now=T0)
    report(registry, "w1", in_flight=4)
    classify = registry.explain_route(*KEY, now=T0, options=LEAST_LOADED)[1]
    embed = registry.explain_route("embed", "text.embed", now=T0, options=LEAST_LOADED)[1]
    assert [(r.worker_id, r.reason) for r in classify.removed] == [("w1", "at_capacity")]
    assert (set(embed.candidates), embed.removed) == ({"w1", "w2"}, ())


def test_at_capacity_is_a_rule_of_least_loaded_only() -> None:
    registry = fleet("full", "idle", max_concurrency=1)
    report(registry, "full", in_flight=1)
    round_robin = RouteOptions(strategy="round_robin")
    explanation = registry.explain_route(*KEY, now=T0, options=round_robin)[1]
    assert (set(explanation.candidates), explanation.removed) == ({"full", "idle"}, ())


# ------------------------------------------------------------- observed SLO


def test_an_observed_latency_beats_the_declared_slo_while_the_report_is_fresh() -> None:
    declared = {"latency_p95_ms": 50.0, "availability": 0.999}
    registry = fleet("w1", slo=declared)
    bound = RouteOptions(slo_constraints={"latency_p95_ms": 100})
    assert registry.route(*KEY, now=T0, options=bound) is not None
    report(registry, "w1", latency_p95_ms=180.0)
    explanation = registry.explain_route(*KEY, now=T0 + 1, options=bound)[1]
    assert [(r.worker_id, r.reason) for r in explanation.removed] == [("w1", "slo")]
    # The other keys stay as declared.
    worker = registry._workers["w1"]
    slo = effective_slo(worker, worker.capabilities[0], now=T0 + 1, fresh_for=60)
    assert slo == {"latency_p95_ms": 180.0, "availability": 0.999}
    # A report as old as unhealthy_after is no longer an observation: the declared SLO is back.
    registry.heartbeat("w1", now=T0 + 60)
    assert registry.route(*KEY, now=T0 + 60, options=bound) is not None


def test_an_observed_latency_gives_a_worker_without_a_declared_slo_a_value() -> None:
    registry = fleet("w1")
    bound = RouteOptions(slo_constraints={"latency_p95_ms": 100})
    assert registry.route(*KEY, now=T0, options=bound) is None
    report(registry, "w1", latency_p95_ms=20.0, in_flight=0)
    endpoint = registry.route(*KEY, now=T0, options=bound)
    assert endpoint is not None and endpoint.worker_id == "w1"
    # A report without latency observes nothing.
    report(registry, "w1", now=T0 + 1, in_flight=1)
    assert registry.route(*KEY, now=T0 + 1, options=bound) is None


# ------------------------------------------- options compose with load (property)

loads = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "in_flight": st.integers(0, 6),
        "latency_p95_ms": st.sampled_from([10.0, 150.0, 400.0]),
    },
)


def observed(spec: dict[str, Any], load: dict[str, Any] | None) -> dict[str, Any]:
    """The worker's spec with its effective SLO: a fresh report's latency beats the declared."""
    if load is None or "latency_p95_ms" not in load:
        return spec
    return {**spec, "slo": {**(spec["slo"] or {}), "latency_p95_ms": load["latency_p95_ms"]}}


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    specs=st.lists(st.tuples(worker_specs, loads), min_size=1, max_size=8),
    asked=st.lists(route_options, min_size=1, max_size=4),
    least=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_options_with_load_reports_agree_with_a_plain_model(
    specs: list[tuple[dict[str, Any], dict[str, Any] | None]],
    asked: list[dict[str, Any]],
    least: list[bool],
) -> None:
    registry = CapabilityRegistry(POLICY, rng=random.Random(1))
    for index, (spec, _) in enumerate(specs):
        fields: dict[str, Any] = {"version": spec["version"], "max_concurrency": 4}
        if spec["cost"] is not None:
            fields["cost_tokens_per_invocation"] = spec["cost"]
        if spec["slo"] is not None:
            fields["slo"] = spec["slo"]
        registry.register(f"w{index}", f"https://w{index}:1", [capability(**fields)], now=T0)
    for index, (spec, load) in enumerate(specs):
        if not spec["silent"]:
            report_of = None if load is None else LoadReport(**load)
            registry.heartbeat(f"w{index}", now=T0 + 30, load=report_of)
    now = T0 + 61  # the silent ones are past unhealthy_after; the reports are 31 s old
    by_id = {f"w{index}": pair for index, pair in enumerate(specs)}
    for drawn, least_loaded_asked in zip(asked, least, strict=False):
        options = dict(drawn)
        if least_loaded_asked:
            options["strategy"] = "least_loaded"
        if options.get("strategy") == "affinity":
            options["affinity_key"] = "key"
        reasons = {
            w: model_reason(observed(spec, load if not spec["silent"] else None), w, options)
            for w, (spec, load) in by_id.items()
        }
        passed = {w for w, reason in reasons.items() if reason is None}
        if "budget_tokens" in options and passed:
            cheapest = min(by_id[w][0]["cost"] or 0.0 for w in passed)
            for w in passed:
                if (by_id[w][0]["cost"] or 0.0) > cheapest:
                    reasons[w] = "budget"
        if options.get("strategy") == "least_loaded":
            passed = {w for w, reason in reasons.items() if reason is None}
            full = {w for w in passed if ((by_id[w][1] or {}).get("in_flight") or 0) >= 4}
            if full and full != passed:
                reasons.update(dict.fromkeys(full, "at_capacity"))
        endpoint, explanation = registry.explain_route(
            *KEY, now=now, options=RouteOptions(**options)
        )
        assert {e.worker_id: e.reason for e in explanation.removed} == {
            w: r for w, r in reasons.items() if r is not None
        }
        assert set(explanation.candidates) == {w for w, r in reasons.items() if r is None}
        chosen_id = None if endpoint is None else endpoint.worker_id
        assert (chosen_id is None) == (not explanation.candidates)
        assert chosen_id is None or chosen_id in explanation.candidates
        plain = registry.route(*KEY, now=now, options=RouteOptions(**options))
        assert (plain is None) == (endpoint is None)
        assert plain is None or plain.worker_id in explanation.candidates
