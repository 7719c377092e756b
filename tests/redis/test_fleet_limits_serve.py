"""``serve --redis --rate-limit``: a fleet of controller processes admits the limit once.

Two ``crank-registry serve --processes 2`` controllers on one Redis (four
controller processes), flooded by 8 concurrent clients far above the limit: what the fleet
admits stays within ``RATE x t + BURST`` plus a leased batch per process;
a 429's ``Retry-After`` is true; a controller cut off from Redis applies
its share of the limit and says so in ``/ready``, then shares again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import redis

from crank_registry import RateLimit
from crank_registry_asgi.fleet_limits import controllers_key, default_lease, liveness_key
from tests.builders import registration_payload
from tests.cli.helpers import ServerProcess, clean_environment, command, free_port
from tests.redis.helpers import Partition, machine_url
from tests.redis.test_fleet_limits import fleet_prefix

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

MACHINE_PORT = 6379
ROUTE = {"verb": "classify", "capability": "image.classify"}
# Low enough that 8 Python clients on a loaded 2-core machine are far above
# it; a burst of 20 leases tokens in pairs.
LIMIT = RateLimit(20, 20)
CLIENTS = 8
FLOOD_SECONDS = 3.0


@dataclasses.dataclass(frozen=True)
class Fleet:
    """Controllers on one Redis, each ``processes_each`` server processes on its own port."""

    controllers: int
    processes_each: int = 1

    @property
    def processes(self) -> int:
        """The controller processes in all: what the liveness keys count."""
        return self.controllers * self.processes_each

    def args(self) -> list[str]:
        return [] if self.processes_each == 1 else ["--processes", str(self.processes_each)]


#: The issue's fleet: 2 controllers x ``--processes 2``.
FLEET = Fleet(controllers=2, processes_each=2)


@contextlib.asynccontextmanager
async def fleet(
    tmp_path: Path, urls: Sequence[str], prefix: str, *extra: str
) -> AsyncIterator[list[ServerProcess]]:
    """One controller per Redis URL of ``urls``, started at once; yields when all answer."""
    servers: list[ServerProcess] = []
    try:
        for index, url in enumerate(urls):
            name = f"c{index}"
            port = free_port()
            log_path = tmp_path / f"{name}.log"
            args = ["--insecure", "--port", str(port), "--state-dir", str(tmp_path / name)]
            args += ["--redis", url, "--redis-prefix", prefix, "--controller-id", name]
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    command("serve", *args, *FLEET.args(), *extra),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=clean_environment(),
                )
            servers.append(ServerProcess(process, f"http://127.0.0.1:{port}", log_path))
        for server in servers:
            # Polled without blocking the loop: the partition's proxy runs in it.
            await wait_async(lambda s=server: _answers(s), timeout=30, what=f"{server.url} up")
        yield servers
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait()


async def _answers(server: ServerProcess) -> bool:
    if server.process.poll() is not None:
        raise AssertionError(f"{server.url} exited:\n{server.log()}")
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            health = await client.get(f"{server.url}/health")
    except httpx.HTTPError:
        return False
    return health.status_code == 200


async def wait_async(check: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await anyio.sleep(0.05)


async def ready(url: str) -> dict[str, Any]:
    """``GET /ready`` of one of the controller's processes (a new connection: any of them)."""
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"{url}/ready")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def ready_everywhere(url: str) -> list[dict[str, Any]]:
    """``GET /ready`` asked often enough to reach each of the controller's processes.

    The kernel spreads new connections over the processes by a hash: eight
    asks miss one of two processes once in 128 runs at most.
    """
    return [await ready(url) for _ in range(8 * FLEET.processes_each)]


@dataclasses.dataclass
class Tally:
    admitted: int = 0
    refused: int = 0
    other: list[int] = dataclasses.field(default_factory=list)
    retry_after: set[str] = dataclasses.field(default_factory=set)
    seconds: float = 0.0


async def flood(urls: Sequence[str], seconds: float) -> Tally:
    """``CLIENTS`` clients, each sending routes to ``urls`` in turn, for ``seconds``."""
    tally = Tally()
    started = time.monotonic()
    ends = started + seconds

    async def client(offset: int) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            turn = offset
            while time.monotonic() < ends:
                response = await http.post(f"{urls[turn % len(urls)]}/route", json=ROUTE)
                turn += 1
                if response.status_code == 200:
                    tally.admitted += 1
                elif response.status_code == 429:
                    tally.refused += 1
                    assert response.json()["error"] == "rate_limited"
                    tally.retry_after.add(response.headers["Retry-After"])
                else:
                    tally.other.append(response.status_code)

    async with anyio.create_task_group() as tasks:
        for offset in range(CLIENTS):
            tasks.start_soon(client, offset)
    # From the first request sent to the last answer received.
    tally.seconds = time.monotonic() - started
    return tally


