"""Validation of the wire models, through the one strict converter."""

from __future__ import annotations

from typing import Any

import pytest

from crank_registry import (
    CapabilitySchema,
    DeregisterRequest,
    HealthPolicy,
    HeartbeatRequest,
    Problem,
    Registration,
    RegistryError,
    RouteRequest,
    ValidationError,
    WorkerRecord,
    capability_label,
    is_worker_id,
    parse_capability_label,
    structure,
)
from tests.builders import WORKER_URL, capability, capability_payload, registration_payload


def problems(data: Any, cls: type[Any]) -> list[str]:
    """The problems of structuring ``data`` as ``cls``, as ``path: message`` lines."""
    with pytest.raises(ValidationError) as caught:
        structure(data, cls)
    assert caught.value.problems, "a ValidationError must list at least one problem"
    return [str(problem) for problem in caught.value.problems]


def paths(data: Any, cls: type[Any]) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        structure(data, cls)
    return [problem.path for problem in caught.value.problems]


# ---------------------------------------------------------------- CapabilitySchema


def test_valid_capability_with_every_optional_field() -> None:
    payload = capability_payload(
        runtime="python3.12",
        env_profile="gpu-small",
        constraints={"region": "eu"},
        slo={"latency_p95_ms": 250, "availability": 0.999, "error_budget_pct": 0.5},
        spiffe_id="spiffe://crank.local/worker/w1",
        required_capabilities=["embed:text.embed"],
        cost_tokens_per_invocation=0,
        slo_bid={"max_latency_ms": 300},
        controller_affinity="eu-west",
    )
    schema = structure(payload, CapabilitySchema)
    assert schema.key == ("classify", "image.classify")
    assert schema.required_capabilities == ("embed:text.embed",)
    assert schema.cost_tokens_per_invocation == 0.0
    assert schema.slo == {"latency_p95_ms": 250, "availability": 0.999, "error_budget_pct": 0.5}


@pytest.mark.parametrize("field", ["requires_gpu", "max_concurrency", "name", "verb", "version"])
def test_capability_required_fields(field: str) -> None:
    payload = capability_payload()
    del payload[field]
    assert problems(payload, CapabilitySchema) == [f"{field}: is required"]


@pytest.mark.parametrize(
    "version",
    [
        "1.0.0",
        "0.0.0",
        "10.20.30",
        "1.0.0-alpha.1",
        "1.0.0+build.5",
        "1.0.0-rc.1+sha.1",
        "1",
        "1.0",
        "v1.0.0",
        "1.0.0.0",
        "2.0rc1",
        "1!2.0.post1.dev3+abc.1",
    ],
)
def test_pep440_versions_accepted(version: str) -> None:
    assert capability(version=version).version == version
    registration = registration_payload(capabilities=[capability_payload(version=version)])
    assert structure(registration, Registration).capabilities[0].version == version


@pytest.mark.parametrize(
    "version", ["latest", "1.0.0-", "", " 1.0.0", "1.0.0\n", "\u0661.\u0662.\u0663", "1.0.0-x.7"]
)
def test_versions_that_are_not_pep440_refused(version: str) -> None:
    [line] = problems(
        registration_payload(capabilities=[capability_payload(version=version)]), Registration
    )
    assert line.startswith("capabilities[0].version: must be a PEP 440 version"), line


def test_a_semantic_version_outside_pep440_is_refused_at_registration_but_read_back() -> None:
    # The rule of older journals: a record written under it still loads (DESIGN, "Versions").
    payload = capability_payload(version="1.0.0-x.7.z.92")
    assert structure(payload, CapabilitySchema).version == "1.0.0-x.7.z.92"
    record = {"worker_id": "w1", "worker_url": WORKER_URL, "capabilities": [payload]}
    assert structure({**record, "last_heartbeat": 1.0}, WorkerRecord).capabilities[0] == (
        structure(payload, CapabilitySchema)
    )
    [line] = problems(registration_payload(capabilities=[payload]), Registration)
    assert line == (
        "capabilities[0].version: must be a PEP 440 version such as 1.2.0 or 2.0rc1, "
        "got '1.0.0-x.7.z.92'"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "must be >= 1"),
        (-3, "must be >= 1"),
        ("4", "must be an integer"),
        (True, "must be an integer"),
        (2.0, "must be an integer"),
    ],
)
def test_max_concurrency(value: object, message: str) -> None:
    assert problems(capability_payload(max_concurrency=value), CapabilitySchema) == [
        f"max_concurrency: {message}"
    ]


