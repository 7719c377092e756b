"""POST /route with routing options, through the real app in-process, with a fake clock.

Every answer is checked against the OpenAPI document by the test client.
"""

from __future__ import annotations

from typing import Any

import pytest

from crank_registry import CapabilityRegistry, RoutingSettings
from tests.builders import capability_payload
from tests.service.helpers import Controller, running

pytestmark = pytest.mark.anyio

ROUTE = {"verb": "classify", "capability": "image.classify"}


async def register(api: Controller, worker_id: str, **fields: Any) -> None:
    await api.register(worker_id, capabilities=[capability_payload(**fields)])


async def fleet(api: Controller) -> None:
    """Four workers of ``classify:image.classify``, each different."""
    await register(api, "old", version="1.1.0", cost_tokens_per_invocation=1)
    await register(
        api,
        "fast",
        version="1.4.0",
        cost_tokens_per_invocation=3,
        slo={"latency_p95_ms": 80, "availability": 0.999},
    )
    await register(
        api,
        "slow",
        version="1.5.0",
        cost_tokens_per_invocation=3,
        slo={"latency_p95_ms": 400, "availability": 0.999},
    )
    await register(api, "dear", version="1.6.0", cost_tokens_per_invocation=9, slo={})


async def routed(api: Controller, **options: Any) -> Any:
    response = await api.post("/route", {**ROUTE, **options})
    assert response.status_code == 200, response.text
    return response.json()


async def test_each_option_filters_over_http() -> None:
    async with running() as api:
        await fleet(api)
        assert {(await routed(api, version=">=1.2,<2"))["worker_id"] for _ in range(6)} == {
            "fast",
            "slow",
            "dear",
        }
        assert (await routed(api, version="~=1.1.0"))["worker_id"] == "old"
        assert {
            (await routed(api, exclude=["old", "fast", "slow"]))["worker_id"] for _ in range(3)
        } == {"dear"}
        assert {(await routed(api, budget_tokens=5))["worker_id"] for _ in range(3)} == {"old"}
        assert {
            (await routed(api, slo_constraints={"latency_p95_ms": 100}))["worker_id"]
            for _ in range(3)
        } == {"fast"}
        assert {
            (await routed(api, slo_constraints={"availability": 0.99}))["worker_id"]
            for _ in range(4)
        } == {"fast", "slow"}


async def test_the_worked_example_of_the_readme() -> None:
    async with running() as api:
        await fleet(api)
        body = await routed(
            api,
            version=">=1.2,<2",
            slo_constraints={"latency_p95_ms": 100},
            budget_tokens=5,
            explain=True,
        )
        assert body == {
            "worker_id": "fast",
            "worker_url": "https://10.0.0.1:8443",
            "version": "1.4.0",
            "explain": {
                "strategy": "round_robin",
                "candidates": ["fast"],
                "removed": [
                    {"worker_id": "old", "reason": "version"},
                    {"worker_id": "slow", "reason": "slo"},
                    {"worker_id": "dear", "reason": "slo"},
                ],
            },
        }


async def test_no_candidate_left_is_503_and_explains_when_asked() -> None:
    async with running() as api:
        await fleet(api)
        ask = {**ROUTE, "version": ">=2"}
        response = await api.post("/route", ask)
        assert response.status_code == 503
        body = response.json()
        assert body["error"] == "no_worker_available" and "explain" not in body
        assert "explain" in body["message"]  # it says how to learn why
        response = await api.post("/route", {**ask, "explain": True})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "30"
        assert response.json()["explain"] == {
            "strategy": "round_robin",
            "candidates": [],
            "removed": [
                {"worker_id": worker_id, "reason": "version"}
                for worker_id in ("old", "fast", "slow", "dear")
            ],
        }
        api.advance(61)  # every worker silent past unhealthy_after
        response = await api.post("/route", {**ROUTE, "explain": True})
        assert response.status_code == 503
        assert {entry["reason"] for entry in response.json()["explain"]["removed"]} == {"unhealthy"}


async def test_explain_false_and_null_answer_without_explain() -> None:
    async with running() as api:
        await fleet(api)
        for value in (False, None):
            body = await routed(api, explain=value, strategy=None, version=None)
            assert "explain" not in body


async def test_affinity_and_idempotency_over_http() -> None:
    registry = CapabilityRegistry(routing=RoutingSettings(idempotency_ttl=60))
    async with running(registry=registry) as api:
        for worker_id in ("w1", "w2", "w3", "w4"):
            await api.register(worker_id)
        sticky = {
            (await routed(api, strategy="affinity", affinity_key="user-7"))["worker_id"]
            for _ in range(5)
        }
        assert len(sticky) == 1
        first = (await routed(api, idempotency_key="order-1"))["worker_id"]
        for _ in range(4):
            assert await api.route() is not None  # plain routes go round
            assert (await routed(api, idempotency_key="order-1"))["worker_id"] == first
        api.advance(61)
        for worker_id in ("w1", "w2", "w3", "w4"):
            await api.post("/heartbeat", {"worker_id": worker_id})
        # Past the TTL: a fresh choice (the next in the rotation), then remembered.
        fresh = (await routed(api, idempotency_key="order-1"))["worker_id"]
        assert (await routed(api, idempotency_key="order-1"))["worker_id"] == fresh


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"version": "latest"}, "version"),
        ({"version": ">=1.2,<<2"}, "version"),
        ({"exclude": ["ok", "not ok"]}, "exclude[1]"),
        ({"budget_tokens": -0.5}, "budget_tokens"),
        ({"slo_constraints": {"latency_p99_ms": 5}}, "slo_constraints.latency_p99_ms"),
        ({"slo_constraints": {}}, "slo_constraints"),
        ({"strategy": "random"}, "strategy"),
        ({"strategy": "affinity"}, "affinity_key"),
        ({"affinity_key": "k"}, "affinity_key"),
        ({"explain": "yes"}, "explain"),
    ],
)
async def test_invalid_options_are_422_naming_the_field(options: dict[str, Any], path: str) -> None:
    async with running() as api:
        await fleet(api)
        response = await api.post("/route", {**ROUTE, **options})
        assert response.status_code == 422
        body = response.json()
        assert body["error"] == "invalid_request"
        assert [problem["path"] for problem in body["detail"]] == [path]
        assert path in body["message"]


async def test_options_on_an_unknown_capability_are_404() -> None:
    async with running() as api:
        await fleet(api)
        response = await api.post(
            "/route", {"verb": "classify", "capability": "typo", "budget_tokens": 1}
        )
        assert response.status_code == 404
        assert response.json()["error"] == "unknown_capability"


async def test_a_registration_with_a_version_that_is_not_pep440_is_422() -> None:
    async with running() as api:
        response = await api.post(
            "/register",
            {
                "worker_id": "w1",
                "worker_url": "https://w1:8443",
                "capabilities": [capability_payload(version="latest")],
            },
        )
        assert response.status_code == 422
        (problem,) = response.json()["detail"]
        assert problem["path"] == "capabilities[0].version"
        assert "PEP 440" in problem["message"]
        assert (
            await api.post(
                "/register",
                {
                    "worker_id": "w1",
                    "worker_url": "https://w1:8443",
                    "capabilities": [capability_payload(version="2.0rc1")],
                },
            )
        ).status_code == 200
