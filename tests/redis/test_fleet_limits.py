"""Fleet-wide limits on Redis: the bucket script, controller liveness, shared buckets, fallback.

Against the machine's Redis, each test under a prefix of its own. The bucket
runs on Redis' clock (``TIME`` in the script), which no test can move: the
limits are chosen so that no token comes back while a test runs (a token
every 10 s), or, to see a refill, a test waits the wait the script answered
(waiting longer changes nothing).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio as aioredis

from crank_registry import RateLimit
from crank_registry.testing import FakeClock
from crank_registry_asgi import create_app
from crank_registry_asgi.fleet_limits import (
    TAKE_TOKENS,
    ControllerLiveness,
    SharedTokenBuckets,
    controllers_key,
    default_lease,
    fleet_client,
    liveness_key,
    rate_key,
)
from crank_registry_asgi.gateway import create_gateway_app
from tests.gateway.helpers import (
    POLICY,
    FakeWorker,
    WorkerNetwork,
    client_of,
    execute,
    hello,
    register,
    serving,
)
from tests.redis.helpers import (
    Partition,
    controller,
    machine_url,
    shared_config,
    unique_prefix,
    wait_until,
)

pytestmark = pytest.mark.anyio

MACHINE_PORT = 6379
ROUTE = {"verb": "classify", "capability": "image.classify"}


@contextlib.contextmanager
def fleet_prefix() -> Iterator[tuple[str, str]]:
    """The machine's Redis URL and a prefix of the test's own; every ``{prefix}:*`` key removed."""
    url = machine_url()
    with unique_prefix(url) as prefix:
        try:
            yield url, prefix
        finally:
            client = redis.Redis.from_url(url, socket_timeout=2)
            with contextlib.suppress(redis.RedisError):
                keys = list(client.scan_iter(match=f"{{{prefix}}}:*"))
                if keys:
                    client.delete(*keys)
            client.close()


@contextlib.asynccontextmanager
async def process(url: str, prefix: str, name: str, **fields: Any) -> AsyncIterator[Any]:
    """What one controller process keeps: its liveness, renewed once (the lifespan's start)."""
    liveness = ControllerLiveness(fleet_client(url), prefix=prefix, controller_id=name, **fields)
    try:
        await liveness.renew()
        yield liveness
    finally:
        await liveness.aclose()


async def take(client: aioredis.Redis, key: str, rate: float, burst: int, want: int) -> list[int]:
    script = client.register_script(TAKE_TOKENS)
    return [int(value) for value in await script(keys=[key], args=[1e6 / rate, burst, want])]


async def test_the_script_takes_what_the_bucket_holds_and_answers_the_wait() -> None:
    with fleet_prefix() as (url, prefix):
        client = aioredis.Redis.from_url(url)
        key = rate_key(prefix, "caller")
        # 0.1 a second (a token every 10 s) in bursts of 3.
        assert await take(client, key, 0.1, 3, 2) == [2, 0]
        assert await take(client, key, 0.1, 3, 2) == [1, 0]  # what is left, not the batch
        taken, wait_us = await take(client, key, 0.1, 3, 1)
        assert taken == 0
        # The next token in 10 s, less the few milliseconds since the first take.
        assert 9_000_000 < wait_us <= 10_000_000
        # The key goes when the bucket is full again: three tokens, 30 s.
        assert 29_000 < await client.pttl(key) <= 30_000
        # Another caller has a bucket of its own.
        assert await take(client, rate_key(prefix, "other"), 0.1, 3, 3) == [3, 0]
        await client.aclose()


async def test_the_script_refills_on_redis_time() -> None:
    with fleet_prefix() as (url, prefix):
        client = aioredis.Redis.from_url(url)
        key = rate_key(prefix, "caller")
        # 50 a second: a token every 20 ms.
        assert await take(client, key, 50, 2, 2) == [2, 0]
        taken, wait_us = await take(client, key, 50, 2, 1)
        assert taken == 0 and 0 < wait_us <= 20_000
        await anyio.sleep(wait_us / 1e6)
        assert (await take(client, key, 50, 2, 1))[0] == 1
        await client.aclose()


async def test_liveness_counts_the_live_controllers_and_prunes_the_dead() -> None:
    with fleet_prefix() as (url, prefix):
        raw = redis.Redis.from_url(url)
        async with process(url, prefix, "a") as a, process(url, prefix, "b") as b:
            assert (a.live, b.live) == (1, 2)
            assert raw.get(liveness_key(prefix, "a")) == a.instance.encode()
            assert 2_000 < raw.pttl(liveness_key(prefix, "a")) <= 3_000
            # A process that dies renews no more: its key expires (50 ms here).
            async with process(url, prefix, "c", ttl=0.05) as c:
                assert c.live == 3
                c._leave = _nothing  # dies: it never leaves
                await anyio.sleep(0.1)
                assert raw.get(liveness_key(prefix, "c")) is None
                assert await a.renew() and a.live == 2  # pruned on read
            # A process that stops removes its own at once.
        assert raw.get(liveness_key(prefix, "a")) is None
        assert raw.zcard(controllers_key(prefix)) == 0
        raw.close()


async def _nothing(**_: Any) -> None:
    pass


async def test_a_renewal_says_whether_the_key_had_lapsed() -> None:
    with fleet_prefix() as (url, prefix):
        raw = redis.Redis.from_url(url)
        async with process(url, prefix, "a") as a:
            seen: list[bool] = []
            a.on_renewed.append(seen.append)
            assert a.lapses == 1  # its first renewal: the key was not there
            assert await a.renew()
            # Expired (a stall longer than its TTL): the others took it for dead.
            raw.delete(liveness_key(prefix, "a"))
            assert await a.renew()
            # Another instance's (a process started again under the same id).
            raw.set(liveness_key(prefix, "a"), "another", px=3_000)
            assert await a.renew()
            assert seen == [False, True, True]
            assert a.lapses == 3
        raw.close()


async def test_a_restarted_process_keeps_its_liveness_when_the_old_one_leaves() -> None:
    with fleet_prefix() as (url, prefix):
        raw = redis.Redis.from_url(url)
        async with process(url, prefix, "a") as old, process(url, prefix, "a") as new:
            await old.aclose()
            assert raw.get(liveness_key(prefix, "a")) == new.instance.encode()
        raw.close()


async def test_the_fleet_admits_the_burst_once_and_refuses_locally_until_the_wait() -> None:
    limit = RateLimit(0.1, 40)  # a token every 10 s: none comes back during the test
    clock = FakeClock()
    with fleet_prefix() as (url, prefix):
        async with process(url, prefix, "a") as live_a, process(url, prefix, "b") as live_b:
            a = SharedTokenBuckets(limit, live_a, clock, prefix=prefix)
            b = SharedTokenBuckets(limit, live_b, clock, prefix=prefix)
            assert a.lease == default_lease(limit) == 4
            admitted = 0
            for _ in range(100):
                for buckets in (a, b):
                    admitted += await buckets.admit("caller") == 0.0
            # The burst, once for both controllers; a round trip per batch of 4.
            assert admitted == 40
            assert a.round_trips + b.round_trips == 10 + 2  # 10 batches, and a refusal each
            wait = await a.admit("caller")
            assert 9 < wait <= 10
            # Refused locally, with the wait left, until it has passed.
            trips = a.round_trips
            clock.advance(wait / 2)
            assert await a.admit("caller") == pytest.approx(wait / 2)
            assert a.round_trips == trips
            clock.advance(wait / 2)
            # Then Redis is asked again (its clock has not moved: refused again).
            assert await a.admit("caller") > 9
            assert a.round_trips == trips + 1
            # Another caller has a bucket of its own.
            assert await b.admit("other") == 0.0


async def test_concurrent_requests_of_a_caller_share_one_round_trip() -> None:
    limit = RateLimit(0.1, 100)  # batches of 10
    clock = FakeClock()
    with fleet_prefix() as (url, prefix):
        async with process(url, prefix, "a") as live:
            buckets = SharedTokenBuckets(limit, live, clock, prefix=prefix)
            waits: list[float] = []

            async def one() -> None:
                waits.append(await buckets.admit("caller"))

            async with anyio.create_task_group() as tasks:
                for _ in range(10):
                    tasks.start_soon(one)
            assert waits == [0.0] * 10
            assert buckets.round_trips == 1


async def test_with_single_tokens_concurrent_requests_do_not_wait_for_each_other() -> None:
    limit = RateLimit(0.1, 10)  # batches of 1: nothing to share
    clock = FakeClock()
    with fleet_prefix() as (url, prefix):
        async with process(url, prefix, "a") as live:
            buckets = SharedTokenBuckets(limit, live, clock, prefix=prefix)
            waits: list[float] = []

            async def one() -> None:
                waits.append(await buckets.admit("caller"))

            async with anyio.create_task_group() as tasks:
                for _ in range(12):
                    tasks.start_soon(one)
            # The burst, and two refusals; every request asked Redis itself.
            assert waits.count(0.0) == 10 and len(waits) == 12
            assert buckets.round_trips == 12
            assert buckets._asking == {}


async def test_a_lease_is_not_used_after_its_lifetime() -> None:
    limit = RateLimit(0.1, 100)
    clock = FakeClock()
    with fleet_prefix() as (url, prefix):
        async with process(url, prefix, "a") as live:
            buckets = SharedTokenBuckets(limit, live, clock, prefix=prefix)
            assert await buckets.admit("caller") == 0.0  # 9 more leased
            clock.advance(1.5)
            assert await buckets.admit("caller") == 0.0
            assert buckets.round_trips == 2


def test_a_lease_is_at_most_a_tenth_of_the_burst() -> None:
    live = ControllerLiveness(aioredis.Redis(), prefix="p", controller_id="a")
    with pytest.raises(ValueError, match="lease must be from 1 to a tenth of the burst"):
        SharedTokenBuckets(RateLimit(10, 100), live, FakeClock(), prefix="p", lease=11)
    assert SharedTokenBuckets(RateLimit(10, 19), live, FakeClock(), prefix="p").lease == 1


async def test_the_local_memory_is_bounded() -> None:
    limit = RateLimit(0.1, 1, max_keys=10)
    clock = FakeClock()
    with fleet_prefix() as (url, prefix):
        async with process(url, prefix, "a") as live:
            buckets = SharedTokenBuckets(limit, live, clock, prefix=prefix)
            for caller in range(30):
                assert await buckets.admit(f"c{caller}") == 0.0
                assert await buckets.admit(f"c{caller}") > 0  # a refusal window kept
            assert len(buckets._local) <= 10
            # A caller without room is still refused: by Redis.
            trips = buckets.round_trips
            assert await buckets.admit("c29") > 0
            assert buckets.round_trips == trips + 1


async def test_redis_unreachable_each_process_applies_its_share_then_shares_again() -> None:
    limit = RateLimit(0.1, 40)
    clock = FakeClock()
    with fleet_prefix() as (url, prefix):
        async with (
            Partition(MACHINE_PORT) as link,
            process(url, prefix, "a"),
            process(link.url, prefix, "b") as live_b,
        ):
            b = SharedTokenBuckets(limit, live_b, clock, prefix=prefix)
            assert live_b.live == 2
            assert b.state().mode == "shared"
            link.cut()
            # The first round trip fails: this request, and the next, are the share's.
            admitted = [await b.admit("caller") == 0.0 for _ in range(30)]
            assert admitted == [True] * 20 + [False] * 10  # BURST / 2
            state = b.state()
            assert (state.mode, state.rate, state.burst, state.controllers) == (
                "local_fallback",
                0.05,
                20,
                2,
            )
            assert await b.admit("caller") == pytest.approx(20.0)  # RATE / 2: one every 20 s
            assert "while Redis is unreachable" in b.describe()
            link.heal()
            assert b.state().mode == "local_fallback"  # until a renewal succeeds
            assert await live_b.renew()
            assert b.state().mode == "shared"
            assert await b.admit("caller") == 0.0  # the shared bucket, untouched


async def test_a_renewal_that_fails_starts_the_fallback_before_any_request() -> None:
    limit = RateLimit(10, 7)
    with fleet_prefix() as (_, prefix):
        async with Partition(MACHINE_PORT) as link, process(link.url, prefix, "a") as live:
            buckets = SharedTokenBuckets(limit, live, FakeClock(), prefix=prefix)
            link.cut()
            assert not await live.renew()
            state = buckets.state()
            # One controller: its share is the whole limit.
            assert (state.mode, state.rate, state.burst) == ("local_fallback", 10, 7)
            assert await buckets.admit("caller") == 0.0
            assert buckets.round_trips == 0


async def test_controllers_on_redis_share_the_limit_and_say_so_in_ready() -> None:
    limit = RateLimit(0.1, 4)
    clock = FakeClock()
    with fleet_prefix() as (url, prefix):
        raw = redis.Redis.from_url(url)
        async with (
            Partition(MACHINE_PORT) as link,
            controller(url, prefix, "a", clock, rate_limit=limit) as a,
            controller(link.url, prefix, "b", clock, rate_limit=limit) as b,
        ):
            assert raw.exists(liveness_key(prefix, "a"), liveness_key(prefix, "b")) == 2
            await a.register("w1")
            await b.service.liveness.renew()
            ready = (await b.get("/ready")).json()
            assert ready["rate_limit"] == {
                "mode": "shared",
                "rate": 0.1,
                "burst": 4,
                "controllers": 2,
            }
            statuses = []
            for _ in range(3):
                for api in (a, b):
                    response = await api.post("/route", ROUTE)
                    statuses.append(response.status_code)
            assert statuses.count(200) == 4 and statuses.count(429) == 2
            refused = await b.post("/route", ROUTE)
            assert refused.status_code == 429
            assert refused.json()["error"] == "rate_limited"
            assert refused.headers["Retry-After"] == "10"
            assert "shared by all controllers" in refused.json()["message"]
            # Redis out of reach from B: B keeps its share, and says so.
            link.cut()
            await b.service.liveness.renew()
            response = await b.get("/ready")
            assert response.status_code == 200
            assert response.json()["rate_limit"] == {
                "mode": "local_fallback",
                "rate": 0.05,
                "burst": 2,
                "controllers": 2,
            }
            assert [(await b.post("/route", ROUTE)).status_code for _ in range(3)] == [
                200,
                200,
                429,
            ]
            link.heal()
            await b.service.liveness.renew()
            assert (await b.get("/ready")).json()["rate_limit"]["mode"] == "shared"
        # Both left: their liveness keys are gone.
        assert raw.exists(liveness_key(prefix, "a"), liveness_key(prefix, "b")) == 0
        raw.close()


async def test_execute_and_route_on_two_gateways_take_from_one_shared_bucket() -> None:
    network = WorkerNetwork()
    worker = network.add("w1.test", FakeWorker(serving({("greet", "hello"): hello})))
    clock = FakeClock()
    limit = RateLimit(0.1, 2)
    with fleet_prefix() as (url, prefix):

        def gateway(name: str) -> Any:
            config = shared_config(url, prefix, name, policy=POLICY, rate_limit=limit)
            return create_gateway_app(create_app(config=config, clock=clock), transport=network)

        a, b = gateway("a"), gateway("b")
        async with client_of(a) as on_a, client_of(b) as on_b:
            await register(on_a, "w1", "https://w1.test:8443")
            await wait_until(lambda: "w1" in b.state.service.registry, what="w1 on B")
            assert (await execute(on_a)).status_code == 200
            route = {"verb": "greet", "capability": "hello"}
            assert (await on_b.post("/route", json=route)).status_code == 200
            refused = await execute(on_b)
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"] == "10"
            assert (await execute(on_a)).status_code == 429
            assert len(worker.received) == 1
