"""Load reports on the worker side: ``LoadMeter``, the serving helper's metering, the agent.

In virtual time: a handler's ``anyio.sleep(0.1)`` takes exactly 100 ms.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from crank_registry import LoadReport
from crank_worker_client import LoadMeter, WorkerAgent
from crank_worker_client.serving import Handler, InvocationError, invocation_app
from tests.builders import capability
from tests.client.helpers import FakeController
from tests.examples.helpers import invoke

pytestmark = pytest.mark.anyio

URL = "https://controller.test"
INTERVAL = 1.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- LoadMeter


def test_the_meter_counts_calls_in_flight_and_reports_p95_and_error_rate() -> None:
    clock = FakeClock()
    meter = LoadMeter(clock=clock)
    assert meter.report() == LoadReport(in_flight=0)  # nothing finished: no latency made up
    with meter.call(), meter.call():
        assert meter.in_flight == 2
        assert meter.report().in_flight == 2
    assert meter.in_flight == 0
    # 20 calls of 10..200 ms, the last one failed.
    for index in range(1, 21):
        with meter.call() as call:
            clock.now += index / 100
            if index == 20:
                call.fail()
    report = meter.report()
    assert report.in_flight == 0
    assert report.error_rate == pytest.approx(1 / 22)
    # Inclusive p95 of 22 values (0, 0, 10..200 ms): rank 0.95 x 21 = 19.95, so 95%
    # of the way from the 20th (180 ms) to the 21st (190 ms).
    assert report.latency_p95_ms == pytest.approx(189.5)


async def test_an_exception_is_an_error_and_a_cancellation_leaves_no_sample() -> None:
    clock = FakeClock()
    meter = LoadMeter(clock=clock)
    with pytest.raises(RuntimeError), meter.call():
        clock.now += 0.010
        raise RuntimeError("handler failed")
    with meter.call():
        clock.now += 0.010
    # A caller that went away after 5 s: neither an error nor a latency of the worker.
    with anyio.CancelScope() as scope, meter.call():
        clock.now += 5.0
        scope.cancel()
        await anyio.sleep(1)
    assert scope.cancelled_caught
    report = meter.report()
    assert report.error_rate == 0.5
    assert report.latency_p95_ms == pytest.approx(10.0)
    assert meter.in_flight == 0


def test_finished_calls_leave_the_window_and_the_sample_bound() -> None:
    clock = FakeClock()
    meter = LoadMeter(window=10, max_samples=3, clock=clock)
    for seconds in (5.0, 0.001, 0.002, 0.003):
        with meter.call():
            clock.now += seconds
    # The 5 s call is the oldest of four: past the bound of three.
    report = meter.report()
    assert report.latency_p95_ms is not None and report.latency_p95_ms < 5
    clock.now += 11
    assert meter.report() == LoadReport(in_flight=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"window": 0}, "window"),
        ({"window": float("inf")}, "window"),
        ({"window": True}, "window"),
        ({"max_samples": 0}, "max_samples"),
        ({"max_samples": 2.5}, "max_samples"),
    ],
)
def test_a_bad_meter_setting_is_refused_by_name(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoadMeter(**options)


# ---------------------------------------------------------------- serving


async def slow(payload: dict[str, Any]) -> dict[str, Any]:
    await anyio.sleep(0.1)
    if payload.get("crash"):
        raise RuntimeError("broken")
    if payload.get("refuse"):
        raise InvocationError("too_dull", "no", status=409)
    if payload.get("unavailable"):
        raise InvocationError("busy", "later", status=503)
    return {"ok": True}


async def stream(payload: Any) -> AsyncIterator[dict[str, Any]]:
    yield {"n": 1}
    raise RuntimeError("mid-stream")


def serving_app(**options: Any) -> Any:
    capabilities = [capability(max_concurrency=2), capability("lines", "stream")]
    handlers: dict[tuple[str, str], Handler] = {
        ("classify", "image.classify"): slow,
        ("stream", "lines"): stream,
    }
    return invocation_app(
        handlers, capabilities, load=LoadMeter(clock=anyio.current_time), **options
    )


async def test_the_serving_helper_meters_every_invocation_without_worker_code() -> None:
    app = serving_app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        seen: list[int] = []

        async def call(payload: dict[str, Any]) -> None:
            await invoke(client, "classify", "image.classify", payload)

        async with anyio.create_task_group() as tasks:
            for _ in range(3):  # one over max_concurrency: it waits, and counts
                tasks.start_soon(call, {})
            await anyio.sleep(0.05)
            seen.append(app.load.in_flight)
        assert seen == [3]
        for payload in ({"crash": True}, {"refuse": True}, {"unavailable": True}):
            await call(payload)
        response = await invoke(client, "stream", "lines", {})
        assert response.status_code == 200
    report = app.load.report()
    assert report.in_flight == 0
    # Failed: the crash, the 503, the broken stream; a 409 is the caller's problem.
    assert report.error_rate == pytest.approx(3 / 7)
    # Seven calls: the stream (0 ms), five of 100 ms, and the third of the first three,
    # which waited 100 ms for a slot: 200 ms. p95 is at rank 0.95 x 6 = 5.7: 170 ms.
    assert report.latency_p95_ms == pytest.approx(170)


async def test_an_app_given_an_agent_makes_its_meter_the_agents_load_source() -> None:
    controller = FakeController(INTERVAL)

    def agent(**options: Any) -> WorkerAgent:
        return WorkerAgent(
            URL, "w1", "https://w1.test", [capability()], transport=controller.transport, **options
        )

    plain = agent()
    app = serving_app(agent=plain)
    assert plain.load is not None and plain.load() == app.load.report()

    def own() -> LoadReport:
        return LoadReport(in_flight=7)

    kept = agent(load=own)
    serving_app(agent=kept)
    assert kept.load is own


# ---------------------------------------------------------------- the agent


def make_agent(controller: FakeController, **options: Any) -> WorkerAgent:
    return WorkerAgent(
        URL,
        "w1",
        "https://w1.test:8443",
        [capability()],
        transport=controller.transport,
        rng=random.Random(5),
        **options,
    )


async def test_the_agent_sends_load_to_a_controller_listing_load_reports() -> None:
    controller = FakeController(INTERVAL, features=("load_reports",))
    reports = iter(range(100))
    async with make_agent(controller, load=lambda: LoadReport(in_flight=next(reports))):
        await anyio.sleep(3.5 * INTERVAL)
        view = controller.registry.get_worker("w1", now=anyio.current_time())
    beats = controller.calls_to("/heartbeat")
    assert len(beats) >= 3
    assert [beat.body["load"] for beat in beats] == [{"in_flight": n} for n in range(len(beats))]
    assert view is not None and view.load == LoadReport(in_flight=len(beats) - 1)


async def test_the_agent_sends_no_load_to_an_older_controller() -> None:
    controller = FakeController(INTERVAL)  # lists no features
    asked: list[float] = []

    def load() -> LoadReport:
        asked.append(anyio.current_time())
        return LoadReport(in_flight=1)

    async with make_agent(controller, load=load) as agent:
        await anyio.sleep(3.5 * INTERVAL)
        assert agent.status.registered
    beats = controller.calls_to("/heartbeat")
    assert len(beats) >= 3 and all("load" not in beat.body for beat in beats)
    assert asked == []  # not even measured


async def test_a_controller_that_stops_taking_load_gets_heartbeats_without_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    controller = FakeController(INTERVAL, features=("load_reports",))
    async with make_agent(controller, load=lambda: LoadReport(in_flight=1)) as agent:
        await anyio.sleep(1.5 * INTERVAL)
        controller.features = ()  # an older controller took its place, same URL
        await anyio.sleep(3 * INTERVAL)
        assert agent.status.registered
    bodies = [beat.body for beat in controller.calls_to("/heartbeat")]
    with_load = [index for index, body in enumerate(bodies) if "load" in body]
    # The refused one is sent again at once without load; none carries it after.
    assert with_load == list(range(len(with_load))) and len(with_load) >= 2
    assert bodies[len(with_load)] == {"worker_id": "w1"}
    assert len(bodies) > len(with_load) + 1
    assert sum("refuses load reports" in r.message for r in caplog.records) == 1


async def test_a_failing_load_source_does_not_stop_the_heartbeats(
    caplog: pytest.LogCaptureFixture,
) -> None:
    controller = FakeController(INTERVAL, features=("load_reports",))

    def broken() -> LoadReport:
        raise OSError("cannot read the queue")

    caplog.set_level(logging.WARNING, "crank_worker_client")
    async with make_agent(controller, load=broken) as agent:
        await anyio.sleep(3.5 * INTERVAL)
        assert agent.status.registered
    beats = controller.calls_to("/heartbeat")
    assert len(beats) >= 3 and all("load" not in beat.body for beat in beats)
    assert sum("load source failed" in r.message for r in caplog.records) == 1
