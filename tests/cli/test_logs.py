"""The JSON log formatter and the logging set-up of ``serve``, in-process."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider

from crank_registry_asgi.logs import TEXT_FORMAT, JsonFormatter, configure_logging


def record(message: str = "worker registered w1", **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("crank_registry_asgi", logging.INFO, __file__, 1, message, (), None)
    made.created = 1_796_000_000.25
    made.__dict__.update(extra)
    return made


def test_a_change_becomes_one_object_with_its_fields() -> None:
    fields = {"worker_id": "w1", "revision": 3, "replaced": "false"}
    line = JsonFormatter().format(record(crank=fields))
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2026-11-30T00:53:20.250Z",
        "level": "info",
        "logger": "crank_registry_asgi",
        "message": "worker registered w1",
        "worker_id": "w1",
        "revision": 3,
        "replaced": "false",
    }


def test_a_field_never_replaces_the_fixed_keys_and_odd_values_become_text() -> None:
    line = json.loads(JsonFormatter().format(record(crank={"level": "x", "path": object})))
    assert line["level"] == "info"
    assert line["path"] == str(object)


def test_inside_a_span_the_line_carries_its_trace() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("POST /register") as span:
        line = json.loads(JsonFormatter().format(record()))
    context = span.get_span_context()
    assert line["trace_id"] == format(context.trace_id, "032x")
    assert line["span_id"] == format(context.span_id, "016x")
    assert "trace_id" not in json.loads(JsonFormatter().format(record()))


def test_an_exception_is_one_field_of_the_same_line() -> None:
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        made = record("sweep failed", exc_info=sys.exc_info())
    line = JsonFormatter().format(made)
    assert "\n" not in line
    exception = json.loads(line)["exception"]
    assert exception.startswith("Traceback") and "RuntimeError: disk on fire" in exception


@pytest.mark.parametrize(
    ("log_format", "kind"), [("text", logging.Formatter), ("json", JsonFormatter)]
)
def test_configure_logging_installs_the_chosen_formatter(
    log_format: str, kind: type[logging.Formatter]
) -> None:
    # As in a fresh `serve` process: no handler on the root logger yet (pytest
    # adds its own for the test's duration; they are put back after).
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = []
    try:
        configure_logging("warning", log_format)
        (handler,) = root.handlers
        assert type(handler.formatter) is kind
        assert root.level == logging.WARNING
        if log_format == "text":
            assert handler.formatter is not None and handler.formatter._fmt == TEXT_FORMAT
    finally:
        root.handlers, root.level = handlers, level


def test_an_unknown_format_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'xml': expected one of text, json"):
        configure_logging("info", "xml")