def test_max_concurrency_of_one_is_enough() -> None:
    assert capability(max_concurrency=1).max_concurrency == 1


@pytest.mark.parametrize("value", [0, 0.0, 2.5, 10])
def test_cost_accepted(value: float) -> None:
    assert capability(cost_tokens_per_invocation=value).cost_tokens_per_invocation == value


@pytest.mark.parametrize("value", [-0.01, -1, float("inf"), float("nan"), "1", False, 10**400])
def test_cost_refused(value: object) -> None:
    [line] = problems(capability_payload(cost_tokens_per_invocation=value), CapabilitySchema)
    assert line.startswith("cost_tokens_per_invocation: must be a")


@pytest.mark.parametrize(
    "spiffe_id",
    ["https://crank.local/w1", "spiffe:/crank.local", "spiffe://", "crank.local/w1", ""],
)
def test_spiffe_id_must_be_a_spiffe_uri(spiffe_id: str) -> None:
    [line] = problems(capability_payload(spiffe_id=spiffe_id), CapabilitySchema)
    assert line.startswith("spiffe_id: must")


@pytest.mark.parametrize("field", ["input_schema", "output_schema"])
@pytest.mark.parametrize("value", [[], "object", None, 1, True])
def test_schemas_are_objects(field: str, value: object) -> None:
    assert problems(capability_payload(**{field: value}), CapabilitySchema) == [
        f"{field}: must be an object"
    ]


@pytest.mark.parametrize("field", ["constraints", "slo_bid"])
def test_optional_objects(field: str) -> None:
    assert problems(capability_payload(**{field: ["a"]}), CapabilitySchema) == [
        f"{field}: must be an object"
    ]
    assert getattr(capability(**{field: None}), field) is None


@pytest.mark.parametrize(
    ("slo", "path", "message"),
    [
        ({"latency_p99_ms": 10}, "slo.latency_p99_ms", "unknown field"),
        ({"availability": 1.5}, "slo.availability", "between 0 and 1"),
        ({"availability": "high"}, "slo.availability", "must be a finite number"),
        ({"error_budget_pct": 101}, "slo.error_budget_pct", "between 0 and 100"),
        ({"latency_p95_ms": 0}, "slo.latency_p95_ms", "must be > 0"),
        ({"latency_p95_ms": True}, "slo.latency_p95_ms", "must be a finite number"),
        ({"latency_p95_ms": 10**400}, "slo.latency_p95_ms", "must be a finite number"),
    ],
)
def test_slo_keys_and_ranges(slo: dict[str, Any], path: str, message: str) -> None:
    [problem] = paths_and_messages(capability_payload(slo=slo))
    assert problem[0] == path
    assert message in problem[1]


def paths_and_messages(payload: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as caught:
        structure(payload, CapabilitySchema)
    return [(p.path, p.message) for p in caught.value.problems]


def test_slo_reports_every_bad_key() -> None:
    found = paths_and_messages(capability_payload(slo={"availability": 2, "p50": 1}))
    assert sorted(path for path, _ in found) == ["slo.availability", "slo.p50"]


@pytest.mark.parametrize("field", ["runtime", "env_profile", "controller_affinity", "name", "verb"])
def test_text_fields(field: str) -> None:
    assert problems(capability_payload(**{field: 3}), CapabilitySchema) == [
        f"{field}: must be a string"
    ]
    assert problems(capability_payload(**{field: "  "}), CapabilitySchema) == [
        f"{field}: must not be empty"
    ]
    assert problems(capability_payload(**{field: "x" * 257}), CapabilitySchema) == [
        f"{field}: must be at most 256 characters"
    ]


def test_required_capabilities_items() -> None:
    assert problems(capability_payload(required_capabilities=["a", ""]), CapabilitySchema) == [
        "required_capabilities[1]: must be a non-empty string"
    ]
    assert problems(capability_payload(required_capabilities=["a", 3]), CapabilitySchema) == [
        "required_capabilities[1]: must be a string"
    ]
    assert problems(capability_payload(required_capabilities="a"), CapabilitySchema) == [
        "required_capabilities: must be a list"
    ]


# ------------------------------------------------------------------ strict types


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_concurrency", "4", "must be an integer"),
        ("requires_gpu", "yes", "must be a boolean"),
        ("requires_gpu", 1, "must be a boolean"),
        ("requires_gpu", 0, "must be a boolean"),
        ("requires_gpu", None, "must be a boolean"),
        ("name", 7, "must be a string"),
        ("version", 1.0, "must be a string"),
        ("cost_tokens_per_invocation", "0.5", "must be a number"),
    ],
)
def test_no_coercion(field: str, value: object, message: str) -> None:
    assert problems(capability_payload(**{field: value}), CapabilitySchema) == [
        f"{field}: {message}"
    ]


