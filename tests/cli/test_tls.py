"""The client-certificate capture, through a real hypercorn server and real TLS."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import hypercorn.asyncio
import hypercorn.asyncio.run
import pytest
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.config import Config

from crank_registry_asgi import certs, tls
from tests.cli.helpers import client_context, free_port


async def echo_app(
    scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
) -> None:
    """Answer every request with what its scope says about TLS."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = json.dumps(
        {
            "has_tls": "tls" in scope["extensions"],
            "tls": scope["extensions"].get("tls"),
            "http_version": scope["http_version"],
        }
    ).encode()
    # Edit the scope's extension: the next request must not see this.
    if "tls" in scope["extensions"]:
        scope["extensions"]["tls"]["client_cert_chain"].append("tampered")
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    authority = certs.make_authority()
    files: dict[str, Path] = {}
    for stem, certified in [
        ("ca", authority),
        ("controller", certs.make_controller_certificate(authority)),
        ("worker-a", certs.make_worker_certificate(authority, "a")),
        ("worker-b", certs.make_worker_certificate(authority, "b")),
    ]:
        certified.write(tmp_path / f"{stem}.pem", tmp_path / f"{stem}.key")
        files[stem] = tmp_path / f"{stem}.pem"
        files[f"{stem}.key"] = tmp_path / f"{stem}.key"
    return files


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[str]:
    """Serve ``echo_app`` with ``config`` on a free port; yield its base URL."""
    tls.install()
    port = free_port()
    config.bind = [f"127.0.0.1:{port}"]
    config.errorlog = None
    stop = asyncio.Event()
    server = hypercorn.asyncio.serve(echo_app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    task = asyncio.create_task(server)
    scheme = "https" if config.ssl_enabled else "http"
    try:
        for _ in range(400):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.025)
            else:
                writer.close()
                break
        else:
            raise AssertionError("the test server did not start")
        yield f"{scheme}://localhost:{port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def mtls_config(pki: dict[str, Path]) -> Config:
    config = Config()
    config.certfile = str(pki["controller"])
    config.keyfile = str(pki["controller.key"])
    config.ca_certs = str(pki["ca"])
    config.verify_mode = ssl.CERT_REQUIRED
    return config


def worker_context(pki: dict[str, Path], name: str) -> ssl.SSLContext:
    return client_context(pki["ca"], pki[f"worker-{name}"], pki[f"worker-{name}.key"])


@pytest.mark.anyio
async def test_each_request_sees_its_connection_certificate(pki: dict[str, Path]) -> None:
    async with (
        running(mtls_config(pki)) as url,
        httpx.AsyncClient(verify=worker_context(pki, "a")) as as_a,
        httpx.AsyncClient(verify=worker_context(pki, "b")) as as_b,
    ):
        # Interleaved requests on two kept-alive connections.
        answers = await asyncio.gather(
            *[client.get(f"{url}/") for client in (as_a, as_b, as_a, as_b, as_a)]
        )
    expected = {
        "a": pki["worker-a"].read_text(),
        "b": pki["worker-b"].read_text(),
    }
    for answer, name in zip(answers, "ababa", strict=True):
        seen = answer.json()["tls"]
        assert seen["client_cert_chain"] == [expected[name]]
        assert seen["client_cert_name"] == f"CN={name}"
        assert seen["tls_version"] == 0x0304
        assert seen["client_cert_error"] is None


@pytest.mark.anyio
async def test_http2_requests_carry_the_certificate(pki: dict[str, Path]) -> None:
    async with (
        running(mtls_config(pki)) as url,
        httpx.AsyncClient(verify=worker_context(pki, "a"), http2=True) as client,
    ):
        answers = [await client.get(f"{url}/") for _ in range(3)]
    for answer in answers:
        assert answer.http_version == "HTTP/2"
        assert answer.json()["http_version"] == "2"
        assert answer.json()["tls"]["client_cert_chain"] == [pki["worker-a"].read_text()]


@pytest.mark.anyio
async def test_tls_without_client_certificates_has_an_empty_chain(pki: dict[str, Path]) -> None:
    config = Config()
    config.certfile = str(pki["controller"])
    config.keyfile = str(pki["controller.key"])
    # A client certificate offered but not asked for is never sent.
    async with (
        running(config) as url,
        httpx.AsyncClient(verify=worker_context(pki, "a")) as client,
    ):
        seen = (await client.get(f"{url}/")).json()
    assert seen["has_tls"] is True
    assert seen["tls"]["client_cert_chain"] == []
    assert seen["tls"]["client_cert_name"] is None


@pytest.mark.anyio
async def test_plain_http_has_no_tls_extension() -> None:
    async with running(Config()) as url, httpx.AsyncClient() as client:
        seen = (await client.get(f"{url}/")).json()
    assert seen == {"has_tls": False, "tls": None, "http_version": "1.1"}


@pytest.mark.anyio
async def test_a_client_without_a_certificate_is_refused_by_mtls(pki: dict[str, Path]) -> None:
    async with (
        running(mtls_config(pki)) as url,
        httpx.AsyncClient(verify=client_context(pki["ca"])) as client,
    ):
        # TLS 1.3: the client's handshake ends before the server checks its
        # certificate, so the refusal shows as the connection closing.
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await client.get(f"{url}/")


def test_install_is_idempotent_and_replaces_only_hypercorns_own_class() -> None:
    tls.install()
    tls.install()
    assert tls.installed()
    assert hypercorn.asyncio.run.TCPServer is tls.CertificateCapturingTCPServer
    assert issubclass(tls.CertificateCapturingTCPServer, TCPServer)


def test_install_refuses_when_another_hook_is_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    class Other(TCPServer):
        pass

    monkeypatch.setattr(hypercorn.asyncio.run, "TCPServer", Other)
    with pytest.raises(RuntimeError, match="already replaced"):
        tls.install()
    assert hypercorn.asyncio.run.TCPServer is Other


@pytest.mark.parametrize("version", ["0.18.0", "0.18.7"])
def test_supported_hypercorn_versions(version: str) -> None:
    tls.check_hypercorn_version(version)


@pytest.mark.parametrize("version", ["0.17.3", "0.19.0", "1.18.0"])
def test_other_hypercorn_versions_are_refused(version: str) -> None:
    with pytest.raises(ImportError, match=rf"hypercorn {version} is installed"):
        tls.check_hypercorn_version(version)
