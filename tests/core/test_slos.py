"""SLO files in the core: the model's checks, the index, and their place in the effective SLO."""

from __future__ import annotations

import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crank_registry import (
    CapabilitySchema,
    Health,
    LoadReport,
    ServiceLevel,
    ServiceLevels,
    SloFile,
    ValidationError,
    WorkerEndpoint,
    effective_slo,
    structure,
)
from crank_registry._records import Load, Member, Worker
from crank_registry._routing import meeting_slo, misses_slo
from tests.builders import capability
from tests.core.helpers import T0
from tests.core.test_routing import KEY, chosen, explained, fleet, removed


def slo_file(file: str, **fields: Any) -> SloFile:
    """An SLO file of ``classify:image.classify``, its content read through the converter."""
    content = {"verb": "classify", "capability": "image.classify", **fields}
    return SloFile(file=file, slo=structure(content, ServiceLevel))


def offered(capability: CapabilitySchema, slos: ServiceLevels | None = None) -> dict[str, float]:
    """The effective SLO of a healthy worker offering ``capability`` under the files ``slos``."""
    worker = Worker("w1", "https://w1:8443", (capability,), Health.HEALTHY, T0, 0)
    if slos is None:
        return dict(effective_slo(worker, capability, now=T0, fresh_for=60.0))
    return dict(effective_slo(worker, capability, slos.of(capability.key), now=T0, fresh_for=60.0))


def test_a_file_beats_the_declared_slo_key_by_key() -> None:
    declared = capability(slo={"latency_p95_ms": 80, "availability": 0.99})
    slos = ServiceLevels([slo_file("classify.yaml", latency_p95_ms=300)])
    # The file's latency wins; the declared availability, which the file does not state, stays.
    assert offered(declared, slos) == {
        "latency_p95_ms": 300,
        "availability": 0.99,
    }
    # Without files, the declared SLO.
    assert offered(declared) == {
        "latency_p95_ms": 80,
        "availability": 0.99,
    }


def test_slo_constraints_check_the_file_over_the_declared_slo() -> None:
    registry = fleet(
        ("boasts", {"slo": {"latency_p95_ms": 50}}),
        ("honest", {"slo": {"latency_p95_ms": 200}}),
        ("silent", {}),
    )
    asked = {"slo_constraints": {"latency_p95_ms": 100}}
    assert set(chosen(registry, 4, **asked)) == {"boasts"}
    # The operator says this capability's p95 is 90 ms, whatever a worker declares.
    registry.set_slos([slo_file("classify.yaml", latency_p95_ms=90)], now=T0)
    assert set(chosen(registry, 6, **asked)) == {"boasts", "honest", "silent"}
    registry.set_slos([slo_file("classify.yaml", latency_p95_ms=150)], now=T0)
    assert chosen(registry, 1, **asked) == [None]
    assert removed(explained(registry, **asked)) == {
        "boasts": "slo",
        "honest": "slo",
        "silent": "slo",
    }
    # Taking the files away gives the declared values back.
    registry.set_slos([], now=T0)
    assert set(chosen(registry, 4, **asked)) == {"boasts"}


def test_a_file_with_a_version_applies_only_to_matching_workers() -> None:
    registry = fleet(
        ("v1", {"version": "1.4.0", "slo": {"availability": 0.999}}),
        ("v2", {"version": "2.1.0", "slo": {"availability": 0.999}}),
    )
    registry.set_slos([slo_file("classify-v2.yaml", version=">=2,<3", availability=0.9)], now=T0)
    asked = {"slo_constraints": {"availability": 0.99}}
    assert set(chosen(registry, 4, **asked)) == {"v1"}
    explanation = explained(registry, **asked)
    assert explanation.candidates == ("v1",)
    assert removed(explanation) == {"v2": "slo"}


