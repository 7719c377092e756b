"""Properties of the converter: round-trips, and nothing but ValidationError on bad input."""

from __future__ import annotations

import json
import string
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crank_registry
from crank_registry import (
    EVENT_TYPES,
    AccessRules,
    CapabilityRegistry,
    CapabilitySchema,
    CapabilityView,
    Change,
    DeregisterRequest,
    EjectionSettings,
    Event,
    HealthPolicy,
    HealthState,
    HeartbeatReceived,
    HeartbeatRequest,
    LoadReport,
    PolicyChanged,
    PolicyRule,
    Problem,
    Registration,
    RegistryChange,
    Reinstatement,
    RouteRequest,
    SelfPreservationChanged,
    SelfPreservationSettings,
    ServiceLevel,
    SloFile,
    SlosChanged,
    Snapshot,
    ValidationError,
    WorkerChange,
    WorkerDeregistered,
    WorkerDraining,
    WorkerEjected,
    WorkerEndpoint,
    WorkerEvicted,
    WorkerHealthy,
    WorkerImported,
    WorkerRecord,
    WorkerRegistered,
    WorkerRestored,
    WorkerUndrained,
    WorkerUnhealthy,
    WorkerView,
    structure,
    structure_event,
    unstructure,
    unstructure_event,
)
from tests.builders import capability_payload
from tests.core.helpers import T0

SETTINGS = settings(
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
# Each payload mutation test builds a valid model first: fewer, richer examples.
MUTATION_SETTINGS = settings(SETTINGS, max_examples=60)

# ------------------------------------------------------------------ strategies

finite_floats = st.floats(allow_nan=False, allow_infinity=False)
json_scalars = st.none() | st.booleans() | st.integers() | finite_floats | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=3)

texts = st.text(string.ascii_letters + string.digits + "._-: /", min_size=1, max_size=20).filter(
    str.strip
)
numbers = st.integers(0, 10**6).map(str)
versions = st.builds(
    lambda major, minor, patch, pre: f"{major}.{minor}.{patch}{pre}",
    numbers,
    numbers,
    numbers,
    st.sampled_from(["", "-alpha.1", "+build.7", "-rc.1+sha.5"]),
)
worker_ids = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=128)
worker_urls = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(["http", "https"]),
    st.sampled_from(["w1", "10.0.0.1", "[::1]", "worker.example.com"]),
    st.sampled_from(["", ":1", ":8443", ":65535"]),
    st.sampled_from(["", "/", "/base/path"]),
)
timestamps = st.floats(min_value=0, max_value=4e9, allow_nan=False)
slos = st.fixed_dictionaries(
    {},
    optional={
        "latency_p95_ms": st.floats(min_value=0.001, max_value=1e6),
        "availability": st.floats(min_value=0, max_value=1),
        "error_budget_pct": st.floats(min_value=0, max_value=100),
    },
)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


verbs = texts.filter(lambda t: ":" not in t)  # "verb:name" must stay unambiguous

