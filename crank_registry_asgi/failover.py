"""Which worker the gateway tries next: the caller's options, minus the workers tried or full.

The gateway goes on to another worker only when nothing reached the one it
tried (:class:`~crank_registry_asgi.upstream.Refused`), and then asks here;
back-pressure (:mod:`crank_registry_asgi.backpressure`) asks here too, with
the workers that have no free slot.
"""

from __future__ import annotations

from collections.abc import Collection

import attrs

from crank_registry import CapabilityRegistry, RouteOptions, UnknownCapability, WorkerEndpoint

__all__ = ["next_worker"]


def next_worker(
    registry: CapabilityRegistry,
    verb: str,
    capability: str,
    *,
    options: RouteOptions | None = None,
    tried: Collection[str],
    busy: Collection[str] = (),
    now: float,
) -> WorkerEndpoint | None:
    """The next worker to try for ``(verb, capability)`` under ``options``, or ``None``.

    The failover's one choice, made by the core: the caller's ``options``
    (its own ``exclude`` included, and its identity for the access policy:
    a denial raises :class:`~crank_registry.PolicyDenied`) with the workers
    ``tried`` and ``busy`` added to ``exclude``. Without options, tried or
    busy workers it is a plain route (O(1)).

    Raises :class:`~crank_registry.UnknownCapability` when no registered
    worker offers the pair at the first choice (the gateway answers 404).
    After an attempt, a pair whose workers have all left meanwhile gives
    ``None``: the failed attempts are the answer then, not a typo.
    """
    if tried or busy:
        base = options or RouteOptions()
        skipped = dict.fromkeys((*(base.exclude or ()), *tried, *busy))
        options = attrs.evolve(base, exclude=tuple(skipped))
    try:
        return registry.route(verb, capability, now=now, options=options)
    except UnknownCapability:
        if tried:
            return None
        raise
