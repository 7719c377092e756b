"""W3C trace context for outgoing requests, when opentelemetry-api is installed.

The ``tracing`` extra (``pip install crank-worker-client[tracing]``) brings
opentelemetry-api; then every request carries the current span's
``traceparent`` (and whatever else the configured propagator writes), so the
controller's span joins the caller's trace. Without the extra, requests carry
no trace headers and nothing else changes. With the API but no SDK
configured, there is no current span and nothing is injected either.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

import httpx

__all__ = ["TRACING_AVAILABLE", "inject_trace_context"]

_inject: Callable[[MutableMapping[str, str]], None] | None
try:
    from opentelemetry.propagate import inject as _inject
except ImportError:  # the `tracing` extra is not installed
    _inject = None

#: True when opentelemetry-api is importable, so requests carry trace context.
TRACING_AVAILABLE = _inject is not None


def inject_trace_context(headers: MutableMapping[str, str]) -> None:
    """Write the current trace context into ``headers`` (no-op without opentelemetry)."""
    if _inject is not None:
        _inject(headers)


async def inject_into_request(request: httpx.Request) -> None:
    """An httpx request hook: every request carries the current trace context."""
    inject_trace_context(request.headers)
