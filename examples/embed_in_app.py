"""The registry mounted inside another Starlette application.

``app`` is an ordinary Starlette app with its own routes; the registry lives
under ``/registry`` (with the gateway's ``/registry/execute``), and the host
app's lifespan runs the registry's (the sweeper; the journal when a
``state_dir`` is configured). Serve it with any ASGI server, for example::

    hypercorn examples.embed_in_app:app --bind 127.0.0.1:8000

or run ``python -m examples.embed_in_app`` to drive it in-process: a worker
registers, a caller routes and lists, and the host app's own page answers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from crank_registry import CapabilitySchema, HealthPolicy, unstructure
from crank_registry_asgi import ServiceConfig, create_app, create_gateway_app

registry_app = create_gateway_app(
    create_app(
        config=ServiceConfig(
            policy=HealthPolicy(heartbeat_interval=10, unhealthy_after=30, evict_after=60)
        )
    )
)


async def home(request: Request) -> JSONResponse:
    """The host application's own page, with a figure from the registry."""
    total, routable = registry_app.state.service.registry.counts(
        now=registry_app.state.service.clock()
    )
    return JSONResponse({"app": "my shop", "registry": {"workers": total, "routable": routable}})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """The host app's lifespan, which runs the registry's.

    A mounted app's lifespan does not run by itself: it is run from here.
    """
    async with registry_app.router.lifespan_context(registry_app):
        yield


app = Starlette(
    routes=[Route("/", home), Mount("/registry", app=registry_app)],
    lifespan=lifespan,
)


async def main() -> None:
    """Drive the host app in-process: register, route, list, and its own page."""
    capability = CapabilitySchema(
        name="markdown_to_html",
        verb="convert",
        version="1.0.0",
        input_schema={"type": "object"},
        output_schema={"type": "object"},
        requires_gpu=False,
        max_concurrency=8,
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            registered = await client.post(
                "/registry/register",
                json={
                    "worker_id": "docs-1",
                    "worker_url": "https://10.0.0.5:8443",
                    "capabilities": unstructure([capability]),
                },
            )
            print("POST /registry/register ->", registered.status_code, registered.json())
            routed = await client.post(
                "/registry/route", json={"verb": "convert", "capability": "markdown_to_html"}
            )
            print("POST /registry/route    ->", routed.status_code, routed.json())
            listed = await client.get("/registry/capabilities")
            print("GET  /registry/capabilities ->", listed.status_code, listed.json())
            missing = await client.post(
                "/registry/route", json={"verb": "convert", "capability": "pdf"}
            )
            print("POST /registry/route (pdf) ->", missing.status_code, missing.json())
            home_page = await client.get("/")
            print("GET  /                  ->", home_page.status_code, home_page.json())


if __name__ == "__main__":
    anyio.run(main)
