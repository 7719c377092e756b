"""Request bodies in, JSON errors out.

Every failure the service answers is JSON, ``{"error": CODE, "message":
TEXT, ...}`` with a stable ``CODE``: the core's
:class:`~crank_registry.ErrorAnswer`, rendered by :func:`error_response`.
The service's own failures (the body, the route table, the journal) are
raised as :class:`ApiError`; the core's
:class:`~crank_registry.RegistryError` values (``forbidden`` and
``unknown_capability`` among them)
carry their own code and status and are rendered by
:func:`registry_error_response`::

    ApiError codes              status
    ├── unsupported_media_type  415
    ├── invalid_json            400
    ├── request_too_large       413
    ├── request_timeout         408   the body was not all in by the deadline
    ├── no_worker_available     503   with Retry-After
    ├── rate_limited            429   with Retry-After (--rate-limit)
    ├── not_ready               503   GET /ready, with reason
    ├── journal_unavailable     503
    ├── store_unavailable       503   the shared registry's Redis (with Retry-After)
    ├── incompatible_peer       503   a newer controller wrote the shared registry
    ├── not_found               404
    └── method_not_allowed      405   with Allow

Many answers go out before the body is read (a wrong path, method or media
type, a declared size over the limit). :class:`DrainRequestBody`, the
outermost layer of every app made here (:class:`ServiceApp`), reads what is
left of the body first, so that the connection stays usable and the server
never sees the client still sending after the answer. It and the bounded
body reader come from :mod:`crank_worker_client.body`, the one
implementation that the workers' invocation server uses too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp

from crank_registry import (
    ErrorAnswer,
    Forbidden,
    PolicyDenied,
    RegistryError,
    RevisionCompacted,
    RevisionReset,
    UnknownCapability,
    ValidationError,
    WorkerNotRegistered,
    unstructure,
)
from crank_worker_client.body import (
    DRAIN_LIMIT,
    DRAIN_SECONDS,
    BodyTimeout,
    BodyTooLarge,
    ClientDisconnected,
    DrainRequestBody,
    content_length,
    read_body,
)

__all__ = [
    "DRAIN_LIMIT",
    "DRAIN_SECONDS",
    "ApiError",
    "DrainRequestBody",
    "ServiceApp",
    "error_response",
    "internal_error",
    "parse_json",
    "read_json_body",
    "registry_error_body",
    "registry_error_response",
]


class ApiError(Exception):
    """A failure answered with ``status`` and the JSON body ``{"error": code, ...}``.

    ``fields`` are the other fields of its :class:`~crank_registry.ErrorAnswer`.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.fields = fields

    def response(self) -> JSONResponse:
        """Render the error as a JSON response."""
        return error_response(
            self.status, self.code, self.message, headers=self.headers, **self.fields
        )


class ServiceApp(Starlette):
    """A Starlette app with :class:`DrainRequestBody` outside everything else.

    Outside Starlette's own error layer too, so that its last-resort 500
    waits for the body like every other answer.
    """

    def build_middleware_stack(self) -> ASGIApp:
        """Starlette's stack, wrapped in :class:`DrainRequestBody`."""
        return DrainRequestBody(super().build_middleware_stack())


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    **fields: Any,
) -> JSONResponse:
    """The :class:`~crank_registry.ErrorAnswer` ``error=code, message=message, **fields``."""
    body = unstructure(ErrorAnswer(error=code, message=message, **fields))
    return JSONResponse(body, status_code=status, headers=headers)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """The exception handler of last resort: a JSON 500, never a traceback.

    Async, as every handler here: Starlette runs a plain function in its
    thread pool, a thread hop for every error answer.
    """
    return error_response(500, "internal_error", "the controller failed to answer this request")


def registry_error_response(error: RegistryError) -> JSONResponse:
    """The answer to one of the core's errors, with the status it hints."""
    return JSONResponse(registry_error_body(error), status_code=error.status_hint)


def registry_error_body(error: RegistryError) -> dict[str, Any]:
    """The JSON body (an :class:`~crank_registry.ErrorAnswer`) of one of the core's errors."""
    fields: dict[str, Any] = {}
    if isinstance(error, ValidationError):
        fields["detail"] = error.problems
    elif isinstance(error, (WorkerNotRegistered, Forbidden)):
        fields["worker_id"] = error.worker_id
    elif isinstance(error, UnknownCapability):
        fields["verb"] = error.verb
        fields["capability"] = error.capability
    elif isinstance(error, PolicyDenied):
        fields["verb"] = error.verb
        fields["capability"] = error.capability
        fields["reason"] = error.reason
        if error.explain is not None:
            fields["explain"] = error.explain
    elif isinstance(error, RevisionCompacted):
        fields["oldest"] = error.oldest
    elif isinstance(error, RevisionReset):
        fields["revision"] = error.latest
    body: dict[str, Any] = unstructure(ErrorAnswer(error=error.code, message=str(error), **fields))
    return body


