"""Two controllers on one Redis: changes made on one are routable on the other."""

from __future__ import annotations

import pytest

from crank_registry.testing import FakeClock
from tests.redis.helpers import controller, machine_url, unique_prefix, wait_until

pytestmark = pytest.mark.anyio


async def test_a_registration_on_one_controller_is_routable_on_the_other() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            await a.register("w1")
            # Applied on A before its answer: A routes to it at once.
            assert await a.route() == "w1"
            await wait_until(lambda: "w1" in b.registry, what="w1 on B")
            assert await b.route() == "w1"
            assert a.registry.revision == b.registry.revision == 1
            assert a.service.epoch == b.service.epoch


async def test_a_deregistration_on_the_other_controller_removes_it_everywhere() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            await a.register("w1")
            await wait_until(lambda: "w1" in b.registry, what="w1 on B")
            response = await b.post("/deregister", {"worker_id": "w1"})
            assert response.status_code == 200, response.text
            assert "w1" not in b.registry
            await wait_until(lambda: "w1" not in a.registry, what="w1 gone from A")
            assert a.registry.revision == b.registry.revision == 2


async def test_a_controller_started_later_loads_the_registry() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with controller(url, prefix, "a", clock) as a:
            for number in range(5):
                await a.register(f"w{number}")
            async with controller(url, prefix, "b", clock) as b:
                assert set(await b.workers()) == {f"w{number}" for number in range(5)}
                assert b.registry.revision == 5
