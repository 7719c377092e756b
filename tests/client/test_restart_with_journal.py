"""A controller restarted on the same state directory, in-process and in real time.

The new app replays the journal: the worker is known at once (unverified, still
routable), its next heartbeat is answered ``worker_not_registered`` and it
re-registers within one heartbeat interval (jitter included).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from crank_registry import HealthPolicy, WorkerEndpoint
from crank_registry_asgi import ServiceConfig, create_app
from crank_worker_client import ControllerClient, WorkerAgent
from tests.builders import capability
from tests.client.helpers import InProcessController

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

URL = "https://controller.test"
INTERVAL = 0.2
#: What the scheduler, a journal fsync and a busy machine may add.
SLACK = 0.5
#: Heartbeats are journalled once per half of ``unhealthy_after``, so the
#: restored worker's last heartbeat may be that old at the restart, and its
#: warm-cache window only the other half from then on. With 5 intervals the
#: window was 0.5 s minus the restart, which a loaded machine can take whole:
#: the route then found no worker. Half of 20 intervals (2 s) is far more
#: than a restart and a route take; the worker still re-registers within an
#: interval, which is what this test is about.
UNHEALTHY_AFTER = 20 * INTERVAL


async def test_restart_on_the_same_state_dir_re_registers_within_one_interval(
    tmp_path: Path,
) -> None:
    policy = HealthPolicy(INTERVAL, UNHEALTHY_AFTER, 2 * UNHEALTHY_AFTER)

    def make_app() -> Any:
        return create_app(config=ServiceConfig(policy=policy, state_dir=tmp_path))

    async with anyio.create_task_group() as tg:
        controller = InProcessController(tg, make_app)
        await controller.start()
        agent = WorkerAgent(
            URL,
            "w1",
            "https://w1.test:8443",
            [capability()],
            transport=controller.transport,
            rng=random.Random(3),
        )
        expected = WorkerEndpoint("w1", "https://w1.test:8443", "1.0.0")
        async with ControllerClient(URL, transport=controller.transport) as client, agent:
            await anyio.sleep(2.5 * INTERVAL)
            await controller.restart()
            back_at = anyio.current_time()
            # Recovered from the journal: known and routable before it re-registers,
            # its last heartbeat at most half an unhealthy_after older than the last one.
            (restored,) = await client.workers()
            assert restored.worker_id == "w1"
            heard = time.time() - restored.last_heartbeat.timestamp()
            assert heard <= UNHEALTHY_AFTER / 2 + INTERVAL + SLACK
            assert await client.route("classify", "image.classify") == expected
            with anyio.fail_after(INTERVAL + SLACK):
                while True:
                    (worker,) = await client.workers()
                    if worker.state.value == "healthy":
                        break
                    assert worker.state.value == "unverified"
                    await anyio.sleep(0.01)
            (re_registration,) = controller.transport.times_of("/register", since=back_at)
            assert re_registration - back_at <= INTERVAL + SLACK
            print(f"\nre-registered {re_registration - back_at:.3f} s after the restart")
            with anyio.fail_after(SLACK):
                while not agent.status.registered:
                    await anyio.sleep(0.01)
            assert agent.status.registrations == 2
        assert await client.workers() == []
        await controller.stop()
