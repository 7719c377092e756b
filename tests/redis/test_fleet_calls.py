"""Two gateways on one Redis, in-process: calls in flight and idempotency keys for the fleet.

The workers are counted where they are called (an httpx transport both
gateways share); each gateway has its own Redis connections, as separate
processes would (``test_fleet_serve.py`` runs real ones).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis

from crank_registry import MIN_RATE, KeptAnswer, RateLimit, Replay, RoutingSettings
from crank_registry.testing import FakeClock
from crank_registry_asgi import create_app
from crank_registry_asgi.execute import Gateway
from crank_registry_asgi.fleet_calls import Claimed, FleetCalls, FleetKeys
from crank_registry_asgi.fleet_limits import ControllerLiveness, fleet_client
from crank_registry_asgi.gateway import GatewayConfig, create_gateway_app
from crank_registry_asgi.redis_store import StoreKeys
from tests.builders import capability
from tests.gateway.helpers import POLICY, client_of, register
from tests.redis.helpers import (
    RedisServer,
    fleet_prefix,
    machine_url,
    shared_config,
    wait_until_async,
)

pytestmark = pytest.mark.anyio

BODY = {"verb": "greet", "capability": "hello", "payload": {"name": "Ada"}}


class CountedWorkers(httpx.AsyncBaseTransport):
    """Workers that count their calls and the most in flight at once, per host.

    A call takes ``seconds``, or waits for ``gate`` when one is set. A worker
    answers its call count (``status``: 200, or what the test sets).
    """

    def __init__(self, seconds: float = 0.01) -> None:
        self.seconds = seconds
        self.gate: anyio.Event | None = None
        self.status = 200
        self.calls: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        self.most: dict[str, int] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.calls[host] = self.calls.get(host, 0) + 1
        now = self.in_flight[host] = self.in_flight.get(host, 0) + 1
        self.most[host] = max(self.most.get(host, 0), now)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await anyio.sleep(self.seconds)
        finally:
            self.in_flight[host] -= 1
        body = {"result": {"call": self.calls[host]}}
        if self.status != 200:
            body = {"error": "worker_error", "message": "scripted"}
        return httpx.Response(
            self.status,
            headers={"content-type": "application/json"},
            stream=httpx.ByteStream(json.dumps(body).encode()),
        )


@contextlib.asynccontextmanager
async def gateway(
    url: str,
    prefix: str,
    controller_id: str,
    workers: httpx.AsyncBaseTransport,
    rate_limit: RateLimit | None = None,
    **config: Any,
) -> AsyncIterator[tuple[httpx.AsyncClient, Gateway]]:
    settings = shared_config(
        url,
        prefix,
        controller_id,
        policy=POLICY,
        routing=RoutingSettings(idempotency_ttl=60.0),
        rate_limit=rate_limit,
    )
    controller = create_app(config=settings, clock=FakeClock())
    app = create_gateway_app(controller, GatewayConfig(**config), transport=workers)
    async with client_of(app) as client:
        yield client, app.state.gateway


def member(url: str, prefix: str, controller_id: str) -> FleetCalls:
    """One process's calls in flight and claims, with its own liveness (not renewed yet)."""
    liveness = ControllerLiveness(fleet_client(url), prefix=prefix, controller_id=controller_id)
    return FleetCalls(
        url=url,
        prefix=prefix,
        liveness=liveness,
        controller_id=controller_id,
        answer_ttl=60,
        max_answer_bytes=1 << 20,
    )


async def start(fleet: FleetCalls) -> FleetCalls:
    """What the lifespan does: the liveness renewed once, then the fleet opened."""
    await fleet.liveness.renew()
    await fleet.open()
    return fleet


async def stop(fleet: FleetCalls) -> None:
    """Leave: the fleet, then its liveness (the lifespan's order)."""
    await fleet.aclose()
    await fleet.liveness.aclose()


async def post(client: httpx.AsyncClient, key: str | None = None, **body: Any) -> httpx.Response:
    headers = {} if key is None else {"Idempotency-Key": key}
    return await client.post("/execute", json={**BODY, **body}, headers=headers)


