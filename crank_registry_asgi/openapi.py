"""The OpenAPI 3.1 document of the controller, generated from the core's models.

Request schemas are walked from the attrs classes (field names, types,
which fields are required) and completed with the constraints that the
core's validators enforce (patterns, lengths, bounds), kept here in one
table: :data:`FIELD_CONSTRAINTS` must name every field of every model, so
a model that grows a field cannot be served with an incomplete document.
Every request object is closed (``additionalProperties: false``), like the
converter, which rejects unknown fields by name.
"""

from __future__ import annotations

import copy
import functools
import re
import types
import typing
from typing import Any

import attrs

from crank_registry import (
    CapabilitySchema,
    DeregisterRequest,
    HeartbeatRequest,
    Registration,
    RouteRequest,
)

__all__ = ["FIELD_CONSTRAINTS", "REQUEST_MODELS", "ROUTE_PATHS", "openapi_document"]

#: The models whose JSON Schemas are derived from their attrs fields.
REQUEST_MODELS: tuple[type[Any], ...] = (
    CapabilitySchema,
    Registration,
    HeartbeatRequest,
    DeregisterRequest,
    RouteRequest,
)

_SEMVER = (
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?"
    r"(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$"
)
# "Not blank" is Python's idea of blank (str.isspace), which also counts
# characters such as U+001C..U+001F that a regex engine's \s may not: the
# class lists them literally so that every engine reads it the same way.
_NOT_BLANK = "[^" + "".join(chr(c) for c in range(0x3001) if chr(c).isspace()) + "]"
#: A short text: not blank, at most 256 characters (the core's rule for names).
TEXT_SCHEMA: dict[str, Any] = {"minLength": 1, "maxLength": 256, "pattern": _NOT_BLANK}
_WORKER_ID: dict[str, Any] = {
    "minLength": 1,
    "maxLength": 128,
    "pattern": r"^[A-Za-z0-9._-]+$",
    "description": "1 to 128 letters, digits, '.', '_' and '-'; the last segment of "
    "the worker's SPIFFE ID.",
}
# The core accepts any absolute http(s) URL with a host; the document
# describes the common subset (a DNS name or IPv4 address and an optional
# port from 1 to 65535), which every schema-driven client can produce and
# the core accepts. Bracketed IPv6 hosts are accepted too, but left out of
# the pattern: JSON Schema cannot tell a valid IPv6 literal from a bad one.
_PORT = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_WORKER_URL: dict[str, Any] = {
    "format": "uri",
    "maxLength": 2048,
    "pattern": r"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.-]+(:"
    + _PORT
    + r")?(/[A-Za-z0-9._~!$&'()*+,;=:@/%-]*)?$",
    "description": "An absolute http:// or https:// URL (a host name or IPv4 address, "
    "an optional port; the service also accepts bracketed IPv6 addresses).",
}
_NUMBER_AT_LEAST_ZERO: dict[str, Any] = {"minimum": 0}
_SLO: dict[str, Any] = {
    "properties": {
        "latency_p95_ms": {"type": "number", "exclusiveMinimum": 0},
        "availability": {"type": "number", "minimum": 0, "maximum": 1},
        "error_budget_pct": {"type": "number", "minimum": 0, "maximum": 100},
    },
    "additionalProperties": False,
}

