"""Every answer of the real app, one of each endpoint and error code, agrees with the document.

The document is generated from the core's answer models; these answers are
built from the same models by the endpoints. Each is validated with
``jsonschema`` against the schema the document gives for its status
(:func:`~tests.service.helpers.check_documented`), and read back into its
model with the converter, as the worker client reads it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from openapi_spec_validator import validate

from crank_registry import (
    CapabilitiesAnswer,
    DeregisterAnswer,
    DrainAnswer,
    ErrorAnswer,
    HealthAnswer,
    HeartbeatAnswer,
    RateLimit,
    ReadyAnswer,
    RegisterAnswer,
    SlosAnswer,
    SnapshotAnswer,
    WatchAnswer,
    WorkerEndpoint,
    WorkerEntry,
    WorkersAnswer,
    structure,
    unstructure,
)
from crank_registry_asgi import ServiceConfig
from crank_registry_asgi.openapi import ERRORS, OPERATIONS, openapi_document
from tests.builders import registration_payload
from tests.service.helpers import (
    CertificateAuthority,
    check_documented,
    documented_path,
    dumps,
    running,
)

pytestmark = pytest.mark.anyio

_MODELS: dict[str, type[Any]] = {
    "/health": HealthAnswer,
    "/ready": ReadyAnswer,
    "/register": RegisterAnswer,
    "/heartbeat": HeartbeatAnswer,
    "/deregister": DeregisterAnswer,
    "/workers/{worker_id}/drain": DrainAnswer,
    "/workers/{worker_id}/undrain": DrainAnswer,
    "/route": WorkerEndpoint,
    "/capabilities": CapabilitiesAnswer,
    "/workers": WorkersAnswer,
    "/workers/{worker_id}": WorkerEntry,
    "/slos": SlosAnswer,
    "/snapshot": SnapshotAnswer,
    "/watch": WatchAnswer,
}


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(openapi_document())


async def _stalled() -> AsyncIterator[bytes]:
    """A request body that stops after its first byte."""
    yield b"{"
    await anyio.sleep_forever()


async def _answers(state_dir: Path) -> list[tuple[str, str, httpx.Response]]:
    """One real answer of every endpoint and every error code."""
    answers: list[tuple[str, str, httpx.Response]] = []

    async def send(
        api: Any, method: str, path: str, *, template: str | None = None, **kwargs: Any
    ) -> None:
        response = await api.client.request(method, path, **kwargs)
        answers.append((method, template or documented_path(path.partition("?")[0]), response))

    drain = "/workers/{worker_id}/drain"
    undrain = "/workers/{worker_id}/undrain"

    json = {"content-type": "application/json"}
    route = {"verb": "classify", "capability": "image.classify"}
    async with running(ServiceConfig(max_body_bytes=4096)) as api:
        await send(api, "GET", "/health")
        await send(api, "GET", "/ready")
        await send(api, "POST", "/route", json=route)  # unknown_capability
        await send(api, "POST", "/register", json=registration_payload("w1"))
        await send(api, "POST", "/heartbeat", json={"worker_id": "w1"})
        load = {"in_flight": 2, "latency_p95_ms": 40.5, "error_rate": 0.01}
        await send(api, "POST", "/heartbeat", json={"worker_id": "w1", "load": load})
        await send(api, "POST", "/route", json=route)
        await send(api, "POST", "/route", json={**route, "strategy": "least_loaded"})
        asking_as = {**route, "requester_identity": "spiffe://crank.local/caller"}
        await send(api, "POST", "/route", json=asking_as)  # forbidden: not a trusted gateway
        explained = {**route, "version": ">=1.2,<2", "budget_tokens": 5, "explain": True}
        await send(api, "POST", "/route", json=explained)  # no_worker_available, explained
        await send(api, "POST", "/route", json={**route, "explain": True})
        await send(api, "POST", "/workers/w1/drain", template=drain)
        await send(api, "POST", "/workers/w1/drain", template=drain)  # changed: false
        await send(api, "GET", "/workers")  # draining
        await send(api, "POST", "/route", json={**route, "explain": True})  # removed: draining
        await send(api, "POST", "/workers/w1/undrain", template=undrain)
        await send(api, "POST", "/workers/nobody/drain", template=drain)  # worker_not_registered
        await send(api, "POST", "/workers/a%20b/drain", template=drain)  # invalid_request
        await send(api, "GET", "/capabilities")
        await send(api, "GET", "/workers")
        await send(api, "GET", "/workers/w1")
        await send(api, "GET", "/workers/nobody")  # worker_not_registered
        await send(api, "GET", "/openapi.json")
        await send(api, "GET", "/metrics")
        for path in ("/ui", "/ui/app.js", "/ui/style.css"):
            await send(api, "GET", path)
        await send(api, "GET", "/snapshot")
        await send(api, "GET", "/watch?since=0&timeout=1")
        await send(api, "GET", "/watch?since=99")  # revision_reset
        api.advance(61)  # w1 silent past unhealthy_after: known, not routable
        await send(api, "POST", "/route", json=route)  # no_worker_available
        await send(api, "POST", "/deregister", json={"worker_id": "w1"})
        await send(api, "POST", "/heartbeat", json={"worker_id": "w1"})  # worker_not_registered
        await send(api, "POST", "/register", json={"worker_id": ""})  # invalid_request
        await send(api, "POST", "/register", content=b"{", headers=json)  # invalid_json
        await send(api, "POST", "/register", content=b"{}", headers={"content-type": "text/plain"})
        await send(api, "POST", "/register", content=dumps("x" * 5000), headers=json)
        await send(api, "GET", "/nowhere")  # not_found
        await send(api, "GET", "/route")  # method_not_allowed
    # Identities from a trusted proxy's header; a request without it has none.
    proxied = ServiceConfig(
        require_identity=True,
        proxy_cert_header="x-client-cert",
        proxy_cert_authorities=[CertificateAuthority().certificate],
    )
    async with running(proxied) as api:
        await send(api, "POST", "/heartbeat", json={"worker_id": "w1"})  # forbidden
        await send(api, "POST", "/workers/w1/drain", template=drain)  # forbidden
    policy = state_dir / "policy.toml"
    policy.write_text('default = "deny"\n')
    async with running(ServiceConfig(policy_file=policy)) as api:
        await send(api, "POST", "/register", json=registration_payload("w1"))
        await send(api, "POST", "/route", json={**route, "explain": True})  # policy_denied
        await send(api, "POST", "/route", json=route)  # policy_denied, no explain
        denied_for = {**route, "requester_identity": "spiffe://crank.local/client/c"}
        await send(api, "POST", "/route", json=denied_for)  # forbidden, no worker_id
    async with running(ServiceConfig(feed_window=1)) as api:
        await send(api, "POST", "/register", json=registration_payload("w1"))
        await send(api, "POST", "/register", json=registration_payload("w2"))
        await send(api, "GET", "/watch?since=0")  # revision_compacted
    async with running(ServiceConfig(request_read_timeout=0.05)) as api:
        await send(api, "POST", "/route", content=_stalled(), headers=json)  # request_timeout
    # The SLO files of another state directory, one with every key.
    with_slos = state_dir / "with-slos"
    (with_slos / "slos").mkdir(parents=True)
    (with_slos / "slos" / "classify.yaml").write_text(
        "verb: classify\ncapability: image.classify\nversion: '>=1.2,<2'\n"
        "latency_p95_ms: 120\navailability: 0.995\nerror_budget_pct: 0.5\n"
    )
    async with running(ServiceConfig(state_dir=with_slos)) as api:
        await send(api, "GET", "/slos")
    async with running(ServiceConfig(rate_limit=RateLimit(1, 1))) as api:
        await send(api, "POST", "/register", json=registration_payload("w1"))
        await send(api, "POST", "/route", json=route)
        await send(api, "POST", "/route", json=route)  # rate_limited
    async with running(ServiceConfig(state_dir=state_dir), lifespan=False) as api:
        await send(api, "POST", "/register", json=registration_payload("w1"))  # journal_unavailable
        await send(api, "GET", "/ready")  # not_ready
    # The shared registry's store, not open (no Redis needed): store_unavailable; and
    # as it is after meeting a newer format in the stream (tests/redis test it for real).
    shared = ServiceConfig(redis_url="redis://127.0.0.1:1/0")
    async with running(shared, lifespan=False) as api:
        await send(api, "POST", "/register", json=registration_payload("w1"))  # store_unavailable
        await send(api, "POST", "/workers/w1/undrain", template=undrain)  # store_unavailable
        api.service.store.incompatible = 99
        await send(api, "POST", "/register", json=registration_payload("w1"))  # incompatible_peer
    return answers


async def test_every_answer_agrees_with_the_document_and_its_model(tmp_path: Path) -> None:
    answers = await _answers(tmp_path)
    codes: set[str] = set()
    paths: set[str] = set()
    for method, path, response in answers:
        body = check_documented(method, path, response)
        if response.status_code == 200:
            paths.add(path)
            model = _MODELS.get(path)
            if model is not None:
                assert unstructure(structure(body, model)) == body
        else:
            codes.add(body["error"])
            assert unstructure(structure(body, ErrorAnswer)) == body
    assert paths == {operation.path for operation in OPERATIONS}
    assert codes == set(ERRORS)


async def test_an_answer_outside_its_schema_is_caught(tmp_path: Path) -> None:
    # The check above could not pass with an answer the document does not describe.
    for method, path, response in await _answers(tmp_path):
        if path == "/route" and response.status_code == 200:
            body = {**response.json(), "extra": 1}
            with pytest.raises(Exception, match="Additional properties"):
                check_documented(method, path, httpx.Response(200, json=body))
            return
    raise AssertionError("no routed answer")