def test_a_version_that_is_not_pep440_is_in_no_files_version_set() -> None:
    old = capability(version="1.0.0", slo={"availability": 0.5})
    # A record of an older journal may hold a semantic version packaging does not parse.
    legacy = capability(version="1.0.0-x.7.z.92", slo={"availability": 0.5})
    slos = ServiceLevels([slo_file("a.yaml", version=">=0", availability=0.99)])
    assert offered(old, slos) == {"availability": 0.99}
    assert offered(legacy, slos) == {"availability": 0.5}


def test_the_first_file_by_name_wins_where_version_sets_overlap() -> None:
    worker = capability(version="2.1.0")
    slos = ServiceLevels(
        [
            slo_file("b-all.yaml", latency_p95_ms=500),
            slo_file("a-v2.yaml", version=">=2", latency_p95_ms=100),
        ]
    )
    assert [f.file for f in slos.files] == ["a-v2.yaml", "b-all.yaml"]
    assert offered(worker, slos) == {"latency_p95_ms": 100}
    older = capability(version="1.0.0")
    assert offered(older, slos) == {"latency_p95_ms": 500}


def test_files_of_other_capabilities_do_not_apply() -> None:
    other = SloFile(
        file="other.yaml",
        slo=ServiceLevel(verb="summarize", capability="image.classify", latency_p95_ms=1),
    )
    worker = capability(slo={"latency_p95_ms": 80})
    assert offered(worker, ServiceLevels([other])) == {"latency_p95_ms": 80}


def test_two_files_for_the_same_capability_and_versions_are_refused_and_nothing_changes() -> None:
    registry = fleet(("w1", {}))
    registry.set_slos([slo_file("a.yaml", latency_p95_ms=10)], now=T0)
    with pytest.raises(ValidationError) as raised:
        registry.set_slos(
            [
                slo_file("b.yaml", availability=0.9),
                slo_file("c.yaml", latency_p95_ms=20),
            ],
            now=T0,
        )
    (problem,) = raised.value.problems
    assert problem.path == "c.yaml"
    assert "b.yaml states already" in problem.message
    assert [f.file for f in registry.slos] == ["a.yaml"]
    # Different version sets of one capability are fine.
    registry.set_slos(
        [
            slo_file("v1.yaml", version="<2", latency_p95_ms=10),
            slo_file("v2.yaml", version=">=2", latency_p95_ms=20),
        ],
        now=T0,
    )
    assert [f.file for f in registry.slos] == ["v1.yaml", "v2.yaml"]


@pytest.mark.parametrize(
    ("content", "problems"),
    [
        ({"latency_p95_ms": 100, "latency_p99_ms": 5}, {"latency_p99_ms": "unknown field"}),
        ({"latency_p95_ms": "100"}, {"latency_p95_ms": "must be a number"}),
        ({"latency_p95_ms": True}, {"latency_p95_ms": "must be a number"}),
        ({"latency_p95_ms": 0}, {"latency_p95_ms": "must be > 0"}),
        ({"availability": 1.5}, {"availability": "between 0 and 1"}),
        ({"error_budget_pct": -1}, {"error_budget_pct": "between 0 and 100"}),
        ({"version": "two", "availability": 0.9}, {"version": "PEP 440 specifier set"}),
        ({"version": 2, "availability": 0.9}, {"version": "must be a string"}),
        ({}, {"": "sets no SLO value"}),
        ({"verb": "a:b", "availability": 0.9}, {"verb": "must not contain ':'"}),
        ({"capability": "", "availability": 0.9}, {"capability": "must not be empty"}),
    ],
)
def test_a_service_level_is_checked_naming_each_field(
    content: dict[str, Any], problems: dict[str, str]
) -> None:
    data = {"verb": "classify", "capability": "image.classify", **content}
    with pytest.raises(ValidationError) as raised:
        structure(data, ServiceLevel)
    found = {problem.path: problem.message for problem in raised.value.problems}
    assert set(found) == set(problems), found
    for path, fragment in problems.items():
        assert fragment in found[path]


def test_verb_and_capability_are_required() -> None:
    with pytest.raises(ValidationError) as raised:
        structure({"availability": 0.9}, ServiceLevel)
    assert {p.path for p in raised.value.problems} == {"verb", "capability"}


