"""Certificates renewed while a real ``crank-registry serve`` and a ``WorkerAgent`` run.

The controller checks its files every 0.2 s (``--cert-watch-interval``), the
agent every 0.2 s too; every wait has a generous deadline and ends as soon
as what it waits for is seen.
"""

from __future__ import annotations

import datetime
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from crank_registry_asgi import certs
from crank_worker_client import (
    AgentState,
    ClientCertificateRequired,
    ControllerClient,
    RegistrationFailed,
    TLSConfig,
    WorkerAgent,
)
from tests.builders import capability
from tests.cli.helpers import ServerProcess, client_context, free_port, serving
from tests.client.test_certificate_files import handshake

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

WATCH = 0.2
INTERVAL = 0.5
DEADLINE = 30.0


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def presented_serial(port: int, context: ssl.SSLContext) -> int:
    """The serial of the certificate the server presents to a new connection."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def eventually(condition: Callable[[], bool], what: str, server: ServerProcess) -> None:
    with anyio.move_on_after(DEADLINE):
        while not condition():
            assert server.process.poll() is None, f"the server exited:\n{server.log()}"
            await anyio.sleep(0.05)
        return
    pytest.fail(f"{what} not seen in {DEADLINE} s:\n{server.log()}")


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    certs.write_development_certificates(out, workers=["w1", "probe"])
    return out


def serve_args(pki: Path, port: int, tmp_path: Path, *extra: str) -> list[str]:
    return [
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
        *extra,
    ]


@pytest.fixture
def controller(pki: Path, tmp_path: Path) -> Iterator[tuple[ServerProcess, int]]:
    port = free_port()
    args = serve_args(pki, port, tmp_path, "--cert-watch-interval", str(WATCH))
    args += ["--heartbeat-interval", str(INTERVAL)]
    args += ["--unhealthy-after", str(4 * INTERVAL), "--evict-after", str(8 * INTERVAL)]
    probe = client_context(pki / "ca.pem", pki / "worker-probe.pem", pki / "worker-probe.key")
    with serving(args, tmp_path / "serve.log", port=port, scheme="https", verify=probe) as server:
        yield server, port


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_renewed_certificates_are_used_without_a_restart(
    controller: tuple[ServerProcess, int], pki: Path
) -> None:
    server, port = controller
    probe = client_context(pki / "ca.pem", pki / "worker-probe.pem", pki / "worker-probe.key")
    tls = TLSConfig(
        ca_certs=pki / "ca.pem", certfile=pki / "worker-w1.pem", keyfile=pki / "worker-w1.key"
    )
    old_controller = serial_of(pki / "controller.pem")
    old_worker = serial_of(pki / "worker-w1.pem")
    assert await anyio.to_thread.run_sync(presented_serial, port, probe) == old_controller
    # A connection opened before the renewal, kept alive across it.
    kept = httpx.Client(verify=probe, base_url=server.url)
    assert kept.get("/health").status_code == 200
    assert controller_expiry_gauge(kept) == not_after_of(pki / "controller.pem")

    async with WorkerAgent(
        server.url,
        "w1",
        "https://127.0.0.1:8443",
        [capability()],
        tls=tls,
        certificate_watch_interval=WATCH,
    ) as agent:
        files = agent.certificates
        assert files is not None
        certs.write_development_certificates(pki, workers=[])  # the controller's, same CA
        certs.renew_worker_certificate(pki, "w1")
        new_controller = serial_of(pki / "controller.pem")
        new_worker = serial_of(pki / "worker-w1.pem")
        assert new_controller != old_controller and new_worker != old_worker

        async def serial_now() -> int:
            return await anyio.to_thread.run_sync(presented_serial, port, probe)

        with anyio.move_on_after(DEADLINE):
            while await serial_now() != new_controller:
                await anyio.sleep(0.05)
        assert await serial_now() == new_controller, server.log()
        await eventually(lambda: files.reloads >= 1, "the worker's reload", server)

        # New connections from the agent present the renewed certificate.
        controller_side = ssl.create_default_context(
            ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem")
        )
        controller_side.load_cert_chain(str(pki / "controller.pem"), str(pki / "controller.key"))
        controller_side.verify_mode = ssl.CERT_REQUIRED
        assert handshake(files.context, controller_side) == (
            new_controller,
            new_worker,
        )

        # The agent goes on heartbeating, without registering again.
        renewed_at = agent.status.last_heartbeat_at
        assert renewed_at is not None
        await eventually(
            lambda: (agent.status.last_heartbeat_at or 0) > renewed_at + 2 * INTERVAL,
            "heartbeats after the renewal",
            server,
        )
        assert agent.status.state is AgentState.REGISTERED
        assert agent.status.registrations == 1

    # The connection opened before the renewal still works; nothing restarted.
    assert kept.get("/health").status_code == 200
    # /metrics shows the expiry of the certificate now in use.
    assert controller_expiry_gauge(kept) == not_after_of(pki / "controller.pem")
    kept.close()
    assert server.process.poll() is None
    log = server.log()
    assert log.count("starting on https://") == 1
    assert "controller certificate reloaded from" in log
    assert "not reloaded" not in log


async def test_a_client_without_a_certificate_is_told_the_controller_requires_one(
    controller: tuple[ServerProcess, int], pki: Path
) -> None:
    server, _ = controller
    async with ControllerClient(server.url, tls=TLSConfig(ca_certs=pki / "ca.pem")) as client:
        with pytest.raises(ClientCertificateRequired) as raised:
            await client.health()
    message = str(raised.value)
    assert f"the controller at {server.url} requires a client certificate" in message
    assert "this client has none" in message and "certfile=" in message

    # A worker agent gives up at once, with the same reason, instead of retrying.
    agent = WorkerAgent(
        server.url,
        "w1",
        "https://127.0.0.1:8443",
        [capability()],
        tls=TLSConfig(ca_certs=pki / "ca.pem"),
        registration_deadline=DEADLINE,
    )
    with anyio.fail_after(DEADLINE / 2), pytest.raises(RegistrationFailed) as failed:
        async with agent:
            pytest.fail("registered without a client certificate")
    assert isinstance(failed.value.__cause__, ClientCertificateRequired)
    assert "requires a client certificate" in str(failed.value)


async def test_serve_warns_when_its_certificate_expires_within_the_warning_window(
    pki: Path, tmp_path: Path
) -> None:
    authority = certs.read_authority(pki / "ca.pem", pki / "ca.key")
    now = datetime.datetime.now(datetime.UTC)
    expiring = certs.make_controller_certificate(
        authority, not_after=now + datetime.timedelta(days=3)
    )
    expiring.write(pki / "controller.pem", pki / "controller.key")
    port = free_port()
    probe = client_context(pki / "ca.pem", pki / "worker-probe.pem", pki / "worker-probe.key")
    args = serve_args(pki, port, tmp_path, "--cert-expiry-warning-days", "7")
    with serving(args, tmp_path / "serve.log", port=port, scheme="https", verify=probe) as server:
        log = server.log()
    [line] = [line for line in log.splitlines() if "expires at" in line]
    assert " WARNING crank_registry_asgi.rotation controller certificate " in line
    assert f"{pki / 'controller.pem'} expires at " in line
    assert "in 3.0 days: renew it (crank-registry certs --renew)" in line


def controller_expiry_gauge(client: httpx.Client) -> float:
    """The controller's certificate expiry as its /metrics shows it."""
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "crank_certificate_expiry_timestamp_seconds" and sample.labels == {
                "certificate": "controller"
            }:
                return sample.value
    raise AssertionError(f"no controller certificate expiry in /metrics:\n{text}")


def not_after_of(path: Path) -> float:
    """A certificate file's notAfter, in seconds since 1970."""
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    return certificate.not_valid_after_utc.timestamp()
