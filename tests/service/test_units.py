"""The service's small pieces: body parsing, the clock, log fields, the document's generator."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from crank_registry import RouteRequest, ValidationError, is_worker_id, iso_utc, structure
from crank_registry_asgi.effects import log_fields
from crank_registry_asgi.http import ApiError, parse_json
from crank_registry_asgi.openapi import ErrorCode, error_schema, openapi_document, type_schema
from tests.builders import registration_payload
from tests.service.helpers import running

DOCUMENT_SCHEMAS = openapi_document()["components"]["schemas"]
JSON = {"content-type": "application/json"}


def answer_of_the_converter(body: Any) -> tuple[int, dict[str, Any]]:
    """What ``/route`` answers (status, some fields) when it reads ``body`` with the converter."""
    try:
        request = structure(body, RouteRequest)
    except ValidationError as error:
        detail = [{"path": p.path, "message": p.message} for p in error.problems]
        return 422, {"error": "invalid_request", "detail": detail}
    if request.requester_identity is not None:  # from a caller no --trusted-gateway names
        return 403, {"error": "forbidden"}
    fields = {"verb": request.verb, "capability": request.capability}
    return 404, {"error": "unknown_capability", **fields}  # nothing is registered


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        {"verb": "classify", "capability": "image.classify"},
        {"verb": "", "capability": ""},
        {"verb": "  ", "capability": "x" * 300},
        {"verb": "v", "capability": 1},
        {"verb": "v", "version": "1.0.0"},
        {"verb": "v", "capability": "c", "version": "latest"},
        {"verb": "v", "capability": "c", "version": ">=1.0"},
        {"verb": "v", "capability": "c", "requester_identity": "spiffe://x/y"},
        {"capability": "c", "verb": "v"},
        [],
        None,
    ],
)
async def test_route_reads_a_body_as_the_converter_does(body: Any) -> None:
    # The common body takes a fast path past the converter: the answer is the same.
    status, fields = answer_of_the_converter(body)
    async with running() as api:
        answer = await api.request("POST", "/route", content=json.dumps(body), headers=JSON)
    assert answer.status_code == status
    assert {key: answer.json().get(key) for key in fields} == fields


def test_depth_limit_boundary() -> None:
    assert parse_json(b"[" * 64 + b"]" * 64, max_depth=64) is not None
    with pytest.raises(ApiError, match="nested more than 64"):
        parse_json(b"[" * 65 + b"]" * 65, max_depth=64)
    deep_object = b'{"a":' * 65 + b"1" + b"}" * 65
    with pytest.raises(ApiError, match="nested"):
        parse_json(deep_object, max_depth=64)
    # A short document cannot be deep: the walk is skipped, the answer is the same.
    assert parse_json(b"[[1]]", max_depth=2) == [[1]]
    with pytest.raises(ApiError, match="nested"):
        parse_json(b"[[[1]]]", max_depth=2)


def test_numbers() -> None:
    assert parse_json(b'{"a": 4.0, "b": 1e3, "c": 2.5, "d": -0.0}', max_depth=8) == {
        "a": 4,
        "b": 1000,
        "c": 2.5,
        "d": 0,
    }
    assert type(parse_json(b"4.0", max_depth=8)) is int
    for bad in (b"NaN", b"-Infinity", b"1e400", b"-1e400"):
        with pytest.raises(ApiError) as caught:
            parse_json(bad, max_depth=8)
        assert caught.value.code == "invalid_json"


def test_strings() -> None:
    assert parse_json('{"\u00e9": "\\ud83d\\ude00"}'.encode(), max_depth=8) == {
        "\u00e9": "\U0001f600"
    }
    for bad in (b'"\\udc00"', b'{"\\ud800": 1}', b'["\\ud800x"]'):
        with pytest.raises(ApiError, match="surrogate"):
            parse_json(bad, max_depth=8)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("application/json", True),
        ("Application/JSON", True),
        ("application/json; charset=utf-8", True),
        ('application/json; charset="UTF-8"', True),
        ("application/json;charset=utf8", True),
        ("application/json; charset=iso-8859-1", False),
        ("application/json-patch+json", False),
        ("text/json", False),
        ("", False),
        (None, False),
    ],
)
async def test_media_types(value: str | None, ok: bool) -> None:
    headers = {} if value is None else {"content-type": value}
    async with running() as api:
        answer = await api.request(
            "POST", "/register", content=json.dumps(registration_payload()), headers=headers
        )
    if ok:
        assert answer.status_code == 200, answer.text
    else:
        assert (answer.status_code, answer.json()["error"]) == (415, "unsupported_media_type")


def test_log_fields_quote_what_would_split() -> None:
    assert log_fields(a="x", b="two words", c='q"uote', d="k=v", e="") == (
        'a=x b="two words" c="q\\"uote" d="k=v" e=""'
    )


def test_iso_utc() -> None:
    assert iso_utc(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=140))
@example("a" * 128)
@example("a" * 129)
@example("w1\n")
def test_the_documented_worker_id_is_the_cores(text: str) -> None:
    # The pattern is anchored; fullmatch reads its "$" as ECMA-262 does (the
    # very end), where re.search would also match before a final newline.
    pattern = DOCUMENT_SCHEMAS["HeartbeatRequest"]["properties"]["worker_id"]["pattern"]
    assert pattern.startswith("^") and pattern.endswith("$")
    assert (re.fullmatch(pattern, text) is not None) is is_worker_id(text)


def test_a_type_without_a_schema_is_an_error() -> None:
    with pytest.raises(TypeError, match="no JSON Schema"):
        type_schema(set[int], {})
    with pytest.raises(TypeError, match="homogeneous"):
        type_schema(tuple[int, str], {})


def test_an_error_code_with_a_field_error_answer_lacks_is_an_error() -> None:
    with pytest.raises(LookupError, match="no field 'retry'"):
        error_schema("busy", ErrorCode(429, "Busy.", ("retry",)), {})


def test_document_is_json() -> None:
    document = openapi_document()
    assert json.loads(json.dumps(document)) == document
    registration = document["components"]["schemas"]["Registration"]
    assert registration["required"] == ["worker_id", "worker_url", "capabilities"]
    capability = document["components"]["schemas"]["CapabilitySchema"]
    assert capability["properties"]["max_concurrency"] == {"type": "integer", "minimum": 1}
    assert capability["properties"]["runtime"]["type"] == ["string", "null"]