#: Per model and field: JSON Schema keywords beyond the type (the validators' rules).
FIELD_CONSTRAINTS: dict[type[Any], dict[str, dict[str, Any]]] = {
    CapabilitySchema: {
        "name": {**TEXT_SCHEMA, "description": "The capability's name, e.g. image.classify."},
        "verb": {
            "minLength": 1,
            "maxLength": 256,
            "allOf": [{"pattern": _NOT_BLANK}, {"pattern": "^[^:]*$"}],
            "description": "What is done with it, e.g. classify; no ':'.",
        },
        "version": {"pattern": _SEMVER, "description": "A semantic version MAJOR.MINOR.PATCH."},
        "input_schema": {"description": "A JSON Schema of the input."},
        "output_schema": {"description": "A JSON Schema of the output."},
        "requires_gpu": {},
        "max_concurrency": {"minimum": 1},
        "runtime": TEXT_SCHEMA,
        "env_profile": TEXT_SCHEMA,
        "constraints": {},
        "slo": _SLO,
        "spiffe_id": {"maxLength": 256, "pattern": r"^spiffe://."},
        "required_capabilities": {"items": {"type": "string", "pattern": _NOT_BLANK}},
        "cost_tokens_per_invocation": _NUMBER_AT_LEAST_ZERO,
        "slo_bid": {},
        "controller_affinity": TEXT_SCHEMA,
    },
    Registration: {
        "worker_id": _WORKER_ID,
        "worker_url": _WORKER_URL,
        "capabilities": {
            "minItems": 1,
            "description": "What the worker can do; no (verb, name) twice.",
        },
    },
    HeartbeatRequest: {"worker_id": _WORKER_ID},
    DeregisterRequest: {"worker_id": _WORKER_ID},
    RouteRequest: {
        "verb": TEXT_SCHEMA,
        "capability": TEXT_SCHEMA,
        "requester_identity": TEXT_SCHEMA,
        "slo_constraints": {},
        "budget_tokens": _NUMBER_AT_LEAST_ZERO,
        "idempotency_key": TEXT_SCHEMA,
        "version": {"pattern": _SEMVER},
    },
}

#: Optional route parameters that are answered 422 ``not_supported`` when set.
NOT_SUPPORTED_YET = (
    "requester_identity",
    "slo_constraints",
    "budget_tokens",
    "idempotency_key",
    "version",
)

