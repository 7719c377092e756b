"""Starlette's HTTP exceptions become JSON errors with stable codes."""

from __future__ import annotations

import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from tests.service.helpers import running

pytestmark = pytest.mark.anyio


async def test_a_status_other_than_404_or_405_keeps_one_stable_code() -> None:
    async def teapot(request: Request) -> Response:
        raise HTTPException(418, "I'm a teapot")

    async with running() as api:
        # A route of the host's own, raising what Starlette's routing would.
        api.app.add_route("/teapot", teapot)
        answer = await api.client.get("/teapot")
    assert answer.status_code == 418
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {"error": "http_error", "message": "I'm a teapot"}


async def test_405_names_the_allowed_methods() -> None:
    async with running() as api:
        answer = await api.request("PUT", "/health")
    body = answer.json()
    assert (answer.status_code, body["error"]) == (405, "method_not_allowed")
    # Starlette's routing allows HEAD wherever it allows GET, in no fixed order.
    allowed = body["message"].partition("(allowed: ")[2].removesuffix(")")
    assert set(allowed.split(", ")) == {"GET", "HEAD"}
