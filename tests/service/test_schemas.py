"""A capability's schemas must be valid JSON Schemas: /register refuses others, recovery skips them.

DESIGN, "Operations": /register refuses a capability whose input_schema or
output_schema is not a valid JSON Schema (jsonschema, no hand-written
validator); "Targets": recovery checks JSON Schema validity once per
distinct schema, a fast path behind one function equal to the plain path.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crank_registry import Problem
from crank_registry_asgi import ServiceConfig, schemas
from crank_registry_asgi.openapi import openapi_document
from crank_registry_asgi.schemas import capability_schema_problems, schema_problems_uncached
from crank_worker_client.json_schema import JsonSchemaError
from crank_worker_client.serving import invocation_app
from tests.builders import capability, capability_payload, registration_payload
from tests.service.helpers import running

DRAFT_7 = "http://json-schema.org/draft-07/schema#"
DRAFT_4 = "http://json-schema.org/draft-04/schema#"
FIX = (
    "a capability's {field} must be a valid JSON Schema (Draft 2020-12, or the draft its "
    "$schema names): fix the schema"
)

# (schema, the path of its fault under the field, jsonschema's reason); None: valid.
SCHEMAS: list[tuple[dict[str, Any], tuple[str, str] | None]] = [
    ({}, None),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}, None),
    ({"$schema": DRAFT_7, "items": [{"type": "string"}], "additionalItems": False}, None),
    ({"$schema": DRAFT_4, "exclusiveMinimum": True, "minimum": 0}, None),
    ({"x-vendor": {"anything": [1, 2]}}, None),  # unknown keywords are annotations
    ({"type": 12}, (".type", "12 is not valid under any of the given schemas")),
    ({"type": "text"}, (".type", "'text' is not valid under any of the given schemas")),
    ({"properties": []}, (".properties", "[] is not of type 'object'")),
    ({"pattern": "("}, (".pattern", "'(' is not a 'regex'")),
    ({"required": "a"}, (".required", "'a' is not of type 'array'")),
    (
        {"$schema": DRAFT_4, "exclusiveMinimum": 0},
        (".exclusiveMinimum", "0 is not of type 'boolean'"),
    ),
    (
        {"$schema": "unknown"},
        (
            ".$schema",
            "'unknown' is not a JSON Schema dialect that jsonschema knows; name one of its "
            "drafts (such as 'https://json-schema.org/draft/2020-12/schema') or leave $schema out",
        ),
    ),
    (
        {"$schema": 7},
        (
            ".$schema",
            "7 is not a JSON Schema dialect that jsonschema knows; name one of its drafts "
            "(such as 'https://json-schema.org/draft/2020-12/schema') or leave $schema out",
        ),
    ),
]


def _expected(field: str, fault: tuple[str, str] | None, prefix: str = "") -> list[dict[str, str]]:
    if fault is None:
        return []
    where, reason = fault
    return [{"path": f"{prefix}{field}{where}", "message": f"{reason}; {FIX.format(field=field)}"}]


# ------------------------------------------------------------------------- /register


@pytest.mark.anyio
@pytest.mark.parametrize("field", ["input_schema", "output_schema"])
@pytest.mark.parametrize(("schema", "fault"), SCHEMAS, ids=[json.dumps(s) for s, _ in SCHEMAS])
async def test_register_refuses_a_schema_that_is_not_a_valid_json_schema(
    field: str, schema: dict[str, Any], fault: tuple[str, str] | None
) -> None:
    sent = {**capability_payload(), field: schema}
    body = registration_payload("w1", capabilities=[sent])
    async with running() as api:
        response = await api.post("/register", body)
        if fault is None:
            assert response.status_code == 200, response.text
            assert "w1" in api.registry
            return
        assert response.status_code == 422, response.text
        answer = response.json()
        assert answer["error"] == "invalid_request"
        assert answer["detail"] == _expected(field, fault, "capabilities[0].")
        assert "w1" not in api.registry


@pytest.mark.anyio
async def test_every_invalid_schema_of_a_registration_is_listed_with_its_capability() -> None:
    capabilities = [
        capability_payload("a"),
        capability_payload("b", input_schema={"type": 12}, output_schema={"$schema": "x"}),
        capability_payload("c", output_schema={"minimum": "1"}),
    ]
    async with running() as api:
        await api.register("w1")
        before = api.registry.export_state()
        response = await api.post("/register", registration_payload("w1", None, capabilities))
        assert response.status_code == 422
        assert [problem["path"] for problem in response.json()["detail"]] == [
            "capabilities[1].input_schema.type",
            "capabilities[1].output_schema.$schema",
            "capabilities[2].output_schema.minimum",
        ]
        # The registration it would have replaced stands.
        assert api.registry.export_state() == before


def test_the_document_says_the_schemas_must_be_valid_json_schemas() -> None:
    properties = openapi_document()["components"]["schemas"]["CapabilitySchema"]["properties"]
    for field in ("input_schema", "output_schema"):
        assert properties[field]["type"] == "object"
        assert "must be a valid JSON Schema" in properties[field]["description"]
        assert "422 invalid_request" in properties[field]["description"]


# -------------------------------------------------- one rule with the workers' server


@pytest.mark.parametrize(("schema", "fault"), SCHEMAS, ids=[json.dumps(s) for s, _ in SCHEMAS])
def test_register_and_the_invocation_server_accept_the_same_schemas(
    schema: dict[str, Any], fault: tuple[str, str] | None
) -> None:
    """A schema the registry holds is one a worker can validate payloads with, and no other."""

    async def echo(payload: Any) -> Any:
        return payload

    served = capability("b", "a", input_schema=schema)
    if fault is None:
        assert capability_schema_problems(served) == ()
        invocation_app({("a", "b"): echo}, [served])
    else:
        (problem,) = capability_schema_problems(served)
        with pytest.raises(JsonSchemaError) as refused:
            invocation_app({("a", "b"): echo}, [served])
        assert f"{problem.path}: {fault[1]}" in str(refused.value)


# ------------------------------------------------------------- the cache (fast path)

# JSON values, small; schemas are objects of them, keyed by likely keywords.
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["", "(", "a", "object"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)
_KEYWORDS = ["type", "properties", "items", "minimum", "pattern", "required", "enum", "$schema"]
_schemas = st.dictionaries(
    st.sampled_from(_KEYWORDS) | st.text(max_size=3),
    _json | st.sampled_from(["string", "integer", DRAFT_7, DRAFT_4, "unknown"]),
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(_schemas, _schemas)
def test_the_cached_check_equals_the_plain_check(
    input_schema: dict[str, Any], output_schema: dict[str, Any]
) -> None:
    checked = capability("n", "v", input_schema=input_schema, output_schema=output_schema)
    plain = schema_problems_uncached("input_schema", input_schema) + schema_problems_uncached(
        "output_schema", output_schema
    )
    assert capability_schema_problems(checked) == plain  # a miss, or a hit of an earlier example
    assert capability_schema_problems(checked) == plain  # a hit


@pytest.mark.parametrize(("schema", "fault"), SCHEMAS, ids=[json.dumps(s) for s, _ in SCHEMAS])
def test_the_cached_check_equals_the_plain_check_on_the_table(
    schema: dict[str, Any], fault: tuple[str, str] | None
) -> None:
    checked = capability(input_schema=schema)
    expected = tuple(Problem(**p) for p in _expected("input_schema", fault))
    assert schema_problems_uncached("input_schema", schema) == expected
    assert capability_schema_problems(checked) == expected
    assert capability_schema_problems(checked) == expected


def test_each_distinct_schema_is_checked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schemas, "_answers", {})
    checked: list[Any] = []
    check_schema = jsonschema.Draft202012Validator.check_schema

    def counting(schema: Any, *args: Any, **kwargs: Any) -> None:
        checked.append(schema)
        check_schema(schema, *args, **kwargs)

    monkeypatch.setattr(jsonschema.Draft202012Validator, "check_schema", counting)
    shared = {"type": "object", "properties": {"n": {"type": "integer"}}}
    for index in range(50):
        capability_schema_problems(capability(f"c{index}", input_schema=dict(shared)))
    # input_schema once, output_schema ({"type": "object"}) once.
    assert checked == [shared, {"type": "object"}]


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schemas, "_answers", {})
    monkeypatch.setattr(schemas, "CACHED_SCHEMAS", 8)
    for index in range(20):
        capability_schema_problems(capability(input_schema={"title": str(index)}))
    assert len(schemas._answers) == 8
    # The newest are kept: the last schema is answered from the cache.
    assert ("input_schema", repr({"title": "19"})) in schemas._answers


# ----------------------------------------------------------------------- recovery


@pytest.mark.anyio
async def test_a_journaled_registration_with_an_invalid_schema_is_skipped_and_logged(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A journal of a release that did not check: the start skips that worker, names the line."""
    config = ServiceConfig(state_dir=tmp_path)
    async with running(config) as api:
        for worker_id in ("w1", "w2", "w3"):
            await api.register(worker_id)
    journal = tmp_path / "registry.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    (number,) = [n for n, line in enumerate(lines, 1) if b'"worker_id":"w2"' in line]
    bad = lines[number - 1].replace(
        b'"input_schema":{"type":"object"}', b'"input_schema":{"type":12}'
    )
    assert bad != lines[number - 1]
    lines[number - 1] = bad
    journal.write_bytes(b"".join(lines))

    caplog.set_level(logging.INFO, logger="crank_registry_asgi")
    async with running(config) as api:
        assert set(await api.workers()) == {"w1", "w3"}
        assert await api.route() in ("w1", "w3")
        # Its worker registers again (with valid schemas) at its next heartbeat.
        assert (await api.post("/register", registration_payload("w2"))).status_code == 200
    (skipped,) = [m for m in caplog.messages if m.startswith("journal line skipped")]
    assert f"line={number}" in skipped
    assert "capabilities[0].input_schema.type: 12 is not valid" in skipped
    (recovered,) = [m for m in caplog.messages if m.startswith("journal recovered")]
    assert "workers_restored=2" in recovered
