"""semantic_search: ``search`` ``documents`` ranks a bundled corpus by TF-IDF.

The corpus is ``examples/workers/data/corpus.json`` (or ``--corpus PATH``).

Run: ``python -m examples.workers.semantic_search``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from crank_worker_client.serving import Handler

from ._runner import run_worker, schema
from .logic.tfidf import CORPUS, SearchIndex, load_corpus

NAME = "semantic_search"

CAPABILITIES = (
    schema(
        "search",
        "documents",
        input_schema={
            "type": "object",
            "properties": {
                "query": {"type": "string", "minLength": 1, "maxLength": 1000},
                "limit": {"type": "integer", "minimum": 1, "maximum": 20, "default": 3},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {
                "results": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "id": {"type": "string"},
                            "title": {"type": "string"},
                            "score": {"type": "number"},
                            "snippet": {"type": "string"},
                        },
                        "required": ["id", "title", "score", "snippet"],
                    },
                }
            },
            "required": ["results"],
        },
        max_concurrency=32,
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--corpus``: the JSON corpus to index."""
    parser.add_argument(
        "--corpus",
        type=Path,
        metavar="PATH",
        default=CORPUS,
        help="the JSON corpus to index (default: %(default)s)",
    )


def make_handlers(options: argparse.Namespace | None = None) -> Mapping[tuple[str, str], Handler]:
    """The handlers of this worker, over an index built once."""
    corpus = options.corpus if options is not None else CORPUS
    index = SearchIndex(load_corpus(corpus))

    async def search(payload: dict[str, Any]) -> dict[str, Any]:
        """``search`` ``documents``: ``{"query", "limit"?}`` -> ranked ``results``."""
        hits = index.search(payload["query"], payload.get("limit", 3))
        return {
            "results": [
                {
                    "id": hit.document.id,
                    "title": hit.document.title,
                    "score": round(hit.score, 6),
                    "snippet": hit.document.text[:120],
                }
                for hit in hits
            ]
        }

    return {("search", "documents"): search}


if __name__ == "__main__":
    run_worker(NAME, CAPABILITIES, make_handlers, add_arguments=add_arguments)
