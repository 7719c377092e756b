"""SLO files over HTTP: read at start, GET /slos, reloads, and the idempotency TTL setting.

Every answer is checked against the OpenAPI document by the test client.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio
import pytest

from crank_registry import RoutingSettings, ServiceLevel, SlosAnswer, structure
from crank_registry_asgi import ServiceConfig
from crank_registry_asgi.slos import SloFileError, read_slos
from tests.builders import capability_payload
from tests.service.helpers import Controller, running

pytestmark = pytest.mark.anyio

ROUTE = {"verb": "classify", "capability": "image.classify"}
CLASSIFY = "verb: classify\ncapability: image.classify\n"


def write(state_dir: Path, name: str, text: str) -> Path:
    """Write ``STATE_DIR/slos/NAME`` (the directory made if needed)."""
    path = state_dir / "slos" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


async def slos(api: Controller) -> dict[str, dict[str, Any]]:
    """``GET /slos`` as ``{file: slo}``, read back into the answer model first."""
    response = await api.get("/slos")
    assert response.status_code == 200, response.text
    answer = structure(response.json(), SlosAnswer)
    assert [entry.file for entry in answer.slos] == sorted(entry.file for entry in answer.slos)
    return {entry["file"]: entry["slo"] for entry in response.json()["slos"]}


async def fleet(api: Controller) -> None:
    """Two workers that declare a fast p95: one at 1.4.0, one at 2.0.0."""
    for worker_id, version in (("v1", "1.4.0"), ("v2", "2.0.0")):
        await api.register(
            worker_id,
            capabilities=[capability_payload(version=version, slo={"latency_p95_ms": 50})],
        )


async def fast_enough(api: Controller) -> dict[str, Any]:
    """Route under a p95 bound of 100 ms, with ``explain``; the answer's explanation."""
    body = {**ROUTE, "slo_constraints": {"latency_p95_ms": 100}, "explain": True}
    response = await api.post("/route", body)
    assert response.status_code in (200, 503), response.text
    return response.json()["explain"]  # type: ignore[no-any-return]


async def test_without_a_state_dir_there_are_no_slo_files() -> None:
    async with running() as api:
        assert await slos(api) == {}
        assert api.service.slo_watcher is None


async def test_files_read_at_start_are_listed_and_beat_the_declared_slo(tmp_path: Path) -> None:
    write(tmp_path, "classify-v2.yaml", CLASSIFY + 'version: ">=2"\nlatency_p95_ms: 250\n')
    write(tmp_path, "other.yaml", "verb: summarize\ncapability: text\navailability: 0.99\n")
    write(tmp_path, "notes.txt", "not an SLO file: only *.yaml are read\n")
    async with running(ServiceConfig(state_dir=tmp_path)) as api:
        assert await slos(api) == {
            "classify-v2.yaml": {
                "verb": "classify",
                "capability": "image.classify",
                "version": ">=2",
                "latency_p95_ms": 250.0,
            },
            "other.yaml": {"verb": "summarize", "capability": "text", "availability": 0.99},
        }
        await fleet(api)
        # v2's file says 250 ms, over the bound, whatever it declares; v1's declared 50 ms stands.
        explanation = await fast_enough(api)
        assert explanation["candidates"] == ["v1"]
        assert explanation["removed"] == [{"worker_id": "v2", "reason": "slo"}]


