"""WorkerAgent against a fake controller over httpx.MockTransport, in virtual time."""

from __future__ import annotations

import itertools
import logging
import random

import anyio
import pytest

from crank_registry import capability_label
from crank_worker_client import (
    AgentState,
    ConfigurationError,
    ControllerUnavailable,
    InvalidRequest,
    RegistrationFailed,
    WorkerAgent,
)
from tests.builders import capability
from tests.client.helpers import FakeController

pytestmark = pytest.mark.anyio

URL = "https://controller.test"
INTERVAL = 1.0


def make_agent(controller: FakeController, worker_id: str = "w1", **options: object) -> WorkerAgent:
    options.setdefault("rng", random.Random(5))
    return WorkerAgent(
        URL,
        worker_id,
        f"https://{worker_id}.test:8443",
        [capability()],
        transport=controller.transport,
        **options,  # type: ignore[arg-type]
    )


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


async def test_registers_heartbeats_with_bounded_jitter_and_deregisters_on_exit() -> None:
    controller = FakeController(INTERVAL)
    agent = make_agent(controller)
    assert agent.status.state is AgentState.STOPPED
    start = anyio.current_time()
    async with agent:
        assert controller.paths() == ["/register"]
        assert controller.registry.get_worker("w1", now=anyio.current_time()) is not None
        status = agent.status
        assert status.registered and status.heartbeat_interval == INTERVAL
        assert status.registrations == 1 and status.last_heartbeat_at is not None
        await anyio.sleep(20 * INTERVAL)
        assert agent.status.state is AgentState.REGISTERED
    beats = [call.at for call in controller.calls_to("/heartbeat")]
    assert 20 <= len(beats) <= 23
    # Every heartbeat is due after the interval minus at most 10% of it.
    assert all(0.9 * INTERVAL <= gap <= INTERVAL for gap in gaps([start, *beats]))
    assert len({round(gap, 9) for gap in gaps(beats)}) > 5  # jittered, not a fixed period
    assert controller.paths()[-1] == "/deregister"
    assert "w1" not in controller.registry
    assert agent.status.state is AgentState.STOPPED


async def test_the_block_keeps_its_own_exception_and_still_deregisters() -> None:
    controller = FakeController(INTERVAL)
    with pytest.raises(ValueError, match="worker crashed") as caught:
        async with make_agent(controller):
            await anyio.sleep(2.5 * INTERVAL)
            raise ValueError("worker crashed")
    assert type(caught.value) is ValueError  # not wrapped in an ExceptionGroup
    assert controller.paths()[-1] == "/deregister"
    assert "w1" not in controller.registry


async def test_a_cancelled_worker_still_deregisters() -> None:
    controller = FakeController(INTERVAL)
    with anyio.move_on_after(3.5 * INTERVAL) as scope:
        async with make_agent(controller):
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert controller.paths()[-1] == "/deregister"
    assert "w1" not in controller.registry


async def test_deregistration_is_bounded_when_the_controller_hangs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    controller = FakeController(INTERVAL)
    controller.faults["/deregister"] = "hang"
    agent = make_agent(controller, deregister_timeout=2.0)
    async with agent:
        await anyio.sleep(INTERVAL / 2)
        leaving = anyio.current_time()
    assert anyio.current_time() - leaving == pytest.approx(2.0)
    assert "did not answer within 2 s" in caplog.text
    assert agent.status.state is AgentState.STOPPED


async def test_deregistration_failure_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    controller = FakeController(INTERVAL)
    async with make_agent(controller):
        controller.fault = "down"
    assert "could not deregister" in caplog.text


