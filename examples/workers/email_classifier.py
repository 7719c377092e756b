"""email_classifier: ``classify`` ``email.spam`` with naive Bayes.

The model is trained at start-up on ``examples/workers/data/spam_training.json``.

Run: ``python -m examples.workers.email_classifier``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from crank_worker_client.serving import Handler

from ._runner import run_worker, schema
from .logic.spam import NaiveBayes, load_training_set

NAME = "email_classifier"

CAPABILITIES = (
    schema(
        "classify",
        "email.spam",
        input_schema={
            "type": "object",
            "properties": {
                "subject": {"type": "string", "maxLength": 1000},
                "body": {"type": "string", "maxLength": 100000},
            },
            "required": ["body"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {
                "label": {"type": "string", "enum": ["ham", "spam"]},
                "spam_probability": {"type": "number", "minimum": 0, "maximum": 1},
                "evidence": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
            },
            "required": ["label", "spam_probability", "evidence"],
        },
        max_concurrency=32,
    ),
)


def make_handlers(options: argparse.Namespace | None = None) -> Mapping[tuple[str, str], Handler]:
    """The handlers of this worker, with the model trained once."""
    model = NaiveBayes(load_training_set())

    async def classify(payload: dict[str, Any]) -> dict[str, Any]:
        """``classify`` ``email.spam``: ``{"subject"?, "body"}`` -> the verdict."""
        verdict = model.classify(f"{payload.get('subject', '')}\n{payload['body']}")
        return {
            "label": verdict.label,
            "spam_probability": round(verdict.spam_probability, 6),
            "evidence": list(verdict.evidence),
        }

    return {("classify", "email.spam"): classify}


if __name__ == "__main__":
    run_worker(NAME, CAPABILITIES, make_handlers)
