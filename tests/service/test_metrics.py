"""GET /metrics: the Prometheus exposition after known traffic, with a fake clock."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import httpx
import pytest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, create_app
from crank_registry_asgi.metrics import Metrics
from tests.builders import capability_payload
from tests.service.helpers import UNKNOWN, running

pytestmark = pytest.mark.anyio

Labels = frozenset[tuple[str, str]]


def samples(text: str) -> dict[tuple[str, Labels], float]:
    """Every sample of an exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(figures: dict[tuple[str, Labels], float], name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in figures, f"{name}{labels} is not exposed"
    return figures[key]


async def scrape(
    client: httpx.AsyncClient, path: str = "/metrics"
) -> dict[tuple[str, Labels], float]:
    response = await client.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return samples(response.text)


async def test_every_metric_after_known_traffic(tmp_path: Path) -> None:
    async with running(ServiceConfig(state_dir=tmp_path)) as api:
        for worker_id in ("w1", "w2", "w3"):
            await api.register(worker_id)
        await api.register("w1")  # the same id again: replaced
        await api.post("/heartbeat", {"worker_id": "w1"})
        assert await api.route() == "w1"
        assert await api.route("classify", "nothing") == UNKNOWN
        await api.post("/deregister", {"worker_id": "w3"})
        await api.client.get("/no/such/path")
        api.advance(100)
        assert await api.route() is None  # every worker silent: known, none routable
        await api.post("/heartbeat", {"worker_id": "w1"})
        api.advance(21)  # w2 silent for 121 s, w1 for 21 s
        await api.service.sweep()  # w2: unhealthy, then evicted
        figures = await scrape(api.client)

    assert value(figures, "crank_registrations_total", replaced="false") == 3
    assert value(figures, "crank_registrations_total", replaced="true") == 1
    assert value(figures, "crank_deregistrations_total") == 1
    assert value(figures, "crank_heartbeats_total") == 2
    assert value(figures, "crank_routes_total", outcome="routed") == 1
    assert value(figures, "crank_routes_total", outcome="no_worker") == 1
    assert value(figures, "crank_routes_total", outcome="unknown_capability") == 1
    assert value(figures, "crank_unhealthy_transitions_total") == 1
    assert value(figures, "crank_evictions_total") == 1
    assert value(figures, "crank_workers", state="healthy") == 1
    assert value(figures, "crank_workers", state="unhealthy") == 0
    assert value(figures, "crank_workers", state="unverified") == 0
    assert value(figures, "crank_capabilities") == 1

    duration = "crank_http_request_duration_seconds_count"
    assert value(figures, duration, method="POST", path="/register", status="200") == 4
    assert value(figures, duration, method="POST", path="/route", status="200") == 1
    assert value(figures, duration, method="POST", path="/route", status="503") == 1
    assert value(figures, duration, method="POST", path="/heartbeat", status="200") == 2
    assert value(figures, duration, method="GET", path="unmatched", status="404") == 1
    paths = {dict(labels).get("path") for name, labels in figures if name == duration}
    assert "/no/such/path" not in paths

    # Every change was appended and fsynced before it was answered.
    appends = value(figures, "crank_journal_append_duration_seconds_count")
    assert appends >= 4 + 1 + 2  # registrations, deregistration, sweep (heartbeats may coalesce)
    assert value(figures, "crank_journal_fsync_duration_seconds_count") >= 1
    assert value(figures, "crank_journal_fsync_duration_seconds_sum") > 0

    version = {dict(labels)["version"] for name, labels in figures if name == "crank_build_info"}
    assert len(version) == 1 and version != {""}
    assert any(name.startswith("process_") for name, _ in figures)


async def test_workers_by_state_before_any_sweep_and_after_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    config = ServiceConfig(state_dir=tmp_path)
    async with running(config, clock=clock) as api:
        await api.register("w1")
        await api.register("w2", capabilities=[capability_payload("text.summarize", "summarize")])
        api.advance(40)
        await api.post("/heartbeat", {"worker_id": "w2"})
        api.advance(21)  # w1 silent for 61 s: shown unhealthy before the sweeper runs
        figures = await scrape(api.client)
        assert value(figures, "crank_workers", state="healthy") == 1
        assert value(figures, "crank_workers", state="unhealthy") == 1
        assert value(figures, "crank_capabilities") == 2
    async with running(config, clock=clock) as api:
        figures = await scrape(api.client)
        # Restored from the journal, heard from by no one since.
        assert value(figures, "crank_workers", state="unverified") == 2
        assert value(figures, "crank_workers", state="healthy") == 0
        # Counters are this process's: a restart starts them again.
        assert value(figures, "crank_registrations_total", replaced="false") == 0


async def test_two_apps_in_one_process_count_apart() -> None:
    async with running() as first, running() as second:
        await first.register("w1")
        assert value(await scrape(first.client), "crank_registrations_total", replaced="false") == 1
        assert (
            value(await scrape(second.client), "crank_registrations_total", replaced="false") == 0
        )
    assert first.app.state.metrics_registry is not second.app.state.metrics_registry


class Expiry(Collector):
    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("crank_test_expiry_seconds", "A test gauge", value=42)


async def test_another_collector_joins_in_one_line() -> None:
    app = create_app(clock=FakeClock())
    app.state.metrics_registry.register(Expiry())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        assert value(await scrape(client), "crank_test_expiry_seconds") == 42


async def test_labels_stay_bounded() -> None:
    async with running() as api:
        await api.client.request("BREW", "/route")
        await api.client.get("/workers/../etc/passwd")
        figures = await scrape(api.client)
    duration = "crank_http_request_duration_seconds_count"
    assert value(figures, duration, method="OTHER", path="/route", status="405") == 1
    assert value(figures, duration, method="GET", path="unmatched", status="404") == 1


async def test_mounted_under_a_prefix_the_path_label_has_it() -> None:
    from tests.service.test_contract import mounted

    async with mounted() as client:
        await client.post(
            "/crank/route", json={"verb": "v", "capability": "c"}
        )  # unknown_capability
        figures = await scrape(client, "/crank/metrics")
    duration = "crank_http_request_duration_seconds_count"
    assert value(figures, duration, method="POST", path="/crank/route", status="404") == 1


def test_a_sliding_count_keeps_one_window_to_the_second() -> None:
    from crank_registry_asgi.metrics import SlidingCount

    recent = SlidingCount(window_s=60)
    for now in (1000.0, 1000.9, 1030.5, 1059.99):
        recent.add(now)
    assert recent.count(1059.99) == 4
    assert recent.count(1060.0) == 2  # second 1000 is 60 s old: it left the window
    recent.add(1060.2)  # reuses second 1000's slot, counted afresh
    assert recent.count(1060.2) == 3
    assert recent.count(1089.9) == 3
    assert recent.count(1090.0) == 2  # and second 1030 left it
    assert recent.count(1200.0) == 0


@pytest.mark.parametrize("window", [0, 0.5, 2.5, -60])
def test_a_sliding_count_refuses_a_window_that_is_not_whole_seconds(window: float) -> None:
    from crank_registry_asgi.metrics import SlidingCount

    with pytest.raises(ValueError, match="whole number of seconds"):
        SlidingCount(window_s=window)


def test_metrics_of_several_processes_need_prometheus_client_in_multiprocess_mode(
    tmp_path: Path,
) -> None:
    # Not started with PROMETHEUS_MULTIPROC_DIR: the counters would stay in memory.
    with pytest.raises(ValueError, match="PROMETHEUS_MULTIPROC_DIR="):
        Metrics(multiprocess_directory=tmp_path)
