"""RegistryFollower and a real ``crank-registry serve`` process stopped by SIGSTOP (real time).

The controller runs on plain HTTP with a 0.5 s heartbeat interval, so the
follower's lag limit is 1 s. While the controller is stopped the follower
keeps answering from its replica; past its lag limit a route asks the
controller's ``/route``, which hangs: after ``stale_route_timeout`` the
route is answered from the replica (and the controller is not asked again
until the backoff has passed). Once the controller continues, the follower
catches up and routes locally again.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from crank_registry import Registration
from crank_worker_client import ControllerClient, RegistryFollower
from tests.builders import capability
from tests.cli.helpers import ServerProcess, free_port, serving

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

INTERVAL = 0.5
STALE_ROUTE_TIMEOUT = 0.5
#: What the scheduler of a busy 2-core machine may add to a wait.
SLACK = 1.5
CLASSIFY = ("classify", "image.classify")


class CountingTransport(httpx.AsyncBaseTransport):
    """httpx's network transport, counting the requests of each path."""

    def __init__(self) -> None:
        self.network = httpx.AsyncHTTPTransport()
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return await self.network.handle_async_request(request)

    async def aclose(self) -> None:
        await self.network.aclose()


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[ServerProcess]:
    port = free_port()
    args = ["--insecure", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--heartbeat-interval", str(INTERVAL), "--unhealthy-after", "3600"]
    args += ["--evict-after", "7200", "--state-dir", str(tmp_path / "state")]
    with serving(args, tmp_path / "server.log", port=port, scheme="http") as server:
        try:
            yield server
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert server.stop() == 0, server.log()


async def routed(follower: RegistryFollower, count: int = 4) -> set[str]:
    return {(await follower.route(*CLASSIFY)).worker_id for _ in range(count)}


async def wait_until_caught_up(follower: RegistryFollower, deadline: float) -> None:
    while follower.lag > follower.lag_limit:
        assert time.monotonic() < deadline, f"the follower is still {follower.lag:.1f} s behind"
        await anyio.sleep(0.05)


async def test_a_follower_routes_locally_while_its_controller_is_stopped(
    controller: ServerProcess,
) -> None:
    transport = CountingTransport()
    async with ControllerClient(controller.url, insecure=True) as client:
        for worker_id in ("w1", "w2"):
            registration = Registration(worker_id, f"https://{worker_id}:8443", (capability(),))
            await client.register(registration)
        async with RegistryFollower(
            controller.url,
            insecure=True,
            transport=transport,
            stale_route_timeout=STALE_ROUTE_TIMEOUT,
        ) as follower:
            assert follower.lag_limit == 2 * INTERVAL
            assert await routed(follower) == {"w1", "w2"}
            os.kill(controller.process.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            # Within the lag limit: answered locally, at once.
            assert await routed(follower) == {"w1", "w2"}
            assert "/route" not in transport.paths
            await anyio.sleep(follower.lag_limit + 0.1 - (time.monotonic() - stopped_at))
            assert follower.lag > follower.lag_limit
            # Past it: the route asks the stopped controller, waits out the
            # timeout, and answers from the replica.
            started = time.monotonic()
            assert (await follower.route(*CLASSIFY)).worker_id in {"w1", "w2"}
            waited = time.monotonic() - started
            assert STALE_ROUTE_TIMEOUT <= waited < STALE_ROUTE_TIMEOUT + SLACK
            assert transport.paths.count("/route") == 1
            # The next routes do not wait for it again (the backoff has not passed).
            started = time.monotonic()
            assert await routed(follower) == {"w1", "w2"}
            assert time.monotonic() - started < STALE_ROUTE_TIMEOUT
            assert transport.paths.count("/route") == 1
            os.kill(controller.process.pid, signal.SIGCONT)
            await wait_until_caught_up(follower, time.monotonic() + 10 * INTERVAL + SLACK)
            # Caught up: changes arrive again and routes are local.
            await client.register(Registration("w3", "https://w3:8443", (capability(),)))
            deadline = time.monotonic() + 10 * INTERVAL + SLACK
            while await routed(follower, 6) != {"w1", "w2", "w3"}:
                assert time.monotonic() < deadline, "the follower never heard of w3"
                await anyio.sleep(0.05)
            routes_asked = transport.paths.count("/route")
            assert await routed(follower) == {"w1", "w2", "w3"}
            assert transport.paths.count("/route") == routes_asked
