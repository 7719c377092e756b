"""document_conversion: ``convert`` ``markdown_to_html`` turns Markdown into safe HTML.

Run: ``python -m examples.workers.document_conversion``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from crank_worker_client.serving import Handler

from ._runner import run_worker, schema
from .logic.markdown import markdown_to_html

NAME = "document_conversion"

CAPABILITIES = (
    schema(
        "convert",
        "markdown_to_html",
        input_schema={
            "type": "object",
            "properties": {"markdown": {"type": "string", "maxLength": 200000}},
            "required": ["markdown"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {"html": {"type": "string", "contentMediaType": "text/html"}},
            "required": ["html"],
        },
        max_concurrency=16,
    ),
)


async def convert(payload: dict[str, Any]) -> dict[str, Any]:
    """``convert`` ``markdown_to_html``: ``{"markdown"}`` -> ``{"html"}``."""
    return {"html": markdown_to_html(payload["markdown"])}


def make_handlers(options: argparse.Namespace | None = None) -> Mapping[tuple[str, str], Handler]:
    """The handlers of this worker."""
    return {("convert", "markdown_to_html"): convert}


if __name__ == "__main__":
    run_worker(NAME, CAPABILITIES, make_handlers)
