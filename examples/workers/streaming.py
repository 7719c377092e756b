"""streaming: ``stream`` ``text`` sends a text back token by token, as NDJSON.

Each line is ``{"index": i, "token": "..."}``; the last line is
``{"done": true, "count": n}``. A token is a word or a punctuation mark,
without whitespace: to read them as text, put a space before each word only
(:func:`examples.workers.logic.tokens.detokenize`). ``delay_ms`` spaces the tokens out, as a
language model would.

Run: ``python -m examples.workers.streaming``.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio

from crank_worker_client.serving import Handler

from ._runner import run_worker, schema
from .logic.tokens import tokenize

NAME = "streaming"

CAPABILITIES = (
    schema(
        "stream",
        "text",
        input_schema={
            "type": "object",
            "properties": {
                "text": {"type": "string", "minLength": 1, "maxLength": 20000},
                "delay_ms": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 0},
            },
            "required": ["text"],
            "additionalProperties": False,
        },
        output_schema={
            "description": "application/x-ndjson: one object per line, the last one has done",
            "type": "object",
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                "token": {"type": "string"},
                "done": {"type": "boolean"},
                "count": {"type": "integer", "minimum": 0},
            },
        },
        max_concurrency=16,
    ),
)


async def stream_text(payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """``stream`` ``text``: the tokens of ``text`` one line at a time, then a summary."""
    delay = payload.get("delay_ms", 0) / 1000
    tokens = tokenize(payload["text"])
    for index, token in enumerate(tokens):
        if delay and index:
            await anyio.sleep(delay)
        yield {"index": index, "token": token}
    yield {"done": True, "count": len(tokens)}


def make_handlers(options: argparse.Namespace | None = None) -> Mapping[tuple[str, str], Handler]:
    """The handlers of this worker."""
    return {("stream", "text"): stream_text}


if __name__ == "__main__":
    run_worker(NAME, CAPABILITIES, make_handlers)
