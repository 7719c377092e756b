"""Which worker the gateway tries next, when a call to one could not be sent.

The gateway goes on to another worker only when nothing reached the one it
tried (:class:`~crank_registry_asgi.upstream.Refused`), and then asks here.
"""

from __future__ import annotations

from collections.abc import Collection

from crank_registry import CapabilityRegistry, RouteOptions, UnknownCapability, WorkerEndpoint

__all__ = ["next_worker"]


def next_worker(
    registry: CapabilityRegistry,
    verb: str,
    capability: str,
    *,
    tried: Collection[str],
    now: float,
    requester: str | None = None,
) -> WorkerEndpoint | None:
    """The next worker to try for ``(verb, capability)``, not one of ``tried``, or ``None``.

    The failover's one choice, made by the core: the first choice is a plain
    route, every later one a route that excludes the workers ``tried``.
    ``requester`` is the caller's identity, for the access policy (a denial
    raises :class:`~crank_registry.PolicyDenied`).

    Raises :class:`~crank_registry.UnknownCapability` when no registered
    worker offers the pair at the first choice (the gateway answers 404).
    After an attempt, a pair whose workers have all left meanwhile gives
    ``None``: the failed attempts are the answer then, not a typo.
    """
    options = (
        RouteOptions(exclude=tried if tried else None, requester_identity=requester)
        if tried or requester is not None
        else None
    )
    try:
        return registry.route(verb, capability, now=now, options=options)
    except UnknownCapability:
        if tried:
            return None
        raise
