"""Answers given before the request body is read, through real servers over real TLS.

A wrong path, method or media type, or a declared size over the limit, is
answered without reading the body. The client must get its JSON answer, the
connection must end cleanly, and the server's log must stay free of
tracebacks: hypercorn 0.18 logs them at ERROR when the client is still
sending after the answer (a TLS shutdown error on HTTP/1.1, a KeyError for a
forgotten HTTP/2 stream).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from crank_registry_asgi import certs
from crank_registry_asgi.server import ServerSettings, serve
from tests.cli.helpers import client_context, free_port, serving

pytestmark = pytest.mark.slow

try:
    import h2  # noqa: F401  (httpx speaks HTTP/2 only with it)
except ImportError:  # pragma: no cover - hypercorn depends on h2
    HTTP_VERSIONS = ["HTTP/1.1"]
else:
    HTTP_VERSIONS = ["HTTP/1.1", "HTTP/2"]

TWO_MIB = b"x" * (2 * 1_048_576)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    authority = certs.make_authority()
    authority.write(out / "ca.pem", out / "ca.key")
    certs.make_controller_certificate(authority).write(
        out / "controller.pem", out / "controller.key"
    )
    certs.make_worker_certificate(authority, "w1").write(
        out / "worker-w1.pem", out / "worker-w1.key"
    )
    return out


def worker_context(pki: Path) -> ssl.SSLContext:
    return client_context(pki / "ca.pem", pki / "worker-w1.pem", pki / "worker-w1.key")


def early_answers(client: httpx.Client, version: str) -> None:
    """Each request answered before its body is read: the right JSON, on ``version``."""
    json_header = {"content-type": "application/json"}
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/nope", {"json": {"a": 1}}, 404, "not_found"),
        ("/health", {"json": {"a": 1}}, 405, "method_not_allowed"),
        (
            "/route",
            {"content": b"a" * 100_000, "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        ("/heartbeat", {"content": TWO_MIB, "headers": json_header}, 413, "request_too_large"),
    ]
    # Twice: a connection kept alive after an early answer must still work.
    for _ in range(2):
        for path, body, status, code in cases:
            answer = client.post(path, **body)
            assert answer.http_version == version, path
            assert (answer.status_code, answer.json()["error"]) == (status, code), answer.text
        assert client.get("/health").status_code == 200


def assert_clean(log: str) -> None:
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert not errors, log


@pytest.mark.parametrize("version", HTTP_VERSIONS)
def test_the_controller_answers_early_without_a_traceback(
    pki: Path, tmp_path: Path, version: str
) -> None:
    port = free_port()
    tls = worker_context(pki)
    args = [
        "--port",
        str(port),
        "--state-dir",
        str(tmp_path / "state"),
        "--certfile",
        str(pki / "controller.pem"),
        "--keyfile",
        str(pki / "controller.key"),
        "--ca-certs",
        str(pki / "ca.pem"),
    ]
    with serving(args, tmp_path / "server.log", port=port, scheme="https", verify=tls) as server:
        http2 = version == "HTTP/2"
        with httpx.Client(
            base_url=server.url, verify=tls, http1=not http2, http2=http2, timeout=10
        ) as client:
            early_answers(client, version)
        assert server.stop() == 0, server.log()
    assert_clean(server.log())


async def never_reads(
    scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
) -> None:
    """Answer 413 at once, without reading the body and without the service's draining."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b'{"error": "request_too_large"}'
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"30")],
        }
    )
    await send({"type": "http.response.body", "body": body})


@pytest.mark.anyio
async def test_the_server_contains_hypercorns_errors_for_an_unread_body(
    pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An app that never reads the body, without the service's draining: on
    # HTTP/2 the client's data then arrives for a stream hypercorn has
    # forgotten (a KeyError in hypercorn 0.18), on HTTP/1.1 the connection
    # is closed while the client sends (a reset, a TLS shutdown error).
    # The client gets its answers and nothing reaches the log.
    caplog.set_level(logging.WARNING)
    port = free_port()
    settings = ServerSettings(
        port=port,
        certfile=pki / "controller.pem",
        keyfile=pki / "controller.key",
        ca_certs=pki / "ca.pem",
    )
    stop = asyncio.Event()
    server = asyncio.create_task(serve(never_reads, settings, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    url = f"https://localhost:{port}"
    tls = worker_context(pki)
    try:
        for _ in range(400):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.025)
            else:
                writer.close()
                break
        if "HTTP/2" in HTTP_VERSIONS:
            async with httpx.AsyncClient(verify=tls, http1=False, http2=True) as client:
                for _ in range(3):
                    answer = await client.post(f"{url}/", content=TWO_MIB)
                    assert answer.http_version == "HTTP/2"
                    assert answer.status_code == 413
                # The connection survived the data for the finished streams.
                assert (await client.post(f"{url}/", content=b"{}")).status_code == 413
        for _ in range(3):
            # A client each: the app does not say `Connection: close`, and
            # hypercorn closes the connection after an unread body.
            async with httpx.AsyncClient(verify=tls) as client:
                # httpx sends the whole body before it reads: hypercorn's
                # close must linger until it has, or the connection is reset
                # under the unread answer.
                answer = await client.post(f"{url}/", content=TWO_MIB)
                assert answer.status_code == 413
        await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)
    problems = [
        f"{record.name}: {record.getMessage()}"
        for record in caplog.records
        if record.levelno >= logging.ERROR
    ]
    assert not problems, problems
