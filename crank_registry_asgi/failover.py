"""Which worker the gateway tries next, when a call to one could not be sent.

The gateway goes on to another worker only when nothing reached the one it
tried (:class:`~crank_registry_asgi.upstream.Refused`), and then asks here.
"""

from __future__ import annotations

from collections.abc import Collection

from crank_registry import CapabilityRegistry, UnknownCapability, WorkerEndpoint

__all__ = ["next_worker"]


def next_worker(
    registry: CapabilityRegistry,
    verb: str,
    capability: str,
    *,
    tried: Collection[str],
    now: float,
) -> WorkerEndpoint | None:
    """The next worker to try for ``(verb, capability)``, not one of ``tried``, or ``None``.

    The failover's one choice. The rotation hands workers out in turn, so a
    worker already tried means it has come round: none is left. The core's
    ``exclude`` routing option (DESIGN, "Routing options") takes this over:
    ``registry.route(..., exclude=tried)``, and the check on ``tried`` goes.

    Raises :class:`~crank_registry.UnknownCapability` when no registered
    worker offers the pair at the first choice (the gateway answers 404).
    After an attempt, a pair whose workers have all left meanwhile gives
    ``None``: the failed attempts are the answer then, not a typo.
    """
    try:
        endpoint = registry.route(verb, capability, now=now)
    except UnknownCapability:
        if tried:
            return None
        raise
    if endpoint is None or endpoint.worker_id in tried:
        return None
    return endpoint