async def test_worker_not_registered_re_registers_at_once_with_current_capabilities(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="crank_worker_client")
    controller = FakeController(INTERVAL)
    agent = make_agent(controller)
    async with agent:
        await agent.update_capabilities([capability(), capability("text.summarize", "summarize")])
        await anyio.sleep(1.5 * INTERVAL)
        controller.restart()  # the controller forgot every worker
        forgotten_at = anyio.current_time()
        await anyio.sleep(1.5 * INTERVAL)
        after_restart = [call for call in controller.calls if call.at >= forgotten_at]
        first_heartbeat, re_registration = after_restart[:2]
        assert (first_heartbeat.path, re_registration.path) == ("/heartbeat", "/register")
        assert re_registration.at == first_heartbeat.at  # at once, no backoff
        assert re_registration.at - forgotten_at <= INTERVAL
        labels = [f"{c['verb']}:{c['name']}" for c in re_registration.body["capabilities"]]
        assert labels == ["classify:image.classify", "summarize:text.summarize"]
        view = controller.registry.get_worker("w1", now=anyio.current_time())
        assert view is not None and view.is_healthy
        assert [capability_label(c.key) for c in view.capabilities] == labels
        assert agent.status.registered and agent.status.registrations == 3
    assert "re-registering" in caplog.text


