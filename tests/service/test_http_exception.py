"""Starlette's HTTP exceptions become JSON errors with stable codes."""

from __future__ import annotations

import json

import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request

from crank_registry_asgi.app import _http_exception


def _request(path: str) -> Request:
    return Request(
        {"type": "http", "method": "PUT", "path": path, "headers": [], "query_string": b""}
    )


@pytest.mark.anyio
async def test_a_status_other_than_404_or_405_keeps_one_stable_code() -> None:
    answer = await _http_exception(_request("/x"), HTTPException(418, "I'm a teapot"))
    assert answer.status_code == 418
    assert json.loads(bytes(answer.body)) == {"error": "http_error", "message": "I'm a teapot"}


@pytest.mark.anyio
async def test_405_names_the_allowed_methods() -> None:
    answer = await _http_exception(
        _request("/health"), HTTPException(405, headers={"Allow": "GET"})
    )
    body = json.loads(bytes(answer.body))
    assert (answer.status_code, body["error"]) == (405, "method_not_allowed")
    assert "allowed: GET" in body["message"]
