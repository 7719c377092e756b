"""Serve capabilities on the invocation convention, as a plain ASGI app.

Install with the ``serving`` extra, ``pip install
'crank-worker-client[serving]'``: it adds jsonschema, and no server. Run the
app with any ASGI server (the examples use hypercorn).

The convention, which the controller's gateway (and any caller) uses to
invoke a capability on the worker that the registry chose:

``POST {worker_url}/invoke/{verb}/{name}``
    ``verb`` and ``name`` are path segments, percent-encoded when they
    contain ``/`` or other reserved characters. The body is JSON (content
    type ``application/json``): ``{"payload": ...}``, any JSON value the
    capability's ``input_schema`` accepts.

``200`` with ``application/json``
    ``{"result": ...}`` for an ordinary capability.

``200`` with ``application/x-ndjson``
    for a streaming capability: one JSON object per line, in order. A
    failure after the first line ends the stream with a last line
    ``{"error": CODE, "message": ...}``.

Errors (``application/json``)
    ``{"error": CODE, "message": ...}``: 404 ``unknown_capability``, 405
    ``method_not_allowed``, 415 ``unsupported_media_type``, 400
    ``invalid_json``, 413 ``request_too_large``, 408 ``request_timeout`` (the
    body was not all in within ``read_timeout`` seconds, 10 by default; the
    connection is closed), 422 ``invalid_request`` (the
    body is not ``{"payload": ...}``), 422 ``invalid_payload`` (the payload
    does not match the input schema; ``detail`` lists every problem as
    ``{"path", "message"}``), a handler's own :class:`InvocationError`
    (its code and status), 500 ``handler_failed`` when a handler raises
    anything else (logged here; the answer carries no traceback), and 500
    ``invalid_input_schema`` when the schema holds a ``$ref`` that does not
    resolve.

``GET {worker_url}/health``
    ``{"status": "ok", "capabilities": ["verb:name", ...]}`` plus whatever
    the ``health`` callable adds (for example the agent's state).

An answer given before the body is read (an unknown capability, a wrong
method or media type, a declared size over the limit) first reads the rest
of the body, up to ``max_body_size`` bytes in all and a few seconds, so
that the connection stays usable and the server never sees the client still
sending after the answer; when more is left, the answer carries
``Connection: close`` over HTTP/1.x. Both rules are those of
:mod:`crank_worker_client.body`, which the controller's service uses too.

:func:`invocation_app` builds the app from a mapping ``{(verb, name):
handler}``; a handler is ``async def handler(payload) -> result``, or an
async generator function for a streaming capability. At most
``max_concurrency`` invocations of a capability run at once; more wait.
With an ``agent`` (a :class:`~crank_worker_client.WorkerAgent`, or any async
context manager), the app registers on ASGI lifespan start-up and
deregisters on shutdown, through
:class:`~crank_worker_client.AgentLifespanMiddleware`.

Payloads are validated against ``input_schema`` with the jsonschema
library, in the dialect the schema's ``$schema`` names (Draft 2020-12
without one; ``format`` is an annotation). Each distinct schema is checked
once, when the app is built: one that is not a valid JSON Schema is refused
then with :class:`JsonSchemaError`, naming the capability and the place in
the schema. Pass ``validate_input=False`` to leave all validation to the
handlers instead. Results are not checked against ``output_schema``.

With the ``tracing`` extra installed, each invocation runs in a server
span whose parent is the caller's W3C ``traceparent``.

Every invocation is metered (:attr:`InvocationApp.load`, a
:class:`~crank_worker_client.LoadMeter`): calls in flight (from the accepted
body, waiting for a concurrency slot included), and over the last minute
the p95 latency and the share that failed (a 5xx answer: the handler
raised, or its :class:`InvocationError` has a 5xx status, or a stream
ended with an error line). A :class:`~crank_worker_client.WorkerAgent`
given as ``agent`` sends that load in its heartbeats, unless it was built
with a ``load`` source of its own; an agent run apart from the app takes
``load=app.load.report``. The same agent waits, when it drains at
shutdown, until the meter counts no call in flight (an agent run apart
takes ``calls_in_flight=lambda: app.load.in_flight``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    MutableMapping,
)
from typing import Any
from urllib.parse import unquote

import anyio

from crank_registry import (
    INVOKE_PREFIX,
    NDJSON,
    CapabilitySchema,
    capability_label,
    invocation_path,
)

from ._agent import WorkerAgent
from ._lifespan import AgentLifespanMiddleware
from ._load import Call, LoadMeter
from ._tracing import invocation_span
from .body import (
    READ_TIMEOUT,
    BodyTimeout,
    BodyTooLarge,
    ClientDisconnected,
    DrainRequestBody,
    declared_length,
    read_body,
)
from .payload import INVALID_PAYLOAD, JsonSchemaError, PayloadSchema, refusal_message

__all__ = [
    "INVOKE_PREFIX",
    "NDJSON",
    "Handler",
    "InvocationApp",
    "InvocationError",
    "JsonSchemaError",
    "invocation_app",
    "invocation_path",
]

logger = logging.getLogger("crank_worker_client.serving")

#: Bodies larger than this are refused with 413 (the registry's own limit).
DEFAULT_MAX_BODY_SIZE = 1_048_576

#: ``async def handler(payload) -> result``, or an async generator function
#: yielding JSON objects for a streaming capability.
Handler = Callable[[Any], Awaitable[Any]] | Callable[[Any], AsyncIterator[dict[str, Any]]]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class InvocationError(Exception):
    """Raised by a handler to answer with an error of its own choosing.

    ``status`` must be a 4xx or 5xx code; ``code`` is a stable machine-readable
    name, ``message`` is for people. Raising it before a stream's first line
    gives an error response; after, the stream's last line.
    """

    def __init__(self, code: str, message: str, *, status: int = 422) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"InvocationError status must be 4xx or 5xx, got {status}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


# ---------------------------------------------------------------- the app


class _Capability:
    __slots__ = ("handler", "limiter", "payload_schema", "schema", "streaming")

    def __init__(
        self, schema: CapabilitySchema, handler: Handler, payload_schema: PayloadSchema | None
    ) -> None:
        self.schema = schema
        self.handler = handler
        self.payload_schema = payload_schema  # None: validation is left to the handler
        self.streaming = inspect.isasyncgenfunction(handler)
        self.limiter: anyio.CapacityLimiter | None = None  # made in the event loop


class InvocationApp:
    """An ASGI app serving ``handlers`` on the invocation convention (module docstring).

    ``handlers`` and ``capabilities`` must name the same ``(verb, name)``
    pairs. ``agent`` (usually a ``WorkerAgent`` built with the same
    capabilities) is entered on lifespan start-up and left on shutdown, so
    the worker registers when the server starts and deregisters when it
    stops. Raises :class:`ValueError` for a mismatch or a handler that is
    not async, and :class:`JsonSchemaError` (a ``ValueError`` too) for an
    ``input_schema`` that is not a valid JSON Schema while
    ``validate_input`` is true. ``read_timeout``: seconds a request body
    may take to arrive whole (later: 408 ``request_timeout``). ``load``:
    the meter of the invocations (a new :class:`LoadMeter` by default);
    a :class:`WorkerAgent` as ``agent`` reports it unless it has a load
    source already.
    """

    def __init__(
        self,
        handlers: Mapping[tuple[str, str], Handler],
        capabilities: Iterable[CapabilitySchema],
        *,
        agent: contextlib.AbstractAsyncContextManager[Any] | None = None,
        validate_input: bool = True,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        health: Callable[[], Mapping[str, Any]] | None = None,
        read_timeout: float = READ_TIMEOUT,
        load: LoadMeter | None = None,
    ) -> None:
        if not isinstance(max_body_size, int) or max_body_size < 1:
            raise ValueError(f"max_body_size must be an integer >= 1, got {max_body_size!r}")
        if (
            not isinstance(read_timeout, (int, float))
            or isinstance(read_timeout, bool)
            or not 0 < read_timeout < math.inf
        ):
            raise ValueError(f"read_timeout must be a finite number > 0, got {read_timeout!r}")
        schemas = {}
        for schema in capabilities:
            if schema.key in schemas:
                raise ValueError(f"capability {capability_label(schema.key)!r} given twice")
            schemas[schema.key] = schema
        missing = sorted(capability_label(k) for k in schemas.keys() - handlers.keys())
        extra = sorted(capability_label(k) for k in handlers.keys() - schemas.keys())
        if missing or extra:
            raise ValueError(
                "handlers and capabilities must name the same (verb, name) pairs: "
                f"without a handler: {missing or 'none'}; without a schema: {extra or 'none'}"
            )
        if not schemas:
            raise ValueError("at least one capability is needed")
        for key, handler in handlers.items():
            if not (inspect.iscoroutinefunction(handler) or inspect.isasyncgenfunction(handler)):
                raise ValueError(
                    f"the handler of {capability_label(key)!r} must be an async function "
                    "or an async generator function"
                )
        payload_schemas = _payload_schemas(schemas.values()) if validate_input else {}
        self._capabilities = {
            key: _Capability(schemas[key], handlers[key], payload_schemas.get(key))
            for key in schemas
        }
        self._max_body_size = max_body_size
        self._read_timeout = float(read_timeout)
        self._health = health
        self.load = load if load is not None else LoadMeter()
        if isinstance(agent, WorkerAgent) and agent.load is None:
            agent.load = self.load.report
        if isinstance(agent, WorkerAgent) and agent.calls_in_flight is None:
            meter = self.load
            agent.calls_in_flight = lambda: meter.in_flight
        app: ASGIApp = DrainRequestBody(self._serve, limit=max_body_size)
        self._app = app if agent is None else AgentLifespanMiddleware(app, agent)

    @property
    def capabilities(self) -> tuple[CapabilitySchema, ...]:
        """The schemas served, in the order given."""
        return tuple(c.schema for c in self._capabilities.values())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry point: lifespan, HTTP, or a websocket closed at once."""
        await self._app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _lifespan_with_nothing_to_do(receive, send)
        # Anything else (websocket) is not part of the convention: close it.
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else scope["path"]
        path = path.partition("?")[0]
        if path == "/health":
            if method not in ("GET", "HEAD"):
                await _error(send, 405, "method_not_allowed", "use GET", allow="GET")
                return
            body: dict[str, Any] = {
                "status": "ok",
                "capabilities": [capability_label(key) for key in self._capabilities],
            }
            if self._health is not None:
                body.update(self._health())
            await _json(send, 200, body)
            return
        segments = path.split("/")
        # ["", "invoke", verb, name]
        if len(segments) != 4 or segments[0] or f"/{segments[1]}" != INVOKE_PREFIX:
            await _error(send, 404, "not_found", f"no such path {scope['path']!r}")
            return
        key = (unquote(segments[2]), unquote(segments[3]))
        capability = self._capabilities.get(key)
        if capability is None:
            await _error(
                send,
                404,
                "unknown_capability",
                f"this worker does not serve {capability_label(key)!r}",
            )
            return
        if method != "POST":
            await _error(send, 405, "method_not_allowed", "use POST", allow="POST")
            return
        headers = _headers(scope)
        content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != "application/json":
            await _error(send, 415, "unsupported_media_type", "the body must be application/json")
            return
        try:
            raw = await read_body(
                receive,
                limit=self._max_body_size,
                declared=declared_length(scope),
                deadline=anyio.current_time() + self._read_timeout,
            )
        except BodyTooLarge as error:
            await _error(send, 413, "request_too_large", str(error))
            return
        except BodyTimeout:
            message = f"the body did not arrive within {self._read_timeout:g} s"
            await _error(send, 408, "request_timeout", message)
            return
        except ClientDisconnected:
            return  # nobody is left to answer
        try:
            document = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            await _error(send, 400, "invalid_json", f"the body is not valid JSON: {error}")
            return
        if not isinstance(document, dict) or "payload" not in document:
            await _error(send, 422, "invalid_request", 'the body must be {"payload": ...}')
            return
        unknown = sorted(set(document) - {"payload"})
        if unknown:
            await _error(
                send,
                422,
                "invalid_request",
                f'unknown field(s) {", ".join(unknown)}; the body is {{"payload": ...}}',
            )
            return
        payload = document["payload"]
        if capability.payload_schema is not None:
            label = capability_label(key)
            try:
                problems = capability.payload_schema.problems(payload)
            except JsonSchemaError as error:
                logger.error("the input_schema of %s cannot be applied: %s", label, error)
                message = f"the input_schema of {label!r} cannot be applied: {error}"
                await _error(send, 500, "invalid_input_schema", message)
                return
            if problems:
                await _json(
                    send,
                    422,
                    {
                        "error": INVALID_PAYLOAD,
                        "message": refusal_message(problems),
                        "detail": [{"path": p.path, "message": p.message} for p in problems],
                    },
                )
                return
        if capability.limiter is None:
            capability.limiter = anyio.CapacityLimiter(capability.schema.max_concurrency)
        with self.load.call() as call:
            async with capability.limiter:
                with invocation_span(headers, key[0], key[1]):
                    if capability.streaming:
                        await self._stream(capability, payload, send, call)
                    else:
                        await self._call(capability, payload, send, call)

    async def _call(self, capability: _Capability, payload: Any, send: Send, call: Call) -> None:
        label = capability_label(capability.schema.key)
        try:
            result = await capability.handler(payload)  # type: ignore[misc]
            body = _dumps({"result": result})
        except InvocationError as error:
            if error.status >= 500:
                call.fail()
            await _error(send, error.status, error.code, error.message)
            return
        except Exception:
            call.fail()
            logger.exception("handler of %s failed", label)
            await _error(send, 500, "handler_failed", f"the handler of {label!r} failed")
            return
        await _send(send, 200, "application/json", body)

    async def _stream(self, capability: _Capability, payload: Any, send: Send, call: Call) -> None:
        label = capability_label(capability.schema.key)
        stream: AsyncIterator[Any] = capability.handler(payload)  # type: ignore[assignment]
        try:
            # The first line decides the status: a handler that fails before
            # producing anything gets an ordinary error response.
            try:
                first = _dumps_line(await stream.__anext__())
            except StopAsyncIteration:
                first = b""
            except InvocationError as error:
                if error.status >= 500:
                    call.fail()
                await _error(send, error.status, error.code, error.message)
                return
            except Exception:
                call.fail()
                logger.exception("handler of %s failed", label)
                await _error(send, 500, "handler_failed", f"the handler of {label!r} failed")
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", NDJSON.encode())],
                }
            )
            await send({"type": "http.response.body", "body": first, "more_body": True})
            while True:
                try:
                    line = _dumps_line(await stream.__anext__())
                except StopAsyncIteration:
                    break
                except InvocationError as error:
                    call.fail()
                    line = _dumps_line({"error": error.code, "message": error.message})
                    await send({"type": "http.response.body", "body": line, "more_body": True})
                    break
                except Exception:
                    call.fail()
                    logger.exception("handler of %s failed mid-stream", label)
                    line = _dumps_line(
                        {"error": "handler_failed", "message": f"the handler of {label!r} failed"}
                    )
                    await send({"type": "http.response.body", "body": line, "more_body": True})
                    break
                await send({"type": "http.response.body", "body": line, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()


#: The name the examples build with: ``invocation_app(handlers, capabilities, ...)``.
invocation_app = InvocationApp


def _payload_schemas(
    capabilities: Iterable[CapabilitySchema],
) -> dict[tuple[str, str], PayloadSchema]:
    """Each capability's input_schema, checked once however many capabilities share it."""
    checked: dict[str, PayloadSchema] = {}
    found = {}
    for capability in capabilities:
        label = capability_label(capability.key)
        try:
            text = json.dumps(capability.input_schema, sort_keys=True, allow_nan=False)
            if text not in checked:
                checked[text] = PayloadSchema(capability.input_schema)
        except (TypeError, ValueError) as error:
            # JsonSchemaError is a ValueError, as is json's refusal of NaN.
            raise JsonSchemaError(
                f"capability {label!r}: {error}; fix its input_schema, or pass "
                "validate_input=False to leave the payload to the handler"
            ) from None
        found[capability.key] = checked[text]
    return found


async def _lifespan_with_nothing_to_do(receive: Receive, send: Send) -> None:
    # The app itself has nothing to start or stop; an agent's registration
    # is AgentLifespanMiddleware's, around it.
    await receive()  # lifespan.startup
    await send({"type": "lifespan.startup.complete"})
    await receive()  # lifespan.shutdown
    await send({"type": "lifespan.shutdown.complete"})


def _refuse_constant(name: str) -> Any:
    # NaN and Infinity are not JSON.
    raise ValueError(f"{name} is not valid JSON")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _dumps_line(value: Any) -> bytes:
    if not isinstance(value, dict):
        raise TypeError(f"a streaming handler must yield JSON objects, got {type(value).__name__}")
    return _dumps(value) + b"\n"


def _headers(scope: Scope) -> dict[str, str]:
    return {
        name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]
    }


async def _send(
    send: Send, status: int, content_type: str, body: bytes, *, allow: str | None = None
) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    if allow is not None:
        headers.append((b"allow", allow.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, body: Mapping[str, Any]) -> None:
    await _send(send, status, "application/json", _dumps(body))


async def _error(
    send: Send, status: int, code: str, message: str, *, allow: str | None = None
) -> None:
    await _send(
        send, status, "application/json", _dumps({"error": code, "message": message}), allow=allow
    )