async def test_the_fleet_never_sends_a_worker_more_than_max_concurrency() -> None:
    url = machine_url()
    workers = CountedWorkers(seconds=0.01)
    with fleet_prefix(url) as prefix:
        async with (
            gateway(url, prefix, "a", workers, queue_limit=200) as (a, on_a),
            gateway(url, prefix, "b", workers, queue_limit=200) as (b, _),
        ):
            # Two workers of 3 calls at once: six in flight for the fleet, not twelve.
            for name in ("w1", "w2"):
                cap = capability(verb="greet", name="hello", max_concurrency=3)
                await register(a, name, f"https://{name}.test", cap)
            await wait_until_async(
                lambda: _routable(b), what="the workers routable on B", timeout=5
            )
            answers: list[int] = []

            async def call(client: httpx.AsyncClient) -> None:
                response = await post(client)
                assert response.status_code == 200, response.text
                answers.append(response.status_code)

            async with anyio.create_task_group() as group:
                for number in range(200):
                    group.start_soon(call, a if number % 2 else b)
            assert on_a.fleet is not None and on_a.fleet.held == {}
    assert answers == [200] * 200
    assert sum(workers.calls.values()) == 200
    assert workers.most == {"w1.test": 3, "w2.test": 3}


async def test_with_a_rate_limit_too_the_fleet_shares_both_limits() -> None:
    # --redis, --gateway and --rate-limit: one liveness per process serves
    # the reservations and the shared buckets alike.
    url = machine_url()
    workers = CountedWorkers(seconds=0.01)
    # No token comes back during the test (one a day); batches of 25.
    limit = RateLimit(MIN_RATE, 250)
    with fleet_prefix(url) as prefix:
        async with (
            gateway(url, prefix, "a", workers, limit, queue_limit=200) as (a, on_a),
            gateway(url, prefix, "b", workers, limit, queue_limit=200) as (b, on_b),
        ):
            for name in ("w1", "w2"):
                cap = capability(verb="greet", name="hello", max_concurrency=3)
                await register(a, name, f"https://{name}.test", cap)
            # Not /route: it would take the caller's tokens.
            await wait_until_async(
                _true_when(lambda: "w2" in on_b.service.registry), what="the workers on B"
            )
            assert on_a.service.liveness is not None
            await on_a.service.liveness.renew()  # counts B too
            for client in (a, b):
                ready = await client.get("/ready")
                assert ready.status_code == 200
                assert ready.json()["rate_limit"] == {
                    "mode": "shared",
                    "rate": MIN_RATE,
                    "burst": 250,
                    "controllers": 2,
                }
            statuses: list[int] = []

            async def call(client: httpx.AsyncClient) -> None:
                response = await post(client)
                statuses.append(response.status_code)

            async with anyio.create_task_group() as group:
                for number in range(300):
                    group.start_soon(call, a if number % 2 else b)
            assert on_a.fleet is not None and on_a.fleet.available
            assert on_b.fleet is not None and on_b.fleet.available
    # The caller's one bucket for both: 250 calls, not 250 on each controller.
    assert sorted(statuses) == [200] * 250 + [429] * 50
    assert sum(workers.calls.values()) == 250
    assert workers.most == {"w1.test": 3, "w2.test": 3}


async def _routable(client: httpx.AsyncClient) -> bool:
    response = await client.post("/route", json={"verb": "greet", "capability": "hello"})
    return response.status_code == 200


async def test_a_dead_controllers_reservations_count_only_while_its_liveness_key_lives() -> None:
    url = machine_url()
    workers = CountedWorkers()
    workers.gate = anyio.Event()
    keys_client = redis.Redis.from_url(url)
    with fleet_prefix(url) as prefix:
        keys = FleetKeys(prefix)
        async with gateway(url, prefix, "a", workers, queue_limit=5) as (a, on_a):
            cap = capability(verb="greet", name="hello", max_concurrency=2)
            await register(a, "w1", "https://w1.test", cap)
            # A controller "ghost" holds both calls w1 takes, and is alive.
            keys_client.sadd(keys.gateways, "ghost")
            keys_client.hset(keys.reservations("ghost"), "w1", 2)
            keys_client.set(keys.liveness("ghost"), "ghost", px=60_000)
            fleet = on_a.fleet
            assert fleet is not None
            assert not await fleet.reserve("w1", 2)
            # Dead (its key expired): its reservations no longer count.
            keys_client.delete(keys.liveness("ghost"))
            assert await fleet.reserve("w1", 2)
            fleet.release("w1")
            # The next renewal forgets it and its hash.
            await wait_until_async(
                lambda: _gone(keys_client, keys, "ghost"), what="ghost forgotten", timeout=5
            )
            workers.gate.set()
    keys_client.close()


async def _gone(client: redis.Redis, keys: FleetKeys, controller_id: str) -> bool:
    return not client.sismember(keys.gateways, controller_id) and not client.exists(
        keys.reservations(controller_id)
    )


