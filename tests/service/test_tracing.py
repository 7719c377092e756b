"""Spans through the OpenTelemetry SDK's in-memory exporter."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.service.helpers import running

pytestmark = pytest.mark.anyio

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def server_span(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    assert found[0].kind is SpanKind.SERVER
    return found[0]


async def test_traceparent_becomes_the_parent(spans: InMemorySpanExporter) -> None:
    async with running() as api:
        body = {
            "worker_id": "w1",
            "worker_url": "http://w1.example:8000",
            "capabilities": [
                {
                    "name": "image.classify",
                    "verb": "classify",
                    "version": "1.0.0",
                    "input_schema": {},
                    "output_schema": {},
                    "requires_gpu": False,
                    "max_concurrency": 1,
                }
            ],
        }
        response = await api.request(
            "POST", "/register", json=body, headers={"traceparent": TRACEPARENT}
        )
        assert response.status_code == 200
    span = server_span(spans, "POST /register")
    assert span.context is not None and span.parent is not None
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.parent.span_id == int(PARENT_ID, 16)
    assert span.parent.is_remote
    attributes = dict(span.attributes or {})
    assert attributes["crank.worker_id"] == "w1"
    assert attributes["http.response.status_code"] == 200
    assert attributes["http.route"] == "/register"
    assert attributes["crank.controller_id"] == "controller"
    assert [event.name for event in span.events] == ["worker registered"]


async def test_route_span_attributes(spans: InMemorySpanExporter) -> None:
    async with running() as api:
        await api.register("w1")
        spans.clear()
        headers = {"traceparent": TRACEPARENT}
        ask = {"verb": "classify", "capability": "image.classify"}
        await api.request("POST", "/route", json=ask, headers=headers)
        routed = server_span(spans, "POST /route")
        spans.clear()
        api.advance(61)  # silent past unhealthy_after
        await api.request("POST", "/route", json=ask, headers=headers)
        missed = server_span(spans, "POST /route")
    attributes = dict(routed.attributes or {})
    assert (attributes["crank.verb"], attributes["crank.capability"]) == (
        "classify",
        "image.classify",
    )
    assert attributes["crank.worker_id"] == "w1"
    assert attributes["http.response.status_code"] == 200
    assert dict(missed.attributes or {})["http.response.status_code"] == 503
    assert missed.status.status_code is StatusCode.ERROR
    assert missed.context is not None and missed.context.trace_id == int(TRACE_ID, 16)


async def test_without_traceparent_the_span_is_a_root(spans: InMemorySpanExporter) -> None:
    async with running() as api:
        await api.get("/health")
        await api.get("/no/such/path")
    health = server_span(spans, "GET /health")
    assert health.parent is None
    # A path that is not a route does not become a span name.
    unknown = server_span(spans, "GET")
    assert dict(unknown.attributes or {})["http.response.status_code"] == 404


async def test_mounted_under_a_prefix(spans: InMemorySpanExporter) -> None:
    from tests.service.test_contract import mounted

    async with mounted() as client:
        response = await client.post("/crank/route", json={"verb": "v", "capability": "c"})
        assert response.status_code == 404
    span = server_span(spans, "POST /crank/route")
    assert dict(span.attributes or {})["http.route"] == "/crank/route"


async def test_a_path_with_parameters_is_named_by_its_template(
    spans: InMemorySpanExporter,
) -> None:
    async with running() as api:
        await api.register("w1")
        spans.clear()
        await api.request("GET", "/workers/w1")
        span = server_span(spans, "GET /workers/{worker_id}")
        assert dict(span.attributes or {})["http.route"] == "/workers/{worker_id}"
        spans.clear()
        await api.request("GET", "/workers/w1/more")  # no route: not a template's
        assert server_span(spans, "GET").name == "GET"