@pytest.mark.parametrize(
    ("name", "text", "fragments"),
    [
        ("typo.yaml", CLASSIFY + "latency_p99_ms: 80\n", ["field latency_p99_ms: unknown field"]),
        ("range.yaml", CLASSIFY + "availability: 99.5\n", ["field availability:", "0 and 1"]),
        ("type.yaml", CLASSIFY + "latency_p95_ms: fast\n", ["field latency_p95_ms: must be a"]),
        ("bool.yaml", CLASSIFY + "latency_p95_ms: yes\n", ["field latency_p95_ms: must be a"]),
        ("version.yaml", CLASSIFY + "version: 2\navailability: 0.9\n", ["field version:"]),
        ("none.yaml", CLASSIFY, ["sets no SLO value"]),
        ("verb.yaml", "capability: x\navailability: 0.9\n", ["field verb: is required"]),
        ("empty.yaml", "", ["expected a mapping", "an empty file"]),
        ("list.yaml", "- verb: classify\n", ["expected a mapping", "found a list"]),
        ("broken.yaml", "verb: [classify\n", ["not valid YAML (line 2"]),
    ],
)
async def test_an_invalid_file_refuses_the_start_naming_the_file_and_field(
    tmp_path: Path, name: str, text: str, fragments: list[str]
) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(SloFileError) as raised:
        async with running(ServiceConfig(state_dir=tmp_path)):
            pytest.fail("the controller started with an invalid SLO file")
    message = str(raised.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


async def test_two_files_for_the_same_capability_and_versions_refuse_the_start(
    tmp_path: Path,
) -> None:
    write(tmp_path, "a.yaml", CLASSIFY + "latency_p95_ms: 80\n")
    write(tmp_path, "b.yaml", CLASSIFY + "availability: 0.9\n")
    with pytest.raises(SloFileError, match=r"b\.yaml: .* that a\.yaml states already"):
        async with running(ServiceConfig(state_dir=tmp_path)):
            pytest.fail("the controller started with conflicting SLO files")


async def test_a_changed_file_is_read_again_and_routes_follow(tmp_path: Path) -> None:
    path = write(tmp_path, "classify.yaml", CLASSIFY + "latency_p95_ms: 250\n")
    async with running(ServiceConfig(state_dir=tmp_path)) as api:
        watcher = api.service.slo_watcher
        await fleet(api)
        assert (await fast_enough(api))["candidates"] == []
        assert not await watcher.check()  # nothing changed
        path.write_text(CLASSIFY + "latency_p95_ms: 90\nerror_budget_pct: 0.5\n")
        assert await watcher.check()
        assert (await slos(api))["classify.yaml"]["latency_p95_ms"] == 90.0
        assert (await fast_enough(api))["candidates"] == ["v1", "v2"]
        # A file removed is an SLO removed: the declared values again.
        path.unlink()
        assert await watcher.check()
        assert await slos(api) == {}
        assert (await fast_enough(api))["candidates"] == ["v1", "v2"]


async def test_an_invalid_change_is_logged_and_the_previous_files_stay_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = write(tmp_path, "a.yaml", CLASSIFY + "latency_p95_ms: 250\n")
    write(tmp_path, "b.yaml", "verb: summarize\ncapability: text\navailability: 0.9\n")
    async with running(ServiceConfig(state_dir=tmp_path)) as api:
        watcher = api.service.slo_watcher
        before = await slos(api)
        # One valid change and one invalid: neither is applied (never half-applied).
        first.write_text(CLASSIFY + "latency_p95_ms: 90\n")
        broken = write(tmp_path, "c.yaml", CLASSIFY + "version: '>=9'\nlatency_p95_ms: -1\n")
        with caplog.at_level(logging.WARNING, logger="crank_registry_asgi.slos"):
            assert not await watcher.check()
            assert not await watcher.check()  # logged once, not at every look
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "crank_registry_asgi.slos"
        ]
        assert len(warnings) == 1, warnings
        assert "the previous ones stay in effect" in warnings[0]
        assert f"{broken}: field latency_p95_ms: must be > 0" in warnings[0]
        assert await slos(api) == before
        # Fixed: all the changes are applied together.
        broken.write_text(CLASSIFY + "version: '>=9'\nlatency_p95_ms: 10\n")
        assert await watcher.check()
        after = await slos(api)
        assert after["a.yaml"]["latency_p95_ms"] == 90.0
        assert set(after) == {"a.yaml", "b.yaml", "c.yaml"}


async def test_the_lifespan_polls_the_files_at_the_configured_interval(tmp_path: Path) -> None:
    config = ServiceConfig(state_dir=tmp_path, slo_poll_interval=0.01)
    async with running(config) as api:
        assert await slos(api) == {}
        write(tmp_path, "classify.yaml", CLASSIFY + "availability: 0.95\n")
        # Generous: the poll runs every 10 ms; a loaded machine may take longer.
        with anyio.fail_after(20):
            while not await slos(api):
                await anyio.sleep(0.01)
        assert (await slos(api))["classify.yaml"]["availability"] == 0.95


def test_read_slos_without_a_directory_reads_nothing(tmp_path: Path) -> None:
    assert read_slos(tmp_path / "slos") == ()
    write(tmp_path, "a.yaml", CLASSIFY + "availability: 0.9\n")
    (files,) = read_slos(tmp_path / "slos")
    assert files.file == "a.yaml"
    assert files.slo == ServiceLevel(verb="classify", capability="image.classify", availability=0.9)


async def test_the_idempotency_ttl_comes_from_the_config() -> None:
    config = ServiceConfig(routing=RoutingSettings(idempotency_ttl=10))
    async with running(config) as api:
        assert api.registry.routing.idempotency_ttl == 10
        for worker_id in ("w1", "w2"):
            await api.register(worker_id)
        keyed = {**ROUTE, "idempotency_key": "order-7"}
        first = (await api.post("/route", keyed)).json()["worker_id"]
        api.advance(9)
        for worker_id in ("w1", "w2"):  # both stay healthy
            await api.post("/heartbeat", {"worker_id": worker_id})
        assert [(await api.post("/route", keyed)).json()["worker_id"] for _ in range(3)] == [
            first
        ] * 3
        api.advance(2)  # 11 s after the key was given: forgotten, a fresh round-robin choice
        for worker_id in ("w1", "w2"):
            await api.post("/heartbeat", {"worker_id": worker_id})
        # The cursor moved once, for the first choice: the fresh one is the other worker,
        # remembered from now on (with the default TTL of an hour it would still be the first).
        again = [(await api.post("/route", keyed)).json()["worker_id"] for _ in range(2)]
        assert again == [({"w1", "w2"} - {first}).pop()] * 2
