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

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio

from crank_registry import (
    CapabilitiesAnswer,
    CapabilityRegistry,
    Counts,
    HealthState,
    ListingQuery,
    WorkerCounter,
    WorkerEntry,
    WorkersAnswer,
    WorkerView,
    capability_label,
    decode_capabilities_cursor,
    decode_workers_cursor,
    encode_capabilities_cursor,
    encode_workers_cursor,
    iso_utc,
    unstructure,
)

__all__ = ["capabilities_body", "counts", "workers_body"]

T = TypeVar("T")

# Work done between two yields, each well under 20 ms on a loaded 2-core
# machine (about 1-3 ms each; see benchmarks/listings.py).
#: Workers a pager examines per step.
PAGE_STEP = 2_000
#: Workers counted per step.
COUNT_STEP = 10_000
#: Entries of an answer rendered per slice.
RENDER_STEP = 250


async def counts(
    registry: CapabilityRegistry,
    *,
    now: float,
    state: HealthState | None = None,
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


async def workers_body(
    registry: CapabilityRegistry, query: ListingQuery, *, now: float
) -> dict[str, Any]:
    """One page of ``GET /workers`` for ``query`` at ``now``: a rendered :class:`WorkersAnswer`.

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
    while not pager.step(PAGE_STEP):
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
    return await _render(answer, "workers", page.workers, _entry)


async def capabilities_body(
    registry: CapabilityRegistry, query: ListingQuery, *, now: float
) -> dict[str, Any]:
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
    while not pager.step(PAGE_STEP):
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
    return await _render(answer, "capabilities", page.capabilities, lambda view: view)


async def _render(
    answer: Any, field: str, items: Sequence[T], entry: Callable[[T], Any]
) -> dict[str, Any]:
    """``answer`` rendered with ``items`` (each made an entry) as its ``field``, a slice at a time.

    ``answer`` is the answer model with ``field`` empty: the rest of it is
    rendered by the converter as usual, and each slice of entries too.
    """
    body: dict[str, Any] = unstructure(answer)
    rendered: list[Any] = []
    for start in range(0, len(items), RENDER_STEP):
        if start:
            await anyio.sleep(0)
        rendered += unstructure([entry(item) for item in items[start : start + RENDER_STEP]])
    body[field] = rendered
    return body


def _entry(view: WorkerView) -> WorkerEntry:
    return WorkerEntry(
        worker_id=view.worker_id,
        worker_url=view.worker_url,
        last_heartbeat=iso_utc(view.last_heartbeat),
        is_healthy=view.is_healthy,
        state=view.state,
        capabilities=tuple(capability_label(c.key) for c in view.capabilities),
    )