async def test_a_call_waiting_on_a_full_fleet_is_served_when_the_other_controller_frees_one() -> (
    None
):
    url = machine_url()
    workers = CountedWorkers()
    workers.gate = anyio.Event()
    with fleet_prefix(url) as prefix:
        async with (
            gateway(url, prefix, "a", workers) as (a, on_a),
            gateway(url, prefix, "b", workers) as (b, _),
        ):
            cap = capability(verb="greet", name="hello", max_concurrency=1)
            await register(a, "w1", "https://w1.test", cap)
            await wait_until_async(lambda: _routable(b), what="w1 routable on B", timeout=5)
            answers: dict[str, int] = {}

            async def call(name: str, client: httpx.AsyncClient) -> None:
                answers[name] = (await post(client)).status_code

            async with anyio.create_task_group() as group:
                group.start_soon(call, "first", b)
                await wait_until_async(
                    _true_when(lambda: workers.calls.get("w1.test") == 1), what="B's call"
                )
                group.start_soon(call, "second", a)
                await wait_until_async(
                    _true_when(lambda: on_a.slots.waiting("greet", "hello") == 1),
                    what="A's call waits",
                )
                workers.gate.set()
    assert answers == {"first": 200, "second": 200}
    assert workers.most == {"w1.test": 1}


def _true_when(predicate: Any) -> Any:
    async def check() -> bool:
        return bool(predicate())

    return check


async def test_the_same_key_sent_to_a_then_b_is_replayed_by_b_without_a_worker_call() -> None:
    url = machine_url()
    workers = CountedWorkers()
    with fleet_prefix(url) as prefix:
        async with (
            gateway(url, prefix, "a", workers) as (a, on_a),
            gateway(url, prefix, "b", workers) as (b, _),
        ):
            await register(a, "w1", "https://w1.test")
            await wait_until_async(lambda: _routable(b), what="w1 routable on B", timeout=5)
            first = await post(a, "order-1")
            # A writes the answer after answering: B waits for it, then replays it.
            again = await post(b, "order-1")
            reused = await post(b, "order-1", payload={"name": "Bob"})
            assert on_a.answers.running == 0 and len(on_a.answers) == 0  # not in memory
    assert (first.status_code, first.json()) == (200, {"result": {"call": 1}})
    assert (again.status_code, again.json()) == (200, {"result": {"call": 1}})
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["x-crank-worker-id"] == "w1"
    assert reused.status_code == 422 and reused.json()["error"] == "idempotency_key_reused"
    assert workers.calls == {"w1.test": 1}


async def test_the_same_key_sent_to_both_at_once_makes_one_worker_call() -> None:
    url = machine_url()
    workers = CountedWorkers()
    workers.gate = anyio.Event()
    with fleet_prefix(url) as prefix:
        async with (
            gateway(url, prefix, "a", workers) as (a, _),
            gateway(url, prefix, "b", workers) as (b, _),
        ):
            await register(a, "w1", "https://w1.test")
            await wait_until_async(lambda: _routable(b), what="w1 routable on B", timeout=5)
            answers: list[httpx.Response] = []

            async def call(client: httpx.AsyncClient) -> None:
                answers.append(await post(client, "order-1"))

            async with anyio.create_task_group() as group:
                for client in (a, b, a, b):
                    group.start_soon(call, client)
                await wait_until_async(
                    _true_when(lambda: workers.calls.get("w1.test") == 1), what="the call"
                )
                workers.gate.set()
    assert workers.calls == {"w1.test": 1}
    assert [answer.json() for answer in answers] == [{"result": {"call": 1}}] * 4
    replayed = [answer.headers.get("Idempotent-Replayed") for answer in answers]
    assert sorted(replayed, key=str) == [None, "true", "true", "true"]


async def test_5xx_and_answers_over_the_size_limit_are_not_kept_in_the_fleet() -> None:
    url = machine_url()
    workers = CountedWorkers()
    with fleet_prefix(url) as prefix:
        async with gateway(url, prefix, "a", workers, idempotency_bytes=30) as (a, on_a):
            await register(a, "w1", "https://w1.test")
            workers.status = 503
            failed = await post(a, "failing")
            workers.status = 200
            retried = await post(a, "failing")
            # {"result":{"call":N}} and its headers are over 30 bytes: never kept.
            large = [await post(a, "large") for _ in range(2)]
            fleet = on_a.fleet
            assert fleet is not None
            await wait_until_async(_true_when(lambda: not fleet._finishes), what="written")
            kept = await fleet.begin(("", "failing"), _fingerprint())
    assert failed.status_code == 502
    assert retried.status_code == 200 and "idempotent-replayed" not in retried.headers
    assert [answer.json()["result"]["call"] for answer in large] == [3, 4]
    assert all("idempotent-replayed" not in answer.headers for answer in large)
    # The first 2xx answer of "failing" is not kept either (too large): a new claim.
    assert isinstance(kept, Claimed)


