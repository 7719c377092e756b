"""Register on startup, deregister on shutdown: lifespan helpers for ASGI workers.

For Starlette (or any framework that takes a lifespan context factory)::

    app = Starlette(routes=..., lifespan=agent_lifespan(agent))

For any ASGI application, whatever its own lifespan handling::

    app = AgentLifespanMiddleware(app, agent)

``agent`` is a :class:`WorkerAgent` (keep a reference to serve its
``status`` from the worker's health endpoint), any other async context
manager, or a function returning a new one at each startup. The worker
registers after the application's own startup completed (it is ready for
traffic) and deregisters before the application's own shutdown begins (no
new traffic while it winds down). A registration that fails at startup
fails the startup with the reason, so the server exits instead of serving
unregistered.

Servers run the lifespan shutdown when they stop accepting requests; some
(hypercorn) only after every open connection has closed, so an idle
keep-alive connection can delay the deregistration by the server's graceful
timeout. A worker that must leave the registry the moment it is told to stop
can instead run ``async with agent:`` around the server itself.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["AgentLifespanMiddleware", "agent_lifespan"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Agent = contextlib.AbstractAsyncContextManager[Any]
AgentSource = Agent | Callable[[], Agent]

# What the wrapped application's lifespan task reports when it ends.
_INNER_RETURNED = "crank.inner_returned"


def _agent_from(source: AgentSource) -> Agent:
    # AbstractAsyncContextManager matches any object with __aenter__ and __aexit__.
    return source if isinstance(source, contextlib.AbstractAsyncContextManager) else source()


def agent_lifespan(
    agent: AgentSource,
) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """A lifespan for ``Starlette(lifespan=...)``: the agent runs while the app does."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with _agent_from(agent):
            yield

    return lifespan


class AgentLifespanMiddleware:
    """Wrap an ASGI application so that a :class:`WorkerAgent` runs with its lifespan.

    The agent is entered after the application's startup and left before
    its shutdown, also when the lifespan is cancelled while running (the
    server stopping hard): the worker deregisters either way.

    Requests and websockets pass through untouched. The wrapped
    application's own lifespan (if it has one) still runs: its startup before
    the registration, its shutdown after the deregistration.
    """

    def __init__(self, app: ASGIApp, agent: AgentSource) -> None:
        self.app = app
        self.agent = agent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry point."""
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        to_inner_send, to_inner_receive = anyio.create_memory_object_stream[Message](math.inf)
        from_inner_send, from_inner_receive = anyio.create_memory_object_stream[Message](math.inf)
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._run_inner, scope, to_inner_receive, from_inner_send)
            try:
                await self._lifespan(receive, send, to_inner_send, from_inner_receive)
            finally:
                task_group.cancel_scope.cancel()

    async def _run_inner(
        self,
        scope: Scope,
        to_inner: MemoryObjectReceiveStream[Message],
        from_inner: MemoryObjectSendStream[Message],
    ) -> None:
        error: Exception | None = None
        try:
            await self.app(scope, to_inner.receive, from_inner.send)
        except Exception as exc:  # an application without lifespan support may raise
            error = exc
        await from_inner.send({"type": _INNER_RETURNED, "error": error})

    async def _lifespan(
        self,
        receive: Receive,
        send: Send,
        to_inner: MemoryObjectSendStream[Message],
        from_inner: MemoryObjectReceiveStream[Message],
    ) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            raise RuntimeError(f"expected lifespan.startup, got {message['type']!r}")
        await to_inner.send(message)
        reply = await from_inner.receive()
        if reply["type"] == "lifespan.startup.failed":
            await send(reply)
            return
        # An application that ends (or raises) before completing its startup
        # does not support lifespan; the agent still runs.
        inner_has_lifespan = reply["type"] == "lifespan.startup.complete"

        agent = _agent_from(self.agent)
        try:
            await agent.__aenter__()
        except Exception as error:
            if inner_has_lifespan:
                await self._shut_inner_down(to_inner, from_inner)
            await send({"type": "lifespan.startup.failed", "message": str(error)})
            return
        try:
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
        except BaseException as error:
            await agent.__aexit__(type(error), error, error.__traceback__)
            raise
        await agent.__aexit__(None, None, None)
        if message["type"] != "lifespan.shutdown":
            raise RuntimeError(f"expected lifespan.shutdown, got {message['type']!r}")
        if inner_has_lifespan:
            await send(await self._shut_inner_down(to_inner, from_inner))
        else:
            await send({"type": "lifespan.shutdown.complete"})

    @staticmethod
    async def _shut_inner_down(
        to_inner: MemoryObjectSendStream[Message],
        from_inner: MemoryObjectReceiveStream[Message],
    ) -> Message:
        await to_inner.send({"type": "lifespan.shutdown"})
        reply = await from_inner.receive()
        if reply["type"] == _INNER_RETURNED:
            # It ended without answering the shutdown: report what it raised.
            error = reply["error"]
            if error is None:
                return {"type": "lifespan.shutdown.complete"}
            return {"type": "lifespan.shutdown.failed", "message": str(error)}
        return reply
