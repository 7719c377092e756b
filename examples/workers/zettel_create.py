"""zettel_create: ``create`` ``zettel.note`` stores a note in the shared SQLite file.

Run: ``python -m examples.workers.zettel_create [--db PATH]`` (or ``ZETTEL_DB``).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Mapping
from typing import Any

import anyio

from crank_worker_client.serving import Handler

from ._runner import run_worker, schema
from ._zettel import NOTE_SCHEMA, add_arguments, note_json, open_store

NAME = "zettel_create"

CAPABILITIES = (
    schema(
        "create",
        "zettel.note",
        input_schema={
            "type": "object",
            "properties": {
                "title": {"type": "string", "minLength": 1, "maxLength": 200},
                "body": {"type": "string", "maxLength": 50000},
                "tags": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1, "maxLength": 40},
                    "maxItems": 20,
                },
            },
            "required": ["title", "body"],
            "additionalProperties": False,
        },
        output_schema=NOTE_SCHEMA,
        max_concurrency=4,
    ),
)


def make_handlers(options: argparse.Namespace | None = None) -> Mapping[tuple[str, str], Handler]:
    """The handlers of this worker, over the shared store."""
    store = open_store(options)

    async def create(payload: dict[str, Any]) -> dict[str, Any]:
        """``create`` ``zettel.note``: ``{"title", "body", "tags"?}`` -> the stored note."""
        note = await anyio.to_thread.run_sync(
            functools.partial(
                store.create_note,
                payload["title"],
                payload["body"],
                tuple(payload.get("tags", ())),
                now=time.time(),
            )
        )
        return note_json(note)

    return {("create", "zettel.note"): create}


if __name__ == "__main__":
    run_worker(NAME, CAPABILITIES, make_handlers, add_arguments=add_arguments)
