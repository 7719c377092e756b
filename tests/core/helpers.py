"""Builders shared by the core's tests: capabilities, payloads, a start time."""

from __future__ import annotations

from typing import Any

from crank_registry import (
    CapabilityRegistry,
    CapabilitySchema,
    HealthPolicy,
    HealthState,
    structure,
)

#: A wall-clock start time, as the service would hand the core.
T0 = 1_700_000_000.0

URL = "https://10.0.0.1:8443"


def capability_payload(
    name: str = "image.classify", verb: str = "classify", **fields: Any
) -> dict[str, Any]:
    """A valid CapabilitySchema as JSON (the wire form); ``fields`` override or add."""
    payload: dict[str, Any] = {
        "name": name,
        "verb": verb,
        "version": "1.0.0",
        "input_schema": {"type": "object"},
        "output_schema": {"type": "object"},
        "requires_gpu": False,
        "max_concurrency": 4,
    }
    payload.update(fields)
    return payload


def capability(
    name: str = "image.classify", verb: str = "classify", **fields: Any
) -> CapabilitySchema:
    """A valid CapabilitySchema, built through the converter like the wire builds it."""
    return structure(capability_payload(name, verb, **fields), CapabilitySchema)


def registration_payload(worker_id: str = "w1", **fields: Any) -> dict[str, Any]:
    """A valid Registration as JSON; ``fields`` override or add."""
    payload: dict[str, Any] = {
        "worker_id": worker_id,
        "worker_url": URL,
        "capabilities": [capability_payload()],
    }
    payload.update(fields)
    return payload


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
    """The worker ids of ``count`` successive routes (``None`` for no worker)."""
    answers = []
    for _ in range(count):
        endpoint = registry.route(verb, name, now=now)
        answers.append(None if endpoint is None else endpoint.worker_id)
    return answers


def state_of(registry: CapabilityRegistry, worker_id: str, now: float) -> HealthState | None:
    """The worker's reported state at ``now`` (``None``: not listed)."""
    view = registry.get_worker(worker_id, now=now)
    return None if view is None else view.state
