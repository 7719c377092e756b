"""The gateway over real sockets and mutual TLS: a refused port, then a real worker."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config

from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, create_app
from crank_registry_asgi.certs import write_development_certificates
from crank_registry_asgi.gateway import GatewayConfig, create_gateway_app, gateway_ssl_context
from tests.gateway.helpers import POLICY, client_of, execute, hello, register, serving

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    write_development_certificates(directory, workers=["real"])
    return directory


def closed_port() -> int:
    """A loopback port that nothing listens on (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def real_worker(certs: Path) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.certfile = str(certs / "worker-real.pem")
    config.keyfile = str(certs / "worker-real.key")
    config.ca_certs = str(certs / "ca.pem")
    config.verify_mode = ssl.CERT_REQUIRED
    stop = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(
            lambda: serve(serving({("greet", "hello"): hello}), config, shutdown_trigger=stop.wait)
        )  # type: ignore[arg-type]
        yield f"https://127.0.0.1:{port}"
        stop.set()


def gateway_app(certs: Path, *, with_client_certificate: bool = True) -> object:
    tls = gateway_ssl_context(
        ca_certs=str(certs / "ca.pem"),
        certfile=str(certs / "controller.pem") if with_client_certificate else None,
        keyfile=str(certs / "controller.key") if with_client_certificate else None,
    )
    controller = create_app(config=ServiceConfig(policy=POLICY), clock=FakeClock())
    return create_gateway_app(controller, GatewayConfig(timeout=10.0), tls=tls)


async def test_fails_over_from_a_refused_port_to_a_worker_over_mtls(
    certs: Path, real_worker: str
) -> None:
    app = gateway_app(certs)
    async with client_of(app) as client:  # type: ignore[arg-type]
        await register(client, "dead", f"https://127.0.0.1:{closed_port()}")
        await register(client, "real", real_worker)
        response = await execute(client, {"name": "TLS"})
    assert response.status_code == 200, response.text
    assert response.json() == {"result": {"greeting": "Hello, TLS!"}}
    assert response.headers["x-crank-worker-id"] == "real"
    assert response.headers["x-crank-attempts"] == "2"


async def test_a_worker_refuses_a_gateway_without_a_client_certificate(
    certs: Path, real_worker: str
) -> None:
    app = gateway_app(certs, with_client_certificate=False)
    async with client_of(app) as client:  # type: ignore[arg-type]
        await register(client, "real", real_worker)
        response = await execute(client)
    # TLS 1.3 reports the missing certificate after the handshake, once the
    # request is on its way: the gateway must not assume it is safe to retry.
    assert response.status_code == 502
    assert response.json()["error"] == "worker_failed"
    assert response.json()["worker_id"] == "real"


async def test_only_refused_ports_is_worker_failed(certs: Path) -> None:
    app = gateway_app(certs)
    async with client_of(app) as client:  # type: ignore[arg-type]
        await register(client, "dead1", f"https://127.0.0.1:{closed_port()}")
        await register(client, "dead2", f"https://127.0.0.1:{closed_port()}")
        response = await execute(client)
    assert response.status_code == 502
    assert [a["worker_id"] for a in response.json()["attempts"]] == ["dead1", "dead2"]
