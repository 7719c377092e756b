"""``GET /workers``, ``GET /capabilities`` and the counts of ``GET /health``, a slice at a time.

The core pages and counts in steps of bounded cost (``crank_registry``'s
pagers and counters); this module runs those steps with a yield to the
event loop between two of them, and renders the answer in slices too, so
that a listing never holds the loop for more than a few milliseconds at
100 000 workers (benchmarks/listings.py; DESIGN "Targets": a yield at
least every 20 ms). The registry may change between two steps: pages are
built from positions, never from an iterator held across a yield.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import anyio

from crank_registry import (
    CapabilitiesAnswer,
    CapabilityRegistry,
    Counts,
    ListingQuery,
    WorkerCounter,
    WorkerEntry,
    WorkerLoad,
    WorkersAnswer,
    WorkerState,
    WorkerView,
    capability_label,
    decode_capabilities_cursor,
    decode_workers_cursor,
    encode_capabilities_cursor,
    encode_workers_cursor,
    iso_utc,
    unstructure,
)

__all__ = ["capabilities_body", "counts", "entry", "workers_body"]


# Work done between two yields: under a millisecond each on a quiet machine
# (benchmarks/listings.py). Small, because they add up: a request is
# carried through the server in several turns of the loop, and each turn
# waits for one slice of every listing in progress.
#: Workers a pager examines per step (and renders, for those it lists).
PAGE_STEP = 25
#: Members of capabilities the capabilities pager groups per step.
CAPABILITY_STEP = 500
#: Workers counted per step.
COUNT_STEP = 1_000
#: Capability entries rendered per slice.
RENDER_STEP = 20


async def counts(
    registry: CapabilityRegistry,
    *,
    now: float,
    state: WorkerState | None = None,
    verb: str | None = None,
    capability: str | None = None,
) -> Counts:
    """The counts at ``now`` (all, routable, matching), taken in steps."""
    counter: WorkerCounter = registry.counter(
        now=now, state=state, verb=verb, capability=capability
    )
    while not counter.step(COUNT_STEP):
        await anyio.sleep(0)
    return counter.counts()


async def workers_body(registry: CapabilityRegistry, query: ListingQuery, *, now: float) -> bytes:
    """One page of ``GET /workers`` for ``query`` at ``now``: a :class:`WorkersAnswer` as JSON.

    Raises :class:`~crank_registry.ValidationError` for a cursor that is not
    one of this listing's.
    """
    after = None if query.cursor is None else decode_workers_cursor(query.cursor)
    pager = registry.workers_pager(
        now=now,
        after=after,
        limit=query.limit,
        state=query.state,
        verb=query.verb,
        capability=query.capability,
    )
    # Each step's workers are rendered at once: nothing but bytes outlives a yield.
    slices: list[bytes] = []
    while True:
        done = pager.step(PAGE_STEP)
        found = pager.take()
        if found:
            slices.append(_json(unstructure(list(map(entry, found))))[1:-1])
        del found
        if done:
            break
        await anyio.sleep(0)
    page = pager.page()
    filtered = query.state is not None or query.verb is not None or query.capability is not None
    counted = await counts(
        registry, now=now, state=query.state, verb=query.verb, capability=query.capability
    )
    answer = WorkersAnswer(
        workers=(),
        total_workers=counted.total,
        healthy_workers=counted.routable,
        matching_workers=counted.matching if filtered else None,
        next_cursor=None if page.next_after is None else encode_workers_cursor(page.next_after),
    )
    return _spliced(answer, "workers", slices)


async def capabilities_body(
    registry: CapabilityRegistry, query: ListingQuery, *, now: float
) -> bytes:
    """One page of ``GET /capabilities`` for ``query`` at ``now``, rendered.

    Raises :class:`~crank_registry.ValidationError` for a cursor that is not
    one of this listing's.
    """
    after = None if query.cursor is None else decode_capabilities_cursor(query.cursor)
    pager = registry.capabilities_pager(
        now=now,
        after=after,
        limit=query.limit,
        state=query.state,
        verb=query.verb,
        capability=query.capability,
    )
    while not pager.step(CAPABILITY_STEP):
        await anyio.sleep(0)
    page = pager.page()
    counted = await counts(registry, now=now)
    answer = CapabilitiesAnswer(
        capabilities=(),
        total_workers=counted.total,
        healthy_workers=counted.routable,
        next_cursor=(
            None if page.next_after is None else encode_capabilities_cursor(page.next_after)
        ),
    )
    slices: list[bytes] = []
    for start in range(0, len(page.capabilities), RENDER_STEP):
        if start:
            await anyio.sleep(0)
        chunk = page.capabilities[start : start + RENDER_STEP]
        slices.append(_json(unstructure(list(chunk)))[1:-1])
    return _spliced(answer, "capabilities", slices)


def _spliced(answer: Any, field: str, slices: Sequence[bytes]) -> bytes:
    """``answer`` as JSON, its (empty) ``field`` filled with the entries rendered in ``slices``.

    The rest of the answer is rendered by the converter as usual; the JSON is
    the same as the whole answer's (a test says so).
    """
    rest: dict[str, Any] = unstructure(answer)
    assert rest.pop(field) == [], f"{field} must be empty in the answer"
    entries = b",".join(part for part in slices if part)
    head = _json({field: []})[:-2]  # {"field":[
    if not rest:
        return head + entries + b"]}"
    return head + entries + b"]," + _json(rest)[1:]  # ,"other":...}


def _json(value: Any) -> bytes:
    """JSON as Starlette's ``JSONResponse`` renders it."""
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")


def entry(view: WorkerView) -> WorkerEntry:
    """The ``GET /workers`` entry of a worker's view."""
    return WorkerEntry(
        worker_id=view.worker_id,
        worker_url=view.worker_url,
        last_heartbeat=iso_utc(view.last_heartbeat),
        is_healthy=view.is_healthy,
        state=view.listed_state,
        health=view.state,
        draining=view.draining,
        capabilities=tuple(capability_label(c.key) for c in view.capabilities),
        load=_load(view),
        ejected_until=None if view.ejected_until is None else iso_utc(view.ejected_until),
    )


def _load(view: WorkerView) -> WorkerLoad | None:
    report = view.load
    if report is None or view.load_reported_at is None:
        return None
    return WorkerLoad(
        in_flight=report.in_flight,
        latency_p95_ms=report.latency_p95_ms,
        error_rate=report.error_rate,
        reported_at=iso_utc(view.load_reported_at),
    )