@pytest.mark.parametrize("fault", ["down", "error"])
async def test_outages_are_retried_with_capped_backoff_and_logged_once(
    fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crank_worker_client")
    controller = FakeController(INTERVAL)
    agent = make_agent(controller, heartbeat_retry_base=INTERVAL / 16)
    work_done = 0
    async with agent:
        await anyio.sleep(0.5 * INTERVAL)
        controller.fault = fault
        outage_start = anyio.current_time()
        for _ in range(10 * 4):  # the worker keeps working through the outage
            await anyio.sleep(INTERVAL / 4)
            work_done += 1
        status = agent.status
        assert status.state is AgentState.UNREACHABLE
        assert status.unreachable_since is not None and status.consecutive_failures >= 8
        assert status.last_error is not None
        controller.fault = None
        recovered_at = anyio.current_time()
        await anyio.sleep(1.1 * INTERVAL)
        assert agent.status.registered and agent.status.unreachable_since is None
    assert work_done == 40
    attempts = [call.at for call in controller.calls_to("/heartbeat") if call.at >= outage_start]
    failed = [at for at in attempts if at < recovered_at]
    retry_gaps = gaps(failed)
    # Exponential backoff from 1/16 of the interval, with at most 10% jitter...
    for expected, gap in zip([1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 1.0], retry_gaps, strict=False):
        assert 0.9 * expected * INTERVAL <= gap <= expected * INTERVAL
    # ... and capped at one interval, so the controller hears from us within one.
    assert max(retry_gaps) <= INTERVAL
    assert min(at for at in attempts if at >= recovered_at) - recovered_at <= INTERVAL
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "retrying with backoff" in warnings[0].getMessage()
    assert any("answers again" in r.getMessage() for r in caplog.records)


async def test_a_second_outage_is_logged_again(caplog: pytest.LogCaptureFixture) -> None:
    controller = FakeController(INTERVAL)
    async with make_agent(controller):
        for _ in range(2):
            controller.fault = "down"
            await anyio.sleep(3 * INTERVAL)
            controller.fault = None
            await anyio.sleep(2 * INTERVAL)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2


async def test_startup_retries_until_the_controller_comes_up() -> None:
    controller = FakeController(INTERVAL)
    controller.fault = "down"

    async def controller_comes_up() -> None:
        await anyio.sleep(4.0)
        controller.fault = None

    agent = make_agent(controller, registration_backoff_base=0.1, registration_backoff_cap=1.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(controller_comes_up)
        start = anyio.current_time()
        async with agent:
            registered_at = anyio.current_time()
            assert agent.status.registered
    attempts = [call.at for call in controller.calls_to("/register")]
    assert 4.0 <= registered_at - start <= 5.0  # within one backoff cap of the controller's return
    assert len(attempts) > 4
    assert all(0 <= gap <= 1.0 for gap in gaps(attempts))  # full jitter, capped


async def test_registration_gives_up_at_the_deadline_with_a_clear_error() -> None:
    controller = FakeController(INTERVAL)
    controller.fault = "down"
    agent = make_agent(controller, registration_deadline=30.0)
    start = anyio.current_time()
    with pytest.raises(RegistrationFailed) as caught:
        async with agent:
            pytest.fail("the block must not run without a registration")
    assert anyio.current_time() - start == pytest.approx(30.0)
    message = str(caught.value)
    assert URL in message and "within 30 s" in message and "Connection refused" in message
    assert isinstance(caught.value.__cause__, ControllerUnavailable)
    assert agent.status.state is AgentState.STOPPED
    assert len(controller.calls_to("/register")) > 5
    assert "/deregister" not in controller.paths()


async def test_registration_gives_up_when_the_controller_hangs() -> None:
    controller = FakeController(INTERVAL)
    controller.fault = "hang"
    with pytest.raises(RegistrationFailed, match="timed out"):
        async with make_agent(controller, registration_deadline=5.0):
            pass


async def test_a_refused_registration_fails_at_once() -> None:
    controller = FakeController(INTERVAL)
    controller.faults["/register"] = "refuse"
    start = anyio.current_time()
    with pytest.raises(RegistrationFailed, match="refused") as caught:
        async with make_agent(controller):
            pytest.fail("the block must not run without a registration")
    assert anyio.current_time() == start
    assert len(controller.calls_to("/register")) == 1
    assert isinstance(caught.value.__cause__, InvalidRequest)
    assert "worker_url: not reachable from the controller" in str(caught.value)


async def test_the_agent_can_run_again_after_exit_but_not_twice_at_once() -> None:
    controller = FakeController(INTERVAL)
    agent = make_agent(controller)
    async with agent:
        with pytest.raises(RuntimeError, match="already running"):
            await agent.__aenter__()
    async with agent:
        assert agent.status.registrations == 1
    assert controller.paths().count("/register") == 2
    assert controller.paths().count("/deregister") == 2


async def test_status_is_ready_for_a_health_endpoint() -> None:
    controller = FakeController(INTERVAL)
    agent = make_agent(controller, clock=lambda: 1_800_000_000.0)
    async with agent:
        document = agent.status.as_dict()
    assert document == {
        "state": "registered",
        "registered": True,
        "worker_id": "w1",
        "controller_url": URL,
        "heartbeat_interval_s": INTERVAL,
        "registered_at": "2027-01-15T08:00:00.000Z",
        "last_heartbeat_at": "2027-01-15T08:00:00.000Z",
        "unreachable_since": None,
        "consecutive_failures": 0,
        "last_error": None,
        "registrations": 1,
        "draining": False,
    }


def test_bad_arguments_fail_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    def build(**changes: object) -> WorkerAgent:
        arguments: dict[str, object] = {
            "controller_url": URL,
            "worker_id": "w1",
            "worker_url": "https://w1:8443",
            "capabilities": [capability()],
        }
        arguments.update(changes)
        return WorkerAgent(**arguments)  # type: ignore[arg-type]

    with pytest.raises(ConfigurationError, match="worker_id"):
        build(worker_id="not a valid id")
    with pytest.raises(ConfigurationError, match="capabilities"):
        build(capabilities=[])
    with pytest.raises(ConfigurationError, match="insecure=True"):
        build(controller_url="http://localhost:9000")
    with pytest.raises(ConfigurationError, match="deregister_timeout"):
        build(deregister_timeout=0)
    with pytest.raises(ConfigurationError, match="registration_deadline"):
        build(registration_deadline=float("inf"))
    # No deadline (retry until stopped) and plain HTTP when asked for: accepted.
    accepted = build(registration_deadline=None, controller_url="http://h:1", insecure=True)
    assert accepted.controller_url == "http://h:1"
    monkeypatch.setenv("CONTROLLER_URL", "https://registry.internal:9443")
    assert build(controller_url=None).controller_url == "https://registry.internal:9443"


async def test_a_hanging_controller_is_an_outage_retried_within_an_interval() -> None:
    controller = FakeController(INTERVAL)
    agent = make_agent(controller, request_timeout=30.0)
    async with agent:
        controller.faults["/heartbeat"] = "hang"
        hang_start = anyio.current_time()
        await anyio.sleep(5 * INTERVAL)
        status = agent.status
        assert status.state is AgentState.UNREACHABLE
        assert status.last_error is not None and "did not answer within 1 s" in status.last_error
        del controller.faults["/heartbeat"]
        await anyio.sleep(2 * INTERVAL)
        assert agent.status.registered
    attempts = [c.at for c in controller.calls_to("/heartbeat") if c.at >= hang_start]
    # Each hanging attempt is given up after one interval, not request_timeout.
    assert all(gap <= 2 * INTERVAL for gap in gaps(attempts))
    assert len(attempts) >= 4
