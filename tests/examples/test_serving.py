"""The invocation convention: crank_worker_client.serving in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import anyio
import jsonschema
import pytest

from crank_worker_client.serving import (
    InvocationError,
    JsonSchemaError,
    invocation_app,
    invocation_path,
)
from tests.builders import capability
from tests.examples.helpers import invoke, ndjson, running

pytestmark = pytest.mark.anyio


ECHO_SCHEMA = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "maxLength": 10},
        "times": {"type": "integer", "minimum": 1},
    },
    "required": ["text"],
    "additionalProperties": False,
}


async def echo(payload: dict[str, Any]) -> dict[str, Any]:
    return {"echo": payload["text"] * payload.get("times", 1)}


async def refuse(payload: Any) -> Any:
    raise InvocationError("too_dull", "that payload is too dull", status=409)


async def crash(payload: Any) -> Any:
    raise RuntimeError("secret internal detail")


async def count_up(payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    for number in range(payload["n"]):
        yield {"n": number}
    if payload.get("fail_after"):
        raise RuntimeError("mid-stream failure")


async def fail_first(payload: Any) -> AsyncIterator[dict[str, Any]]:
    raise InvocationError("no_stream", "cannot stream that", status=422)
    yield {}  # pragma: no cover - makes this an async generator


HANDLERS: dict[tuple[str, str], Any] = {
    ("echo", "text"): echo,
    ("refuse", "it"): refuse,
    ("crash", "it"): crash,
    ("count", "numbers"): count_up,
    ("stream", "refused"): fail_first,
}
CAPABILITIES = [
    capability(verb="echo", name="text", input_schema=ECHO_SCHEMA),
    capability(verb="refuse", name="it"),
    capability(verb="crash", name="it"),
    capability(
        verb="count",
        name="numbers",
        input_schema={
            "type": "object",
            "properties": {"n": {"type": "integer"}},
            "required": ["n"],
        },
    ),
    capability(verb="stream", name="refused"),
]


def app(**options: Any) -> Any:
    return invocation_app(HANDLERS, CAPABILITIES, **options)


async def test_result_is_the_handlers_answer() -> None:
    async with running(app()) as client:
        response = await invoke(client, "echo", "text", {"text": "ab", "times": 2})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"result": {"echo": "abab"}}


async def test_health_lists_capabilities_and_extra_details() -> None:
    async with running(app(health=lambda: {"agent": {"state": "registered"}})) as client:
        response = await client.get("/health")
    assert response.json() == {
        "status": "ok",
        "capabilities": ["echo:text", "refuse:it", "crash:it", "count:numbers", "stream:refused"],
        "agent": {"state": "registered"},
    }


@pytest.mark.parametrize(
    ("request_args", "status", "code"),
    [
        (
            {"method": "POST", "url": "/invoke/echo/nothing", "json": {"payload": {}}},
            404,
            "unknown_capability",
        ),
        ({"method": "POST", "url": "/elsewhere", "json": {"payload": {}}}, 404, "not_found"),
        ({"method": "POST", "url": "/invoke/echo", "json": {"payload": {}}}, 404, "not_found"),
        ({"method": "GET", "url": "/invoke/echo/text"}, 405, "method_not_allowed"),
        ({"method": "POST", "url": "/health"}, 405, "method_not_allowed"),
        (
            {"method": "POST", "url": "/invoke/echo/text", "content": b'{"payload": {}}'},
            415,
            "unsupported_media_type",
        ),
        (
            {
                "method": "POST",
                "url": "/invoke/echo/text",
                "content": b'{"payload": ',
                "headers": {"content-type": "application/json"},
            },
            400,
            "invalid_json",
        ),
        (
            {
                "method": "POST",
                "url": "/invoke/echo/text",
                "content": b'{"payload": "\xff"}',
                "headers": {"content-type": "application/json"},
            },
            400,
            "invalid_json",
        ),
        (
            {
                "method": "POST",
                "url": "/invoke/echo/text",
                "content": b'{"payload": NaN}',
                "headers": {"content-type": "application/json"},
            },
            400,
            "invalid_json",
        ),
        (
            {
                "method": "POST",
                "url": "/invoke/echo/text",
                "content": b"[" * 100_000,
                "headers": {"content-type": "application/json"},
            },
            400,
            "invalid_json",
        ),
        ({"method": "POST", "url": "/invoke/echo/text", "json": [1]}, 422, "invalid_request"),
        (
            {"method": "POST", "url": "/invoke/echo/text", "json": {"text": "a"}},
            422,
            "invalid_request",
        ),
        (
            {
                "method": "POST",
                "url": "/invoke/echo/text",
                "json": {"payload": {"text": "a"}, "extra": 1},
            },
            422,
            "invalid_request",
        ),
        (
            {"method": "POST", "url": "/invoke/echo/text", "json": {"payload": {"text": 5}}},
            422,
            "invalid_payload",
        ),
        ({"method": "POST", "url": "/invoke/refuse/it", "json": {"payload": {}}}, 409, "too_dull"),
        (
            {"method": "POST", "url": "/invoke/crash/it", "json": {"payload": {}}},
            500,
            "handler_failed",
        ),
        (
            {"method": "POST", "url": "/invoke/stream/refused", "json": {"payload": {}}},
            422,
            "no_stream",
        ),
    ],
)
async def test_errors_are_json_with_a_code(
    request_args: dict[str, Any], status: int, code: str
) -> None:
    async with running(app()) as client:
        response = await client.request(**request_args)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == code
    assert isinstance(body["message"], str)
    assert "Traceback" not in response.text
    assert "secret internal detail" not in response.text


async def test_invalid_payload_lists_every_problem() -> None:
    async with running(app()) as client:
        response = await invoke(
            client, "echo", "text", {"text": "x" * 11, "times": 0, "other": True}
        )
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {"path": "payload.text", "message": "must be at most 10 characters"},
        {"path": "payload.times", "message": "must be >= 1"},
        {"path": "payload.other", "message": "unknown field"},
    ]


async def test_body_over_the_limit_is_refused_by_its_declared_length() -> None:
    async with running(app(max_body_size=100)) as client:
        response = await invoke(client, "echo", "text", {"text": "x" * 200})
    assert response.status_code == 413
    assert response.json()["error"] == "request_too_large"


async def test_body_over_the_limit_is_refused_without_a_declared_length() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"payload": "'
        for _ in range(10):
            yield b"x" * 50
        yield b'"}'

    async with running(app(max_body_size=100)) as client:
        response = await client.post(
            "/invoke/echo/text", content=chunks(), headers={"content-type": "application/json"}
        )
    assert response.status_code == 413


async def test_streaming_answers_ndjson_lines() -> None:
    async with running(app()) as client:
        response = await invoke(client, "count", "numbers", {"n": 3})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert ndjson(response) == [{"n": 0}, {"n": 1}, {"n": 2}]


async def test_a_stream_that_fails_midway_ends_with_an_error_line() -> None:
    async with running(app()) as client:
        response = await invoke(client, "count", "numbers", {"n": 2, "fail_after": True})
    assert response.status_code == 200
    assert ndjson(response) == [
        {"n": 0},
        {"n": 1},
        {"error": "handler_failed", "message": "the handler of 'count:numbers' failed"},
    ]


async def test_percent_encoded_names_address_the_capability() -> None:
    weird = capability(verb="get", name="a/b c")

    async def answer(payload: Any) -> str:
        return "found"

    served = invocation_app({("get", "a/b c"): answer}, [weird])
    assert invocation_path("get", "a/b c") == "/invoke/get/a%2Fb%20c"
    async with running(served) as client:
        response = await client.post(invocation_path("get", "a/b c"), json={"payload": {}})
    assert response.json() == {"result": "found"}


async def test_at_most_max_concurrency_invocations_run_at_once() -> None:
    running_now = 0
    peak = 0

    async def slow(payload: Any) -> None:
        nonlocal running_now, peak
        running_now += 1
        peak = max(peak, running_now)
        await anyio.sleep(0.01)
        running_now -= 1

    served = invocation_app(
        {("slow", "op"): slow}, [capability(verb="slow", name="op", max_concurrency=2)]
    )
    async with running(served) as client, anyio.create_task_group() as group:
        for _ in range(6):
            group.start_soon(invoke, client, "slow", "op", {})
    assert peak == 2


class RecordingAgent:
    def __init__(self, fail: bool = False) -> None:
        self.events: list[str] = []
        self.fail = fail

    async def __aenter__(self) -> RecordingAgent:
        if self.fail:
            raise RuntimeError("controller refused the registration")
        self.events.append("registered")
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.events.append("deregistered")


async def test_the_agent_is_entered_at_startup_and_left_at_shutdown() -> None:
    agent = RecordingAgent()
    async with running(app(agent=agent)) as client:
        assert agent.events == ["registered"]
        await invoke(client, "echo", "text", {"text": "a"})
    assert agent.events == ["registered", "deregistered"]


async def test_a_lifespan_cancelled_while_running_still_leaves_the_agent() -> None:
    agent = RecordingAgent()
    started = anyio.Event()

    async def receive() -> dict[str, Any]:
        if not started.is_set():
            return {"type": "lifespan.startup"}
        await anyio.sleep_forever()  # the server is stopped before it sends shutdown
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()

    async with anyio.create_task_group() as group:
        group.start_soon(app(agent=agent), {"type": "lifespan"}, receive, send)
        await started.wait()
        group.cancel_scope.cancel()
    assert agent.events == ["registered", "deregistered"]


async def test_a_failing_agent_fails_startup() -> None:
    with pytest.raises(RuntimeError, match=r"start-up failed.*controller refused"):
        async with running(app(agent=RecordingAgent(fail=True))):
            pass


def test_handlers_and_capabilities_must_match() -> None:
    with pytest.raises(ValueError, match="without a handler: \\['b:c'\\]"):
        invocation_app(
            {("echo", "text"): echo},
            [capability(verb="echo", name="text"), capability(verb="b", name="c")],
        )
    with pytest.raises(ValueError, match="without a schema: \\['b:c'\\]"):
        invocation_app(
            {("echo", "text"): echo, ("b", "c"): echo}, [capability(verb="echo", name="text")]
        )
    with pytest.raises(ValueError, match="at least one"):
        invocation_app({}, [])


def test_handlers_must_be_async() -> None:
    def sync(payload: Any) -> Any:
        return payload

    with pytest.raises(ValueError, match="must be an async function"):
        invocation_app({("a", "b"): sync}, [capability(verb="a", name="b")])


def test_an_invalid_schema_is_refused_at_build_unless_validation_is_off() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "text"}}}
    with pytest.raises(
        JsonSchemaError,
        match=r"capability 'a:b': input_schema\.properties\.x\.type: 'text' is not valid.*"
        r"validate_input=False",
    ):
        invocation_app({("a", "b"): echo}, [capability(verb="a", name="b", input_schema=schema)])
    invocation_app(
        {("a", "b"): echo},
        [capability(verb="a", name="b", input_schema=schema)],
        validate_input=False,
    )


async def test_without_validation_the_handler_sees_any_payload() -> None:
    async def keys(payload: Any) -> Any:
        return sorted(payload)

    served = invocation_app(
        {("k", "v"): keys},
        [capability(verb="k", name="v", input_schema={"type": "string"})],
        validate_input=False,
    )
    async with running(served) as client:
        response = await invoke(client, "k", "v", {"b": 1, "a": 2})
    assert response.json() == {"result": ["a", "b"]}


async def problems_of(schema: dict[str, Any], payload: Any) -> list[tuple[str, str]]:
    """What the app answers about ``payload`` under ``schema``: [] when it is accepted."""

    async def accept(payload: Any) -> None:
        return None

    served = invocation_app(
        {("check", "it"): accept}, [capability(verb="check", name="it", input_schema=schema)]
    )
    async with running(served) as client:
        response = await invoke(client, "check", "it", payload)
    if response.status_code == 200:
        return []
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_payload"
    assert body["message"] == "; ".join(f"{d['path']}: {d['message']}" for d in body["detail"])
    return [(problem["path"], problem["message"]) for problem in body["detail"]]


DRAFT_4 = "http://json-schema.org/draft-04/schema#"
DRAFT_7 = "http://json-schema.org/draft-07/schema#"


@pytest.mark.parametrize(
    ("schema", "value", "problems"),
    [
        ({"type": "integer"}, 3, []),
        ({"type": "integer"}, 3.0, []),
        ({"type": "integer"}, 3.5, [("payload", "must be of type integer")]),
        ({"type": "integer"}, 10**400, []),
        ({"type": "integer", "maximum": 10}, 10**400, [("payload", "must be <= 10")]),
        ({"type": "integer"}, True, [("payload", "must be of type integer")]),
        ({"type": "number"}, False, [("payload", "must be of type number")]),
        ({"type": ["string", "null"]}, None, []),
        ({"type": ["string", "null"]}, 1, [("payload", "must be of type string or null")]),
        ({"type": "boolean"}, 1, [("payload", "must be of type boolean")]),
        ({"enum": [1, "a"]}, True, [("payload", 'must be one of 1, "a"')]),
        ({"enum": [1, "a"]}, 1.0, []),
        ({"const": False}, 0, [("payload", "must be false")]),
        ({"const": {"a": [1]}}, {"a": [1]}, []),
        ({"minimum": 1, "exclusiveMaximum": 3}, 3, [("payload", "must be < 3")]),
        ({"exclusiveMinimum": 0, "maximum": 2.5}, 0, [("payload", "must be > 0")]),
        ({"multipleOf": 5}, 12, [("payload", "must be a multiple of 5")]),
        ({"pattern": "^[a-z]+$"}, "abc1", [("payload", "must match the pattern '^[a-z]+$'")]),
        ({"minLength": 2}, "a", [("payload", "must be at least 2 characters")]),
        (
            {"items": {"type": "string"}, "minItems": 1},
            [],
            [("payload", "must have at least 1 items")],
        ),
        (
            {"items": {"type": "string"}, "maxItems": 1},
            ["a", 2],
            [("payload[1]", "must be of type string"), ("payload", "must have at most 1 items")],
        ),
        ({"uniqueItems": True}, [1, 1.0], [("payload", "must not hold the same item twice")]),
        ({"uniqueItems": True}, [1, True], []),
        # jsonschema gives a false subschema's failure no path: it is the parent's.
        ({"properties": {"a": False}}, {"a": 1}, [("payload", "is not allowed")]),
        (
            {"additionalProperties": {"type": "integer"}},
            {"a": 1, "b": "x"},
            [("payload.b", "must be of type integer")],
        ),
        (
            {"required": ["a", "b", "c"]},
            {"a": 1},
            [("payload.b", "is required"), ("payload.c", "is required")],
        ),
        (
            {
                "properties": {"a": {}},
                "patternProperties": {"^x-": {}},
                "additionalProperties": False,
            },
            {"a": 1, "x-trace": 2, "b": 3, "c": 4},
            [("payload.b", "unknown field"), ("payload.c", "unknown field")],
        ),
        (
            {"type": "string", "format": "email", "description": "annotations only"},
            "not an email",
            [],
        ),
        # Beyond the subset the hand-written validator had.
        (
            {"oneOf": [{"type": "string"}, {"type": "integer"}]},
            [],
            [("payload", "must match exactly one of the schemas of oneOf")],
        ),
        (
            {"oneOf": [{"type": "integer"}, {"minimum": 0}]},
            1,
            [("payload", "must match exactly one of the schemas of oneOf")],
        ),
        ({"oneOf": [{"type": "integer"}, {"minimum": 0}]}, -1, []),
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, None, []),
        ({"not": {"const": "root"}}, "root", [("payload", "must not match the schema of not")]),
        (
            {
                "$defs": {"name": {"type": "string", "pattern": "^[A-Z]"}},
                "properties": {"names": {"type": "array", "items": {"$ref": "#/$defs/name"}}},
            },
            {"names": ["Ada", "bob"]},
            [("payload.names[1]", "must match the pattern '^[A-Z]'")],
        ),
        (
            {"prefixItems": [{"type": "string"}], "items": False},
            ["a", "b"],
            [("payload", "Expected at most 1 item but found 1 extra: 'b'")],
        ),
        (
            {"if": {"properties": {"kind": {"const": "png"}}}, "then": {"required": ["width"]}},
            {"kind": "png"},
            [("payload.width", "is required")],
        ),
        ({"minProperties": 1}, {}, [("payload", "must have at least 1 fields")]),
        (
            {"dependentRequired": {"a": ["b"]}},
            {"a": 1},
            [("payload", "'b' is a dependency of 'a'")],
        ),
        # The dialect comes from $schema: draft 4's boolean exclusiveMinimum,
        # draft 7's array form of items.
        (
            {"$schema": DRAFT_4, "minimum": 1, "exclusiveMinimum": True},
            1,
            [("payload", "must be > 1")],
        ),
        (
            {"$schema": DRAFT_7, "items": [{"type": "string"}], "additionalItems": False},
            ["a", "b"],
            [("payload", "Additional items are not allowed ('b' was unexpected)")],
        ),
    ],
)
async def test_payloads_are_validated_with_jsonschema(
    schema: dict[str, Any], value: Any, problems: list[tuple[str, str]]
) -> None:
    assert await problems_of(schema, value) == problems


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "text"}, "input_schema.type: 'text' is not valid under any of the given schemas"),
        ({"minimum": "1"}, "input_schema.minimum: '1' is not of type 'number'"),
        ({"maxLength": -1}, "input_schema.maxLength: -1 is less than the minimum of 0"),
        ({"pattern": "("}, "input_schema.pattern: '(' is not a 'regex'"),
        ({"enum": "a"}, "input_schema.enum: 'a' is not of type 'array'"),
        ({"required": "a"}, "input_schema.required: 'a' is not of type 'array'"),
        ({"properties": []}, "input_schema.properties: [] is not of type 'object'"),
        ({"items": {"oneOf": {}}}, "input_schema.items.oneOf: {} is not of type 'array'"),
        (
            {"$schema": DRAFT_4, "exclusiveMinimum": 0},
            "input_schema.exclusiveMinimum: 0 is not of type 'boolean'",
        ),
        (
            {"$schema": "https://example.com/my-dialect"},
            "input_schema.$schema: 'https://example.com/my-dialect' is not a JSON Schema dialect",
        ),
        ({"const": float("nan")}, "Out of range float values are not JSON compliant"),
    ],
)
def test_an_invalid_schema_is_refused_at_build_naming_the_capability(
    schema: dict[str, Any], message: str
) -> None:
    with pytest.raises(JsonSchemaError) as refused:
        invocation_app({("a", "b"): echo}, [capability(verb="a", name="b", input_schema=schema)])
    assert str(refused.value).startswith("capability 'a:b': ")
    assert message in str(refused.value)


def test_each_distinct_schema_is_checked_once_when_the_app_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checked: list[Any] = []
    check_schema = jsonschema.Draft202012Validator.check_schema

    def counting(schema: Any, *args: Any, **kwargs: Any) -> None:
        checked.append(schema)
        check_schema(schema, *args, **kwargs)

    monkeypatch.setattr(jsonschema.Draft202012Validator, "check_schema", counting)
    shared = {"type": "object", "properties": {"n": {"type": "integer"}}}
    served = invocation_app(
        {("a", "one"): echo, ("a", "two"): echo, ("a", "three"): echo},
        [
            capability(verb="a", name="one", input_schema=shared),
            capability(verb="a", name="two", input_schema=dict(reversed(shared.items()))),
            capability(verb="a", name="three", input_schema={"type": "object"}),
        ],
    )
    assert checked == [shared, {"type": "object"}]
    assert len(served.capabilities) == 3


async def test_a_ref_that_does_not_resolve_is_a_json_500_naming_the_capability() -> None:
    schema = {"properties": {"a": {"$ref": "https://example.com/elsewhere.json"}}}
    served = invocation_app(
        {("a", "b"): echo}, [capability(verb="a", name="b", input_schema=schema)]
    )
    async with running(served) as client:
        response = await invoke(client, "a", "b", {"a": 1})
        accepted = await invoke(client, "a", "b", {"text": "no a, no $ref"})
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "invalid_input_schema"
    assert "'a:b'" in body["message"]
    assert "https://example.com/elsewhere.json" in body["message"]
    assert accepted.status_code == 200


async def test_a_raw_asgi_error_never_leaks_a_traceback_for_unserialisable_results() -> None:
    async def unserialisable(payload: Any) -> Any:
        return {"value": object()}

    served = invocation_app(
        {("bad", "result"): unserialisable}, [capability(verb="bad", name="result")]
    )
    async with running(served) as client:
        response = await invoke(client, "bad", "result", {})
    assert response.status_code == 500
    assert response.json()["error"] == "handler_failed"


async def test_works_under_trio_too() -> None:
    # The app uses anyio only; run one request on trio directly.
    results: list[Any] = []

    async def main() -> None:
        async with running(app()) as client:
            response = await invoke(client, "echo", "text", {"text": "t"})
            results.append(response.json())

    await anyio.to_thread.run_sync(lambda: anyio.run(main, backend="trio"))
    assert results == [{"result": {"echo": "t"}}]


def test_invocation_errors_carry_a_code_a_message_and_an_error_status() -> None:
    error = InvocationError("code", "text", status=418)
    assert (error.code, error.message, error.status) == ("code", "text", 418)
    with pytest.raises(ValueError, match="4xx or 5xx"):
        InvocationError("code", "text", status=200)


async def _raw_request(
    served: Any, path: str, chunks: list[bytes], headers: list[tuple[bytes, bytes]]
) -> tuple[list[int], list[dict[str, Any]]]:
    """Run one HTTP/1.1 request; return how many chunks were read at the answer's start."""
    pending = list(chunks)
    read_at_start: list[int] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not pending:
            return {"type": "http.disconnect"}
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            read_at_start.append(len(chunks) - len(pending))
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
    }
    await served(scope, receive, send)
    return read_at_start, sent


