"""Every answer of /execute, one of each status and error code, agrees with its document."""

from __future__ import annotations

import functools
from typing import Any

import anyio
import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from crank_registry import RateLimit
from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, create_app
from crank_registry_asgi.gateway import (
    EXECUTE_PATH,
    GATEWAY_ERRORS,
    GatewayConfig,
    create_gateway_app,
    gateway_openapi_document,
)
from crank_worker_client.serving import InvocationError
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
    serving,
)
from tests.service.helpers import check_documented_headers

pytestmark = pytest.mark.anyio

DOCUMENT = gateway_openapi_document()
_JSON = {"content-type": "application/json"}


def _check(response: httpx.Response) -> Any:
    """Assert that an /execute answer (body and headers) is documented; return its body."""
    responses = DOCUMENT["paths"][EXECUTE_PATH]["post"]["responses"]
    status = str(response.status_code)
    documented = responses.get(status) or responses[f"{status[0]}XX"]
    schema = documented["content"]["application/json"]["schema"]
    body = response.json()
    root = {"components": DOCUMENT["components"]}
    jsonschema.validate(body, {**schema, **root}, cls=jsonschema.Draft202012Validator)
    check_documented_headers(documented, response)
    return body


def test_the_gateway_document_is_valid_openapi_3_1() -> None:
    validate(DOCUMENT)


async def test_every_execute_answer_agrees_with_the_document() -> None:
    async def broken(payload: Any) -> Any:
        raise RuntimeError("disk on fire")

    async def picky(payload: Any) -> Any:
        raise InvocationError("unknown_note", "no note with id 9", status=404)

    opened = anyio.Event()

    async def gate(payload: Any) -> Any:
        await opened.wait()
        return {"opened": True}

    network = WorkerNetwork()
    network.add("ok.test", FakeWorker(serving({("greet", "hello"): hello})))
    network.add("broken.test", FakeWorker(serving({("greet", "broken"): broken})))
    network.add("picky.test", FakeWorker(serving({("greet", "picky"): picky})))
    network.add("slow.test", FakeWorker(failure=httpx.ConnectTimeout))
    network.add("gate.test", FakeWorker(serving({("greet", "gate"): gate})))
    answers: list[httpx.Response] = []
    clock = FakeClock()
    app = make_gateway(network, clock, GatewayConfig(max_attempts=1, queue_limit=0))
    async with client_of(app) as client:
        answers.append(await execute(client))  # unknown_capability
        await register(client, "ok", "https://ok.test")
        answers.append(await execute(client))
        answers.append(await execute(client, payload="not an object"))  # invalid_payload
        answers.append(await client.post(EXECUTE_PATH, json={"verb": "greet"}))
        answers.append(await client.post(EXECUTE_PATH, content=b"{", headers=_JSON))
        answers.append(await client.post(EXECUTE_PATH, content=b"{}"))
        answers.append(await client.post(EXECUTE_PATH, content=b" " * 2_000_000, headers=_JSON))
        for name in ("broken", "picky", "slow"):
            await register(
                client, name, f"https://{name}.test", capability(verb="greet", name=name)
            )
            answers.append(await execute(client, capability=name))
        # The same Idempotency-Key with another body.
        keyed = {"Idempotency-Key": "k"}
        body = {"verb": "greet", "capability": "hello", "payload": {"name": "Ada"}}
        answers.append(await client.post(EXECUTE_PATH, json=body, headers=keyed))
        answers.append(await client.post(EXECUTE_PATH, json=body, headers=keyed))  # replayed
        assert answers[-1].headers["Idempotent-Replayed"] == "true"
        answers.append(await client.post(EXECUTE_PATH, json={**body, "payload": {}}, headers=keyed))
        # One call in flight to a worker that takes one, and no queue: overloaded.
        gated = capability(verb="greet", name="gate", max_concurrency=1)
        await register(client, "gate", "https://gate.test", gated)
        gateway = app.state.gateway
        async with anyio.create_task_group() as group:
            group.start_soon(functools.partial(execute, client, capability="gate"))
            while gateway.slots.in_flight("gate") == 0:
                await anyio.sleep(0)
            answers.append(await execute(client, capability="gate"))
            opened.set()
        clock.advance(3.5)  # past unhealthy_after: every pair known, none routable
        answers.append(await execute(client))  # no_worker_available
    limited = ServiceConfig(policy=POLICY, rate_limit=RateLimit(1, 1))
    controller = create_app(config=limited, clock=FakeClock())
    async with client_of(create_gateway_app(controller, transport=network)) as client:
        await register(client, "ok", "https://ok.test")
        answers.append(await execute(client))
        answers.append(await execute(client))  # rate_limited
    statuses = {response.status_code for response in answers}
    codes = {_check(response).get("error") for response in answers}
    assert statuses == {200, 400, 404, 413, 415, 422, 429, 502, 503, 504}
    assert set(GATEWAY_ERRORS) | {"rate_limited", "no_worker_available"} <= codes
