"""Malformed requests: each gets a 4xx with a JSON error, and nothing changes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest

from tests.builders import capability_payload, registration_payload
from tests.service.helpers import Controller, running

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}
MIB = 1024 * 1024


@attrs.frozen
class Case:
    """One malformed request and the answer it must get."""

    id: str
    path: str
    body: bytes
    status: int
    error: str
    headers: dict[str, str] = attrs.field(factory=lambda: dict(JSON))
    method: str = "POST"


def reg(**changes: Any) -> bytes:
    """A registration of the already registered w1, with ``changes``."""
    return json.dumps({**registration_payload("w1"), **changes}).encode()


def cap(**changes: Any) -> bytes:
    """A registration of w1 whose one capability has ``changes`` (None: drop the key)."""
    item = {
        key: value
        for key, value in {**capability_payload(), **changes}.items()
        if value is not None
    }
    return reg(capabilities=[item])


def route(**fields: Any) -> bytes:
    return json.dumps({"verb": "classify", "capability": "image.classify", **fields}).encode()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def invalid(case_id: str, path: str, body: bytes) -> Case:
    return Case(case_id, path, body, 422, "invalid_request")


CASES = [
    # The media type.
    Case("no content type", "/register", reg(), 415, "unsupported_media_type", headers={}),
    Case(
        "text/plain",
        "/register",
        reg(),
        415,
        "unsupported_media_type",
        {"content-type": "text/plain"},
    ),
    Case(
        "form encoded",
        "/heartbeat",
        b"worker_id=w1",
        415,
        "unsupported_media_type",
        {"content-type": "application/x-www-form-urlencoded"},
    ),
    Case(
        "latin-1 charset",
        "/deregister",
        b'{"worker_id": "w1"}',
        415,
        "unsupported_media_type",
        {"content-type": "application/json; charset=latin-1"},
    ),
    Case(
        "json-ish type",
        "/route",
        route(),
        415,
        "unsupported_media_type",
        {"content-type": "application/jsonx"},
    ),
    # Not JSON.
    Case("truncated", "/register", reg()[:-5], 400, "invalid_json"),
    Case("empty body", "/heartbeat", b"", 400, "invalid_json"),
    Case("not utf-8", "/register", b'{"worker_id": "w\xff1"}', 400, "invalid_json"),
    Case("utf-16", "/heartbeat", '{"worker_id": "w1"}'.encode("utf-16"), 400, "invalid_json"),
    Case("deep array", "/register", nested(100_000), 400, "invalid_json"),
    Case(
        "deep schema",
        "/register",
        cap(input_schema=json.loads(nested(80).decode())),
        400,
        "invalid_json",
    ),
    Case(
        "NaN",
        "/route",
        b'{"verb": "v", "capability": "c", "budget_tokens": NaN}',
        400,
        "invalid_json",
    ),
    Case(
        "Infinity",
        "/register",
        cap().replace(b'"max_concurrency": 4', b'"max_concurrency": Infinity'),
        400,
        "invalid_json",
    ),
    Case(
        "overflowing float",
        "/route",
        b'{"verb": "v", "capability": "c", "budget_tokens": 1e999}',
        400,
        "invalid_json",
    ),
    Case(
        "huge integer",
        "/register",
        cap().replace(b'"max_concurrency": 4', b'"max_concurrency": ' + b"9" * 5000),
        400,
        "invalid_json",
    ),
    Case(
        "duplicate keys",
        "/heartbeat",
        b'{"worker_id": "w1", "worker_id": "w2"}',
        400,
        "invalid_json",
    ),
    Case(
        "lone surrogate",
        "/register",
        reg(worker_url="http://w1.example/\\ud800").replace(b"\\\\", b"\\"),
        400,
        "invalid_json",
    ),
    Case("trailing garbage", "/deregister", b'{"worker_id": "w1"} x', 400, "invalid_json"),
    Case("single quotes", "/deregister", b"{'worker_id': 'w1'}", 400, "invalid_json"),
    # Too large, declared.
    Case(
        "2 MiB declared",
        "/register",
        b'{"worker_id": "' + b"a" * (2 * MIB) + b'"}',
        413,
        "request_too_large",
    ),
    # JSON, but not the model.
    invalid("array body", "/register", b"[]"),
    invalid("string body", "/heartbeat", b'"w1"'),
    invalid("null body", "/deregister", b"null"),
    invalid(
        "missing worker_id",
        "/register",
        json.dumps({"worker_url": "http://a", "capabilities": [capability_payload()]}).encode(),
    ),
    invalid("worker_id int", "/register", reg(worker_id=7)),
    invalid("worker_id slash", "/register", reg(worker_id="w/1")),
    invalid("worker_id empty", "/register", reg(worker_id="")),
    invalid("worker_id too long", "/register", reg(worker_id="w" * 129)),
    invalid("worker_id newline", "/register", reg(worker_id="w1\n")),
    invalid("url ftp", "/register", reg(worker_url="ftp://w1.example")),
    invalid("url relative", "/register", reg(worker_url="/w1")),
    invalid("url space", "/register", reg(worker_url="http://w1 .example")),
    invalid("url port 0", "/register", reg(worker_url="http://w1.example:0")),
    invalid("url port out of range", "/register", reg(worker_url="http://w1.example:99999")),
    invalid("url no host", "/register", reg(worker_url="http://")),
    invalid("capabilities empty", "/register", reg(capabilities=[])),
    invalid("capabilities object", "/register", reg(capabilities=capability_payload())),
    invalid(
        "duplicate capability",
        "/register",
        reg(capabilities=[capability_payload(), capability_payload(version="2.0.0")]),
    ),
    invalid("unknown field", "/register", reg(worker_name="w1")),
    invalid("capability typo", "/register", cap(max_concurency=4)),
    invalid("capability missing verb", "/register", cap(verb=None)),
    invalid("max_concurrency string", "/register", cap(max_concurrency="4")),
    invalid("max_concurrency zero", "/register", cap(max_concurrency=0)),
    invalid("max_concurrency float", "/register", cap(max_concurrency=2.5)),
    invalid("requires_gpu yes", "/register", cap(requires_gpu="yes")),
    invalid("requires_gpu 1", "/register", cap(requires_gpu=1)),
    invalid("version not PEP 440", "/register", cap(version="1.0.0-x.7")),
    invalid("version number", "/register", cap(version=1)),
    invalid("slo unknown key", "/register", cap(slo={"p99": 5})),
    invalid("slo availability 2", "/register", cap(slo={"availability": 2})),
    invalid("input_schema list", "/register", cap(input_schema=[])),
    invalid("input_schema type 12", "/register", cap(input_schema={"type": 12})),
    invalid("output_schema unknown $schema", "/register", cap(output_schema={"$schema": "x"})),
    invalid("input_schema bad pattern", "/register", cap(input_schema={"pattern": "("})),
    invalid("negative cost", "/register", cap(cost_tokens_per_invocation=-1)),
    invalid("blank name", "/register", cap(name="   ")),
    invalid("spiffe_id scheme", "/register", cap(spiffe_id="https://crank.local/w1")),
    invalid("required_capabilities blank", "/register", cap(required_capabilities=[""])),
    invalid("heartbeat no worker_id", "/heartbeat", b"{}"),
    invalid("heartbeat worker_id int", "/heartbeat", b'{"worker_id": 1}'),
    invalid("heartbeat unknown field", "/heartbeat", b'{"worker_id": "w1", "at": 5}'),
    invalid("deregister worker_id list", "/deregister", b'{"worker_id": ["w1"]}'),
    invalid("deregister bad chars", "/deregister", b'{"worker_id": "w 1"}'),
    invalid("route missing capability", "/route", b'{"verb": "classify"}'),
    invalid("route verb int", "/route", route(verb=3)),
    invalid("route budget string", "/route", route(budget_tokens="10")),
    invalid("route version latest", "/route", route(version="latest")),
    invalid("route version specifier typo", "/route", route(version=">=1.2,<<2")),
    invalid("route slo_constraints list", "/route", route(slo_constraints=[])),
    invalid("route slo_constraints empty", "/route", route(slo_constraints={})),
    invalid("route slo_constraints unknown key", "/route", route(slo_constraints={"p99": 1})),
    invalid("route exclude string", "/route", route(exclude="w1")),
    invalid("route exclude bad id", "/route", route(exclude=["w 1"])),
    invalid("route strategy unknown", "/route", route(strategy="fastest")),
    invalid("route affinity without key", "/route", route(strategy="affinity")),
    invalid("route affinity_key alone", "/route", route(affinity_key="k")),
    invalid("route explain string", "/route", route(explain="yes")),
    invalid("route budget negative", "/route", route(budget_tokens=-1)),
    invalid("route unknown field", "/route", route(priority=1)),
    # A requester_identity from a caller no --trusted-gateway names.
    Case(
        "route requester_identity",
        "/route",
        route(requester_identity="spiffe://x/y"),
        403,
        "forbidden",
    ),
    # Paths and methods.
    Case("POST /health", "/health", b"{}", 405, "method_not_allowed"),
    Case("GET /register", "/register", b"", 405, "method_not_allowed", method="GET"),
    Case("PUT /workers", "/workers", b"{}", 405, "method_not_allowed", method="PUT"),
    Case("unknown path", "/register/w1", reg(), 404, "not_found"),
]


async def _two_workers() -> AsyncIterator[Controller]:
    async with running() as api:
        await api.register("w1")
        await api.register("w2")
        yield api


def test_at_least_forty_distinct_cases() -> None:
    assert len({case.id for case in CASES}) == len(CASES) >= 40
    assert len({(case.path, case.body, tuple(case.headers.items())) for case in CASES}) == len(
        CASES
    )


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_malformed_request_is_refused_and_changes_nothing(case: Case) -> None:
    async for api in _two_workers():
        before = api.registry.export_state()
        response = await api.request(
            case.method, case.path, content=case.body, headers=case.headers
        )
        assert response.status_code == case.status, response.text
        body = response.json()
        assert body["error"] == case.error
        assert body["message"]
        if case.error == "invalid_request":
            assert body["detail"] and all(d["message"] for d in body["detail"])
        assert api.registry.export_state() == before


async def _chunks(size: int, count: int, consumed: list[int]) -> AsyncIterator[bytes]:
    yield b'{"worker_id": "'
    for _ in range(count):
        consumed.append(size)
        yield b"a" * size
    yield b'"}'


async def test_huge_declared_body_is_refused_before_reading() -> None:
    consumed: list[int] = []
    async for api in _two_workers():
        before = api.registry.export_state()
        headers = {**JSON, "content-length": str(64 * MIB)}
        response = await api.request(
            "POST", "/register", content=_chunks(MIB, 64, consumed), headers=headers
        )
        assert response.status_code == 413
        assert response.json()["error"] == "request_too_large"
        assert sum(consumed) == 0
        assert api.registry.export_state() == before


async def test_huge_undeclared_body_is_cut_off_while_streaming() -> None:
    consumed: list[int] = []
    async for api in _two_workers():
        before = api.registry.export_state()
        response = await api.request(
            "POST", "/register", content=_chunks(64 * 1024, 1024, consumed), headers=JSON
        )
        assert response.status_code == 413
        assert response.json()["error"] == "request_too_large"
        # Stopped just past the limit, not after the whole 64 MiB.
        assert MIB <= sum(consumed) <= MIB + 64 * 1024
        assert api.registry.export_state() == before


async def test_a_body_just_under_the_limit_is_read() -> None:
    async for api in _two_workers():
        body = registration_payload("w3")
        body["capabilities"][0]["input_schema"] = {"description": "x" * (MIB - 1000)}
        data = json.dumps(body).encode()
        assert len(data) < MIB
        response = await api.request("POST", "/register", content=data, headers=JSON)
        assert response.status_code == 200


async def test_execute_without_the_gateway_says_how_to_serve_it() -> None:
    async with running() as api:
        response = await api.request("POST", "/execute", content=route(), headers=JSON)
        assert response.status_code == 404
        assert response.json() == {
            "error": "not_found",
            "message": "no such path: /execute; "
            "start the controller with --gateway to serve /execute",
        }
        # Any other unknown path is only named.
        other = await api.request("POST", "/executes", content=route(), headers=JSON)
        assert other.json()["message"] == "no such path: /executes"


@pytest.mark.parametrize("path", ["/health", "/ready", "/slos", "/snapshot", "/workers/w1"])
async def test_a_query_parameter_to_an_endpoint_that_takes_none_is_422_naming_each(
    path: str,
) -> None:
    async with running() as api:
        await api.register("w1")
        assert (await api.get(path)).status_code == 200
        response = await api.get(f"{path}?verbose=1&x=2&x=3")
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["error"] == "invalid_request"
        assert [problem["path"] for problem in body["detail"]] == ["verbose", "x"]
        assert f"{path} takes none" in body["message"]


async def test_metrics_the_document_and_the_dashboard_take_the_parameters_others_add() -> None:
    async with running() as api:
        for path in ("/metrics", "/openapi.json", "/ui"):
            assert (await api.get(f"{path}?_=1700000000")).status_code == 200