def test_unknown_fields_rejected_by_name() -> None:
    payload = capability_payload(max_concurency=3, Name="x")
    assert sorted(problems(payload, CapabilitySchema)) == [
        "Name: unknown field",
        "max_concurency: unknown field",
    ]


def test_every_problem_listed_with_its_path() -> None:
    payload = registration_payload(
        worker_id="bad id",
        capabilities=[
            capability_payload("a"),
            capability_payload("b", requires_gpu="yes"),
            capability_payload("c", max_concurrency=0, extra=1),
        ],
    )
    assert sorted(problems(payload, Registration)) == [
        "capabilities[1].requires_gpu: must be a boolean",
        "capabilities[2].extra: unknown field",
        "capabilities[2].max_concurrency: must be >= 1",
        "worker_id: must be 1 to 128 characters of letters, digits, '.', '_' and '-'",
    ]


def test_error_carries_code_and_status() -> None:
    with pytest.raises(ValidationError) as caught:
        structure({}, HeartbeatRequest)
    error = caught.value
    assert isinstance(error, RegistryError)
    assert (error.code, error.status_hint) == ("invalid_request", 422)
    assert error.problems == (Problem("worker_id", "is required"),)
    assert str(error) == "worker_id: is required"


@pytest.mark.parametrize("data", [None, [], "x", 3, [{"worker_id": "w1"}]])
def test_non_objects_refused_at_the_root(data: object) -> None:
    assert problems(data, HeartbeatRequest) == ["must be an object"]


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ValidationError) as caught:
        CapabilitySchema(
            name="a",
            verb="b",
            version="1.0.0",
            input_schema={},
            output_schema={},
            requires_gpu=False,
            max_concurrency=0,
        )
    assert [str(p) for p in caught.value.problems] == ["max_concurrency: must be >= 1"]


def test_required_capabilities_list_is_stored_as_a_tuple() -> None:
    schema = CapabilitySchema(
        name="a",
        verb="b",
        version="1.0.0",
        input_schema={},
        output_schema={},
        requires_gpu=False,
        max_concurrency=1,
        required_capabilities=["x:y"],
    )
    assert schema.required_capabilities == ("x:y",)


# ---------------------------------------------------------------- Registration


@pytest.mark.parametrize("worker_id", ["w1", "a", "A.b_c-9", "x" * 128, "worker-0001.eu_west"])
def test_worker_ids_accepted(worker_id: str) -> None:
    assert structure(registration_payload(worker_id), Registration).worker_id == worker_id
    assert is_worker_id(worker_id)


@pytest.mark.parametrize(
    "worker_id", ["", "x" * 129, "has space", "slash/y", "colon:y", "é", "w1\n", "w\x001", 7, None]
)
def test_worker_ids_refused(worker_id: object) -> None:
    assert paths(registration_payload(worker_id), Registration) == ["worker_id"]
    assert not is_worker_id(worker_id)


@pytest.mark.parametrize(
    "url",
    [
        "http://w1:8080",
        "https://10.0.0.1:8443/base",
        "https://[::1]:9000",
        "http://localhost",
        "https://worker.example.com/path?q=1",
    ],
)
def test_worker_urls_accepted(url: str) -> None:
    assert structure(registration_payload(worker_url=url), Registration).worker_url == url


@pytest.mark.parametrize(
    "url",
    [
        "ftp://w1",
        "w1:8080",
        "/relative",
        "https://",
        "http://:80",
        "http://w1:0",
        "http://w1:99999",
        "http://w1:port",
        "http://[::1",
        "https://w 1",
        "https://w1\t/x",
        "https://w1/\u2003x",
        "http://w\x001",
        "http://w1/\x7f",
        "",
        "https://" + "a" * 3000,
        42,
    ],
)
def test_worker_urls_refused(url: object) -> None:
    assert paths(registration_payload(worker_url=url), Registration) == ["worker_url"]


