"""What the core's tests share: a start time, a registry with workers, routes and states."""

from __future__ import annotations

from crank_registry import (
    CapabilityRegistry,
    HealthPolicy,
    HealthState,
    UnknownCapability,
)
from tests.builders import capability

#: A wall-clock start time, as the service would hand the core.
T0 = 1_700_000_000.0


def registry_with(
    *worker_ids: str, now: float = T0, policy: HealthPolicy | None = None
) -> CapabilityRegistry:
    """A registry where each of ``worker_ids`` registered ``classify:image.classify`` at ``now``."""
    registry = CapabilityRegistry(policy)
    for worker_id in worker_ids:
        registry.register(worker_id, f"https://{worker_id}:8443", [capability()], now=now)
    return registry


def routes(
    registry: CapabilityRegistry,
    count: int,
    *,
    now: float,
    verb: str = "classify",
    name: str = "image.classify",
) -> list[str | None]:
    """The worker ids of ``count`` successive routes.

    ``None`` for no routable worker, ``UNKNOWN`` when no worker offers the pair.
    """
    answers: list[str | None] = []
    for _ in range(count):
        try:
            endpoint = registry.route(verb, name, now=now)
        except UnknownCapability:
            answers.append(UNKNOWN)
            continue
        answers.append(None if endpoint is None else endpoint.worker_id)
    return answers


#: What :func:`routes` records for a pair that no registered worker offers.
UNKNOWN = "<unknown capability>"


def state_of(registry: CapabilityRegistry, worker_id: str, now: float) -> HealthState | None:
    """The worker's reported state at ``now`` (``None``: not listed)."""
    view = registry.get_worker(worker_id, now=now)
    return None if view is None else view.state
