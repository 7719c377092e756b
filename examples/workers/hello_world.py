"""hello_world: ``greet`` ``hello`` answers a greeting.

Run: ``python -m examples.workers.hello_world`` (see :mod:`examples.workers._runner`
for the settings).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from crank_worker_client.serving import Handler, InvocationError

from ._runner import run_worker, schema
from .logic.greeting import GREETINGS, greet

NAME = "hello_world"

CAPABILITIES = (
    schema(
        "greet",
        "hello",
        input_schema={
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 100},
                "language": {"type": "string", "enum": sorted(GREETINGS), "default": "en"},
            },
            "required": ["name"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {"greeting": {"type": "string"}},
            "required": ["greeting"],
        },
        max_concurrency=64,
    ),
)


async def hello(payload: dict[str, Any]) -> dict[str, Any]:
    """``greet`` ``hello``: ``{"name", "language"?}`` -> ``{"greeting"}``."""
    try:
        return {"greeting": greet(payload["name"], payload.get("language", "en"))}
    except ValueError as error:
        raise InvocationError("invalid_payload", str(error)) from None


def make_handlers(options: argparse.Namespace | None = None) -> Mapping[tuple[str, str], Handler]:
    """The handlers of this worker."""
    return {("greet", "hello"): hello}


if __name__ == "__main__":
    run_worker(NAME, CAPABILITIES, make_handlers)