def test_capabilities_must_not_be_empty() -> None:
    assert problems(registration_payload(capabilities=[]), Registration) == [
        "capabilities: must not be empty"
    ]
    assert problems(registration_payload(capabilities={}), Registration) == [
        "capabilities: must be a list"
    ]


def test_duplicate_verb_and_name_rejected() -> None:
    payload = registration_payload(
        capabilities=[
            capability_payload("a", "run"),
            capability_payload("a", "stop"),
            capability_payload("a", "run", version="2.0.0"),
        ]
    )
    assert problems(payload, Registration) == [
        "capabilities[2]: duplicate capability 'run:a' (also at [0])"
    ]


def test_same_name_with_another_verb_is_not_a_duplicate() -> None:
    payload = registration_payload(
        capabilities=[capability_payload("a", "run"), capability_payload("a", "stop")]
    )
    assert len(structure(payload, Registration).capabilities) == 2


# ------------------------------------------------------------ other wire models


def test_route_request_optionals() -> None:
    request = structure({"verb": "classify", "capability": "image.classify"}, RouteRequest)
    assert request.requester_identity is None and request.version is None
    assert sorted(
        problems(
            {
                "verb": "v",
                "capability": "c",
                "budget_tokens": -1,
                "version": "latest",
                "slo_constraints": [],
                "requester_identity": 5,
                "idempotency_key": "",
            },
            RouteRequest,
        )
    ) == [
        "budget_tokens: must be a finite number >= 0",
        "idempotency_key: must not be empty",
        "requester_identity: must be a string",
        "slo_constraints: must be an object",
        "version: must be a PEP 440 specifier set such as '>=1.2,<2', '~=1.4' or '==2.*', "
        "got 'latest'",
    ]


def test_heartbeat_and_deregister_requests() -> None:
    assert structure({"worker_id": "w1"}, HeartbeatRequest) == HeartbeatRequest("w1")
    assert structure({"worker_id": "w1"}, DeregisterRequest) == DeregisterRequest("w1")
    assert problems({"worker_id": "w1", "at": 1}, DeregisterRequest) == ["at: unknown field"]


def test_worker_record_last_heartbeat_must_be_finite() -> None:
    record = {
        "worker_id": "w1",
        "worker_url": "https://10.0.0.1:8443",
        "capabilities": [capability_payload()],
    }
    assert problems(record, WorkerRecord) == ["last_heartbeat: is required"]
    for bad in (float("nan"), float("inf"), "1", True, 10**400):
        assert problems({**record, "last_heartbeat": bad}, WorkerRecord)[0].startswith(
            "last_heartbeat: must be a"
        )
    assert structure({**record, "last_heartbeat": 5}, WorkerRecord).last_heartbeat == 5.0


def test_health_policy() -> None:
    assert HealthPolicy() == HealthPolicy(30.0, 60.0, 120.0)
    with pytest.raises(ValidationError):
        HealthPolicy(heartbeat_interval=0)
    with pytest.raises(ValidationError):
        HealthPolicy(unhealthy_after=10.0)  # below the heartbeat interval
    with pytest.raises(ValidationError):
        HealthPolicy(evict_after=30.0)  # below unhealthy_after


def test_capability_labels() -> None:
    assert capability_label(("classify", "image.classify")) == "classify:image.classify"
    assert parse_capability_label("classify:image.classify") == ("classify", "image.classify")
    for bad in ("classify", ":x", "x:", ""):
        with pytest.raises(ValidationError):
            parse_capability_label(bad)


def test_deeply_nested_input_is_a_validation_error() -> None:
    nested: Any = []
    for _ in range(100_000):
        nested = [nested]
    assert problems(registration_payload(capabilities=nested), Registration)


def test_a_verb_may_not_hold_a_colon_but_a_name_may() -> None:
    # Listings print "verb:name": a colon in the verb would make it ambiguous.
    payload = {
        "name": "ocr:v2",
        "verb": "extract:text",
        "version": "1.0.0",
        "input_schema": {},
        "output_schema": {},
        "requires_gpu": False,
        "max_concurrency": 1,
    }
    with pytest.raises(ValidationError) as caught:
        structure(payload, CapabilitySchema)
    assert [str(p) for p in caught.value.problems] == ["verb: must not contain ':'"]
    capability = structure({**payload, "verb": "extract"}, CapabilitySchema)
    assert parse_capability_label(capability_label(capability.key)) == ("extract", "ocr:v2")