async def test_an_early_answer_reads_the_rest_of_the_body_first() -> None:
    # An unknown capability, a wrong media type: answered without the body,
    # but only once it has been read, so the connection stays usable.
    json_type = (b"content-type", b"application/json")
    for path, headers, status in [
        ("/invoke/echo/nope", [json_type], 404),
        ("/invoke/echo/text", [(b"content-type", b"text/plain")], 415),
    ]:
        read, sent = await _raw_request(app(), path, [b"{", b'"a"', b": 1}"], headers)
        assert read == [3]
        assert sent[0]["status"] == status
        assert (b"connection", b"close") not in sent[0]["headers"]


async def test_an_early_answer_to_a_body_over_the_limit_closes_instead_of_reading() -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"1000")]
    read, sent = await _raw_request(
        app(max_body_size=100), "/invoke/echo/text", [b"x"] * 10, headers
    )
    assert read == [0]
    assert sent[0]["status"] == 413
    assert (b"connection", b"close") in sent[0]["headers"]


async def test_a_client_that_leaves_mid_body_gets_no_answer() -> None:
    messages = [
        {"type": "http.request", "body": b'{"payload": ', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": "/invoke/echo/text",
        "raw_path": b"/invoke/echo/text",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }
    await app()(scope, receive, send)
    assert sent == []
    assert messages == []
