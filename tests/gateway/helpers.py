"""A controller with its gateway in-process, and workers behind a scriptable network."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import httpx
from starlette.applications import Starlette

from crank_registry import CapabilitySchema, HealthPolicy
from crank_registry_asgi import ServiceConfig, create_app
from crank_registry_asgi.gateway import GatewayConfig, create_gateway_app
from crank_worker_client.serving import Handler, invocation_app
from tests.builders import capability

POLICY = HealthPolicy(heartbeat_interval=1.0, unhealthy_after=3.0, evict_after=6.0)


@attrs.define
class FakeWorker:
    """A worker host: an invocation app, or a network failure instead of it.

    ``failure`` (the exception class raised when the gateway connects or
    after it sent the request) models what a real network does:
    ``httpx.ConnectError`` is a refused connection.
    """

    app: Any = None
    failure: type[httpx.TransportError] | None = None
    received: list[Any] = attrs.Factory(list)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.failure in (httpx.ConnectError, httpx.ConnectTimeout):
            raise self.failure("scripted", request=request)
        self.received.append(json.loads(request.content))
        if self.failure is not None:
            raise self.failure("scripted", request=request)
        return await httpx.ASGITransport(app=self.app).handle_async_request(request)


class WorkerNetwork(httpx.AsyncBaseTransport):
    """Routes each request to the :class:`FakeWorker` named by its host.

    ``closed`` counts how often the client holding it closed it.
    """

    def __init__(self) -> None:
        self.hosts: dict[str, FakeWorker] = {}
        self.requests: list[httpx.Request] = []
        self.closed = 0

    def add(self, host: str, worker: FakeWorker) -> FakeWorker:
        self.hosts[host] = worker
        return worker

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        worker = self.hosts.get(request.url.host)
        if worker is None:
            raise httpx.ConnectError("no such host", request=request)
        return await worker.handle(request)

    async def aclose(self) -> None:
        self.closed += 1


def serving(handlers: dict[tuple[str, str], Handler]) -> Any:
    return invocation_app(handlers, [capability(verb=v, name=n) for v, n in handlers])


async def hello(payload: dict[str, Any]) -> dict[str, Any]:
    return {"greeting": f"Hello, {payload['name']}!"}


def make_gateway(
    network: httpx.AsyncBaseTransport | None,
    clock: Callable[[], float],
    config: GatewayConfig | None = None,
    *,
    max_body_bytes: int = 1_048_576,
) -> Starlette:
    controller = create_app(
        config=ServiceConfig(policy=POLICY, max_body_bytes=max_body_bytes), clock=clock
    )
    return create_gateway_app(controller, config or GatewayConfig(), transport=network)


@contextlib.asynccontextmanager
async def client_of(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://controller") as client:
            yield client


async def register(
    client: httpx.AsyncClient, worker_id: str, url: str, *caps: CapabilitySchema
) -> None:
    from crank_registry import unstructure

    response = await client.post(
        "/register",
        json={
            "worker_id": worker_id,
            "worker_url": url,
            "capabilities": unstructure(list(caps or [capability(verb="greet", name="hello")])),
        },
    )
    assert response.status_code == 200, response.text


async def execute(client: httpx.AsyncClient, payload: Any = None, **fields: Any) -> httpx.Response:
    body = {
        "verb": "greet",
        "capability": "hello",
        "payload": payload if payload is not None else {"name": "Ada"},
    }
    body.update(fields)
    return await client.post("/execute", json=body)
