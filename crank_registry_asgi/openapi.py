"""The OpenAPI 3.1 document of the controller, generated from the core's models.

Every schema comes from an attrs class of the core: the request models and
the answers (``crank_registry._wire``). :func:`model_schema` reads the type
of each field from its annotation (``X | None`` is optional, a tuple is an
array, a nested attrs class a ``$ref``) and adds the JSON Schema keywords
that the field keeps in its metadata (:data:`crank_registry.JSON_SCHEMA`).
Every object is closed (``additionalProperties: false``), like the
converter, which rejects unknown fields by name.

What is written here is the table of the API: :data:`OPERATIONS` (method,
path, request model, answer) and :data:`ERRORS` (per error code: its
status, which fields of :class:`~crank_registry.ErrorAnswer` it carries,
what it means).
"""

from __future__ import annotations

import copy
import enum
import functools
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from crank_registry import (
    EVENT_TYPES,
    JSON_SCHEMA,
    OMIT_IF_FALSE,
    WORKER_ID_PATTERN,
    CapabilitiesAnswer,
    Change,
    DeregisterAnswer,
    DeregisterRequest,
    DrainAnswer,
    ErrorAnswer,
    HealthAnswer,
    HeartbeatAnswer,
    HeartbeatRequest,
    ListingQuery,
    ReadyAnswer,
    RegisterAnswer,
    Registration,
    RouteRequest,
    SlosAnswer,
    SnapshotAnswer,
    WatchAnswer,
    WatchQuery,
    WorkerEndpoint,
    WorkerEntry,
    WorkersAnswer,
)

from .feed import EVENT_ID_PATTERN

__all__ = [
    "BODY_ERRORS",
    "ERRORS",
    "OPERATIONS",
    "ROUTE_PATHS",
    "ErrorCode",
    "Operation",
    "build_document",
    "component_name",
    "error_answers",
    "error_schema",
    "json_answer",
    "model_schema",
    "openapi_document",
    "operation_object",
    "query_parameters",
    "property_schemas",
    "ref",
    "type_schema",
]


@attrs.frozen
class ErrorCode:
    """One error code: its status, what it means, and its fields beyond ``error`` and ``message``.

    ``fields`` are always sent, ``optional`` ones sometimes; each is a field
    of :class:`~crank_registry.ErrorAnswer`.
    """

    status: int
    description: str
    fields: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    headers: Mapping[str, Any] = attrs.field(factory=dict)


