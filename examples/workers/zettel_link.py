"""zettel_link: ``link`` ``zettel.links`` links two notes and answers the target's backlinks.

Run: ``python -m examples.workers.zettel_link [--db PATH]`` (or ``ZETTEL_DB``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import anyio

from crank_worker_client.serving import Handler, InvocationError

from ._runner import run_worker, schema
from ._zettel import add_arguments, open_store
from .logic.zettel import Link, UnknownNote

NAME = "zettel_link"

_LINK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "source": {"type": "integer", "minimum": 1},
        "target": {"type": "integer", "minimum": 1},
        "relation": {"type": "string"},
    },
    "required": ["source", "target", "relation"],
}

CAPABILITIES = (
    schema(
        "link",
        "zettel.links",
        input_schema={
            "type": "object",
            "properties": {
                "source": {"type": "integer", "minimum": 1},
                "target": {"type": "integer", "minimum": 1},
                "relation": {
                    "type": "string",
                    "pattern": "^[a-z][a-z0-9_-]*$",
                    "maxLength": 40,
                    "default": "related",
                },
            },
            "required": ["source", "target"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {
                "link": _LINK_SCHEMA,
                "backlinks": {"type": "array", "items": _LINK_SCHEMA},
            },
            "required": ["link", "backlinks"],
        },
        max_concurrency=4,
    ),
)


def _link_json(link: Link) -> dict[str, Any]:
    return {"source": link.source, "target": link.target, "relation": link.relation}


def make_handlers(options: argparse.Namespace | None = None) -> Mapping[tuple[str, str], Handler]:
    """The handlers of this worker, over the shared store."""
    store = open_store(options)

    def link_and_list(source: int, target: int, relation: str) -> tuple[Link, list[Link]]:
        return store.link(source, target, relation), store.backlinks(target)

    async def link(payload: dict[str, Any]) -> dict[str, Any]:
        """``link`` ``zettel.links``: ``{"source", "target", "relation"?}`` -> link + backlinks."""
        source, target = int(payload["source"]), int(payload["target"])
        try:
            made, backlinks = await anyio.to_thread.run_sync(
                link_and_list, source, target, payload.get("relation", "related")
            )
        except UnknownNote as error:
            raise InvocationError("unknown_note", str(error), status=404) from None
        except ValueError as error:
            raise InvocationError("invalid_payload", str(error)) from None
        return {"link": _link_json(made), "backlinks": [_link_json(b) for b in backlinks]}

    return {("link", "zettel.links"): link}


if __name__ == "__main__":
    run_worker(NAME, CAPABILITIES, make_handlers, add_arguments=add_arguments)
