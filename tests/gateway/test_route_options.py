"""/execute takes the routing options of /route: each chooses as /route would, and is checked."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from crank_registry.testing import FakeClock
from tests.builders import capability
from tests.gateway.helpers import (
    FakeWorker,
    WorkerNetwork,
    client_of,
    execute,
    hello,
    make_gateway,
    register,
    serving,
)

pytestmark = pytest.mark.anyio

# Three workers of greet:hello, apart in version, cost and SLO.
FLEET = {
    "old": {"version": "1.4.0", "cost_tokens_per_invocation": 1, "slo": {"latency_p95_ms": 500}},
    "new": {"version": "2.1.0", "cost_tokens_per_invocation": 5, "slo": {"latency_p95_ms": 50}},
    "mid": {"version": "2.0.0", "cost_tokens_per_invocation": 3, "slo": {"latency_p95_ms": 200}},
}


async def answered_by(options: dict[str, Any], times: int = 3) -> list[str | int]:
    """Who answers ``times`` /execute calls with ``options`` (a status when it is not 200)."""
    network = WorkerNetwork()
    for name in FLEET:
        network.add(f"{name}.test", FakeWorker(serving({("greet", "hello"): hello})))
    answers: list[str | int] = []
    async with client_of(make_gateway(network, FakeClock())) as client:
        for name, fields in FLEET.items():
            await register(
                client, name, f"https://{name}.test", capability("hello", "greet", **fields)
            )
        for _ in range(times):
            response = await execute(client, **options)
            answers.append(
                response.headers["x-crank-worker-id"]
                if response.status_code == 200
                else response.status_code
            )
    return answers


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, ["old", "new", "mid"]),
        ({"version": ">=2"}, ["new", "mid", "new"]),
        ({"version": "~=1.4"}, ["old", "old", "old"]),
        ({"slo_constraints": {"latency_p95_ms": 200}}, ["new", "mid", "new"]),
        ({"budget_tokens": 4}, ["old", "old", "old"]),
        ({"budget_tokens": 10, "version": ">=2"}, ["mid", "mid", "mid"]),
        ({"exclude": ["old", "mid"]}, ["new", "new", "new"]),
        ({"strategy": "round_robin", "exclude": ["new"]}, ["old", "mid", "old"]),
        ({"version": ">=3"}, [503, 503, 503]),
        ({"budget_tokens": 0}, [503, 503, 503]),
    ],
)
async def test_each_option_chooses_as_route_does(
    options: dict[str, Any], expected: list[str | int]
) -> None:
    assert await answered_by(options) == expected


async def test_affinity_sends_a_key_to_one_worker_and_least_loaded_spreads() -> None:
    by_key = await answered_by({"strategy": "affinity", "affinity_key": "user-7"}, times=4)
    assert len(set(by_key)) == 1 and by_key[0] in FLEET
    spread = await answered_by({"strategy": "least_loaded"}, times=6)
    # Each call ends before the next: nobody is loaded, every worker is a candidate.
    assert set(spread) <= set(FLEET) and len(spread) == 6


@pytest.mark.parametrize(
    ("options", "path", "message"),
    [
        ({"version": "two"}, "version", "PEP 440"),
        ({"slo_constraints": {"p99": 3}}, "slo_constraints.p99", "unknown field"),
        ({"budget_tokens": -1}, "budget_tokens", ">= 0"),
        ({"strategy": "fastest"}, "strategy", "must be one of"),
        ({"strategy": "affinity"}, "affinity_key", "is required"),
        ({"affinity_key": "k"}, "affinity_key", "only with strategy 'affinity'"),
        ({"exclude": ["not an id"]}, "exclude[0]", "worker id"),
        ({"idempotency_key": "k"}, "idempotency_key", "Idempotency-Key header"),
        ({"requester_identity": "spiffe://crank.local/client/a"}, "requester_identity", "caller"),
        ({"explain": True}, "explain", "POST /route"),
    ],
)
async def test_a_bad_option_is_422_naming_it(
    options: dict[str, Any], path: str, message: str
) -> None:
    network = WorkerNetwork()
    async with client_of(make_gateway(network, FakeClock())) as client:
        response = await execute(client, **options)
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid_request"
    (problem,) = body["detail"]
    assert problem["path"] == path
    assert message in problem["message"]
    assert network.requests == []


async def test_an_unmet_option_says_so_and_points_at_explain() -> None:
    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(serving({("greet", "hello"): hello})))
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        response = await execute(client, exclude=["w1"])
    assert response.status_code == 503
    body = response.json()
    assert body["error"] == "no_worker_available"
    assert "meets the route's options" in body["message"]
    assert "Retry-After" in response.headers


async def test_failover_keeps_the_callers_exclude_and_its_options() -> None:
    network = WorkerNetwork()
    down = network.add("down.test", FakeWorker(failure=httpx.ConnectError))
    network.add("up.test", FakeWorker(serving({("greet", "hello"): hello})))
    network.add("avoided.test", FakeWorker(serving({("greet", "hello"): hello})))
    network.add("old.test", FakeWorker(serving({("greet", "hello"): hello})))
    async with client_of(make_gateway(network, FakeClock())) as client:
        for name in ("down", "avoided", "up"):
            await register(
                client, name, f"https://{name}.test", capability("hello", "greet", version="2.0.0")
            )
        await register(client, "old", "https://old.test", capability("hello", "greet"))
        response = await execute(client, exclude=["avoided"], version=">=2")
    assert response.status_code == 200
    assert response.headers["x-crank-worker-id"] == "up"
    assert response.headers["x-crank-attempts"] == "2"
    # Neither the excluded worker nor the one outside the version was tried.
    assert [request.url.host for request in network.requests] == ["down.test", "up.test"]
    assert down.received == []