capabilities = st.builds(
    CapabilitySchema,
    name=texts,
    verb=verbs,
    version=versions,
    input_schema=json_objects,
    output_schema=json_objects,
    requires_gpu=st.booleans(),
    max_concurrency=st.integers(1, 2**40),
    runtime=optional(texts),
    env_profile=optional(texts),
    constraints=optional(json_objects),
    slo=optional(slos),
    spiffe_id=optional(texts.map(lambda t: "spiffe://" + t)),
    required_capabilities=optional(st.lists(texts, max_size=3).map(tuple)),
    cost_tokens_per_invocation=optional(st.floats(min_value=0, max_value=1e12)),
    slo_bid=optional(json_objects),
    controller_affinity=optional(texts),
)
capability_tuples = st.lists(capabilities, min_size=1, max_size=2, unique_by=lambda c: c.key).map(
    tuple
)
registrations = st.builds(Registration, worker_ids, worker_urls, capability_tuples)
records = st.builds(
    WorkerRecord,
    worker_ids,
    worker_urls,
    capability_tuples,
    timestamps,
    st.booleans(),
    st.booleans(),
    st.booleans(),
    ejected_until=optional(timestamps),
    ejections=optional(st.integers(1, 100)),
    ejection_ended=optional(timestamps),
)
revisions = st.integers(1, 2**53)
endpoints = st.builds(WorkerEndpoint, worker_ids, worker_urls, versions)
specifiers = st.lists(
    st.builds(
        lambda operator, version: f"{operator}{version}",
        st.sampled_from([">=", "<=", ">", "<", "==", "!=", "~="]),
        versions.filter(lambda v: "+" not in v),
    ),
    min_size=1,
    max_size=3,
).map(",".join)
slo_constraints = st.fixed_dictionaries(
    {},
    optional={
        "latency_p95_ms": st.floats(min_value=0, max_value=1e6),
        "availability": st.floats(min_value=0, max_value=1),
    },
).filter(bool)
strategies = st.sampled_from([(None, None), ("round_robin", None), ("least_loaded", None)]) | (
    texts.map(lambda key: ("affinity", key))
)
route_requests = st.builds(
    lambda strategy, **fields: RouteRequest(
        strategy=strategy[0], affinity_key=strategy[1], **fields
    ),
    strategies,
    verb=texts,
    capability=texts,
    requester_identity=optional(texts),
    slo_constraints=optional(slo_constraints),
    budget_tokens=optional(st.floats(min_value=0, max_value=1e9)),
    idempotency_key=optional(texts),
    version=optional(specifiers),
    exclude=optional(st.lists(worker_ids, max_size=3).map(tuple)),
    explain=optional(st.booleans()),
)
policies = st.tuples(st.floats(0.001, 1e6), st.floats(0.001, 1e6), st.floats(0.001, 1e6)).map(
    lambda t: HealthPolicy(*sorted(t))
)
load_reports = st.builds(
    LoadReport,
    in_flight=optional(st.integers(0, 2**40)),
    latency_p95_ms=optional(st.floats(min_value=0, max_value=1e9)),
    error_rate=optional(st.floats(min_value=0, max_value=1)),
)
views = st.builds(
    WorkerView,
    worker_ids,
    worker_urls,
    timestamps,
    st.sampled_from(HealthState),
    st.booleans(),
    capability_tuples,
    st.booleans(),
    optional(load_reports),
    optional(timestamps),
    ejected_until=optional(timestamps),
)
capability_views = st.builds(
    CapabilityView,
    texts,
    texts,
    versions,
    st.lists(worker_ids, max_size=3).map(tuple),
    st.lists(worker_ids, max_size=3).map(tuple),
)
slo_values = st.fixed_dictionaries(
    {},
    optional={
        "latency_p95_ms": st.floats(min_value=0.001, max_value=1e6),
        "availability": st.floats(min_value=0, max_value=1),
        "error_budget_pct": st.floats(min_value=0, max_value=100),
    },
).filter(bool)  # a file states at least one value
service_levels = st.builds(
    lambda values, **fields: ServiceLevel(**fields, **values),
    slo_values,
    verb=verbs,
    capability=texts,
    version=optional(specifiers),
)
globs = st.lists(texts, min_size=1, max_size=2).map(tuple)
policy_rules = st.builds(PolicyRule, identity=texts, allow=globs, deny=optional(globs)) | (
    st.builds(PolicyRule, identity=texts, deny=globs)
)
access_rules = st.builds(
    AccessRules,
    rules=st.lists(policy_rules, max_size=3).map(tuple),
    default=st.sampled_from(["allow", "deny"]),
    trust_domain=st.sampled_from(["crank.local", "example.org"]),
)
slo_files = st.lists(st.builds(SloFile, file=texts, slo=service_levels), max_size=3).map(tuple)
reinstatements = st.builds(
    Reinstatement,
    worker_ids,
    st.sampled_from((HealthState.HEALTHY, HealthState.UNVERIFIED)),
    timestamps,
)
MODEL_STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    CapabilitySchema: capabilities,
    Registration: registrations,
    WorkerRecord: records,
    WorkerEndpoint: endpoints,
    RouteRequest: route_requests,
    HealthPolicy: policies,
    WorkerView: views,
    CapabilityView: capability_views,
    HeartbeatRequest: st.builds(HeartbeatRequest, worker_ids, load=optional(load_reports)),
    LoadReport: load_reports,
    DeregisterRequest: st.builds(DeregisterRequest, worker_ids),
    Problem: st.builds(Problem, st.text(max_size=10), st.text(max_size=10)),
    ServiceLevel: service_levels,
    Snapshot: st.builds(
        Snapshot,
        st.integers(0, 2**53),
        st.lists(records, max_size=3).map(tuple),
        access_policy=optional(access_rules),
        slos=slo_files,
        self_preservation=optional(timestamps),
    ),
    AccessRules: access_rules,
    Reinstatement: reinstatements,
    SelfPreservationSettings: st.builds(
        SelfPreservationSettings,
        threshold=st.floats(0, 0.99),
        max_duration=optional(st.floats(0.001, 1e6)),
        min_workers=st.integers(1, 10**6),
    ),
    EjectionSettings: st.builds(
        EjectionSettings,
        after_failures=st.integers(0, 10**6),
        max_ejected_percent=st.floats(0, 100),
    ),
}
EVENT_STRATEGIES: dict[type[Event], st.SearchStrategy[Any]] = {
    WorkerRegistered: st.builds(
        WorkerRegistered,
        worker_ids,
        worker_urls,
        capability_tuples,
        timestamps,
        st.booleans(),
        revision=revisions,
    ),
    HeartbeatReceived: st.builds(HeartbeatReceived, worker_ids, timestamps),
    WorkerDeregistered: st.builds(WorkerDeregistered, worker_ids, timestamps, revision=revisions),
    WorkerUnhealthy: st.builds(
        WorkerUnhealthy, worker_ids, timestamps, timestamps, revision=revisions
    ),
    WorkerHealthy: st.builds(WorkerHealthy, worker_ids, timestamps, revision=revisions),
    WorkerDraining: st.builds(WorkerDraining, worker_ids, timestamps, revision=revisions),
    WorkerUndrained: st.builds(WorkerUndrained, worker_ids, timestamps, revision=revisions),
    WorkerEvicted: st.builds(WorkerEvicted, worker_ids, timestamps, timestamps, revision=revisions),
    WorkerImported: st.builds(
        WorkerImported,
        worker_ids,
        worker_urls,
        capability_tuples,
        timestamps,
        texts,
        revision=revisions,
    ),
    SlosChanged: st.builds(SlosChanged, timestamps, slo_files, revision=revisions),
    PolicyChanged: st.builds(PolicyChanged, timestamps, access_rules, revision=revisions),
    SelfPreservationChanged: st.builds(
        SelfPreservationChanged,
        timestamps,
        st.booleans(),
        st.sampled_from(["workers_fell_silent", "heartbeats_returned", "max_duration"]),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
        st.lists(reinstatements, max_size=3).map(tuple),
        revision=revisions,
    ),
    WorkerEjected: st.builds(
        WorkerEjected,
        worker_ids,
        timestamps,
        timestamps,
        texts,
        texts,
        st.floats(0, 100),
        st.integers(1, 100),
        revision=revisions,
    ),
    WorkerRestored: st.builds(
        WorkerRestored, worker_ids, timestamps, timestamps, revision=revisions
    ),
}
models = st.one_of(*MODEL_STRATEGIES.values())
events = st.one_of(*EVENT_STRATEGIES.values())