def test_values_lists_the_keys_set_in_the_order_of_a_declared_slo() -> None:
    level = ServiceLevel(
        verb="classify", capability="image.classify", error_budget_pct=1, latency_p95_ms=5
    )
    assert level.values == {"latency_p95_ms": 5, "error_budget_pct": 1}
    assert level.key == KEY


def test_set_slos_takes_slo_files_only() -> None:
    registry = fleet(("w1", {}))
    with pytest.raises(ValidationError, match="expected SloFile values"):
        registry.set_slos([{"file": "a.yaml"}], now=T0)  # type: ignore[list-item]
    assert registry.slos == ()


# ------------------------------------------- the route's check, against the rule

_VERSIONS = ("1.0.0", "1.4.0", "2.1.0", "1.0.0-x.7.z.92")  # the last: an older journal's
_SPECIFIERS = (None, ">=1.4", "<2", "==1.0.0")
_LATENCIES = st.sampled_from((50.0, 100.0, 150))
_AVAILABILITIES = st.sampled_from((0.9, 0.99, 1))


def _slo_values() -> st.SearchStrategy[dict[str, float]]:
    return st.fixed_dictionaries(
        {}, optional={"latency_p95_ms": _LATENCIES, "availability": _AVAILABILITIES}
    )


@st.composite
def _members(draw: st.DrawFn) -> list[Member]:
    """Members of one pair: declared SLOs, versions and load reports (fresh, stale or none)."""
    values = [
        capability(version=draw(st.sampled_from(_VERSIONS)), slo=draw(_slo_values()) or None)
        for _ in range(draw(st.integers(1, 3)))
    ]
    members = []
    for index in range(draw(st.integers(1, 6))):
        value = draw(st.sampled_from(values))  # workers share values, as the registry stores them
        worker = Worker(f"w{index}", "https://w:8443", (value,), Health.HEALTHY, T0, index)
        if draw(st.booleans()):
            worker.load = Load()
            latency = draw(st.none() | _LATENCIES)
            # Fresh, exactly unhealthy_after (60 s) old (no longer fresh), or older.
            age = draw(st.sampled_from((0.0, 60.0, 61.0)))
            worker.load.reported(LoadReport(in_flight=1, latency_p95_ms=latency), T0 - age)
        endpoint = WorkerEndpoint(worker.worker_id, worker.worker_url, value.version)
        members.append(Member(worker, KEY, endpoint, value))
    return members


@st.composite
def _files(draw: st.DrawFn) -> ServiceLevels:
    """Up to four SLO files of the pair, in any order of names, overlapping version sets."""
    specifiers = draw(st.lists(st.sampled_from(_SPECIFIERS), unique=True, max_size=4))
    names = draw(st.permutations(string.ascii_lowercase[: len(specifiers)]))
    files = []
    for name, specifier in zip(names, specifiers, strict=True):
        values = draw(_slo_values().filter(bool))
        version = {} if specifier is None else {"version": specifier}
        files.append(slo_file(f"{name}.yaml", **version, **values))
    return ServiceLevels(files)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    members=_members(),
    slos=_files(),
    bounds=st.fixed_dictionaries(
        {}, optional={"latency_p95_ms": _LATENCIES, "availability": _AVAILABILITIES}
    ).filter(bool),
)
def test_a_routes_slo_check_keeps_the_workers_whose_effective_slo_meets_the_bounds(
    members: list[Member], slos: ServiceLevels, bounds: dict[str, float]
) -> None:
    # The plain rule: each worker's effective SLO (observed, else file, else declared).
    meets = [
        member
        for member in members
        if not misses_slo(
            effective_slo(member.worker, member.capability, slos.of(KEY), now=T0, fresh_for=60.0),
            bounds,
        )
    ]
    reasons: dict[str, str] = {}
    assert meeting_slo(members, bounds, slos.of(KEY), T0, 60.0, reasons) == meets
    assert reasons == {m.worker.worker_id: "slo" for m in members if m not in meets}