def _media_type_is_json(content_type: str | None) -> bool:
    if content_type is None:
        return False
    media_type, _, params = content_type.partition(";")
    if media_type.strip().lower() != "application/json":
        return False
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            return False
    return True


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "request_too_large", f"the request body is larger than {limit} bytes")


async def read_json_body(
    request: Request, *, max_bytes: int, max_depth: int, read_timeout: float | None
) -> Any:
    """The request's JSON body, refused with an :class:`ApiError` when it is not one.

    The checks run cheapest first: the media type, then the declared size
    (refused before reading anything), then the size while streaming (so an
    undeclared or lying length is cut off at ``max_bytes`` + one chunk),
    then UTF-8 and JSON with a nesting limit. A body not all in within
    ``read_timeout`` seconds is 408 ``request_timeout`` (``None``: no limit).
    """
    # The two headers are found in one pass over the raw list (names are
    # lower case in ASGI); building starlette's Headers costs more.
    content_type: bytes | None = None
    declared: bytes | None = None
    for name, value in request.scope["headers"]:
        if name == b"content-type":
            content_type = value
        elif name == b"content-length":
            declared = value
    if content_type != b"application/json" and not _media_type_is_json(
        None if content_type is None else content_type.decode("latin-1")
    ):
        raise ApiError(
            415,
            "unsupported_media_type",
            "the request body must be JSON sent as 'Content-Type: application/json'",
        )
    length = None if declared is None else content_length(declared)
    deadline = None if read_timeout is None else anyio.current_time() + read_timeout
    try:
        body = await read_body(request.receive, limit=max_bytes, declared=length, deadline=deadline)
    except BodyTooLarge:
        raise _too_large(max_bytes) from None
    except BodyTimeout:
        raise ApiError(
            408,
            "request_timeout",
            f"the request body did not arrive within {read_timeout:g} s; "
            "send it whole, without pauses",
        ) from None
    except ClientDisconnected:
        raise ClientDisconnect() from None
    return parse_json(body, max_depth=max_depth)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _json_number(text: str) -> float | int:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    # A number with a zero fraction (4.0, 1e3) is an integer in JSON Schema,
    # which the OpenAPI document follows; int() of a float is exact.
    return int(value) if value.is_integer() else value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key[:40]!r}")
            seen.add(key)
    return result


def _lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# One decoder for every request: json.loads(..., hooks) builds a new one per call.
_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant,
    parse_float=_json_number,
    object_pairs_hook=_unique_keys,
)


def _problem_in(value: Any, max_depth: int, check_strings: bool) -> str | None:
    """What is wrong with a parsed document, or ``None``.

    Iterative, so that measuring a deep document cannot itself recurse.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > max_depth:
                return f"the request body is nested more than {max_depth} levels deep"
            if check_strings and any(_lone_surrogate(key) for key in item):
                return "the request body has a lone surrogate escape in a key"
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            if depth > max_depth:
                return f"the request body is nested more than {max_depth} levels deep"
            stack.extend((child, depth + 1) for child in item)
        elif check_strings and isinstance(item, str) and _lone_surrogate(item):
            return "the request body has a lone surrogate escape in a string"
    return None


def parse_json(body: bytes, *, max_depth: int) -> Any:
    """Parse ``body`` as strict JSON: UTF-8, no NaN/Infinity, no duplicate keys.

    Numbers with a zero fraction come back as ``int`` (``4.0`` is the
    integer 4, as JSON Schema has it); numbers too large for a float are
    refused rather than read as infinity.

    Raises :class:`ApiError` ``invalid_json`` (400) for anything else,
    including arrays and objects nested more than ``max_depth`` deep.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(
            400, "invalid_json", f"the request body is not UTF-8 (byte {error.start})"
        ) from None
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise ApiError(
            400, "invalid_json", f"the request body is nested more than {max_depth} levels deep"
        ) from None
    except ValueError as error:
        # JSONDecodeError is a ValueError; so are the hooks' refusals and
        # Python's limit on the digits of an integer.
        raise ApiError(
            400, "invalid_json", f"the request body is not valid JSON: {error}"
        ) from None
    # A \uD800-style escape decodes to a lone surrogate, which no UTF-8
    # answer, log line or journal line could hold; only then are strings checked.
    check_strings = "\\u" in text
    # A document nests at most half its length deep: short ones need no walk.
    if check_strings or len(text) > 2 * max_depth:
        problem = _problem_in(value, max_depth, check_strings=check_strings)
        if problem is not None:
            raise ApiError(400, "invalid_json", problem)
    return value
