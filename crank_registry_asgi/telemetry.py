"""Tracing through the OpenTelemetry API (a no-op without an SDK).

:class:`TracingMiddleware` opens one server span per request, named after
the route (``POST /register``), parented by the caller's W3C
``traceparent``; endpoints add ``crank.*`` attributes to it through
:func:`annotate`. Metrics are Prometheus' (:mod:`crank_registry_asgi.metrics`).
"""

from __future__ import annotations

from collections.abc import Collection

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["INSTRUMENTATION_NAME", "TracingMiddleware", "annotate", "tracer"]

#: The instrumentation scope of the service's spans.
INSTRUMENTATION_NAME = "crank_registry_asgi"


# Before an SDK is installed this is a proxy that starts delegating once one
# is, so it can be taken once, here, instead of per request.
_TRACER = trace.get_tracer(INSTRUMENTATION_NAME)


def tracer() -> trace.Tracer:
    """The service's tracer (follows the global tracer provider)."""
    return _TRACER


def annotate(
    *,
    worker_id: str | None = None,
    verb: str | None = None,
    capability: str | None = None,
) -> None:
    """Add the ``crank.*`` attributes that are known to the current span."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    if worker_id is not None:
        span.set_attribute("crank.worker_id", worker_id)
    if verb is not None:
        span.set_attribute("crank.verb", verb)
    if capability is not None:
        span.set_attribute("crank.capability", capability)


class TracingMiddleware:
    """One ``SERVER`` span per HTTP request, a child of the caller's ``traceparent``.

    Skipped altogether while no SDK is installed (the global tracer provider
    is still the API's proxy), when every span would be a no-op.

    The span is named ``"METHOD /path"`` for the service's own routes (a
    path with parameters by its template, ``/workers/{worker_id}``) and
    just ``"METHOD"`` for any other path (a path from a client must not
    become a span name). It records ``http.response.status_code`` and
    ``crank.controller_id`` (when given); a 5xx or an exception marks it as an error.
    """

    def __init__(
        self, app: ASGIApp, *, route_paths: Collection[str], controller_id: str | None = None
    ) -> None:
        self.app = app
        self.route_paths = frozenset(route_paths)
        # The templates with parameters, matched as Starlette's router matches them.
        self._templates = [
            (compile_path(path)[0], path) for path in sorted(self.route_paths) if "{" in path
        ]
        self.controller_id = controller_id

    def _template(self, route: str) -> str | None:
        """The route template ``route`` (a path) matches, or ``None``."""
        if route in self.route_paths:
            return route
        return next((path for pattern, path in self._templates if pattern.match(route)), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request inside its span."""
        if scope["type"] != "http" or isinstance(
            trace.get_tracer_provider(), trace.ProxyTracerProvider
        ):
            # No SDK installed: every span would be a no-op, and starting
            # one still costs more than routing a request.
            await self.app(scope, receive, send)
            return
        method = str(scope.get("method", "")).upper()
        path = scope.get("path", "")
        # Mounted under a prefix, the route is what follows the root path;
        # the span names the whole template, prefix included.
        root_path = scope.get("root_path", "")
        route = path[len(root_path) :] if root_path and path.startswith(root_path) else path
        matched = self._template(route)
        template = None if matched is None else root_path.rstrip("/") + matched
        name = method if template is None else f"{method} {template}"
        carrier = {
            key.decode("latin-1").lower(): value.decode("latin-1")
            for key, value in scope.get("headers", ())
        }
        attributes: dict[str, str] = {"http.request.method": method, "url.path": path}
        if self.controller_id is not None:
            attributes["crank.controller_id"] = self.controller_id
        if template is not None:
            attributes["http.route"] = template
        with tracer().start_as_current_span(
            name,
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=True,
            set_status_on_exception=True,
        ) as span:

            async def send_and_record(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                        span.set_attribute("error.type", str(status))
                await send(message)

            await self.app(scope, receive, send_and_record)