def retry_after(description: str) -> dict[str, Any]:
    """The ``Retry-After`` header of an answer: whole seconds, as ``description`` says."""
    return {
        "Retry-After": {
            "description": description,
            "required": True,
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    }


#: Every error code the controller answers with.
ERRORS: Mapping[str, ErrorCode] = {
    "invalid_json": ErrorCode(400, "The body is not UTF-8 JSON, or is nested too deeply."),
    "request_too_large": ErrorCode(413, "The body is larger than the limit (1 MiB by default)."),
    "request_timeout": ErrorCode(
        408, "The body did not arrive whole within the read deadline (10 s by default)."
    ),
    "unsupported_media_type": ErrorCode(415, "The body is not sent as application/json."),
    "invalid_request": ErrorCode(
        422,
        "The body is JSON but not the model, or a query parameter is invalid (or "
        "given to an endpoint that takes none); every problem listed.",
        ("detail",),
    ),
    "forbidden": ErrorCode(
        403,
        "The caller's identity may not act on this worker: none where one is required, "
        "another worker's or a client's, not exactly spiffe://DOMAIN/worker/NAME, or a "
        "proxy header's certificate that did not verify or came from an untrusted peer; "
        "on /route, a body requester_identity from a caller not named by --trusted-gateway; "
        "the message says which.",
        optional=("worker_id",),
    ),
    "policy_denied": ErrorCode(
        403,
        "The access policy does not let the requester (the caller's identity, or a trusted "
        "gateway's requester_identity) route to this verb and capability: a worker's "
        "required_capabilities, or a --policy rule or its default; reason names which. "
        "Not worth retrying. With explain, the workers the policy removed.",
        ("verb", "capability", "reason"),
        optional=("explain",),
    ),
    "worker_not_registered": ErrorCode(
        404,
        "Unknown, evicted, or restored and not re-registered: register again.",
        ("worker_id",),
    ),
    "unknown_capability": ErrorCode(
        404,
        "No registered worker, in any state, offers this verb and capability: "
        "a typo or a capability never deployed, not an outage (no Retry-After).",
        ("verb", "capability"),
    ),
    "no_worker_available": ErrorCode(
        503,
        "Workers offer it, but none is routable now (or, with routing options, none "
        "meets them); with explain, why.",
        ("verb", "capability"),
        optional=("explain",),
        headers=retry_after("The heartbeat interval in whole seconds."),
    ),
    "journal_unavailable": ErrorCode(
        503,
        "The change could not be made durable; nothing was changed. Retry later.",
        headers=retry_after("The heartbeat interval in whole seconds."),
    ),
    "rate_limited": ErrorCode(
        429,
        "The caller (its identity, else its address; for a trusted gateway, the "
        "requester_identity) is over the controller's --rate-limit; retry after Retry-After.",
        headers=retry_after("Seconds until the caller's next token, rounded up."),
    ),
    "not_ready": ErrorCode(
        503,
        "The controller cannot route yet (its journal is not replayed) or any more (it is "
        "shutting down); reason says which.",
        ("reason",),
        headers=retry_after("Seconds before asking again."),
    ),
    "store_unavailable": ErrorCode(
        503,
        "The shared registry's Redis cannot be reached; nothing was changed (routing goes "
        "on, heartbeats are kept). Retry later: every controller shares the store, so "
        "another controller answers the same.",
        headers=retry_after("The heartbeat interval in whole seconds."),
    ),
    "incompatible_peer": ErrorCode(
        503,
        "Another controller wrote the shared registry in a newer format than this one "
        "reads; nothing was changed. Upgrade this controller.",
        headers=retry_after("The heartbeat interval in whole seconds."),
    ),
    "revision_compacted": ErrorCode(
        410,
        "The changes after since have left the feed's window (serve --feed-window): "
        "load /snapshot again; oldest is the lowest since still answered.",
        ("oldest",),
    ),
    "revision_reset": ErrorCode(
        410,
        "since is beyond the latest revision, or epoch is another history's (a new "
        "journal, or a shared registry whose Redis lost its data): load /snapshot again; "
        "revision is the latest.",
        ("revision",),
    ),
    "not_found": ErrorCode(404, "No such path."),
    "method_not_allowed": ErrorCode(405, "The path does not take this method (see Allow)."),
}


@attrs.frozen
class Operation:
    """One endpoint: its 200 answer is ``answer``, its errors the codes in ``errors``.

    ``request`` is the model of its JSON body, ``query`` that of its query
    parameters (each field one optional parameter).
    ``media_type`` is the 200 answer's; an answer that is not JSON (the
    metrics' text, the dashboard's files) is a string. ``stream``: the 200 answer is also served as
    ``text/event-stream`` (asked for with ``Accept``), described so.
    ``headers``: its request header (and path) parameters.
    """

    method: str
    path: str
    operation_id: str
    summary: str
    answer: Any
    answer_description: str
    request: type[Any] | None = None
    errors: tuple[str, ...] = ()
    media_type: str = "application/json"
    query: type[Any] | None = None
    stream: str | None = None
    headers: tuple[Mapping[str, Any], ...] = ()


#: What any endpoint with a body may answer about it.
BODY_ERRORS = (
    "invalid_json",
    "request_too_large",
    "request_timeout",
    "unsupported_media_type",
    "invalid_request",
)
_WORKER_WRITE = (
    *BODY_ERRORS,
    "forbidden",
    "journal_unavailable",
    "store_unavailable",
    "incompatible_peer",
)

#: What drain and undrain answer (no body: only the path's worker id is checked).
_DRAIN_ERRORS = (
    "invalid_request",
    "forbidden",
    "worker_not_registered",
    "journal_unavailable",
    "store_unavailable",
    "incompatible_peer",
)
#: The worker of a ``/workers/{worker_id}/...`` path.
_WORKER_ID_PARAMETER: Mapping[str, Any] = {
    "name": "worker_id",
    "in": "path",
    "required": True,
    "description": "The worker's id.",
    "schema": {"type": "string", **attrs.fields(DrainAnswer).worker_id.metadata[JSON_SCHEMA]},
}

#: The controller's endpoints, in the order they are documented.
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET",
        "/health",
        "health",
        "Liveness and worker counts",
        HealthAnswer,
        "Up.",
        errors=("invalid_request",),
    ),
    Operation(
        "GET",
        "/ready",
        "ready",
        "Readiness: the controller can route",
        ReadyAnswer,
        "Ready: the journal is replayed (or the shared registry loaded); store says "
        "whether it takes writes, self_preservation whether the controller is in "
        "self-preservation (neither takes the controller out of a load balancer).",
        errors=("invalid_request", "not_ready"),
    ),
    Operation(
        "POST",
        "/register",
        "register",
        "Register a worker, or replace its URL and capabilities",
        RegisterAnswer,
        "Registered; heartbeat every heartbeat_interval_s; features lists what the "
        "controller accepts beyond the base protocol (load_reports: a heartbeat's load).",
        Registration,
        _WORKER_WRITE,
    ),
    Operation(
        "POST",
        "/heartbeat",
        "heartbeat",
        "Heartbeat: the worker is alive, and optionally its load",
        HeartbeatAnswer,
        "Acknowledged.",
        HeartbeatRequest,
        (*_WORKER_WRITE, "worker_not_registered"),
    ),
    Operation(
        "POST",
        "/deregister",
        "deregister",
        "Deregister a worker that is leaving",
        DeregisterAnswer,
        "Removed.",
        DeregisterRequest,
        (*_WORKER_WRITE, "worker_not_registered"),
    ),
    Operation(
        "POST",
        "/workers/{worker_id}/drain",
        "drain",
        "Drain a worker: it takes no new routes, and keeps its registration while its calls finish",
        DrainAnswer,
        "Draining (changed: false when it was draining already). A registration of the "
        "worker (a new process) or /undrain ends it. Allowed to the worker itself, to an "
        "identity matching the controller's --operator globs, and to anyone without "
        "identities (--insecure); no body is read.",
        errors=_DRAIN_ERRORS,
        headers=(_WORKER_ID_PARAMETER,),
    ),
    Operation(
        "POST",
        "/workers/{worker_id}/undrain",
        "undrain",
        "Undrain a worker: it takes routes again as its health allows",
        DrainAnswer,
        "Not draining (changed: false when it was not draining).",
        errors=_DRAIN_ERRORS,
        headers=(_WORKER_ID_PARAMETER,),
    ),
    Operation(
        "POST",
        "/route",
        "route",
        "Route: the next healthy worker for a verb and capability, under the routing options",
        WorkerEndpoint,
        "The worker to call (round-robin unless the options say otherwise); with explain, why.",
        RouteRequest,
        (
            *BODY_ERRORS,
            "forbidden",
            "policy_denied",
            "unknown_capability",
            "no_worker_available",
            "rate_limited",
        ),
    ),
    Operation(
        "GET",
        "/capabilities",
        "capabilities",
        "A page of (verb, capability, version) entries and their workers",
        CapabilitiesAnswer,
        "The capabilities, sorted; next_cursor is absent on the last page.",
        errors=("invalid_request",),
        query=ListingQuery,
    ),
    Operation(
        "GET",
        "/workers",
        "workers",
        "A page of workers and their health, in registration order",
        WorkersAnswer,
        "The workers; next_cursor is absent on the last page.",
        errors=("invalid_request",),
        query=ListingQuery,
    ),
    Operation(
        "GET",
        "/workers/{worker_id}",
        "worker",
        "One worker and its health, as /workers lists it",
        WorkerEntry,
        "The worker: state (ejected, else its health), health, ejected_until while it is "
        "ejected for failing calls.",
        errors=("invalid_request", "worker_not_registered"),
        headers=(
            {
                "name": "worker_id",
                "in": "path",
                "required": True,
                "description": "The worker's id.",
                "schema": {"type": "string", "pattern": WORKER_ID_PATTERN},
            },
        ),
    ),
    Operation(
        "GET",
        "/slos",
        "slos",
        "The SLO files in effect (STATE_DIR/slos/*.yaml)",
        SlosAnswer,
        "Each file's name and what it states, in the order of the names; "
        "empty without SLO files or a state directory.",
        errors=("invalid_request",),
    ),
    Operation(
        "GET",
        "/snapshot",
        "snapshot",
        "The whole registry at one revision, to follow with /watch",
        SnapshotAnswer,
        "The epoch, the revision, the timings and every worker with its state; "
        "follow it with /watch?epoch=EPOCH&since=REVISION.",
        errors=("invalid_request",),
    ),
    Operation(
        "GET",
        "/watch",
        "watch",
        "The changes after a revision: a long poll, or Server-Sent Events as they come",
        WatchAnswer,
        "At most 1000 changes after since, at once when there are any; else the changes "
        "that come within timeout, or none and the latest revision (the bookmark).",
        errors=("invalid_request", "revision_compacted", "revision_reset"),
        query=WatchQuery,
        stream=(
            "With Accept: text/event-stream, Server-Sent Events: one event per change, "
            "id EPOCH:REVISION, event its type, data its JSON (as in events); a bookmark "
            'event (data {"epoch", "revision"}, id EPOCH:REVISION) every '
            "min(15 s, heartbeat_interval / 2). A reader that falls behind the window gets "
            "an error event, data the 410 revision_compacted body, and the stream ends. "
            "timeout, when given, ends the stream after that many seconds; resume it with "
            "Last-Event-ID."
        ),
        headers=(
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "description": "Resume after this event (EPOCH:REVISION, an event's id): "
                "it replaces since and epoch.",
                "schema": {"type": "string", "pattern": f"^{EVENT_ID_PATTERN}$"},
                "example": "5f0c2a9e41d7b3c8:42",
            },
        ),
    ),
    Operation(
        "GET",
        "/metrics",
        "metrics",
        "Prometheus metrics (text exposition format 0.0.4)",
        str,
        "The metrics; the README lists each one and its labels.",
        media_type="text/plain",
    ),
    Operation(
        "GET", "/openapi.json", "openapi", "This document", dict[str, Any], "The OpenAPI document."
    ),
    Operation(
        "GET",
        "/ui",
        "dashboard",
        "The dashboard: status, capabilities, workers and the latest changes, live",
        str,
        "The page (HTML); it loads /ui/app.js and /ui/style.css and reads the API beside it.",
        media_type="text/html",
    ),
    Operation(
        "GET",
        "/ui/app.js",
        "dashboard_script",
        "The dashboard's script",
        str,
        "The script (JavaScript).",
        media_type="text/javascript",
    ),
    Operation(
        "GET",
        "/ui/style.css",
        "dashboard_style",
        "The dashboard's style sheet",
        str,
        "The style sheet (CSS).",
        media_type="text/css",
    ),
)

