"""W3C trace context for requests sent and calls served, when opentelemetry-api is installed.

The ``tracing`` extra (``pip install crank-worker-client[tracing]``) brings
opentelemetry-api; then every request carries the current span's
``traceparent`` (and whatever else the configured propagator writes), so the
controller's span joins the caller's trace. Without the extra, requests carry
no trace headers and nothing else changes. With the API but no SDK
configured, there is no current span and nothing is injected either.

A call served by :mod:`crank_worker_client.serving` runs in a server span
whose parent is the caller's ``traceparent`` (:func:`invocation_span`); without
the extra, in none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping

import httpx

__all__ = ["TRACING_AVAILABLE", "inject_trace_context", "invocation_span"]

_inject: Callable[[MutableMapping[str, str]], None] | None
try:
    from opentelemetry import propagate, trace
except ImportError:  # the `tracing` extra is not installed
    _inject = None
else:
    _inject = propagate.inject
    _tracer = trace.get_tracer("crank_worker_client.serving")

#: True when opentelemetry-api is importable, so requests carry trace context.
TRACING_AVAILABLE = _inject is not None


def inject_trace_context(headers: MutableMapping[str, str]) -> None:
    """Write the current trace context into ``headers`` (no-op without opentelemetry)."""
    if _inject is not None:
        _inject(headers)


async def inject_into_request(request: httpx.Request) -> None:
    """An httpx request hook: every request carries the current trace context."""
    inject_trace_context(request.headers)


@contextlib.contextmanager
def invocation_span(headers: Mapping[str, str], verb: str, name: str) -> Iterator[None]:
    """A server span for one invocation, child of the caller's trace context in ``headers``."""
    if not TRACING_AVAILABLE:
        yield
        return
    with _tracer.start_as_current_span(
        f"invoke {verb} {name}",
        context=propagate.extract(headers),
        kind=trace.SpanKind.SERVER,
        attributes={"crank.verb": verb, "crank.capability": name},
    ):
        yield
