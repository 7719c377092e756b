"""Whatever a caller sends to /execute, the answer is JSON with a stable code, never a 500."""

from __future__ import annotations

import json
from typing import Any

import anyio
import jsonschema
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from crank_registry.testing import FakeClock
from tests.builders import capability
from tests.gateway.helpers import (
    FakeWorker,
    WorkerNetwork,
    client_of,
    make_gateway,
    register,
    serving,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"verb": st.sampled_from(["greet", "", 7]), "capability": st.sampled_from(["hello", "x"])},
        optional={
            "payload": json_values,
            "extra": json_values,
            "version": st.sampled_from([">=1", "~=2.0", "nonsense", 3]),
            "strategy": st.sampled_from(["least_loaded", "affinity", "round_robin", None, 1]),
            "exclude": st.sampled_from([["w1"], ["w2"], [], "w1", [7]]),
            "budget_tokens": st.sampled_from([0, 5, -1, "5"]),
        },
    ),
)
# 422 is the gateway's invalid_request, or its invalid_payload (the payload against the
# worker's input_schema); 404 is unknown_capability ("greet:x" is offered by no worker).
ALLOWED = {200, 400, 404, 422, 503}
#: The plain validator of the worker's input_schema (tests.builders' capability).
SCHEMA = jsonschema.Draft202012Validator(capability().input_schema)


async def echo(payload: dict[str, Any]) -> dict[str, Any]:
    return {"echo": payload}


async def post_all(raw_bodies: list[bytes]) -> list[tuple[int, Any]]:
    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(serving({("greet", "hello"): echo})))
    answers = []
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        for raw in raw_bodies:
            response = await client.post(
                "/execute", content=raw, headers={"content-type": "application/json"}
            )
            answers.append((response.status_code, response.json()))
    return answers


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(bodies, min_size=1, max_size=5), st.binary(max_size=30))
@example([{"verb": "greet", "capability": "hello", "payload": {"a": [1]}}], b"{")
@example([{"verb": "greet", "capability": "hello", "payload": 5}], b"\xff")
def test_execute_answers_every_body_with_json(values: list[Any], garbage: bytes) -> None:
    raw_bodies = [json.dumps(value).encode() for value in values] + [garbage]
    for (status, body), value in zip(
        anyio.run(post_all, raw_bodies), [*values, garbage], strict=True
    ):
        assert status in ALLOWED, (status, body)
        if status == 200:
            assert body == {"result": {"echo": value["payload"]}}
            assert SCHEMA.is_valid(value["payload"])
        elif body.get("error") == "invalid_payload":
            # Refused where the plain validator refuses (and 200 only where it accepts).
            assert status == 422 and not SCHEMA.is_valid(value["payload"])
            assert body["detail"]
        else:
            assert isinstance(body["error"], str) and isinstance(body["message"], str)