#: The service's paths, in the order they are documented.
ROUTE_PATHS: tuple[str, ...] = tuple(operation.path for operation in OPERATIONS)

_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def ref(name: str) -> dict[str, Any]:
    """A reference to the component schema ``name``."""
    return {"$ref": f"#/components/schemas/{name}"}


def type_schema(tp: Any, components: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of an annotation; attrs classes are added to ``components``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [type_schema(a, components) for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(inner.get("type"), str):
            return {**inner, "type": [inner["type"], "null"]}
        return {"anyOf": [inner, {"type": "null"}]}
    if origin is typing.Literal:
        (value,) = typing.get_args(tp)
        return {"const": value}
    if tp is Any:
        return {}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"type": "string", "enum": [member.value for member in tp]}
    if origin is dict:
        return {"type": "object"}
    if origin is tuple:
        item, ellipsis = typing.get_args(tp)
        if ellipsis is not Ellipsis:
            raise TypeError(f"only homogeneous tuples are arrays: {tp!r}")
        return {"type": "array", "items": type_schema(item, components)}
    if attrs.has(tp):
        if tp.__name__ not in components:
            components[tp.__name__] = {}  # taken, while its own fields are walked
            components[tp.__name__] = model_schema(tp, components)
        return ref(tp.__name__)
    raise TypeError(f"no JSON Schema for {tp!r}")


def property_schemas(
    cls: type[Any], components: dict[str, Any], names: Iterable[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Each field's schema (or those of ``names``): its type's, then its metadata's keywords."""
    attrs.resolve_types(cls)
    fields = attrs.fields_dict(cls)
    properties: dict[str, dict[str, Any]] = {}
    for name in fields if names is None else names:
        field = fields.get(name)
        if field is None:
            raise LookupError(f"{cls.__name__} has no field {name!r}")
        schema = type_schema(field.type, components)
        extra = copy.deepcopy(field.metadata.get(JSON_SCHEMA, {}))
        if "items" in extra and "items" in schema:
            schema["items"] = {**schema["items"], **extra.pop("items")}
        properties[field.name] = {**schema, **extra}
    return properties


def model_schema(cls: type[Any], components: dict[str, Any]) -> dict[str, Any]:
    """The closed JSON Schema of an attrs class.

    A field is required unless its default is ``None``, or false (``False``,
    an empty tuple) for a field marked :data:`~crank_registry.OMIT_IF_FALSE`:
    the converter leaves such a field out of an answer, and a request may too.
    """
    return {
        "type": "object",
        "description": (cls.__doc__ or "").strip().split("\n\n")[0],
        "properties": property_schemas(cls, components),
        "required": [
            f.name
            for f in attrs.fields(cls)
            if f.default is not None and not (f.metadata.get(OMIT_IF_FALSE) and not f.default)
        ],
        "additionalProperties": False,
    }


def change_schema(components: dict[str, Any]) -> dict[str, Any]:
    """One change of the feed: any of the event types that are changes, tagged by ``type``.

    The form is the journal's (``crank_registry.unstructure_event``); its
    ``type`` says which change it is.
    """
    variants = []
    for tag, cls in sorted(EVENT_TYPES.items()):
        if not issubclass(cls, Change):
            continue
        schema = model_schema(cls, components)
        schema["properties"] = {"type": {"const": tag}, **schema["properties"]}
        schema["required"] = ["type", *schema["required"]]
        variants.append(schema)
    return {"description": "A change of the registry, with its revision.", "oneOf": variants}


def component_name(code: str) -> str:
    """The component of an error code: ``worker_not_registered`` -> ``WorkerNotRegistered``."""
    return "".join(part.capitalize() for part in code.split("_"))


def error_schema(code: str, spec: ErrorCode, components: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~crank_registry.ErrorAnswer` that error ``code`` answers."""
    names = ("message", *spec.fields, *spec.optional)
    properties: dict[str, Any] = {"error": {"const": code}}
    for name, schema in property_schemas(ErrorAnswer, components, names).items():
        # An optional field is left out when unset, never sent as null.
        kind = schema.get("type")
        properties[name] = {**schema, "type": kind[0]} if isinstance(kind, list) else schema
    return {
        "type": "object",
        "description": spec.description,
        "properties": properties,
        "required": ["error", "message", *spec.fields],
        "additionalProperties": False,
    }


def json_answer(description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An OpenAPI response whose body is JSON ``schema``."""
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
        **extra,
    }


def error_answers(codes: Iterable[str], errors: Mapping[str, ErrorCode]) -> dict[str, Any]:
    """The responses of these error codes, by status (codes of one status: any of them)."""
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(errors[code].status, []).append(code)
    responses: dict[str, Any] = {}
    for status, group in sorted(by_status.items()):
        refs = [ref(component_name(code)) for code in group]
        headers = {name: h for code in group for name, h in errors[code].headers.items()}
        responses[str(status)] = json_answer(
            " ".join(errors[code].description for code in group),
            refs[0] if len(refs) == 1 else {"anyOf": refs},
            **({"headers": headers} if headers else {}),
        )
    return responses


def query_parameters(model: type[Any], components: dict[str, Any]) -> list[dict[str, Any]]:
    """The OpenAPI query parameters of ``model``: each field, without its null.

    A field without a default is a required parameter; the others are optional.
    """
    parameters = []
    for name, given in property_schemas(model, components).items():
        kind = given.get("type")
        # "X | None": a parameter is absent, never null.
        schema = {**given, "type": kind[0]} if isinstance(kind, list) else given
        field = attrs.fields_dict(model)[name]
        if field.default is not None and field.default is not attrs.NOTHING:
            schema["default"] = field.default
        # Required when the model has no default for it (/watch's since).
        required = field.default is attrs.NOTHING
        parameter: dict[str, Any] = {"name": name, "in": "query", "required": required}
        description = schema.pop("description", None)
        if description is not None:
            parameter["description"] = description
        parameters.append({**parameter, "schema": schema})
    return parameters


def operation_object(
    operation: Operation, errors: Mapping[str, ErrorCode], components: dict[str, Any]
) -> dict[str, Any]:
    """The OpenAPI operation of one endpoint (its models are added to ``components``)."""
    result: dict[str, Any] = {"summary": operation.summary, "operationId": operation.operation_id}
    parameters = [] if operation.query is None else query_parameters(operation.query, components)
    parameters.extend(dict(header) for header in operation.headers)
    if parameters:
        result["parameters"] = parameters
    if operation.request is not None:
        schema = type_schema(operation.request, components)
        result["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    schema = type_schema(operation.answer, components)
    if operation.media_type == "application/json":
        success = json_answer(operation.answer_description, schema)
        if operation.stream is not None:
            success["description"] += " " + operation.stream
            success["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    else:
        success = {
            "description": operation.answer_description,
            "content": {operation.media_type: {"schema": schema}},
        }
    result["responses"] = {
        "200": success,
        **error_answers(operation.errors, errors),
    }
    return result


def build_document(
    operations: Iterable[Operation], errors: Mapping[str, ErrorCode]
) -> dict[str, Any]:
    """An OpenAPI 3.1 document of ``operations``, with a component for every error code."""
    components: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for operation in operations:
        paths.setdefault(operation.path, {})[operation.method.lower()] = operation_object(
            operation, errors, components
        )
    if WatchAnswer.__name__ in components:  # its events are changes (its metadata's $ref)
        components["Change"] = change_schema(components)
    for code, spec in errors.items():
        components[component_name(code)] = error_schema(code, spec, components)
    _check_patterns(components)
    return {
        "openapi": "3.1.0",
        "info": {"title": "crank-registry controller", "version": "1", "description": _ABOUT},
        "paths": paths,
        "components": {"schemas": components},
    }


def _check_patterns(schema: Any) -> None:
    # Every pattern must compile: a typo would otherwise surface only in a client.
    if isinstance(schema, dict):
        if isinstance(schema.get("pattern"), str):
            re.compile(schema["pattern"])
        for value in schema.values():
            _check_patterns(value)
    elif isinstance(schema, list):
        for value in schema:
            _check_patterns(value)


_ABOUT = (
    "A capability registry and router. Every error is JSON "
    '{"error": CODE, "message": TEXT, ...} with a stable CODE; unknown '
    "paths answer 404 not_found and wrong methods 405 method_not_allowed."
)


@functools.cache
def _document() -> dict[str, Any]:
    return build_document(OPERATIONS, ERRORS)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh copy, safe to modify)."""
    return copy.deepcopy(_document())
