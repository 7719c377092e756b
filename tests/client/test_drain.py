"""Graceful shutdown: the agent drains, its calls in flight finish, then it deregisters.

Virtual time: a fake controller (a real registry behind ``httpx.MockTransport``)
and the serving helper's app over ``httpx.ASGITransport``.
"""

from __future__ import annotations

import itertools
import logging
import random
from typing import Any

import anyio
import httpx
import pytest

from crank_registry import HealthState, WorkerState
from crank_worker_client import (
    ConfigurationError,
    ControllerClient,
    UnexpectedResponse,
    WorkerAgent,
    WorkerNotRegisteredError,
)
from crank_worker_client.serving import invocation_app
from tests.builders import capability
from tests.client.helpers import FakeController

pytestmark = pytest.mark.anyio

URL = "https://controller.test"
INTERVAL = 1.0
FEATURES = ("load_reports", "drain")


def make_agent(controller: FakeController, **options: Any) -> WorkerAgent:
    options.setdefault("rng", random.Random(3))
    return WorkerAgent(
        URL, "w1", "https://w1.test", [capability()], transport=controller.transport, **options
    )


class SlowWorker:
    """The serving helper's app with one handler that answers once ``release`` is set."""

    def __init__(self, agent: WorkerAgent) -> None:
        self.release = anyio.Event()
        self.statuses: list[int] = []

        async def classify(payload: Any) -> dict[str, Any]:
            await self.release.wait()
            return {"ok": True}

        # Given the agent, the app makes its meter the agent's count of calls in flight.
        self.app = invocation_app(
            {("classify", "image.classify"): classify}, [capability()], agent=agent
        )

    async def call(self) -> None:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://w1") as client:
            response = await client.post("/invoke/classify/image.classify", json={"payload": {}})
        self.statuses.append(response.status_code)

    async def until_in_flight(self, count: int) -> None:
        while self.app.load.in_flight != count:
            await anyio.sleep(0.01)


async def test_shutdown_drains_finishes_the_call_in_flight_then_deregisters() -> None:
    controller = FakeController(INTERVAL, features=FEATURES)
    agent = make_agent(controller)
    worker = SlowWorker(agent)
    seen: dict[str, Any] = {}

    async def while_draining() -> None:
        # The worker is draining: no new route, still registered and heartbeating.
        while not agent.status.draining:
            await anyio.sleep(0.01)
        await anyio.sleep(5 * INTERVAL)
        now = anyio.current_time()
        view = controller.registry.get_worker("w1", now=now)
        seen["draining"] = view is not None and view.draining
        seen["routed"] = controller.registry.route("classify", "image.classify", now=now)
        seen["deregistered"] = bool(controller.calls_to("/deregister"))
        worker.release.set()

    async with anyio.create_task_group() as tasks, agent:
        tasks.start_soon(worker.call)
        await worker.until_in_flight(1)
        tasks.start_soon(while_draining)
        # The block is over: the agent drained, waited for the call, then left.
    assert worker.statuses == [200]  # the call started before the shutdown was not lost
    assert seen == {"draining": True, "routed": None, "deregistered": False}
    paths = controller.paths()
    assert paths.index("/workers/w1/drain") < paths.index("/deregister")
    drained_at = controller.calls_to("/workers/w1/drain")[0].at
    # Heartbeats went on while the call finished: the worker stayed healthy.
    assert len([c for c in controller.calls_to("/heartbeat") if c.at > drained_at]) >= 4
    assert "w1" not in controller.registry


async def test_drain_then_exit_waits_once_and_an_idle_worker_leaves_at_once() -> None:
    controller = FakeController(INTERVAL, features=FEATURES)
    agent = make_agent(controller)
    SlowWorker(agent)  # no call: nothing in flight
    async with agent:
        start = anyio.current_time()
        assert await agent.drain() is True
        assert anyio.current_time() - start < 0.1
        assert controller.registry.get_worker("w1", now=start).draining  # type: ignore[union-attr]
    assert controller.paths().count("/workers/w1/drain") == 1  # the exit did not drain again
    assert controller.paths()[-1] == "/deregister"


async def test_an_older_controller_without_drain_is_not_asked_and_shutdown_still_works() -> None:
    controller = FakeController(INTERVAL, features=("load_reports",))
    agent = make_agent(controller)
    async with agent:
        await anyio.sleep(2 * INTERVAL)
    assert not [path for path in controller.paths() if path.startswith("/workers/")]
    assert controller.paths()[-1] == "/deregister"
    assert "w1" not in controller.registry


async def test_a_call_that_never_ends_delays_the_exit_by_drain_timeout_at_most(
    caplog: pytest.LogCaptureFixture,
) -> None:
    controller = FakeController(INTERVAL, features=FEATURES)
    agent = make_agent(controller, drain_timeout=3.0)
    worker = SlowWorker(agent)
    async with anyio.create_task_group() as tasks:
        async with agent:
            tasks.start_soon(worker.call)
            await worker.until_in_flight(1)
            left_at = anyio.current_time()
        assert 3.0 <= anyio.current_time() - left_at < 3.5
        assert controller.paths()[-1] == "/deregister"
        worker.release.set()  # the server's own shutdown would end it
    assert "calls still in flight after draining for 3 s" in caplog.text


