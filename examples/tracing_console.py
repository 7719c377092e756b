"""One trace across caller, controller and worker, printed by the SDK's console exporter.

The libraries use only the OpenTelemetry API; this program installs the SDK
(a development requirement) with a :class:`ConsoleSpanExporter`. A caller
span wraps ``POST /execute``; the controller's server span continues the
caller's trace, its gateway forwards the call in a client span, and the
worker's server span continues that (and the handler adds one of its own):
five spans, one trace id. Everything
runs in-process (the worker is reached through an ASGI transport), so the
program needs no certificates or ports: ``python -m examples.tracing_console``.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from crank_registry import CapabilitySchema, unstructure
from crank_registry_asgi import create_app
from crank_registry_asgi.gateway import create_gateway_app
from crank_worker_client.serving import invocation_app


def one_line(span: ReadableSpan) -> str:
    """A compact rendering: name, kind, trace id, span id and parent."""
    context = span.context
    if context is None:
        return f"{span.name} (no context)\n"
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else "-" * 16
    return (
        f"trace={context.trace_id:032x} span={context.span_id:016x} parent={parent} "
        f"{span.kind.name:<8} {span.name}\n"
    )


async def greet(payload: dict[str, Any]) -> dict[str, Any]:
    """The worker's handler, with a span of its own inside the invocation's."""
    with trace.get_tracer("worker").start_as_current_span("compose greeting"):
        return {"greeting": f"Hello, {payload['name']}!"}


async def main() -> None:
    """Install the SDK, wire caller, controller and worker in-process, make one call."""
    provider = TracerProvider(resource=Resource.create({"service.name": "crank-demo"}))
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(formatter=one_line)))
    trace.set_tracer_provider(provider)

    capability = CapabilitySchema(
        name="hello",
        verb="greet",
        version="1.0.0",
        input_schema={"type": "object", "required": ["name"]},
        output_schema={"type": "object"},
        requires_gpu=False,
        max_concurrency=4,
    )
    worker = invocation_app({("greet", "hello"): greet}, [capability])
    controller = create_gateway_app(create_app(), transport=httpx.ASGITransport(app=worker))

    async with controller.router.lifespan_context(controller):
        transport = httpx.ASGITransport(app=controller)
        async with httpx.AsyncClient(transport=transport, base_url="http://controller") as client:
            await client.post(
                "/register",
                json={
                    "worker_id": "greeter",
                    "worker_url": "http://greeter.internal",
                    "capabilities": unstructure([capability]),
                },
            )
            print("spans of one call (children end before their parents):")
            with trace.get_tracer("caller").start_as_current_span("caller: greet Ada"):
                headers: dict[str, str] = {}
                propagate.inject(headers)
                response = await client.post(
                    "/execute",
                    json={"verb": "greet", "capability": "hello", "payload": {"name": "Ada"}},
                    headers=headers,
                )
    print("answer:", response.status_code, response.json())
    provider.shutdown()


if __name__ == "__main__":
    anyio.run(main)
