"""The gateway checks /execute payloads against the input_schema of the worker it chose."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.responses import JSONResponse

from crank_registry import EjectionSettings, Problem
from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, create_app
from crank_registry_asgi.gateway import GatewayConfig, create_gateway_app
from crank_registry_asgi.payloads import PayloadChecks
from crank_worker_client.payload import PayloadSchema
from crank_worker_client.serving import invocation_app
from tests.builders import capability
from tests.gateway.helpers import (
    POLICY,
    FakeWorker,
    WorkerNetwork,
    client_of,
    execute,
    hello,
    make_gateway,
    register,
)

pytestmark = pytest.mark.anyio

NAMED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name"],
    "additionalProperties": False,
}
TEXT = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "required": ["text"],
    "additionalProperties": False,
}
BAD = {"tags": ["a", 7], "extra": 1}


def worker_app(schema: dict[str, Any]) -> Any:
    """A worker serving ``greet:hello`` with ``schema``, validating with the serving helper."""
    return invocation_app(
        {("greet", "hello"): hello}, [capability(verb="greet", name="hello", input_schema=schema)]
    )


async def test_a_refused_payload_is_422_with_every_path_and_reaches_no_worker() -> None:
    network = WorkerNetwork()
    worker = network.add("w1.test", FakeWorker(worker_app(NAMED)))
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(
            client,
            "w1",
            "https://w1.test",
            capability(verb="greet", name="hello", input_schema=NAMED),
        )
        refused = await execute(client, BAD)
        accepted = await execute(client, {"name": "Ada", "tags": ["x"]})
    assert refused.status_code == 422
    body = refused.json()
    assert body["error"] == "invalid_payload"
    assert {(p["path"], p["message"]) for p in body["detail"]} == {
        ("payload.name", "is required"),
        ("payload.tags[1]", "must be of type string"),
        ("payload.extra", "unknown field"),
    }
    assert "x-crank-worker-id" not in refused.headers
    assert accepted.status_code == 200
    # Only the accepted call reached the worker.
    assert worker.received == [{"payload": {"name": "Ada", "tags": ["x"]}}]


async def test_the_gateway_answers_as_the_workers_serving_helper_would() -> None:
    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(worker_app(NAMED)))
    direct = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=worker_app(NAMED)), base_url="http://w1.test"
    )
    async with client_of(make_gateway(network, FakeClock())) as client, direct:
        await register(
            client,
            "w1",
            "https://w1.test",
            capability(verb="greet", name="hello", input_schema=NAMED),
        )
        payloads: list[Any] = [BAD, {"name": "toolong"}, [], None]
        for payload in payloads:
            from_gateway = await client.post(
                "/execute", json={"verb": "greet", "capability": "hello", "payload": payload}
            )
            from_worker = await direct.post("/invoke/greet/hello", json={"payload": payload})
            assert from_worker.status_code == from_gateway.status_code == 422
            assert from_gateway.json() == from_worker.json()
    assert network.requests == []


async def test_failover_to_a_worker_of_another_version_checks_against_its_schema() -> None:
    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(failure=httpx.ConnectError))
    second = network.add("w2.test", FakeWorker(worker_app(TEXT)))
    async with client_of(make_gateway(network, FakeClock())) as client:
        old = capability(verb="greet", name="hello", version="1.0.0", input_schema=NAMED)
        new = capability(verb="greet", name="hello", version="2.0.0", input_schema=TEXT)
        await register(client, "w1", "https://w1.test", old)
        await register(client, "w2", "https://w2.test", new)
        # Valid for w1 (chosen first, refuses the connection), not for w2's version.
        response = await execute(client, {"name": "Ada"})
    assert response.status_code == 422
    assert {(p["path"], p["message"]) for p in response.json()["detail"]} == {
        ("payload.text", "is required"),
        ("payload.name", "unknown field"),
    }
    assert [request.url.host for request in network.requests] == ["w1.test"]
    assert second.received == []


async def test_an_idempotency_key_keeps_the_422() -> None:
    network = WorkerNetwork()
    worker = network.add("w1.test", FakeWorker(worker_app(NAMED)))
    keyed = {"Idempotency-Key": "k-1"}
    body = {"verb": "greet", "capability": "hello", "payload": BAD}
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(
            client,
            "w1",
            "https://w1.test",
            capability(verb="greet", name="hello", input_schema=NAMED),
        )
        first = await client.post("/execute", json=body, headers=keyed)
        again = await client.post("/execute", json=body, headers=keyed)
        fixed = await client.post(
            "/execute", json={**body, "payload": {"name": "Ada"}}, headers=keyed
        )
    assert first.status_code == again.status_code == 422
    assert again.json() == first.json()
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert fixed.status_code == 422 and fixed.json()["error"] == "idempotency_key_reused"
    assert worker.received == []


async def test_a_call_waiting_for_a_full_worker_is_checked_when_it_gets_one() -> None:
    opened = anyio.Event()

    async def gated(payload: Any) -> Any:
        await opened.wait()
        return {"opened": True}

    one_at_a_time = capability(verb="greet", name="hello", max_concurrency=1, input_schema=NAMED)
    network = WorkerNetwork()
    worker = network.add(
        "w1.test", FakeWorker(invocation_app({("greet", "hello"): gated}, [one_at_a_time]))
    )
    app = make_gateway(network, FakeClock())
    gateway = app.state.gateway
    answers: list[httpx.Response] = []
    async with client_of(app) as client:
        await register(client, "w1", "https://w1.test", one_at_a_time)

        async def call(payload: Any) -> None:
            answers.append(await execute(client, payload))

        async with anyio.create_task_group() as group:
            group.start_soon(call, {"name": "Ada"})
            while gateway.slots.in_flight("w1") == 0:
                await anyio.sleep(0)
            group.start_soon(call, BAD)
            while gateway.slots.waiting("greet", "hello") == 0:
                await anyio.sleep(0)
            opened.set()
        assert gateway.slots.in_flight("w1") == 0
        assert gateway.slots.waiting("greet", "hello") == 0
    assert sorted(answer.status_code for answer in answers) == [200, 422]
    assert worker.received == [{"payload": {"name": "Ada"}}]


async def test_a_refused_payload_is_no_outcome_for_ejection() -> None:
    # Two failures in a row eject; a refused payload between them neither
    # counts as one nor, being no call, resets the streak as a success would.
    network = WorkerNetwork()
    bad = network.add(
        "bad.test", FakeWorker(JSONResponse({"error": "boom", "message": "x"}, status_code=500))
    )
    ejection = EjectionSettings(after_failures=2)
    controller = create_app(
        config=ServiceConfig(policy=POLICY, ejection=ejection), clock=FakeClock()
    )
    app = create_gateway_app(controller, GatewayConfig(), transport=network)
    async with client_of(app) as client:
        await register(client, "bad", "https://bad.test")
        assert (await execute(client)).status_code == 502
        assert (await execute(client, "not an object")).status_code == 422
        assert (await client.get("/workers/bad")).json()["state"] == "healthy"
        assert app.state.gateway.slots.in_flight("bad") == 0
        assert (await execute(client)).status_code == 502
        assert (await client.get("/workers/bad")).json()["state"] == "ejected"
    assert len(bad.received) == 2


async def test_a_schema_the_gateway_cannot_apply_leaves_the_payload_to_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # /register takes a $ref that resolves nowhere (the schema is valid); applying it fails.
    dangling = {"$ref": "#/$defs/missing"}
    network = WorkerNetwork()
    worker = network.add("w1.test", FakeWorker(JSONResponse({"result": "took it"})))
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(
            client,
            "w1",
            "https://w1.test",
            capability(verb="greet", name="hello", input_schema=dangling),
        )
        with caplog.at_level(logging.WARNING, logger="crank_registry_asgi"):
            answers = [await execute(client, {"n": index}) for index in range(2)]
    assert [answer.status_code for answer in answers] == [200, 200]
    assert len(worker.received) == 2
    logged = [r.getMessage() for r in caplog.records if "cannot apply" in r.getMessage()]
    assert len(logged) == 1 and "w1 greet:hello 1.0.0" in logged[0]


def test_the_validators_kept_are_bounded_least_recently_used_out_first() -> None:
    checks = PayloadChecks(max_schemas=2)
    first, second, third = ({"type": kind} for kind in ("object", "array", "string"))
    assert checks.problems(first, {}, where="a") == []
    assert checks.problems(second, [], where="b") == []
    assert checks.problems(first, 1, where="a") == [Problem("payload", "must be of type object")]
    assert checks.problems(third, "x", where="c") == []  # second, the least recently used, out
    assert len(checks) == 2
    assert set(checks._compiled) == {repr(first), repr(third)}


def test_equal_schemas_of_different_values_are_kept_apart() -> None:
    # 1 and True are equal in Python; as schema values they are not the same rule.
    checks = PayloadChecks()
    assert checks.problems({"const": 1}, True, where="a") != []
    assert checks.problems({"const": True}, True, where="a") == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
SCHEMAS = [NAMED, TEXT, {"type": "array", "items": {"type": "integer"}, "maxItems": 2}]
_SHARED = PayloadChecks(max_schemas=2)  # fewer than the schemas: entries come and go


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(SCHEMAS), json_values)
def test_the_cached_check_gives_what_a_fresh_validator_gives(
    schema: dict[str, Any], payload: Any
) -> None:
    assert _SHARED.problems(schema, payload, where="x") == PayloadSchema(schema).problems(payload)