# ------------------------------------------------------------------- round trips


@SETTINGS
@given(models)
def test_every_model_round_trips(value: Any) -> None:
    data = unstructure(value)
    assert structure(data, type(value)) == value
    assert structure(json.loads(json.dumps(data, allow_nan=False)), type(value)) == value


@SETTINGS
@given(events)
def test_every_event_round_trips(event: Event) -> None:
    data = unstructure_event(event)
    assert data["type"] in EVENT_TYPES and EVENT_TYPES[data["type"]] is type(event)
    assert structure_event(data) == event
    assert structure_event(json.loads(json.dumps(data, allow_nan=False))) == event


def test_the_strategies_cover_every_public_model_and_event() -> None:
    public = [getattr(crank_registry, name) for name in crank_registry.__all__]
    # Not drawn here: the journal's values are the journal tests' business, the
    # health table's rows test_health's, the wire answers (and the gateway's
    # request, the listings' query) test_wire's, the listings' pages test_listing's.
    elsewhere = {
        crank_registry.ListingQuery,
        crank_registry.WorkersPage,
        crank_registry.CapabilitiesPage,
        crank_registry.Counts,
        crank_registry.ReplayResult,
        crank_registry.SkippedLine,
        crank_registry.RefusedCapability,  # tests/journal/test_schema_check.py
        crank_registry.SnapshotPart,
        crank_registry.EpochLine,  # tests/journal/test_epoch.py
        crank_registry.WatchQuery,  # its parse: tests/service/test_feed.py
        crank_registry.Transition,
        crank_registry.Refusal,
        crank_registry.ExecuteRequest,
        # The idempotency store's values: tests/core/test_idempotency.py.
        crank_registry.KeptAnswer,
        crank_registry.Run,
        crank_registry.Replay,
        crank_registry.Running,
        crank_registry.Reused,
        # In-process values of the routing options: tests/core/test_routing.py.
        crank_registry.RouteOptions,
        crank_registry.RoutingSettings,
        # The access policy's values: tests/core/test_policy.py.
        crank_registry.BuiltinPolicy,
        crank_registry.Decision,
        crank_registry.PolicyRule,
        crank_registry.PolicyRules,
        crank_registry.RateLimit,  # tests/core/test_admission.py
        *(crank_registry.ANSWER_TYPES - MODEL_STRATEGIES.keys()),
    }
    everything = {obj for obj in public if isinstance(obj, type) and attrs.has(obj)}
    assert elsewhere <= everything
    attrs_classes = everything - elsewhere
    assert set(EVENT_STRATEGIES) == set(EVENT_TYPES.values())
    assert set(MODEL_STRATEGIES) == {c for c in attrs_classes if not issubclass(c, Event)}
    assert {c for c in attrs_classes if issubclass(c, Event)} == set(EVENT_TYPES.values()) | {
        Event,
        Change,
        WorkerChange,
        RegistryChange,
    }


