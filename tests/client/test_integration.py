"""WorkerAgent and ControllerClient against the real controller app, in-process, in virtual time."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from crank_registry import HealthPolicy, WorkerEndpoint
from crank_registry_asgi import ServiceConfig, create_app
from crank_worker_client import ControllerClient, UnknownCapability, WorkerAgent
from tests.builders import capability
from tests.client.helpers import InProcessController

pytestmark = pytest.mark.anyio

URL = "https://controller.test"
INTERVAL = 0.2
EPOCH = 1_800_000_000.0


def app_factory(state_dir: Path | None = None) -> Callable[[], Any]:
    policy = HealthPolicy(INTERVAL, 2 * INTERVAL, 4 * INTERVAL)

    def make_app() -> Any:
        # The app reads the same virtual clock as the agents, as wall-clock seconds.
        return create_app(
            config=ServiceConfig(policy=policy, state_dir=state_dir),
            clock=lambda: EPOCH + anyio.current_time(),
        )

    return make_app


@pytest.fixture
async def controller() -> AsyncIterator[InProcessController]:
    async with anyio.create_task_group() as tg:
        running = InProcessController(tg, app_factory())
        await running.start()
        yield running
        await running.stop()


def make_agent(
    controller: InProcessController, worker_id: str = "w1", **options: Any
) -> WorkerAgent:
    options.setdefault("rng", random.Random(worker_id))
    return WorkerAgent(
        URL,
        worker_id,
        f"https://{worker_id}.test:8443",
        [capability()],
        transport=controller.transport,
        **options,
    )


async def test_a_worker_registers_stays_routable_and_disappears_at_once_on_exit(
    controller: InProcessController,
) -> None:
    async with ControllerClient(URL, transport=controller.transport) as client:
        # No worker offers it yet: unknown, not an outage.
        with pytest.raises(UnknownCapability):
            await client.route("classify", "image.classify")
        async with make_agent(controller):
            assert await client.route("classify", "image.classify") == WorkerEndpoint(
                "w1", "https://w1.test:8443", "1.0.0"
            )
            # Many unhealthy_after periods later, heartbeats keep it routable.
            for _ in range(10):
                await anyio.sleep(5 * INTERVAL)
                (worker,) = await client.workers()
                assert (worker.worker_id, worker.is_healthy, worker.state.value) == (
                    "w1",
                    True,
                    "healthy",
                )
            assert (await client.health()).healthy_workers == 1
            assert [c.healthy_workers for c in await client.capabilities()] == [("w1",)]
        assert await client.workers() == []
        with pytest.raises(UnknownCapability):
            await client.route("classify", "image.classify")


async def test_a_worker_leaving_on_error_disappears_at_once(
    controller: InProcessController,
) -> None:
    async with ControllerClient(URL, transport=controller.transport) as client:
        with pytest.raises(KeyError):
            async with make_agent(controller):
                assert len(await client.workers()) == 1
                raise KeyError("boom")
        assert await client.workers() == []


@pytest.mark.parametrize("downtime", [0.0, 3 * INTERVAL])
async def test_a_restarted_controller_sees_the_worker_again_within_one_interval(
    controller: InProcessController, downtime: float
) -> None:
    async with ControllerClient(URL, transport=controller.transport) as client:
        agent = make_agent(controller)
        async with agent:
            await anyio.sleep(2.5 * INTERVAL)
            await controller.restart(downtime)
            back_at = anyio.current_time()
            assert await client.workers() == []  # the new app has never heard of it
            await anyio.sleep(INTERVAL)
            (worker,) = await client.workers()
            assert worker.worker_id == "w1" and worker.is_healthy
            (re_registration,) = controller.transport.times_of("/register", since=back_at)
            # The heartbeat schedule never waits more than one interval (jitter
            # included); the retry backoff is capped at one interval too.
            assert re_registration - back_at <= INTERVAL
            assert agent.status.registered and agent.status.registrations == 2
            assert await client.route("classify", "image.classify") == WorkerEndpoint(
                "w1", "https://w1.test:8443", "1.0.0"
            )


async def test_a_worker_started_before_its_controller_registers_when_it_comes_up() -> None:
    async with anyio.create_task_group() as tg:
        controller = InProcessController(tg, app_factory())

        async def start_later() -> None:
            await anyio.sleep(3.0)
            await controller.start()

        tg.start_soon(start_later)
        agent = make_agent(controller, registration_backoff_base=0.1, registration_backoff_cap=0.5)
        async with agent:
            assert anyio.current_time() - 3.0 <= 0.5
            async with ControllerClient(URL, transport=controller.transport) as client:
                assert [w.worker_id for w in await client.workers()] == ["w1"]
        await controller.stop()