def _fingerprint() -> str:
    from crank_registry import body_fingerprint

    return body_fingerprint(BODY)


async def test_a_claim_of_a_dead_controller_is_taken_over() -> None:
    url = machine_url()
    keys_client = redis.Redis.from_url(url)
    with fleet_prefix(url) as prefix:
        keys = FleetKeys(prefix)
        fleet = await start(member(url, prefix, "a"))
        try:
            first = await fleet.begin(("", "k"), "f1")
            assert isinstance(first, Claimed)
            # The claim's owner is "a", alive: a duplicate waits.
            other = await start(member(url, prefix, "b"))
            assert type(await other.begin(("", "k"), "f1")).__name__ == "Running"
            assert type(await other.begin(("", "k"), "f2")).__name__ == "Reused"
            # "a" dies: its liveness key expires, and the duplicate runs.
            keys_client.delete(keys.liveness("a"))
            taken = await other.begin(("", "k"), "f1")
            assert isinstance(taken, Claimed)
            # The first claimant's late answer is not written over the new claim.
            fleet.finish(("", "k"), first.token, KeptAnswer(200, "application/json", b"{}"))
            await fleet._flush()
            other.finish(("", "k"), taken.token, KeptAnswer(201, "application/json", b"[]"))
            await other._flush()
            replay = await fleet.begin(("", "k"), "f1")
            assert isinstance(replay, Replay) and replay.answer.status == 201
            await stop(other)
        finally:
            await stop(fleet)
    keys_client.close()


async def test_a_restarted_controller_drops_the_claims_and_reservations_of_its_last_life() -> None:
    url = machine_url()
    with fleet_prefix(url) as prefix:
        keys = FleetKeys(prefix)
        keys_client = redis.Redis.from_url(url)
        before = await start(member(url, prefix, "a"))
        assert isinstance(await before.begin(("", "k"), "f1"), Claimed)
        assert await before.reserve("w1", 4)
        # Killed (nothing given back, its liveness key left); started again
        # with the same id at once.
        await before._redis.aclose()
        await before.liveness.redis.aclose()
        after = await start(member(url, prefix, "a"))
        try:
            assert after.liveness.lapses == 1  # the key was the old instance's
            assert keys_client.hgetall(keys.reservations("a")) == {}
            assert isinstance(await after.begin(("", "k"), "f1"), Claimed)
        finally:
            await stop(after)
        keys_client.close()


async def test_without_redis_each_controller_takes_its_share_and_keys_are_503(
    tmp_path: Path,
) -> None:
    workers = CountedWorkers()
    with RedisServer(tmp_path, persistent=False) as server:
        prefix = "crank"
        async with (
            gateway(server.url, prefix, "a", workers) as (a, on_a),
            gateway(server.url, prefix, "b", workers) as (_, on_b),
        ):
            await register(a, "w1", "https://w1.test")  # max_concurrency 4
            fleet = on_a.fleet
            assert fleet is not None and on_b.fleet is not None
            await on_b.fleet.liveness.renew()
            await fleet.liveness.renew()
            assert fleet.available and fleet.live == 2
            server.kill()
            # Two controllers were live at the last contact: this one takes 4 // 2.
            assert await fleet.reserve("w1", 4)
            assert not fleet.available
            assert await fleet.reserve("w1", 4)
            assert not await fleet.reserve("w1", 4)
            fleet.release("w1")  # one left in flight
            keyed = await post(a, "order-1")
            plain = await post(a)
            # Redis is back (empty): a sync writes what is in flight. The other
            # controller may sync first and drop this one's hash (its liveness key is
            # not back yet); the renewal that finds it lapsed rewrites it, within a
            # liveness period.
            server.start()
            await wait_until_async(_true_when(lambda: fleet.available), what="reconnected")
            keys = FleetKeys(prefix)
            client = redis.Redis(port=server.port)
            await wait_until_async(
                _true_when(lambda: client.hgetall(keys.reservations("a")) == {b"w1": b"1"}),
                what="the call in flight written again",
            )
            client.close()
            fleet.release("w1")
            assert fleet.held == {}
    assert keyed.status_code == 503
    assert keyed.json()["error"] == "store_unavailable"
    assert keyed.headers["Retry-After"] == "1"
    assert plain.status_code == 200
    assert workers.calls == {"w1.test": 1}