async def test_a_fleet_admits_the_limit_once_and_falls_back_to_its_share(
    tmp_path: Path,
) -> None:
    redis_url = machine_url()
    raw = redis.Redis.from_url(redis_url)
    with fleet_prefix() as (_, prefix):
        async with Partition(MACHINE_PORT) as link:
            # The last controller reaches Redis through a link the test can cut.
            urls = [redis_url] * (FLEET.controllers - 1) + [link.url]
            timings = ["--unhealthy-after", "3600", "--evict-after", "7200"]
            async with fleet(
                tmp_path, urls, prefix, "--rate-limit", str(LIMIT), *timings
            ) as servers:
                controllers = [server.url for server in servers]
                async with httpx.AsyncClient(timeout=5) as http:
                    registered = await http.post(
                        f"{controllers[0]}/register", json=registration_payload("w1")
                    )
                    assert registered.status_code == 200, registered.text

                    async def everywhere() -> bool:
                        for url in controllers:
                            health = (await http.get(f"{url}/health")).json()
                            if health["healthy_workers"] != 1:
                                return False
                            for answer in await ready_everywhere(url):
                                if answer["rate_limit"]["controllers"] != FLEET.processes:
                                    return False
                        return True

                    await wait_async(everywhere, timeout=10, what="w1 and every process seen")
                    assert (await ready(controllers[0]))["rate_limit"] == {
                        "mode": "shared",
                        "rate": LIMIT.rate,
                        "burst": LIMIT.burst,
                        "controllers": FLEET.processes,
                    }

                    tally = await flood(controllers, FLOOD_SECONDS)
                    leased = FLEET.processes * default_lease(LIMIT)
                    bound = LIMIT.rate * tally.seconds + LIMIT.burst + leased
                    print(
                        f"\n{FLEET.processes} processes, {CLIENTS} clients, "
                        f"{tally.seconds:.2f} s: admitted {tally.admitted}, refused "
                        f"{tally.refused}; bound RATE x t + BURST + leased = "
                        f"{LIMIT.rate:g} x {tally.seconds:.2f} + {LIMIT.burst} + {leased} "
                        f"= {bound:.0f} ({tally.admitted / bound:.2f}x of it)"
                    )
                    assert tally.other == []
                    assert tally.admitted <= bound
                    # Far above the limit, the fleet still admits it (none is lost).
                    assert tally.refused > tally.admitted
                    assert tally.admitted >= 0.5 * LIMIT.rate * tally.seconds
                    # The next token is at most one interval away: Retry-After 1.
                    assert tally.retry_after == {"1"}

                    # A 429's Retry-After is true: a request sent after it is admitted.
                    for _ in range(1000):
                        refused = await http.post(f"{controllers[0]}/route", json=ROUTE)
                        if refused.status_code == 429:
                            break
                    assert refused.status_code == 429, refused.text
                    await anyio.sleep(int(refused.headers["Retry-After"]))
                    again = await http.post(f"{controllers[0]}/route", json=ROUTE)
                    assert again.status_code == 200, again.text

                    # Redis out of reach from the last controller: its share, and /ready says so.
                    link.cut()
                    cut_off = controllers[-1]

                    async def falls_back() -> bool:
                        answers = await ready_everywhere(cut_off)
                        return all(a["rate_limit"]["mode"] == "local_fallback" for a in answers)

                    await wait_async(falls_back, timeout=10, what="the fallback in /ready")
                    assert (await ready(cut_off))["rate_limit"] == {
                        "mode": "local_fallback",
                        "rate": LIMIT.rate / FLEET.processes,
                        "burst": LIMIT.burst // FLEET.processes,
                        "controllers": FLEET.processes,
                    }
                    assert (await ready(controllers[0]))["rate_limit"]["mode"] == "shared"
                    alone = await flood([cut_off], 1.0)
                    # Each of the cut-off controller's processes applies its own share.
                    share_bound = FLEET.processes_each * (
                        LIMIT.rate / FLEET.processes * alone.seconds
                        + LIMIT.burst // FLEET.processes
                    )
                    print(
                        f"cut off: admitted {alone.admitted} in {alone.seconds:.2f} s "
                        f"(bound {share_bound:.0f})"
                    )
                    assert 0 < alone.admitted <= share_bound

                    link.heal()

                    async def shares_again() -> bool:
                        answers = await ready_everywhere(cut_off)
                        return all(a["rate_limit"]["mode"] == "shared" for a in answers)

                    await wait_async(shares_again, timeout=10, what="shared again in /ready")
                for server in servers:
                    server.process.terminate()
                for server in servers:
                    # Waited for in a thread: the link's proxy must go on running.
                    status = await anyio.to_thread.run_sync(server.process.wait, 20)
                    assert status == 0, server.log()
                    assert "Traceback" not in server.log()
        # Each process took its liveness with it.
        assert list(raw.scan_iter(match=liveness_key(prefix, "*"))) == []
        assert raw.zrange(controllers_key(prefix), 0, -1) == []
    raw.close()
