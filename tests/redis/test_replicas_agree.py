"""Three replicas fed one stream, with partitions and snapshot reloads at random points, agree.

The stream holds registrations, deregistrations, drains and undrains,
heartbeats and sweeps, written through any of the three.
"""

from __future__ import annotations

import random

import pytest

from crank_registry.testing import FakeClock
from tests.builders import registration_payload
from tests.redis.helpers import Partition, controller, machine_url, unique_prefix, wait_until
from tests.service.helpers import Controller

pytestmark = pytest.mark.anyio

MACHINE_PORT = 6379


def replica(api: Controller) -> tuple[int, list[tuple[object, ...]]]:
    """What must be equal: the revision, and every worker's record, health and drain."""
    records = sorted(
        (
            r.worker_id,
            r.worker_url,
            r.capabilities,
            r.last_heartbeat,
            r.verified,
            r.silent,
            r.draining,
        )
        for r in api.registry.records()
    )
    return api.registry.revision, records


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_replicas_fed_the_same_stream_end_equal(seed: int) -> None:
    url = machine_url()
    rng = random.Random(seed)
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            Partition(MACHINE_PORT) as link_b,
            Partition(MACHINE_PORT) as link_c,
            controller(url, prefix, "a", clock, redis_snapshot_every=4) as a,
            controller(link_b.url, prefix, "b", clock, redis_snapshot_every=4) as b,
            controller(link_c.url, prefix, "c", clock, redis_snapshot_every=4) as c,
        ):
            controllers = [a, b, c]
            links = {"b": link_b, "c": link_c}
            answered: dict[int, int] = {}
            drains = 0  # drains and undrains answered
            for _ in range(80):
                api = rng.choice(controllers)
                worker = f"w{rng.randrange(12)}"
                roll = rng.random()
                if roll < 0.35:
                    url_number = rng.randrange(3)
                    payload = registration_payload(
                        worker, worker_url=f"http://{worker}-{url_number}.test:8080"
                    )
                    response = await api.request("POST", "/register", json=payload)
                    assert response.status_code in (200, 503), response.text
                    answered[response.status_code] = answered.get(response.status_code, 0) + 1
                elif roll < 0.42:
                    response = await api.post("/deregister", {"worker_id": worker})
                    assert response.status_code in (200, 404, 503), response.text
                elif roll < 0.52:
                    action = rng.choice(["drain", "undrain"])
                    # Mostly a worker the replica holds (else it is 404 every time).
                    held = sorted(record.worker_id for record in api.registry.records())
                    if held and rng.random() < 0.8:
                        worker = rng.choice(held)
                    response = await api.request("POST", f"/workers/{worker}/{action}")
                    assert response.status_code in (200, 404, 503), response.text
                    if response.status_code == 200:
                        drains += 1
                elif roll < 0.7:
                    clock.advance(rng.choice([0.5, 1.0, 5.0]))
                    response = await api.post("/heartbeat", {"worker_id": worker})
                    assert response.status_code in (200, 404), response.text
                elif roll < 0.8:
                    name = rng.choice(sorted(links))
                    link = links[name]
                    link.heal() if not link.open else link.cut()
                elif roll < 0.9:
                    rng.choice(controllers).service.store._reload = True
                else:
                    clock.advance(rng.choice([30.0, 70.0, 130.0]))
                    for sweeping in controllers:
                        await sweeping.service.sweep()
            for link in links.values():
                link.heal()

            def agree() -> bool:
                return replica(a) == replica(b) == replica(c)

            await wait_until(agree, timeout=15, what="the three replicas agree")
            # The run wrote, and met outages: the agreement is not that of idle replicas.
            assert answered.get(200, 0) >= 5 and answered.get(503, 0) >= 1, answered
            assert drains >= 1
            assert a.registry.revision >= 5
            assert a.service.epoch == b.service.epoch == c.service.epoch
