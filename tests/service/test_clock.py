"""The service's clock: wall-clock steps change no health decision and are logged once."""

from __future__ import annotations

import logging
import pathlib

import pytest

from crank_registry import iso_utc
from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig
from crank_registry_asgi.clock import CHECK_EVERY_S, AnchoredClock
from tests.service.helpers import running

START = 1_800_000_000.0
HOUR = 3600.0
# The defaults: heartbeat every 30 s, unhealthy after 60 s, evicted after 120 s.
CONFIG = ServiceConfig()


class Sources:
    """A fake wall clock that can be stepped either way and a fake monotonic clock."""

    def __init__(self) -> None:
        self.wall = FakeClock(START)
        self.monotonic = FakeClock(5_000.0)

    def elapse(self, seconds: float) -> None:
        """Real time passes: both clocks move."""
        self.wall.advance(seconds)
        self.monotonic.advance(seconds)

    def step(self, seconds: float) -> None:
        """The system clock is set: only the wall clock moves, either way."""
        self.wall.now += seconds


def step_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "crank_registry_asgi.clock" and record.levelno == logging.WARNING
    ]


def test_the_clock_follows_the_monotonic_clock_from_the_wall_anchor(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="crank_registry_asgi.clock")
    sources = Sources()
    clock = AnchoredClock(wall=sources.wall, monotonic=sources.monotonic)
    assert clock() == START
    sources.elapse(10.0)
    assert clock() == START + 10.0
    # Drift under a second is no step.
    sources.step(0.5)
    sources.elapse(1.0)
    assert clock() == START + 11.0
    assert step_messages(caplog) == []

    sources.step(-HOUR)
    assert clock() == START + 11.0
    assert step_messages(caplog) == []  # checked again only CHECK_EVERY_S later
    sources.elapse(CHECK_EVERY_S)
    # Never the wall clock's time again.
    assert clock() == pytest.approx(START + 11.0 + CHECK_EVERY_S, abs=1e-6)
    [message] = step_messages(caplog)
    assert message.startswith("wall clock stepped backward")
    assert "step_s=-3599.500" in message  # from the last logged difference (0.0)
    assert "wall_minus_service_clock_s=-3599.500" in message
    assert clock.offset == pytest.approx(-3599.5)

    # A clock that stays stepped is not logged again; a second step is.
    for _ in range(5):
        clock()
    assert len(step_messages(caplog)) == 1
    sources.step(2 * HOUR)
    sources.elapse(1.0)
    clock()
    messages = step_messages(caplog)
    assert len(messages) == 2
    assert messages[1].startswith("wall clock stepped forward")
    assert "step_s=+7200.000" in messages[1]


@pytest.mark.anyio
async def test_a_backward_step_does_not_keep_a_silent_worker_healthy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="crank_registry_asgi.clock")
    sources = Sources()
    clock = AnchoredClock(wall=sources.wall, monotonic=sources.monotonic)
    async with running(CONFIG, clock=sources.monotonic, service_clock=clock) as api:
        await api.register("silent")
        await api.register("talking")
        sources.step(-HOUR)
        # Past unhealthy_after of real time: "talking" heartbeats, "silent" does not.
        for _ in range(3):
            sources.elapse(25.0)
            assert (await api.post("/heartbeat", {"worker_id": "talking"})).status_code == 200
        await api.service.sweep()
        workers = await api.workers()
        assert workers["silent"]["state"] == "unhealthy"
        assert workers["talking"]["state"] == "healthy"
        # Times shown stay wall-clock seconds, those of the anchored clock.
        assert workers["silent"]["last_heartbeat"] == iso_utc(START)
        assert workers["talking"]["last_heartbeat"] == iso_utc(START + 75.0)
        assert await api.route() == "talking"
        # And evicted on time as well.
        sources.elapse(60.0)
        await api.service.sweep()
        assert "silent" not in await api.workers()
    assert len(step_messages(caplog)) == 1


@pytest.mark.anyio
async def test_a_forward_step_of_an_hour_evicts_nobody(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="crank_registry_asgi.clock")
    sources = Sources()
    clock = AnchoredClock(wall=sources.wall, monotonic=sources.monotonic)
    async with running(CONFIG, clock=sources.monotonic, service_clock=clock) as api:
        names = [f"w{i}" for i in range(50)]
        for name in names:
            await api.register(name)
        sources.elapse(20.0)
        sources.step(HOUR)
        assert await api.service.sweep() == ()
        workers = await api.workers()
        assert sorted(workers) == sorted(names)
        assert {entry["state"] for entry in workers.values()} == {"healthy"}
        for name in names:
            assert (await api.post("/heartbeat", {"worker_id": name})).status_code == 200
        sources.elapse(50.0)  # 50 s after their heartbeats: still within unhealthy_after
        assert await api.service.sweep() == ()
        assert len(await api.workers()) == 50
    [message] = step_messages(caplog)
    assert "step_s=+3600.000" in message


@pytest.mark.anyio
async def test_after_a_restart_the_journal_is_read_against_the_anchored_clock(
    tmp_path: pathlib.Path,
) -> None:
    config = ServiceConfig(state_dir=tmp_path)
    sources = Sources()
    first = AnchoredClock(wall=sources.wall, monotonic=sources.monotonic)
    async with running(config, clock=sources.monotonic, service_clock=first) as api:
        await api.register("silent")
    # The wall clock is set back an hour while the controller is down.
    sources.step(-HOUR)
    sources.elapse(5.0)
    second = AnchoredClock(wall=sources.wall, monotonic=sources.monotonic)
    async with running(config, clock=sources.monotonic, service_clock=second) as api:
        # Heard from "in the future": counted as heard at this start, not an hour on.
        restored = (await api.workers())["silent"]
        assert (restored["state"], restored["last_heartbeat"]) == (
            "unverified",
            iso_utc(START - HOUR + 5.0),
        )
        sources.elapse(61.0)
        assert await api.route() is None
        assert (await api.workers())["silent"]["is_healthy"] is False
        sources.elapse(60.0)
        await api.service.sweep()
        assert "silent" not in await api.workers()
