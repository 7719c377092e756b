"""The lifespan helpers: a worker registers on startup and deregisters on shutdown."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from crank_worker_client import AgentLifespanMiddleware, WorkerAgent, agent_lifespan
from tests.builders import capability
from tests.client.helpers import FakeController

pytestmark = pytest.mark.anyio

Message = dict[str, Any]


def make_agent(controller: FakeController) -> WorkerAgent:
    return WorkerAgent(
        "https://controller.test",
        "w1",
        "https://w1.test:8443",
        [capability()],
        transport=controller.transport,
        registration_deadline=5.0,
        rng=random.Random(1),
    )


class LifespanDriver:
    """Plays the server's side of the ASGI lifespan protocol."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.to_app, self._app_receive = anyio.create_memory_object_stream[Message](math.inf)
        self._app_send, self.from_app = anyio.create_memory_object_stream[Message](math.inf)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LifespanDriver]:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.app, scope, self._app_receive.receive, self._app_send.send)
            yield self

    async def exchange(self, message_type: str) -> Message:
        await self.to_app.send({"type": message_type})
        return await self.from_app.receive()


async def test_starlette_lifespan_registers_and_deregisters() -> None:
    controller = FakeController()
    agent = make_agent(controller)
    app = Starlette(lifespan=agent_lifespan(agent))
    async with app.router.lifespan_context(app):
        assert "w1" in controller.registry
        assert agent.status.registered
        await anyio.sleep(3.0)
    assert "w1" not in controller.registry
    assert controller.paths()[0] == "/register" and controller.paths()[-1] == "/deregister"
    assert controller.paths().count("/heartbeat") >= 3


async def test_a_factory_gives_a_fresh_agent_per_startup() -> None:
    controller = FakeController()
    made: list[WorkerAgent] = []

    def factory() -> WorkerAgent:
        made.append(make_agent(controller))
        return made[-1]

    app = Starlette(lifespan=agent_lifespan(factory))
    for _ in range(2):
        async with app.router.lifespan_context(app):
            assert "w1" in controller.registry
    assert len(made) == 2 and made[0] is not made[1]
    assert "w1" not in controller.registry


async def test_middleware_runs_the_agent_for_an_app_without_lifespan() -> None:
    controller = FakeController()

    async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError("only http here")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"pong"})

    app = AgentLifespanMiddleware(bare_app, make_agent(controller))
    async with LifespanDriver(app).running() as server:
        assert (await server.exchange("lifespan.startup"))["type"] == "lifespan.startup.complete"
        assert "w1" in controller.registry
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://w"
        ) as http:
            assert (await http.get("/ping")).text == "pong"
        assert (await server.exchange("lifespan.shutdown"))["type"] == "lifespan.shutdown.complete"
    assert "w1" not in controller.registry


async def test_middleware_registers_after_the_apps_startup_and_leaves_before_its_shutdown() -> None:
    controller = FakeController()
    seen: list[str] = []

    @contextlib.asynccontextmanager
    async def own_lifespan(app: Starlette) -> AsyncIterator[None]:
        seen.append(f"app starting, registered={'w1' in controller.registry}")
        yield
        seen.append(f"app stopping, registered={'w1' in controller.registry}")

    async def health(request: Any) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    inner = Starlette(routes=[Route("/health", health)], lifespan=own_lifespan)
    app = AgentLifespanMiddleware(inner, make_agent(controller))
    async with LifespanDriver(app).running() as server:
        assert (await server.exchange("lifespan.startup"))["type"] == "lifespan.startup.complete"
        seen.append(f"serving, registered={'w1' in controller.registry}")
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://w"
        ) as http:
            assert (await http.get("/health")).json() == {"status": "ok"}
        assert (await server.exchange("lifespan.shutdown"))["type"] == "lifespan.shutdown.complete"
    assert seen == [
        "app starting, registered=False",
        "serving, registered=True",
        "app stopping, registered=False",
    ]


async def test_a_failed_registration_fails_the_startup_and_shuts_the_app_down() -> None:
    controller = FakeController()
    controller.fault = "down"
    stopped: list[bool] = []

    @contextlib.asynccontextmanager
    async def own_lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        stopped.append(True)

    app = AgentLifespanMiddleware(Starlette(lifespan=own_lifespan), make_agent(controller))
    async with LifespanDriver(app).running() as server:
        reply = await server.exchange("lifespan.startup")
    assert reply["type"] == "lifespan.startup.failed"
    assert "could not register worker 'w1'" in reply["message"]
    assert stopped == [True]


async def test_the_apps_own_startup_failure_is_passed_on_without_registering() -> None:
    controller = FakeController()

    @contextlib.asynccontextmanager
    async def broken_lifespan(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("database unreachable")
        yield

    app = AgentLifespanMiddleware(Starlette(lifespan=broken_lifespan), make_agent(controller))
    async with LifespanDriver(app).running() as server:
        reply = await server.exchange("lifespan.startup")
    assert reply["type"] == "lifespan.startup.failed"
    assert "database unreachable" in reply["message"]
    assert controller.calls == []
