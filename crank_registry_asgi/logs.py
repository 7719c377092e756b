"""How ``crank-registry serve`` writes its log lines: ``--log-format text|json``.

``text`` is one human line a record (``TIME LEVEL LOGGER MESSAGE``); ``json``
is one JSON object a line, rendered by :class:`JsonFormatter`, for log
collectors. Both go to standard error through the root logger, so the
server's own records (hypercorn's ``hypercorn.error``) take the same form.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from opentelemetry import trace

from crank_registry import iso_utc

__all__ = ["LOG_FORMATS", "TEXT_FORMAT", "JsonFormatter", "configure_logging"]

#: The values of ``--log-format``.
LOG_FORMATS = ("text", "json")

#: The layout of a ``text`` line.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# The keys every JSON line has; a structured field never replaces them.
_RESERVED = frozenset({"time", "level", "logger", "message", "exception", "stack"})


class JsonFormatter(logging.Formatter):
    """One JSON object a record.

    Keys: ``time`` (ISO 8601 UTC, milliseconds), ``level`` (``info``...),
    ``logger``, ``message``; then the record's structured fields (the
    ``crank`` mapping that :mod:`~crank_registry_asgi.effects` passes as
    ``extra``: ``worker_id``, ``revision``...); ``trace_id`` and
    ``span_id`` when the record was made inside a recording span;
    ``exception`` and ``stack`` (the formatted traceback) when there is one.
    Values that JSON cannot hold are written as their ``str()``.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: dict[str, Any] = {
            "time": iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "crank", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                if key not in _RESERVED:
                    line[str(key)] = value
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line["trace_id"] = format(context.trace_id, "032x")
            line["span_id"] = format(context.span_id, "016x")
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """Send every record at ``level`` or above to standard error, as ``log_format`` says.

    ``log_format`` is one of :data:`LOG_FORMATS`; anything else is a
    :class:`ValueError` naming the choices.
    """
    if log_format == "text":
        formatter = logging.Formatter(TEXT_FORMAT)
    elif log_format == "json":
        formatter = JsonFormatter()
    else:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler])
