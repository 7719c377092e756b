"""The service's small pieces: body parsing, the clock, log fields, the document's tables."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest

from crank_registry import RouteRequest, ValidationError, iso_utc, structure
from crank_registry_asgi.app import ClampedClock, _route_request
from crank_registry_asgi.effects import log_fields
from crank_registry_asgi.http import ApiError, _media_type_is_json, parse_json
from crank_registry_asgi.openapi import FIELD_CONSTRAINTS, REQUEST_MODELS, model_schema


@pytest.mark.parametrize(
    "body",
    [
        {"verb": "classify", "capability": "image.classify"},
        {"verb": "", "capability": ""},
        {"verb": "  ", "capability": "x" * 300},
        {"verb": "v", "capability": 1},
        {"verb": "v", "version": "1.0.0"},
        {"verb": "v", "capability": "c", "version": "1.0.0"},
        {"capability": "c", "verb": "v"},
        [],
        None,
    ],
)
def test_route_fast_path_equals_the_converter(body: Any) -> None:
    def outcome(function: Any) -> Any:
        try:
            return function(body)
        except ValidationError as error:
            return error.problems

    assert outcome(_route_request) == outcome(lambda data: structure(data, RouteRequest))


def test_clamped_clock_never_goes_backwards() -> None:
    readings = iter([10.0, 12.0, 11.0, 12.5])
    clock = ClampedClock(lambda: next(readings))
    assert [clock(), clock(), clock(), clock()] == [10.0, 12.0, 12.0, 12.5]


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
def test_media_types(value: str | None, ok: bool) -> None:
    assert _media_type_is_json(value) is ok


def test_log_fields_quote_what_would_split() -> None:
    assert log_fields(a="x", b="two words", c='q"uote', d="k=v", e="") == (
        'a=x b="two words" c="q\\"uote" d="k=v" e=""'
    )


def test_iso_utc() -> None:
    assert iso_utc(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"


def test_every_field_of_every_model_is_documented() -> None:
    for model in REQUEST_MODELS:
        schema = model_schema(model)
        assert set(schema["properties"]) == {field.name for field in attrs.fields(model)}
        assert schema["additionalProperties"] is False


def test_a_model_field_missing_from_the_table_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    table = {**FIELD_CONSTRAINTS, RouteRequest: dict(FIELD_CONSTRAINTS[RouteRequest])}
    del table[RouteRequest]["version"]
    monkeypatch.setattr("crank_registry_asgi.openapi.FIELD_CONSTRAINTS", table)
    with pytest.raises(LookupError, match="version"):
        model_schema(RouteRequest)


def test_document_is_json() -> None:
    from crank_registry_asgi.openapi import openapi_document

    document = openapi_document()
    assert json.loads(json.dumps(document)) == document
    registration = document["components"]["schemas"]["Registration"]
    assert registration["required"] == ["worker_id", "worker_url", "capabilities"]
    capability = document["components"]["schemas"]["CapabilitySchema"]
    assert capability["properties"]["max_concurrency"] == {"type": "integer", "minimum": 1}
    assert capability["properties"]["runtime"]["type"] == ["string", "null"]