_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _type_schema(tp: Any) -> dict[str, Any]:
    """The JSON Schema of a field annotation (``None`` in a union is JSON null)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [_type_schema(arg) for arg in typing.get_args(tp) if arg is not type(None)]
        (inner,) = options
        if isinstance(inner.get("type"), str):
            return {**inner, "type": [inner["type"], "null"]}
        return {"anyOf": [inner, {"type": "null"}]}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if origin is dict:
        return {"type": "object"}
    if origin is tuple:
        item, ellipsis = typing.get_args(tp)
        assert ellipsis is Ellipsis, f"only homogeneous tuples are lists: {tp!r}"
        return {"type": "array", "items": _type_schema(item)}
    if attrs.has(tp):
        return _ref(tp.__name__)
    raise TypeError(f"no JSON Schema for {tp!r}")


def model_schema(cls: type[Any]) -> dict[str, Any]:
    """The closed JSON Schema of one request model."""
    attrs.resolve_types(cls)
    constraints = FIELD_CONSTRAINTS[cls]
    fields = attrs.fields(cls)
    missing = {field.name for field in fields} ^ set(constraints)
    if missing:
        raise LookupError(f"{cls.__name__}: constraints and fields differ on {sorted(missing)}")
    properties: dict[str, Any] = {}
    for field in fields:
        schema = _type_schema(field.type)
        extra = copy.deepcopy(constraints[field.name])
        if "items" in extra and "items" in schema:
            schema["items"] = {**schema["items"], **extra.pop("items")}
        properties[field.name] = {**schema, **extra}
    return {
        "type": "object",
        "description": (cls.__doc__ or "").strip().split("\n\n")[0],
        "properties": properties,
        "required": [field.name for field in fields if field.default is attrs.NOTHING],
        "additionalProperties": False,
    }


def _closed(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


_STRING = {"type": "string"}
_COUNT = {"type": "integer", "minimum": 0}
_INTERVAL = {"type": "number", "exclusiveMinimum": 0}
_WORKER_ID_OUT = {"type": "string", "pattern": _WORKER_ID["pattern"]}


def _error(codes: list[str], **extra: Any) -> dict[str, Any]:
    """An error body whose ``error`` is one of ``codes``."""
    properties: dict[str, Any] = {"error": {"type": "string", "enum": codes}, "message": _STRING}
    properties.update(extra)
    return _closed(properties)


def _response_schemas() -> dict[str, Any]:
    return {
        "Health": _closed(
            {
                "status": {"const": "ok"},
                "total_workers": _COUNT,
                "healthy_workers": _COUNT,
            }
        ),
        "Registered": _closed(
            {
                "status": {"const": "registered"},
                "worker_id": _WORKER_ID_OUT,
                "heartbeat_interval_s": _INTERVAL,
            }
        ),
        "Acknowledged": _closed(
            {
                "status": {"const": "acknowledged"},
                "timestamp": {"type": "string", "format": "date-time"},
                "heartbeat_interval_s": _INTERVAL,
            }
        ),
        "Deregistered": _closed({"status": {"const": "deregistered"}, "worker_id": _WORKER_ID_OUT}),
        "WorkerEndpoint": _closed(
            {"worker_id": _WORKER_ID_OUT, "worker_url": _STRING, "version": _STRING}
        ),
        "CapabilityList": _closed(
            {
                "capabilities": {
                    "type": "array",
                    "items": _closed(
                        {
                            "verb": _STRING,
                            "capability": _STRING,
                            "version": _STRING,
                            "workers": {"type": "array", "items": _WORKER_ID_OUT},
                            "healthy_workers": {"type": "array", "items": _WORKER_ID_OUT},
                        }
                    ),
                },
                "total_workers": _COUNT,
                "healthy_workers": _COUNT,
            }
        ),
        "WorkerList": _closed(
            {
                "workers": {
                    "type": "array",
                    "items": _closed(
                        {
                            "worker_id": _WORKER_ID_OUT,
                            "worker_url": _STRING,
                            "last_heartbeat": {"type": "string", "format": "date-time"},
                            "is_healthy": {"type": "boolean"},
                            "state": {
                                "type": "string",
                                "enum": ["healthy", "unhealthy", "unverified"],
                            },
                            "capabilities": {
                                "type": "array",
                                "items": {"type": "string", "pattern": ":"},
                            },
                        }
                    ),
                }
            }
        ),
        "InvalidRequest": _error(
            ["invalid_request"],
            detail={
                "type": "array",
                "minItems": 1,
                "items": _closed({"path": _STRING, "message": _STRING}),
            },
        ),
        "NotSupported": _error(["not_supported"], field={"type": "string"}),
        "InvalidJson": _error(["invalid_json"]),
        "UnsupportedMediaType": _error(["unsupported_media_type"]),
        "RequestTooLarge": _error(["request_too_large"]),
        "Forbidden": _error(["forbidden"], worker_id=_STRING),
        "WorkerNotRegistered": _error(["worker_not_registered"], worker_id=_WORKER_ID_OUT),
        "NoWorkerAvailable": _error(["no_worker_available"], verb=_STRING, capability=_STRING),
        "JournalUnavailable": _error(["journal_unavailable"]),
        "Error": _error(["not_found", "method_not_allowed"]),
    }


def _json(schema_name: str, description: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref(schema_name)}},
        **extra,
    }


def _json_any_of(names: list[str], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"oneOf": [_ref(n) for n in names]}}},
    }


def _body_errors() -> dict[str, Any]:
    return {
        "400": _json("InvalidJson", "The body is not UTF-8 JSON, or is nested too deeply."),
        "413": _json("RequestTooLarge", "The body is larger than the limit (1 MiB by default)."),
        "415": _json("UnsupportedMediaType", "The body is not sent as application/json."),
        "422": _json("InvalidRequest", "The body is JSON but not the model; every problem listed."),
    }


def _post(
    summary: str,
    operation: str,
    *,
    model: str,
    ok: str,
    ok_description: str,
    errors: dict[str, Any],
) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "operationId": operation,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(model)}},
            },
            "responses": {"200": _json(ok, ok_description), **_body_errors(), **errors},
        }
    }


def _get(summary: str, operation: str, ok: str, ok_description: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "operationId": operation,
            "responses": {"200": _json(ok, ok_description)},
        }
    }


_FORBIDDEN = {"403": _json("Forbidden", "Under mTLS: the caller's identity is not this worker.")}
_JOURNAL = {"503": _json("JournalUnavailable", "The change could not be made durable.")}
_NOT_REGISTERED = {
    "404": _json(
        "WorkerNotRegistered",
        "Unknown, evicted, or restored and not re-registered: register again.",
    )
}


def _paths() -> dict[str, Any]:
    route_errors = _body_errors()
    route_errors["422"] = _json_any_of(
        ["InvalidRequest", "NotSupported"],
        "The body is not the model, or sets an optional parameter that has no "
        f"behaviour yet ({', '.join(NOT_SUPPORTED_YET)}).",
    )
    return {
        "/health": _get("Liveness and worker counts", "health", "Health", "The controller is up."),
        "/register": _post(
            "Register a worker, or replace its URL and capabilities",
            "register",
            model="Registration",
            ok="Registered",
            ok_description="Registered; heartbeat every heartbeat_interval_s.",
            errors={**_FORBIDDEN, **_JOURNAL},
        ),
        "/heartbeat": _post(
            "Heartbeat: the worker is alive",
            "heartbeat",
            model="HeartbeatRequest",
            ok="Acknowledged",
            ok_description="Acknowledged.",
            errors={**_FORBIDDEN, **_NOT_REGISTERED, **_JOURNAL},
        ),
        "/deregister": _post(
            "Deregister a worker that is leaving",
            "deregister",
            model="DeregisterRequest",
            ok="Deregistered",
            ok_description="Removed.",
            errors={**_FORBIDDEN, **_NOT_REGISTERED, **_JOURNAL},
        ),
        "/route": {
            "post": {
                "summary": "Route: the next healthy worker for a verb and capability",
                "operationId": "route",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("RouteRequest")}},
                },
                "responses": {
                    "200": _json("WorkerEndpoint", "The worker to call, round-robin."),
                    **route_errors,
                    "503": _json(
                        "NoWorkerAvailable",
                        "No healthy worker offers it now.",
                        headers={
                            "Retry-After": {
                                "description": "The heartbeat interval in whole seconds.",
                                "required": True,
                                "schema": {"type": "string", "pattern": "^[0-9]+$"},
                            }
                        },
                    ),
                },
            }
        },
        "/capabilities": _get(
            "Every (verb, capability, version) and its workers",
            "capabilities",
            "CapabilityList",
            "The capabilities.",
        ),
        "/workers": _get("Every worker and its health", "workers", "WorkerList", "The workers."),
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "responses": {
                    "200": {
                        "description": "The OpenAPI 3.1 document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


#: The service's paths, in the order they are documented.
ROUTE_PATHS: tuple[str, ...] = tuple(_paths())


@functools.cache
def _document() -> dict[str, Any]:
    schemas = {cls.__name__: model_schema(cls) for cls in REQUEST_MODELS}
    schemas.update(_response_schemas())
    for schema in schemas.values():
        _check_patterns(schema)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "crank-registry controller",
            "version": "1",
            "description": (
                "A capability registry and router. Every error is JSON "
                '{"error": CODE, "message": TEXT, ...} with a stable CODE; unknown '
                "paths answer 404 not_found and wrong methods 405 method_not_allowed."
            ),
        },
        "paths": _paths(),
        "components": {"schemas": schemas},
    }


def _check_patterns(schema: Any) -> None:
    # Every pattern must compile: a typo here would otherwise surface only
    # in a client.
    if isinstance(schema, dict):
        if isinstance(schema.get("pattern"), str):
            re.compile(schema["pattern"])
        for value in schema.values():
            _check_patterns(value)
    elif isinstance(schema, list):
        for value in schema:
            _check_patterns(value)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh copy, safe to modify)."""
    return copy.deepcopy(_document())