async def test_a_drain_refused_for_a_store_outage_is_asked_again_until_it_is_heard() -> None:
    controller = FakeController(INTERVAL, features=FEATURES)
    agent = make_agent(controller)
    worker = SlowWorker(agent)
    seen: dict[str, Any] = {}

    async def outage_then_recovery() -> None:
        while not controller.calls_to("/workers/w1/drain"):
            await anyio.sleep(0.01)
        await anyio.sleep(2 * INTERVAL)  # the controller's store is back
        del controller.faults["/workers/w1/drain"]
        await anyio.sleep(2 * INTERVAL)
        now = anyio.current_time()
        seen["routed"] = controller.registry.route("classify", "image.classify", now=now)
        seen["drain requests"] = len(controller.calls_to("/workers/w1/drain"))
        worker.release.set()

    async with anyio.create_task_group() as tasks, agent:
        tasks.start_soon(worker.call)
        await worker.until_in_flight(1)
        controller.faults["/workers/w1/drain"] = "store_unavailable"
        tasks.start_soon(outage_then_recovery)
    # Heard at last: no new route while the call finished.
    assert seen["routed"] is None
    assert seen["drain requests"] >= 3  # the first, retries in the outage, the one heard
    assert worker.statuses == [200]
    drains = controller.calls_to("/workers/w1/drain")
    assert len(drains) == seen["drain requests"]  # none after it was heard
    # The heartbeats' backoff: 1/16 of the interval, doubling, never more than one.
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(drains)]
    assert gaps[0] < INTERVAL / 8
    assert all(gap <= INTERVAL + 0.1 for gap in gaps)
    assert controller.paths()[-1] == "/deregister"


async def test_drain_retries_stop_when_the_calls_end_and_never_delay_the_exit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    controller = FakeController(INTERVAL, features=FEATURES)
    agent = make_agent(controller, drain_timeout=3.0)
    worker = SlowWorker(agent)
    async with anyio.create_task_group() as tasks:
        async with agent:
            tasks.start_soon(worker.call)
            await worker.until_in_flight(1)
            controller.faults["/workers/w1/drain"] = "store_unavailable"

            async def release_later() -> None:
                await anyio.sleep(1.5)
                worker.release.set()

            tasks.start_soon(release_later)
            left_at = anyio.current_time()
        # The call ended at 1.5 s: the agent left then, the controller still unavailable.
        assert 1.5 <= anyio.current_time() - left_at < 1.6
        asked = len(controller.calls_to("/workers/w1/drain"))
        assert asked >= 3
    assert controller.paths()[-1] == "/deregister"
    assert len(controller.calls_to("/workers/w1/drain")) == asked  # no retry after the exit
    assert caplog.text.count("could not drain") == 1  # one warning an outage


async def test_a_drain_the_controller_refuses_is_not_asked_again() -> None:
    controller = FakeController(INTERVAL, features=FEATURES)
    agent = make_agent(controller, drain_timeout=3.0)
    worker = SlowWorker(agent)
    async with anyio.create_task_group() as tasks, agent:
        tasks.start_soon(worker.call)
        await worker.until_in_flight(1)
        controller.faults["/workers/w1/drain"] = "refuse"  # an answer it means (422)

        async def release_later() -> None:
            await anyio.sleep(2.0)
            worker.release.set()

        tasks.start_soon(release_later)
    assert len(controller.calls_to("/workers/w1/drain")) == 1
    assert worker.statuses == [200]


async def test_a_worker_forgotten_while_draining_is_drained_again_when_it_registers() -> None:
    controller = FakeController(INTERVAL, features=FEATURES)
    agent = make_agent(controller)
    worker = SlowWorker(agent)
    async with anyio.create_task_group() as tasks, agent:
        tasks.start_soon(worker.call)
        await worker.until_in_flight(1)

        async def restart_then_release() -> None:
            while not agent.status.draining:
                await anyio.sleep(0.01)
            await anyio.sleep(0.5)
            controller.restart()  # forgets the worker and its drain
            while controller.registry.get_worker("w1", now=anyio.current_time()) is None:
                await anyio.sleep(0.01)  # the next heartbeat registers it again...
            await anyio.sleep(0.1)
            now = anyio.current_time()
            # ...and the agent drains it again: still no new route.
            assert controller.registry.route("classify", "image.classify", now=now) is None
            worker.release.set()

        tasks.start_soon(restart_then_release)
    assert worker.statuses == [200]
    assert controller.paths().count("/workers/w1/drain") == 2


async def test_the_client_drains_and_undrains_by_worker_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    controller = FakeController(INTERVAL, features=FEATURES)
    async with (
        make_agent(controller),
        ControllerClient(URL, transport=controller.transport) as client,
    ):
        answer = await client.drain("w1")
        assert (answer.worker_id, answer.draining, answer.changed) == ("w1", True, True)
        assert (await client.drain("w1")).changed is False  # draining already
        assert (await client.undrain("w1")).changed is True
        with pytest.raises(WorkerNotRegisteredError):
            await client.drain("nobody")
        with pytest.raises(ConfigurationError, match="worker_id"):
            await client.drain("..")
    older = FakeController(INTERVAL)
    async with ControllerClient(URL, transport=older.transport) as client:
        with pytest.raises(UnexpectedResponse) as raised:
            await client.drain("w1")
        assert raised.value.code == "not_found"


async def test_workers_of_a_controller_from_before_drain_read_their_state_as_health() -> None:
    entry = {
        "worker_id": "w1",
        "worker_url": "https://w1.test",
        "last_heartbeat": "2026-11-26T20:00:00.000Z",
        "is_healthy": False,
        "state": "unhealthy",
        "capabilities": ["classify:image.classify"],
    }
    answer = {"workers": [entry], "total_workers": 1, "healthy_workers": 0}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=answer))
    async with ControllerClient(URL, transport=transport) as client:
        (worker,) = await client.workers()
    assert (worker.state, worker.health, worker.draining) == (
        WorkerState.UNHEALTHY,
        HealthState.UNHEALTHY,
        False,
    )