async def test_a_call_given_back_is_given_back_by_the_next_reservation() -> None:
    url = machine_url()
    keys_client = redis.Redis.from_url(url)
    with fleet_prefix(url) as prefix:
        keys = FleetKeys(prefix)
        # run() is not running: nothing else gives back.
        fleet = await start(member(url, prefix, "a"))
        try:
            assert await fleet.reserve("w1", 1)
            assert not await fleet.reserve("w1", 1)
            fleet.release("w1")
            assert keys_client.hgetall(keys.reservations("a")) == {b"w1": b"1"}
            # The next reservation gives it back in its script, then counts.
            assert await fleet.reserve("w1", 1)
            assert await fleet.reserve("w2", 5)
            fleet.release("w1")
            fleet.release("w2")
            await fleet._flush()  # what run() sends when no reservation carried it
            assert keys_client.hgetall(keys.reservations("a")) == {}
            assert fleet.held == {}
        finally:
            await stop(fleet)
    keys_client.close()


async def test_a_renewal_after_the_liveness_key_expired_writes_the_calls_in_flight() -> None:
    url = machine_url()
    keys_client = redis.Redis.from_url(url)
    with fleet_prefix(url) as prefix:
        keys = FleetKeys(prefix)
        fleet = await start(member(url, prefix, "a"))
        try:
            assert await fleet.reserve("w1", 4)
            assert await fleet.reserve("w1", 4)
            assert await fleet.reserve("w2", 4)
            fleet.release("w2")  # not sent yet
            # A renewal that finds its own key asks for a plain sync.
            assert await fleet.liveness.renew()
            await fleet._sync_after_renewal()
            assert keys_client.hgetall(keys.reservations("a")) == {b"w1": b"2", b"w2": b"1"}
            # Its key expired (a stall longer than 3 s), and another controller
            # dropped its hash: the renewal reports the lapse, and the sync
            # after it writes what this process has in flight.
            keys_client.delete(keys.liveness("a"), keys.reservations("a"))
            keys_client.srem(keys.gateways, "a")
            assert await fleet.liveness.renew()
            assert fleet.liveness.lapses == 2  # its first renewal, and this one
            await fleet._sync_after_renewal()
            assert keys_client.hgetall(keys.reservations("a")) == {b"w1": b"2"}
            await fleet._flush()  # the release of w2 is not given back twice
            assert keys_client.hgetall(keys.reservations("a")) == {b"w1": b"2"}
            assert keys_client.sismember(keys.gateways, "a")
            assert keys_client.exists(keys.liveness("a"))
        finally:
            await stop(fleet)
    keys_client.close()


def test_the_fleet_keys_share_the_registrys_hash_tag() -> None:
    keys = FleetKeys("crank")
    tag = StoreKeys("crank").stream.split(":")[0]
    for key in (
        keys.liveness("a"),
        keys.reservations("a"),
        keys.claims("a"),
        keys.gateways,
        keys.answer(("spiffe://x/y", "k")),
    ):
        assert key.startswith(tag + ":"), key
    assert keys.answer(("", "k")) != keys.answer(("other", "k"))


async def test_a_refused_payload_reserves_nothing_and_its_422_is_kept_for_the_fleet() -> None:
    url = machine_url()
    workers = CountedWorkers()
    named = {"type": "object", "required": ["name"]}
    with fleet_prefix(url) as prefix:
        async with (
            gateway(url, prefix, "a", workers) as (a, on_a),
            gateway(url, prefix, "b", workers) as (b, _),
        ):
            cap = capability(verb="greet", name="hello", max_concurrency=1, input_schema=named)
            await register(a, "w1", "https://w1.test", cap)
            await wait_until_async(lambda: _routable(b), what="w1 routable on B", timeout=5)
            refused = await post(a, "k-refused", payload={"text": "hi"})
            assert refused.status_code == 422, refused.text
            assert refused.json()["detail"] == [{"path": "payload.name", "message": "is required"}]
            assert on_a.fleet is not None and on_a.fleet.held == {}
            # The one slot w1 has is free: a valid call takes it.
            assert (await post(a)).status_code == 200
            # The 422 is the key's answer on the other controller too.
            again = await post(b, "k-refused", payload={"text": "hi"})
            assert again.status_code == 422
            assert again.headers["Idempotent-Replayed"] == "true"
    assert workers.calls == {"w1.test": 1}
