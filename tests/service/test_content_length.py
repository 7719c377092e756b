"""Content-Length values that are not plain numbers never break an answer."""

from __future__ import annotations

import httpx
import pytest

from crank_registry_asgi import create_app
from crank_worker_client.serving import invocation_app
from tests.builders import capability

# Over int()'s 4300-digit limit; a Latin-1 digit that str.isdigit admits.
ODD_LENGTHS = [(b"9" * 5000, 413), ("\u00b2".encode("latin-1"), None)]


@pytest.mark.anyio
@pytest.mark.parametrize(("declared", "status"), ODD_LENGTHS)
async def test_controller_answers_odd_content_lengths(declared: bytes, status: int | None) -> None:
    app = create_app()
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        headers = {b"content-type": b"application/json", b"content-length": declared}
        registered = await client.post("/register", content=b"{}", headers=headers)
        missing = await client.post("/nope", content=b"{}", headers=headers)
    assert registered.status_code == (status or 422)
    assert registered.json()["error"] == ("request_too_large" if status else "invalid_request")
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")


@pytest.mark.anyio
@pytest.mark.parametrize(("declared", "status"), ODD_LENGTHS)
async def test_worker_answers_odd_content_lengths(declared: bytes, status: int | None) -> None:

    async def echo(payload: object) -> object:
        return payload

    app = invocation_app(
        {("greet", "hello"): echo},
        [capability("hello", "greet", output_schema={}, max_concurrency=1)],
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        headers = {b"content-type": b"application/json", b"content-length": declared}
        answer = await client.post(
            "/invoke/greet/hello", content=b'{"payload": {}}', headers=headers
        )
        missing = await client.post("/nope", content=b"{}", headers=headers)
    assert answer.status_code == (status or 200)
    assert missing.status_code == 404
