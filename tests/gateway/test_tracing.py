"""One trace across three hops: caller -> controller (gateway) -> worker."""

from __future__ import annotations

import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from crank_registry.testing import FakeClock
from tests.gateway.helpers import (
    FakeWorker,
    WorkerNetwork,
    client_of,
    hello,
    make_gateway,
    register,
    serving,
)

pytestmark = pytest.mark.anyio


async def test_trace_context_flows_from_caller_through_controller_to_worker(
    spans: InMemorySpanExporter,
) -> None:
    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(serving({("greet", "hello"): hello})))
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        spans.clear()
        with trace.get_tracer("caller").start_as_current_span("caller") as caller:
            headers: dict[str, str] = {}
            propagate.inject(headers)
            response = await client.post(
                "/execute",
                json={"verb": "greet", "capability": "hello", "payload": {"name": "Ada"}},
                headers=headers,
            )
    assert response.status_code == 200
    # The worker received the forward span's context, not the caller's.
    forwarded = network.requests[0].headers["traceparent"]

    finished = {span.name: span for span in spans.get_finished_spans()}
    server = finished["POST /execute"]
    forward = finished["POST greet hello"]
    worker = finished["invoke greet hello"]
    caller_context = caller.get_span_context()

    assert server.kind is SpanKind.SERVER
    assert forward.kind is SpanKind.CLIENT
    assert worker.kind is SpanKind.SERVER
    trace_id = caller_context.trace_id
    assert {server.context.trace_id, forward.context.trace_id, worker.context.trace_id} == {
        trace_id
    }
    assert server.parent is not None and server.parent.span_id == caller_context.span_id
    assert forward.parent is not None and forward.parent.span_id == server.context.span_id
    assert worker.parent is not None and worker.parent.span_id == forward.context.span_id
    assert forwarded.startswith(f"00-{trace_id:032x}-{forward.context.span_id:016x}-")

    assert server.attributes is not None and forward.attributes is not None
    assert server.attributes["crank.verb"] == "greet"
    assert server.attributes["crank.capability"] == "hello"
    assert server.attributes["crank.worker_id"] == "w1"
    assert server.attributes["crank.controller_id"] == "controller"
    assert server.attributes["http.response.status_code"] == 200
    assert forward.attributes["crank.worker_id"] == "w1"
    assert forward.attributes["http.response.status_code"] == 200
    assert forward.attributes["url.full"] == "https://w1.test/invoke/greet/hello"


async def test_each_attempt_is_its_own_client_span(spans: InMemorySpanExporter) -> None:
    import httpx

    network = WorkerNetwork()
    network.add("w1.test", FakeWorker(failure=httpx.ConnectError))
    network.add("w2.test", FakeWorker(serving({("greet", "hello"): hello})))
    async with client_of(make_gateway(network, FakeClock())) as client:
        await register(client, "w1", "https://w1.test")
        await register(client, "w2", "https://w2.test")
        spans.clear()
        response = await client.post(
            "/execute", json={"verb": "greet", "capability": "hello", "payload": {"name": "B"}}
        )
    assert response.status_code == 200
    forwards = [s for s in spans.get_finished_spans() if s.name == "POST greet hello"]
    assert [s.attributes["crank.worker_id"] for s in forwards if s.attributes] == ["w1", "w2"]
    assert [s.attributes["crank.attempt"] for s in forwards if s.attributes] == [1, 2]
    assert not forwards[0].status.is_ok
    assert forwards[1].status.is_unset
