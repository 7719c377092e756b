"""Listings in pages: positions, filters, cursors, counts, and paging while workers come and go."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crank_registry import (
    CapabilityRegistry,
    CapabilityView,
    HealthPolicy,
    HealthState,
    ListingQuery,
    ValidationError,
    WorkerState,
    decode_capabilities_cursor,
    decode_workers_cursor,
    encode_capabilities_cursor,
    encode_workers_cursor,
)
from crank_registry._listing import OrderIndex
from tests.builders import capability
from tests.core.helpers import T0

POLICY = HealthPolicy()


def fleet(count: int, *, now: float = T0) -> CapabilityRegistry:
    """Workers w0..w{count-1}; even ones offer classify:image.classify, odd ones embed:text."""
    registry = CapabilityRegistry(POLICY)
    for n in range(count):
        offered = capability() if n % 2 == 0 else capability("text", "embed", version="2.0.0")
        registry.register(f"w{n}", f"https://w{n}:8443", [offered], now=now)
    return registry


def all_pages(registry: CapabilityRegistry, *, now: float, limit: int, **filters: Any) -> list[str]:
    """Every worker id over all pages, following ``next_after``."""
    seen: list[str] = []
    after = None
    while True:
        page = registry.workers_page(now=now, after=after, limit=limit, **filters)
        seen += [view.worker_id for view in page.workers]
        if page.next_after is None:
            return seen
        assert len(page.workers) == limit
        after = page.next_after


def plain_capabilities(registry: CapabilityRegistry, now: float) -> list[CapabilityView]:
    """``GET /capabilities`` as a plain scan of every worker computes it."""
    groups: dict[tuple[str, str, str], tuple[list[str], list[str]]] = {}
    for view in registry.workers(now=now):
        for c in view.capabilities:
            workers, healthy = groups.setdefault((c.verb, c.name, c.version), ([], []))
            workers.append(view.worker_id)
            if view.is_healthy:
                healthy.append(view.worker_id)
    return [
        CapabilityView(verb, name, version, tuple(workers), tuple(healthy))
        for (verb, name, version), (workers, healthy) in sorted(groups.items())
    ]


# ------------------------------------------------------------------ workers


@pytest.mark.parametrize("limit", [1, 3, 7, 10, 11, 500])
def test_pages_list_every_worker_once_in_registration_order(limit: int) -> None:
    registry = fleet(10)
    assert all_pages(registry, now=T0, limit=limit) == [f"w{n}" for n in range(10)]


def test_the_last_page_has_no_next_position_even_when_it_is_full() -> None:
    registry = fleet(4)
    first = registry.workers_page(now=T0, limit=2)
    assert [v.worker_id for v in first.workers] == ["w0", "w1"]
    assert first.next_after is not None
    last = registry.workers_page(now=T0, after=first.next_after, limit=2)
    assert [v.worker_id for v in last.workers] == ["w2", "w3"]
    assert last.next_after is None
    empty = CapabilityRegistry(POLICY).workers_page(now=T0, limit=5)
    assert empty.workers == () and empty.next_after is None


def test_a_page_shows_the_same_view_as_workers() -> None:
    registry = fleet(5)
    later = T0 + POLICY.unhealthy_after + 1
    registry.heartbeat("w1", now=later)
    page = registry.workers_page(now=later, limit=None)
    assert list(page.workers) == registry.workers(now=later)


def test_filters_keep_state_verb_and_capability() -> None:
    registry = fleet(6)
    later = T0 + POLICY.unhealthy_after + 1
    registry.heartbeat("w0", now=later)
    registry.heartbeat("w3", now=later)
    ids = {
        "healthy": all_pages(registry, now=later, limit=1, state=HealthState.HEALTHY),
        "unhealthy": all_pages(registry, now=later, limit=2, state=HealthState.UNHEALTHY),
        "classify": all_pages(registry, now=later, limit=2, verb="classify"),
        "text": all_pages(registry, now=later, limit=2, capability="text"),
        "pair": all_pages(registry, now=later, limit=2, verb="embed", capability="text"),
        "pair+state": all_pages(
            registry, now=later, limit=1, verb="embed", capability="text", state=HealthState.HEALTHY
        ),
        "nobody": all_pages(
            registry, now=later, limit=2, verb="embed", capability="image.classify"
        ),
    }
    assert ids == {
        "healthy": ["w0", "w3"],
        "unhealthy": ["w1", "w2", "w4", "w5"],
        "classify": ["w0", "w2", "w4"],
        "text": ["w1", "w3", "w5"],
        "pair": ["w1", "w3", "w5"],
        "pair+state": ["w3"],
        "nobody": [],
    }


def test_an_unverified_worker_is_listed_as_such() -> None:
    registry = CapabilityRegistry(POLICY)
    registry.restore(fleet(3).records(), now=T0 + 1)
    registry.register("w1", "https://w1:8443", [capability()], now=T0 + 1)
    unverified = all_pages(registry, now=T0 + 1, limit=1, state=HealthState.UNVERIFIED)
    assert unverified == ["w0", "w2"]


def test_a_re_registered_worker_keeps_its_position() -> None:
    registry = fleet(3)
    registry.register("w0", "https://elsewhere:8443", [capability("text", "embed")], now=T0 + 1)
    assert all_pages(registry, now=T0 + 1, limit=1) == ["w0", "w1", "w2"]
    # ...also in the index of a capability it took up.
    assert all_pages(registry, now=T0 + 1, limit=1, verb="embed", capability="text") == [
        "w0",
        "w1",
    ]
    assert all_pages(registry, now=T0 + 1, limit=1, verb="classify") == ["w2"]


def test_a_pager_in_small_steps_gives_the_page_of_one_call() -> None:
    registry = fleet(40)
    for filters in ({}, {"verb": "embed"}, {"state": HealthState.HEALTHY}):
        pager = registry.workers_pager(now=T0, after=5, limit=7, **filters)
        steps = 1
        while not pager.step(3):
            steps += 1
        assert pager.page() == registry.workers_page(now=T0, after=5, limit=7, **filters)
        assert steps > 1


def test_limit_must_be_positive() -> None:
    registry = fleet(1)
    for limit in (0, -1):
        with pytest.raises(ValidationError, match="limit"):
            registry.workers_page(now=T0, limit=limit)
        with pytest.raises(ValidationError, match="limit"):
            registry.capabilities_page(now=T0, limit=limit)


# ------------------------------------------------------------- capabilities


def test_capabilities_page_over_sorted_entries_and_versions() -> None:
    registry = CapabilityRegistry(POLICY)
    for n, version in enumerate(["1.0.0", "2.0.0", "1.0.0", "3.0.0"]):
        registry.register(f"a{n}", f"https://a{n}:1", [capability(version=version)], now=T0)
    registry.register("b", "https://b:1", [capability("text", "embed")], now=T0)
    everything = registry.get_all_capabilities(now=T0)
    assert [(e.verb, e.capability, e.version, e.workers) for e in everything] == [
        ("classify", "image.classify", "1.0.0", ("a0", "a2")),
        ("classify", "image.classify", "2.0.0", ("a1",)),
        ("classify", "image.classify", "3.0.0", ("a3",)),
        ("embed", "text", "1.0.0", ("b",)),
    ]
    for limit in (1, 2, 3, 4):
        seen: list[CapabilityView] = []
        after = None
        while True:
            page = registry.capabilities_page(now=T0, after=after, limit=limit)
            seen += page.capabilities
            if page.next_after is None:
                break
            after = page.next_after
        assert seen == everything
    page = registry.capabilities_page(now=T0, limit=4)
    assert page.next_after is None


def test_capabilities_filters() -> None:
    registry = fleet(6)
    later = T0 + POLICY.unhealthy_after + 1
    registry.heartbeat("w3", now=later)
    by_verb = registry.capabilities_page(now=later, limit=10, verb="embed").capabilities
    assert [(e.verb, e.workers, e.healthy_workers) for e in by_verb] == [
        ("embed", ("w1", "w3", "w5"), ("w3",))
    ]
    by_name = registry.capabilities_page(now=later, limit=10, capability="image.classify")
    assert [e.capability for e in by_name.capabilities] == ["image.classify"]
    healthy = registry.capabilities_page(now=later, limit=10, state=HealthState.HEALTHY)
    assert [(e.verb, e.workers) for e in healthy.capabilities] == [("embed", ("w3",))]
    assert registry.capabilities_page(now=later, limit=10, verb="zzz").capabilities == ()


def test_a_cursor_survives_its_capability_leaving() -> None:
    registry = fleet(4)
    first = registry.capabilities_page(now=T0, limit=1)
    assert first.next_after == ("classify", "image.classify", "1.0.0")
    registry.deregister("w0", now=T0)
    registry.deregister("w2", now=T0)
    rest = registry.capabilities_page(now=T0, after=first.next_after, limit=1)
    assert [e.verb for e in rest.capabilities] == ["embed"] and rest.next_after is None


# ------------------------------------------------------------------- counts


def test_counts_in_steps_equal_counts_at_once() -> None:
    registry = fleet(9)
    later = T0 + POLICY.unhealthy_after + 1
    registry.heartbeat("w3", now=later)
    registry.heartbeat("w4", now=later)
    assert registry.counts(now=later) == (9, 2)
    counter = registry.counter(now=later, verb="embed")
    while not counter.step(2):
        pass
    counts = counter.counts()
    assert (counts.total, counts.routable, counts.matching) == (9, 2, 4)
    unfiltered = registry.counts_of(now=later)
    assert unfiltered.matching == unfiltered.total == 9
    assert registry.counts_of(now=later, state=HealthState.UNHEALTHY).matching == 7


# ------------------------------------------------------------------ cursors


def test_cursors_round_trip_and_are_opaque() -> None:
    for position in (0, 1, 2**40):
        cursor = encode_workers_cursor(position)
        assert cursor.isascii() and cursor.isalnum() and cursor != str(position)
        assert decode_workers_cursor(cursor) == position
    entry = ("classify", "image.classify", "1.0.0+é")
    assert decode_capabilities_cursor(encode_capabilities_cursor(entry)) == entry


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "abc",
        "!!!",
        "eyJ4IjoxfQ",
        encode_capabilities_cursor(("a", "b", "c")),
        "W10",
        "WyJ3MSJd",
    ],
)
def test_a_garbage_workers_cursor_is_a_validation_error(cursor: str) -> None:
    with pytest.raises(ValidationError) as caught:
        decode_workers_cursor(cursor)
    assert [problem.path for problem in caught.value.problems] == ["cursor"]


def test_a_workers_cursor_is_not_a_capabilities_cursor() -> None:
    with pytest.raises(ValidationError, match="GET /capabilities"):
        decode_capabilities_cursor(encode_workers_cursor(3))


# ------------------------------------------------------------ order index


def test_order_index_skips_holes_and_compacts() -> None:
    index = OrderIndex()
    for order in range(100):
        index.add(order, f"w{order}")
    for order in range(0, 100, 3):
        index.discard(order)
    index.discard(1000)  # never indexed: nothing happens
    assert [o for o, _ in index.after(10)] == [o for o in range(11, 100) if o % 3]
    for order in range(100):
        index.discard(order)
    assert len(index) == 0 and len(index.orders) < 20
    index.add(5, "w5")
    index.add(2, "w2")  # a worker taking up a capability keeps its older position
    assert list(index.after(-1)) == [(2, "w2"), (5, "w5")]


# ------------------------------------------- paging while workers come and go

# Each step: register a new worker, re-register, deregister, heartbeat, advance
# time and sweep, or read the next page (of a pager stepped in small budgets).
steps = st.lists(
    st.tuples(
        st.sampled_from(["register", "again", "leave", "beat", "time", "page", "page"]),
        st.integers(0, 10_000),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(
    initial=st.integers(0, 30),
    limit=st.integers(1, 6),
    budget=st.integers(1, 5),
    plan=steps,
    filtered=st.booleans(),
)
def test_paging_while_workers_come_and_go_lists_each_survivor_exactly_once(
    initial: int, limit: int, budget: int, plan: list[tuple[str, int]], filtered: bool
) -> None:
    """Changes land between pages and between a pager's steps; no worker repeats or is skipped.

    Filtered on ``classify:image.classify``: every registration here offers
    it, so the even workers of the fleet offer it throughout.
    """
    registry = fleet(initial)
    now = T0
    fresh = initial
    gone: set[str] = set()
    filters: dict[str, Any] = {}
    if filtered:
        filters = {"verb": "classify", "capability": "image.classify"}
    throughout = {f"w{n}" for n in range(initial) if not filtered or n % 2 == 0}
    listed: list[str] = []

    def change(action: str, n: int) -> None:
        nonlocal fresh, now
        ids = [record.worker_id for record in registry.records()]
        if action == "register":
            registry.register(f"w{fresh}", f"https://w{fresh}:1", [capability()], now=now)
            fresh += 1
        elif action == "again" and ids:
            offered = [capability(), capability("text", "embed")][: 1 + n % 2]
            registry.register(ids[n % len(ids)], "https://again:1", offered, now=now)
        elif action == "leave" and ids:
            registry.deregister(ids[n % len(ids)], now=now)
        elif action == "beat" and ids:
            registry.heartbeat(ids[n % len(ids)], now=now)
        elif action == "time":
            now += n % 200
            registry.cleanup_stale(now=now)
        gone.update(set(ids) - {record.worker_id for record in registry.records()})

    def read_a_page(after: int | None) -> int | None:
        pager = registry.workers_pager(now=now, after=after, limit=limit, **filters)
        while not pager.step(budget):
            if plan and plan[0][0] != "page":
                change(*plan.pop(0))  # a change between two steps of one page
        page = pager.page()
        assert len(page.workers) <= limit
        listed.extend(view.worker_id for view in page.workers)
        return page.next_after

    after = read_a_page(None)
    while after is not None:
        if plan:
            action, n = plan.pop(0)
            if action != "page":
                change(action, n)
                continue
        after = read_a_page(after)

    assert len(listed) == len(set(listed)), f"a worker was listed twice: {listed}"
    assert throughout - gone <= set(listed), "a worker present throughout was skipped"
    numbers = [int(worker_id[1:]) for worker_id in listed if worker_id in throughout]
    assert numbers == sorted(numbers)


@settings(max_examples=100, deadline=None)
@given(
    plan=st.lists(
        st.tuples(st.sampled_from(["register", "leave", "time"]), st.integers(0, 500)), max_size=40
    ),
    versions=st.lists(st.sampled_from(["1.0.0", "1.1.0", "2.0.0"]), min_size=1, max_size=3),
)
def test_capabilities_pages_equal_the_plain_scan(
    plan: list[tuple[str, int]], versions: list[str]
) -> None:
    registry = CapabilityRegistry(POLICY)
    now = T0
    for step, (action, n) in enumerate(plan):
        ids = [record.worker_id for record in registry.records()]
        if action == "register":
            offered = [
                capability(f"m{n % 3}", "classify", version=versions[n % len(versions)]),
                capability(f"m{n % 5}", "embed"),
            ]
            registry.register(f"w{step}", "https://w:1", offered, now=now)
        elif action == "leave" and ids:
            registry.deregister(ids[n % len(ids)], now=now)
        else:
            now += n % 90
            registry.cleanup_stale(now=now)
    expected = plain_capabilities(registry, now)
    assert registry.get_all_capabilities(now=now) == expected
    for limit in (1, 2, 5):
        seen: list[CapabilityView] = []
        after = None
        while True:
            pager = registry.capabilities_pager(now=now, after=after, limit=limit)
            while not pager.step(2):
                pass
            page = pager.page()
            seen += page.capabilities
            if page.next_after is None:
                break
            after = page.next_after
        assert seen == expected


def test_an_unfiltered_page_examines_only_its_own_workers() -> None:
    """O(limit): from any position, limit + 1 entries complete the page (no scan before it)."""
    registry = fleet(2_000)
    for after in (None, 0, 999, 1_990):
        pager = registry.workers_pager(now=T0, after=after, limit=5)
        assert pager.step(6), f"a page after {after} needed more than 6 entries"
    pager = registry.workers_pager(
        now=T0, after=500, limit=5, verb="classify", capability="image.classify"
    )
    assert pager.step(6)  # a capability's own index: only its workers are examined


def test_listing_query_defaults_and_values() -> None:
    assert ListingQuery.parse([]) == ListingQuery(limit=500)
    query = ListingQuery.parse(
        [
            ("limit", "5000"),
            ("cursor", "abc"),
            ("state", "unverified"),
            ("verb", "v"),
            ("capability", "c"),
        ]
    )
    assert query == ListingQuery(
        limit=5000, cursor="abc", state=WorkerState.UNVERIFIED, verb="v", capability="c"
    )
    with pytest.raises(ValidationError, match="limit: must be from 1 to 5000"):
        ListingQuery(limit=0)


def test_a_pager_between_two_steps_survives_a_snapshot_replacing_the_registry() -> None:
    registry = fleet(10)
    other = fleet(4)
    other.register("x", "https://x:1", [capability()], now=T0)
    pager = registry.workers_pager(now=T0, limit=None)
    counter = registry.counter(now=T0)
    assert not pager.step(3) and not counter.step(3)
    snapshot = other.snapshot()
    registry.apply_snapshot(type(snapshot)(registry.revision + 1, snapshot.workers))
    while not pager.step(3) or not counter.step(3):
        pass
    # Positions go on after the snapshot: what it holds comes after them.
    listed = [view.worker_id for view in pager.page().workers]
    assert listed == ["w0", "w1", "w2", "w0", "w1", "w2", "w3", "x"]
    assert counter.counts().total == 3 + 5
