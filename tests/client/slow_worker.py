"""A worker program whose one capability answers after a delay, counting its calls.

``python -m tests.client.slow_worker --controller URL --insecure --worker-id ID
--delay 0.3`` serves ``greet`` ``hello`` with the example workers' runner
(:func:`examples.workers._runner.serve`), so it shuts down as they do: on
SIGTERM it drains, waits for its calls in flight, deregisters, then stops
serving. ``--shutdown-grace`` is how long the server itself then waits for
calls still running (the runner's default 2 s; a test sets it short, so
that only the agent's wait can save a call in flight).

On the way out it prints one JSON line to stdout, ``{"calls": [[start, end],
...]}``: each call it took, when it arrived and when its handler returned,
on the monotonic clock (system-wide on Linux, so the test can place its own
moments among them); ``end`` is ``null`` for a call that never finished.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import anyio

from crank_worker_client.serving import Handler
from examples.workers._runner import parse_settings, schema, serve

NAME = "slow_worker"
#: Fewer than the test's callers on two workers: calls wait in the gateway's queue too.
MAX_CONCURRENCY = 6

CAPABILITIES = (
    schema(
        "greet",
        "hello",
        input_schema={
            "type": "object",
            "properties": {"name": {"type": "string"}},
            "required": ["name"],
            "additionalProperties": False,
        },
        output_schema={"type": "object", "properties": {"greeting": {"type": "string"}}},
        max_concurrency=MAX_CONCURRENCY,
    ),
)

#: Every call taken: ``[arrived, returned or None]``, monotonic seconds.
CALLS: list[list[float | None]] = []


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--delay SECONDS``: how long each call takes; ``--shutdown-grace SECONDS``."""
    parser.add_argument("--delay", type=float, default=0.3, help="seconds each call takes")
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=2.0,
        help="seconds the server waits for calls still running once deregistered",
    )


def make_handlers(options: argparse.Namespace) -> Mapping[tuple[str, str], Handler]:
    """The one slow handler, recording each call in :data:`CALLS`."""
    delay: float = options.delay

    async def hello(payload: dict[str, Any]) -> dict[str, Any]:
        call: list[float | None] = [time.monotonic(), None]
        CALLS.append(call)
        await anyio.sleep(delay)
        call[1] = time.monotonic()
        return {"greeting": f"Hello, {payload['name']}!"}

    return {("greet", "hello"): hello}


def main() -> None:
    """Serve until SIGTERM, then print the calls taken."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {NAME} %(levelname)s %(name)s: %(message)s"
    )
    settings, options = parse_settings(NAME, add_arguments=add_arguments)
    handlers = make_handlers(options)
    try:
        asyncio.run(serve(settings, CAPABILITIES, handlers, shutdown_grace=options.shutdown_grace))
    finally:
        print(json.dumps({"calls": CALLS}), flush=True)


if __name__ == "__main__":
    main()
