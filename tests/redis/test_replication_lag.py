"""``crank_replication_lag_seconds``: a stream entry's time in Redis to its application here.

The lag is measured on Redis' clock: this host's clock corrected by the
offset to Redis ``TIME`` that the controller measures when it connects, so
a host whose clock is off (here: five seconds ahead) reports the real lag,
and logs the offset.
"""

from __future__ import annotations

import logging
import re
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, create_app
from tests.builders import registration_payload
from tests.redis.helpers import controller, machine_url, unique_prefix, wait_until
from tests.service.helpers import Controller, running

pytestmark = pytest.mark.anyio

LAG = "crank_replication_lag_seconds"


def lag_samples(exposition: str) -> dict[str, float]:
    """The histogram's samples: ``count``, ``sum`` and ``le=BOUND`` for each bucket."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        if family.name != LAG:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                samples[f"le={sample.labels['le']}"] = sample.value
            else:
                samples[sample.name.removeprefix(f"{LAG}_")] = sample.value
    return samples


async def lags(api: Controller) -> dict[str, float]:
    return lag_samples((await api.get("/metrics")).text)


async def test_every_controller_reports_the_lag_of_the_entries_it_applies() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            before = (await lags(b))["count"]
            await a.register("w1")
            await wait_until(lambda: "w1" in b.registry, what="w1 on B")
            clock.advance(1)
            assert (await a.post("/heartbeat", {"worker_id": "w1"})).status_code == 200
            await wait_until(
                lambda: b.registry.get_worker("w1", now=clock.now).last_heartbeat == clock.now,
                what="the heartbeat batch on B",
            )
            # The change and the heartbeat batch, each applied on both controllers.
            for api in (a, b):
                samples = await lags(api)
                assert samples["count"] - (before if api is b else 0) >= 2
                # One host, one clock: well under a second, even on a loaded machine.
                assert samples["le=1.0"] == samples["count"]


async def test_a_host_clock_off_redis_is_logged_and_corrected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="crank_registry_asgi.redis")
    url = machine_url()
    with unique_prefix(url) as prefix:
        app = create_app(
            config=ServiceConfig(redis_url=url, redis_prefix=prefix, controller_id="ahead"),
            clock=FakeClock(),
        )
        store = app.state.service.store
        # This host's clock runs five seconds ahead of Redis'.
        store.wall = lambda: time.time() + 5.0
        async with app.router.lifespan_context(app):
            assert store.offset == pytest.approx(-5.0, abs=0.5)
            (warning,) = [r for r in caplog.records if "off Redis' clock" in r.getMessage()]
            said = re.search(r"this host's clock is ([+-][\d.]+) s off", warning.getMessage())
            assert said is not None and float(said.group(1)) == pytest.approx(5.0, abs=0.5)
            assert "controller_id=ahead" in warning.getMessage()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                response = await client.post("/register", json=registration_payload("w1"))
                assert response.status_code == 200, response.text
                samples = lag_samples((await client.get("/metrics")).text)
            # Uncorrected, the entry would seem five seconds late.
            assert samples["count"] >= 1
            assert samples["le=1.0"] == samples["count"]


async def test_a_controller_on_a_journal_has_no_replication_lag() -> None:
    async with running() as api:
        assert await lags(api) == {}
