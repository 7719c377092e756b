"""The document's worker_url pattern agrees with what the service accepts."""

from __future__ import annotations

import re

import pytest

from crank_registry import ValidationError, WorkerRecord, structure
from crank_registry_asgi.openapi import openapi_document


def _pattern() -> re.Pattern[str]:
    schemas = openapi_document()["components"]["schemas"]
    return re.compile(schemas["Registration"]["properties"]["worker_url"]["pattern"])


def _service_accepts(url: str) -> bool:
    try:
        structure(
            {
                "worker_id": "w1",
                "worker_url": url,
                "capabilities": [
                    {
                        "name": "n",
                        "verb": "v",
                        "version": "1.0.0",
                        "input_schema": {},
                        "output_schema": {},
                        "requires_gpu": False,
                        "max_concurrency": 1,
                    }
                ],
                "last_heartbeat": 0.0,
            },
            WorkerRecord,
        )
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:18443",
        "https://localhost:65535/x",
        "http://worker-1.internal:8080/api/v1",
        "https://w1",
    ],
)
def test_document_admits_urls_the_service_accepts(url: str) -> None:
    assert _service_accepts(url)
    assert _pattern().fullmatch(url)


@pytest.mark.parametrize("url", ["https://h:65536", "https://h:0", "ftp://h", "https://"])
def test_document_refuses_urls_the_service_refuses(url: str) -> None:
    assert not _service_accepts(url)
    assert not _pattern().fullmatch(url)
