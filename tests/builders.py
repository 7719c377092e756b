"""The one place the suite builds capabilities and registrations.

Every directory builds its values here, so that a change of the wire shape
(a new required field, a renamed one) is one edit. The defaults are the
suite's usual worker: ``classify:image.classify`` version 1.0.0, reachable
at :data:`WORKER_URL`.
"""

from __future__ import annotations

from typing import Any

from crank_registry import CapabilitySchema, structure

#: Where a registration's worker listens, unless a test says otherwise.
WORKER_URL = "https://10.0.0.1:8443"


def capability_payload(
    name: str = "image.classify", verb: str = "classify", **fields: Any
) -> dict[str, Any]:
    """A valid capability as JSON (the wire form); ``fields`` override or add."""
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
    """A valid :class:`CapabilitySchema`, built through the converter as a request's is."""
    return structure(capability_payload(name, verb, **fields), CapabilitySchema)


def registration_payload(
    worker_id: str = "w1",
    worker_url: str | None = None,
    capabilities: Any = None,
    **fields: Any,
) -> dict[str, Any]:
    """A valid registration body as JSON; ``fields`` override or add.

    ``capabilities`` defaults to one :func:`capability_payload`; any value,
    valid or not, is sent as given.
    """
    payload: dict[str, Any] = {
        "worker_id": worker_id,
        "worker_url": worker_url if worker_url is not None else WORKER_URL,
        "capabilities": capabilities if capabilities is not None else [capability_payload()],
    }
    payload.update(fields)
    return payload
