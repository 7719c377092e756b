"""``GET /workers`` and ``GET /capabilities`` in pages: query parameters, refusals, the document."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from starlette.responses import JSONResponse

from crank_registry import (
    CapabilitiesAnswer,
    CapabilityRegistry,
    ListingQuery,
    WorkersAnswer,
    encode_capabilities_cursor,
    encode_workers_cursor,
    unstructure,
)
from crank_registry.testing import FakeClock
from crank_registry_asgi import listings
from tests.builders import capability, capability_payload
from tests.service.helpers import Controller, running

pytestmark = pytest.mark.anyio


async def every_page(
    api: Controller, path: str, query: str = "", cursor: str | None = None
) -> list[dict[str, Any]]:
    """Every page of a listing (from ``cursor``), following next_cursor; each answer checked."""
    pages = []
    while True:
        params = query + (f"&cursor={cursor}" if cursor is not None else "")
        response = await api.get(f"{path}?{params}")
        assert response.status_code == 200, response.text
        pages.append(response.json())
        cursor = pages[-1].get("next_cursor")
        if cursor is None:
            return pages


async def register_fleet(api: Controller, count: int) -> None:
    """w0..w{count-1}; even ones offer classify:image.classify, odd ones embed:text."""
    for n in range(count):
        if n % 2 == 0:
            await api.register(f"w{n}")
        else:
            await api.register(f"w{n}", capabilities=[capability_payload("text", "embed")])


async def test_workers_page_through_everyone_with_counts() -> None:
    async with running() as api:
        await register_fleet(api, 7)
        pages = await every_page(api, "/workers", "limit=3")
    assert [len(page["workers"]) for page in pages] == [3, 3, 1]
    ids = [entry["worker_id"] for page in pages for entry in page["workers"]]
    assert ids == [f"w{n}" for n in range(7)]
    for page in pages:
        assert (page["total_workers"], page["healthy_workers"]) == (7, 7)
        assert "matching_workers" not in page
    assert "next_cursor" not in pages[-1]


async def test_the_default_page_is_500_workers() -> None:
    registry = CapabilityRegistry()
    for n in range(501):
        registry.register(f"w{n}", f"https://w{n}:1", [capability()], now=1_000.0)
    async with running(registry=registry) as api:
        first = (await api.get("/workers")).json()
        assert len(first["workers"]) == 500 and "next_cursor" in first
        last = (await api.get(f"/workers?cursor={first['next_cursor']}")).json()
    assert [entry["worker_id"] for entry in last["workers"]] == ["w500"]


async def test_filters_and_how_many_match() -> None:
    async with running() as api:
        await register_fleet(api, 6)
        api.advance(api.registry.policy.unhealthy_after + 1)
        await api.post("/heartbeat", {"worker_id": "w3"})
        embed = await every_page(api, "/workers", "limit=1&verb=embed&capability=text")
        unhealthy = await every_page(api, "/workers", "limit=2&state=unhealthy")
        healthy_embed = await every_page(api, "/workers", "verb=embed&state=healthy")
    assert [e["worker_id"] for p in embed for e in p["workers"]] == ["w1", "w3", "w5"]
    assert {(p["total_workers"], p["healthy_workers"], p["matching_workers"]) for p in embed} == {
        (6, 1, 3)
    }
    assert [e["worker_id"] for p in unhealthy for e in p["workers"]] == [
        "w0",
        "w1",
        "w2",
        "w4",
        "w5",
    ]
    assert unhealthy[0]["matching_workers"] == 5
    assert [e["worker_id"] for p in healthy_embed for e in p["workers"]] == ["w3"]


async def test_capabilities_page_over_sorted_entries() -> None:
    async with running() as api:
        await register_fleet(api, 4)
        await api.register("v2", capabilities=[capability_payload(version="2.0.0")])
        pages = await every_page(api, "/capabilities", "limit=1")
        embed = (await api.get("/capabilities?verb=embed")).json()
    entries = [(e["verb"], e["capability"], e["version"]) for p in pages for e in p["capabilities"]]
    assert entries == [
        ("classify", "image.classify", "1.0.0"),
        ("classify", "image.classify", "2.0.0"),
        ("embed", "text", "1.0.0"),
    ]
    assert pages[0]["capabilities"][0]["workers"] == ["w0", "w2"]
    assert {(p["total_workers"], p["healthy_workers"]) for p in pages} == {(5, 5)}
    assert [e["workers"] for e in embed["capabilities"]] == [["w1", "w3"]]


@pytest.mark.parametrize(
    ("query", "parameter", "words"),
    [
        ("limit=0", "limit", "from 1 to 5000"),
        ("limit=5001", "limit", "from 1 to 5000"),
        ("limit=abc", "limit", "'abc'"),
        ("limit=-1", "limit", "from 1 to 5000"),
        ("limit=1e3", "limit", "integer"),
        ("limit=1&limit=2", "limit", "more than once"),
        ("state=sick", "state", "healthy, unhealthy, unverified"),
        ("state=", "state", "empty"),
        ("cursor=garbage", "cursor", "next_cursor"),
        ("cursor=%25%25", "cursor", "next_cursor"),
        ("page=2", "page", "unknown query parameter"),
        ("verb=" + "v" * 300, "verb", "at most 256"),
    ],
)
@pytest.mark.parametrize("path", ["/workers", "/capabilities"])
async def test_an_invalid_query_parameter_is_422_naming_it(
    path: str, query: str, parameter: str, words: str
) -> None:
    async with running() as api:
        await api.register("w1")
        response = await api.get(f"{path}?{query}")
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_request"
    assert [problem["path"] for problem in body["detail"]] == [parameter]
    assert words in body["detail"][0]["message"] and parameter in body["message"]


async def test_a_cursor_of_the_other_listing_is_refused() -> None:
    async with running() as api:
        await register_fleet(api, 3)
        workers_cursor = (await api.get("/workers?limit=1")).json()["next_cursor"]
        capabilities_cursor = encode_capabilities_cursor(("a", "b", "c"))
        on_capabilities = await api.get(f"/capabilities?cursor={workers_cursor}")
        on_workers = await api.get(f"/workers?cursor={capabilities_cursor}")
    for response, listing in ((on_capabilities, "GET /capabilities"), (on_workers, "GET /workers")):
        assert response.status_code == 422
        assert listing in response.json()["detail"][0]["message"]


async def test_every_problem_is_listed_at_once() -> None:
    async with running() as api:
        response = await api.get("/workers?limit=0&state=sick&colour=red")
    assert response.status_code == 422
    paths = sorted(problem["path"] for problem in response.json()["detail"])
    assert paths == ["colour", "limit", "state"]


async def test_health_counts_every_worker() -> None:
    async with running() as api:
        await register_fleet(api, 3)
        api.advance(api.registry.policy.unhealthy_after + 1)
        await api.post("/heartbeat", {"worker_id": "w1"})
        body = (await api.get("/health")).json()
    assert (body["total_workers"], body["healthy_workers"]) == (3, 1)


async def test_a_listing_yields_to_the_event_loop_between_slices() -> None:
    """Another task runs many times while one large page is built, counted and rendered."""
    registry = CapabilityRegistry()
    clock = FakeClock()
    count = 10 * listings.COUNT_STEP
    shared = (capability(),)
    for n in range(count):
        registry.register(f"w{n}", f"https://w{n}:1", shared, now=clock())
    async with running(registry=registry, clock=clock) as api:
        turns = 0
        done = anyio.Event()

        async def other_task() -> None:
            nonlocal turns
            while not done.is_set():
                turns += 1
                await anyio.sleep(0)

        async with anyio.create_task_group() as group:
            group.start_soon(other_task)
            response = await api.get("/workers?limit=5000&state=healthy")
            done.set()
    assert response.status_code == 200 and len(response.json()["workers"]) == 5000
    # A yield between two of the pager's steps (each examines and renders
    # PAGE_STEP workers), and between two of the counter's.
    assert turns >= 5000 // listings.PAGE_STEP + count // listings.COUNT_STEP - 2 > 20


async def test_an_answer_rendered_in_slices_is_the_answer_rendered_whole() -> None:
    registry = CapabilityRegistry()
    clock = FakeClock()
    for n in range(2 * listings.RENDER_STEP + 7):
        registry.register(f"w{n}", f"https://w{n}:1", [capability()], now=clock())
    query = ListingQuery.parse([("limit", str(2 * listings.RENDER_STEP + 5))])
    body = await listings.workers_body(registry, query, now=clock())
    page = registry.workers_page(now=clock(), limit=query.limit)
    assert page.next_after is not None
    whole = WorkersAnswer(
        workers=tuple(map(listings.entry, page.workers)),
        total_workers=len(registry),
        healthy_workers=len(registry),
        next_cursor=encode_workers_cursor(page.next_after),
    )
    assert body == JSONResponse(unstructure(whole)).body
    capabilities = await listings.capabilities_body(registry, query, now=clock())
    entries = registry.capabilities_page(now=clock(), limit=query.limit).capabilities
    assert (
        capabilities
        == JSONResponse(
            unstructure(
                CapabilitiesAnswer(
                    capabilities=entries, total_workers=len(registry), healthy_workers=len(registry)
                )
            )
        ).body
    )


async def test_the_document_lists_the_query_parameters() -> None:
    async with running() as api:
        document = (await api.get("/openapi.json")).json()
    for path in ("/workers", "/capabilities"):
        operation = document["paths"][path]["get"]
        parameters = {p["name"]: p for p in operation["parameters"]}
        assert set(parameters) == {"limit", "cursor", "state", "verb", "capability"}
        assert all(p["in"] == "query" and not p["required"] for p in parameters.values())
        assert parameters["limit"]["schema"] == {
            "type": "integer",
            "minimum": 1,
            "maximum": 5000,
            "default": 500,
        }
        assert parameters["state"]["schema"]["enum"] == [
            "healthy",
            "unhealthy",
            "unverified",
            "draining",
            "ejected",
        ]
        assert "422" in operation["responses"]


async def test_paging_is_stable_while_workers_come_and_go() -> None:
    async with running() as api:
        await register_fleet(api, 6)
        first = (await api.get("/workers?limit=2")).json()
        await api.post("/deregister", {"worker_id": "w0"})  # already listed
        await api.post("/deregister", {"worker_id": "w4"})  # not listed yet
        await api.register("late")
        await api.register("w1", worker_url="https://10.0.0.9:8443")  # registers again
        rest = await every_page(api, "/workers", "limit=2", first["next_cursor"])
    listed = [e["worker_id"] for page in [first, *rest] for e in page["workers"]]
    assert listed == ["w0", "w1", "w2", "w3", "w5", "late"]
