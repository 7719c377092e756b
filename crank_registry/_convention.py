"""Conventions both sides of the wire share.

The invocation convention: how a caller reaches a capability on a worker.

Both sides use these names: the worker's invocation app
(:mod:`crank_worker_client.serving`) serves each capability on
:func:`invocation_path`, and the controller's gateway forwards there. The
body is ``{"payload": ...}``; a streamed answer is :data:`NDJSON`.
"""

from __future__ import annotations

import datetime
from urllib.parse import quote

__all__ = ["INVOKE_PREFIX", "NDJSON", "invocation_path", "iso_utc"]

#: The path prefix under which a worker serves its capabilities.
INVOKE_PREFIX = "/invoke"
#: The media type of a streamed answer: one JSON object per line.
NDJSON = "application/x-ndjson"


def invocation_path(verb: str, name: str) -> str:
    """The path a worker serves ``(verb, name)`` on: ``/invoke/{verb}/{name}``.

    Both segments are percent-encoded, ``/`` included, so that any verb and
    name make exactly two path segments.
    """
    return f"{INVOKE_PREFIX}/{quote(verb, safe='')}/{quote(name, safe='')}"


def iso_utc(timestamp: float) -> str:
    """Seconds since the epoch as ISO 8601 UTC, ``2026-11-26T20:11:50.123Z``.

    The form every answer and status shows a time in.
    """
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
