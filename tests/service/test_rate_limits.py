"""``--rate-limit``: /route refused 429 ``rate_limited`` over a caller's limit; worker writes never.

Callers are told apart by their identity (the client certificate's SPIFFE
ID, here handed to the app as the TLS layer would), else by their address.
Time is the fake clock's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from crank_registry import HealthPolicy, RateLimit
from crank_registry_asgi import ServiceConfig
from tests.service.helpers import CertificateAuthority, Controller, running

pytestmark = pytest.mark.anyio

ROUTE = {"verb": "classify", "capability": "image.classify"}


class AsCaller:
    """An ASGI wrapper that sets each request's address and client certificate."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.address: str | None = "10.0.0.1"
        self.pem: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "client": None if self.address is None else (self.address, 40000)}
            if self.pem is not None:
                scope["extensions"] = {"tls": {"client_cert_chain": [self.pem]}}
        await self.app(scope, receive, send)


def wrapped(holder: list[AsCaller]) -> Callable[[Starlette], Any]:
    def wrap(app: Starlette) -> AsCaller:
        holder.append(AsCaller(app))
        return holder[0]

    return wrap


def limited(rate: float, burst: int, **settings: Any) -> ServiceConfig:
    return ServiceConfig(rate_limit=RateLimit(rate, burst), **settings)


async def routed(api: Controller) -> int:
    return (await api.post("/route", ROUTE)).status_code


async def test_over_the_burst_is_429_with_the_wait_until_the_next_token() -> None:
    async with running(limited(0.25, 3)) as api:  # a token every 4 s
        await api.register("w1")
        assert [await routed(api) for _ in range(3)] == [200, 200, 200]
        refused = await api.post("/route", ROUTE)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "4"
        body = refused.json()
        assert body["error"] == "rate_limited"
        assert "0.25 requests per second in bursts of 3" in body["message"]
        assert "address 127.0.0.1" in body["message"]
        api.advance(2.5)  # 1.5 s to go: rounded up
        assert (await api.post("/route", ROUTE)).headers["retry-after"] == "2"
        api.advance(1.5)
        assert await routed(api) == 200
        assert await routed(api) == 429


@pytest.mark.parametrize(("rate", "waited", "expected"), [(2.0, 0.0, 1), (0.1, 3.0, 7)])
async def test_retry_after_is_the_true_wait_rounded_up(
    rate: float, waited: float, expected: int
) -> None:
    async with running(limited(rate, 1)) as api:
        await api.register("w1")
        assert await routed(api) == 200
        api.advance(waited)
        refused = await api.post("/route", ROUTE)
        assert refused.headers["retry-after"] == str(expected)
        assert expected == math.ceil(1 / rate - waited)
        api.advance(expected)  # waiting as told is enough
        assert await routed(api) == 200


async def test_a_refused_route_is_refused_before_its_body_is_read() -> None:
    async with running(limited(1, 1)) as api:
        await api.register("w1")
        assert await routed(api) == 200
        # Not even JSON: the limit answers first.
        response = await api.client.post("/route", content=b"{", headers={"content-type": "x"})
        assert response.status_code == 429


async def test_a_registration_storm_is_never_limited() -> None:
    policy = HealthPolicy(heartbeat_interval=1, unhealthy_after=3, evict_after=6)
    async with running(limited(1, 1, policy=policy)) as api:
        for worker in range(300):
            await api.register(f"w{worker}")
        for worker in range(300):
            beat = await api.post("/heartbeat", {"worker_id": f"w{worker}"})
            assert beat.status_code == 200, beat.text
        for worker in range(300):
            await api.register(f"w{worker}")  # every worker again, at once
        for worker in range(150):
            gone = await api.post("/deregister", {"worker_id": f"w{worker}"})
            assert gone.status_code == 200, gone.text
        # The one caller's limit was untouched by all of it.
        assert await routed(api) == 200
        assert await routed(api) == 429


async def test_reads_are_not_limited() -> None:
    async with running(limited(1, 1)) as api:
        await api.register("w1")
        for path in ("/health", "/ready", "/workers", "/capabilities", "/snapshot") * 5:
            assert (await api.get(path)).status_code == 200


async def test_callers_are_told_apart_by_address() -> None:
    holder: list[AsCaller] = []
    async with running(limited(1, 1), wrap=wrapped(holder)) as api:
        (caller,) = holder
        await api.register("w1")
        assert await routed(api) == 200
        assert await routed(api) == 429
        caller.address = "10.0.0.2"
        assert await routed(api) == 200
        caller.address = None  # unknown addresses share one bucket
        assert await routed(api) == 200
        refused = await api.post("/route", ROUTE)
        assert refused.status_code == 429
        assert "callers of unknown address" in refused.json()["message"]


async def test_callers_with_an_identity_are_told_apart_by_it_not_by_address(
    authority: CertificateAuthority,
) -> None:
    holder: list[AsCaller] = []
    alice = authority.issue("spiffe://crank.local/client/alice")
    bob = authority.issue("spiffe://crank.local/client/bob")
    async with running(limited(1, 1), wrap=wrapped(holder)) as api:
        (caller,) = holder
        await api.register("w1")
        caller.pem = alice
        assert await routed(api) == 200
        caller.address = "10.9.9.9"  # another address, the same identity: the same bucket
        refused = await api.post("/route", ROUTE)
        assert refused.status_code == 429
        assert "spiffe://crank.local/client/alice" in refused.json()["message"]
        caller.pem = bob  # the same address, another identity: its own bucket
        assert await routed(api) == 200
        caller.pem = None  # anonymous from the address alice used last: its own bucket too
        assert await routed(api) == 200


async def test_refusals_are_counted_per_path() -> None:
    async with running(limited(1, 1)) as api:
        await api.register("w1")
        for _ in range(4):
            await routed(api)
        exposition = (await api.get("/metrics")).text
        assert 'crank_rate_limited_total{path="/route"} 3.0' in exposition
        assert 'crank_rate_limited_total{path="/execute"} 0.0' in exposition


async def test_without_a_limit_nothing_is_refused() -> None:
    async with running() as api:
        await api.register("w1")
        assert {await routed(api) for _ in range(200)} == {200}


async def test_the_setting_takes_a_rate_limit_only() -> None:
    with pytest.raises(TypeError, match="rate_limit"):
        ServiceConfig(rate_limit="100:20")  # type: ignore[arg-type]


async def test_a_trusted_gateways_routes_count_against_whom_they_are_for(
    authority: CertificateAuthority,
) -> None:
    gateway_id = "spiffe://crank.local/client/gateway"
    holder: list[AsCaller] = []
    config = limited(1, 1, trusted_gateways=[gateway_id])
    async with running(config, wrap=wrapped(holder)) as api:
        (caller,) = holder
        await api.register("w1")
        caller.pem = authority.issue(gateway_id)
        for user in ("alice", "bob", "carol"):
            asked = {**ROUTE, "requester_identity": f"spiffe://crank.local/client/{user}"}
            assert (await api.post("/route", asked)).status_code == 200
        again = {**ROUTE, "requester_identity": "spiffe://crank.local/client/alice"}
        refused = await api.post("/route", again)
        assert refused.status_code == 429
        assert "spiffe://crank.local/client/alice" in refused.json()["message"]
        # Routing as itself, the gateway has a bucket of its own.
        assert await routed(api) == 200
        assert await routed(api) == 429