# ---------------------------------------------------- only ValidationError, ever

TARGETS = [
    Registration,
    RouteRequest,
    HeartbeatRequest,
    LoadReport,
    DeregisterRequest,
    CapabilitySchema,
    WorkerRecord,
    WorkerView,
    HealthPolicy,
    ServiceLevel,
]


def structure_or_validation_error(data: Any, cls: Any) -> None:
    try:
        result = structure(data, cls)
    except ValidationError as error:
        assert error.problems
        assert all(isinstance(p.path, str) and p.message for p in error.problems)
    else:
        assert isinstance(result, cls)


def structure_event_or_validation_error(data: Any) -> None:
    try:
        result = structure_event(data)
    except ValidationError as error:
        assert error.problems
    else:
        assert isinstance(result, Event)


@pytest.mark.parametrize("cls", TARGETS, ids=lambda cls: cls.__name__)
@SETTINGS
@given(data=json_values)
def test_arbitrary_json_gives_only_validation_errors(cls: Any, data: Any) -> None:
    structure_or_validation_error(data, cls)


@SETTINGS
@given(data=json_values)
def test_arbitrary_json_events_give_only_validation_errors(data: Any) -> None:
    structure_event_or_validation_error(data)


@st.composite
def mutated(draw: st.DrawFn, source: st.SearchStrategy[Any]) -> Any:
    """A valid JSON payload with a few changes: values replaced, keys dropped or added."""
    payload = json.loads(json.dumps(draw(source)))
    for _ in range(draw(st.integers(1, 3))):
        # Walk to a random container inside the payload.
        node = payload
        while True:
            children = (
                list(node.values())
                if isinstance(node, dict)
                else node
                if isinstance(node, list)
                else []
            )
            containers = [c for c in children if isinstance(c, (dict, list))]
            if not containers or draw(st.booleans()):
                break
            node = draw(st.sampled_from(containers))
        if isinstance(node, dict):
            action = draw(st.sampled_from(["replace", "drop", "add"]))
            if action == "add" or not node:
                node[draw(st.text(max_size=8))] = draw(json_values)
            elif action == "drop":
                del node[draw(st.sampled_from(sorted(node)))]
            else:
                node[draw(st.sampled_from(sorted(node)))] = draw(
                    json_values | st.sampled_from(["4", "yes", 1, 0, True, 10**400, -1, "", []])
                )
        elif isinstance(node, list) and node:
            node[draw(st.integers(0, len(node) - 1))] = draw(json_values)
    return payload


MUTATION_SOURCES = {
    Registration: registrations.map(unstructure),
    RouteRequest: route_requests.map(unstructure),
    HeartbeatRequest: st.builds(HeartbeatRequest, worker_ids).map(unstructure),
    CapabilitySchema: capabilities.map(unstructure),
    WorkerRecord: records.map(unstructure),
    WorkerView: views.map(unstructure),
}


@pytest.mark.parametrize("cls", list(MUTATION_SOURCES), ids=lambda cls: cls.__name__)
@MUTATION_SETTINGS
@given(data=st.data())
def test_mutated_payloads_give_only_validation_errors(cls: Any, data: st.DataObject) -> None:
    payload = data.draw(mutated(MUTATION_SOURCES[cls]))
    structure_or_validation_error(payload, cls)


@MUTATION_SETTINGS
@given(data=mutated(events.map(unstructure_event)))
def test_mutated_events_give_only_validation_errors(data: Any) -> None:
    structure_event_or_validation_error(data)


snapshots = st.lists(records, max_size=3).map(
    lambda rs: {"format_version": 1, "workers": unstructure(rs)}
)


@MUTATION_SETTINGS
@given(state=json_values | snapshots | mutated(snapshots))
def test_import_of_any_state_raises_only_validation_error_and_then_changes_nothing(
    state: Any,
) -> None:
    registry = CapabilityRegistry()
    registry.register(
        "w1", "https://w1:1", [structure(capability_payload(), CapabilitySchema)], now=T0
    )
    before = registry.export_state()
    try:
        registry.import_remote_state("peer", state, now=T0)
    except ValidationError as error:
        assert error.problems
        assert registry.export_state() == before
