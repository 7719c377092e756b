"""zettel_search: ``search`` ``zettel.notes`` finds notes by words and tag.

Run: ``python -m examples.workers.zettel_search [--db PATH]`` (or ``ZETTEL_DB``).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Mapping
from typing import Any

import anyio

from crank_worker_client.serving import Handler

from ._runner import run_worker, schema
from ._zettel import NOTE_SCHEMA, add_arguments, note_json, open_store

NAME = "zettel_search"

CAPABILITIES = (
    schema(
        "search",
        "zettel.notes",
        input_schema={
            "type": "object",
            "properties": {
                "query": {"type": "string", "maxLength": 500},
                "tag": {"type": "string", "minLength": 1, "maxLength": 40},
                "limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {"notes": {"type": "array", "items": NOTE_SCHEMA}},
            "required": ["notes"],
        },
        max_concurrency=16,
    ),
)


def make_handlers(options: argparse.Namespace | None = None) -> Mapping[tuple[str, str], Handler]:
    """The handlers of this worker, over the shared store."""
    store = open_store(options)

    async def search(payload: dict[str, Any]) -> dict[str, Any]:
        """``search`` ``zettel.notes``: ``{"query", "tag"?, "limit"?}`` -> ``{"notes"}``."""
        notes = await anyio.to_thread.run_sync(
            functools.partial(
                store.search,
                payload["query"],
                tag=payload.get("tag"),
                limit=payload.get("limit", 10),
            )
        )
        return {"notes": [note_json(note) for note in notes]}

    return {("search", "zettel.notes"): search}


if __name__ == "__main__":
    run_worker(NAME, CAPABILITIES, make_handlers, add_arguments=add_arguments)
