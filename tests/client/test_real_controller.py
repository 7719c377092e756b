"""WorkerAgent against a real ``crank-registry serve`` process over mutual TLS, in real time.

The controller is started with ``python -m crank_registry_asgi serve`` and
certificates from ``python -m crank_registry_asgi certs``; the worker agent
presents its client certificate (SPIFFE ID ``.../worker/w1``). Intervals are
short (0.5 s) and every wait has a generous, bounded deadline.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from crank_registry import WorkerEndpoint
from crank_worker_client import (
    ClientCertificateRequired,
    ControllerClient,
    ControllerUnavailable,
    ForbiddenError,
    RegistrationFailed,
    TLSConfig,
    WorkerAgent,
)
from tests.builders import capability
from tests.cli.helpers import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

INTERVAL = 0.5
#: What a process start, a TLS handshake and the scheduler may add on a busy machine.
SLACK = 1.0
START_DEADLINE = 30.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    command = [sys.executable, "-m", "crank_registry_asgi", "certs", "--out", str(out)]
    command += ["--worker", "w1", "--worker", "caller"]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return out


class ControllerProcess:
    """``crank-registry serve`` with mTLS on a fixed port and state directory."""

    def __init__(self, certs: Path, state_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.certs = certs
        self.state_dir = state_dir
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.process is None
        command = [sys.executable, "-m", "crank_registry_asgi", "serve"]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--state-dir", str(self.state_dir)]
        command += ["--certfile", str(self.certs / "controller.pem")]
        command += ["--keyfile", str(self.certs / "controller.key")]
        command += ["--ca-certs", str(self.certs / "ca.pem")]
        command += ["--heartbeat-interval", str(INTERVAL)]
        command += ["--unhealthy-after", str(3 * INTERVAL), "--evict-after", str(6 * INTERVAL)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no deregistration, no journal flush."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def controller(certs: Path, tmp_path: Path) -> Iterator[ControllerProcess]:
    process = ControllerProcess(certs, tmp_path / "state", tmp_path / "controller.log")
    try:
        yield process
    finally:
        process.stop()


def tls_for(certs: Path, name: str) -> TLSConfig:
    return TLSConfig(
        ca_certs=certs / "ca.pem",
        certfile=certs / f"worker-{name}.pem",
        keyfile=certs / f"worker-{name}.key",
    )


async def wait_until_up(client: ControllerClient, controller: ControllerProcess) -> float:
    """Poll /health until the controller answers; the time it first did."""
    with anyio.move_on_after(START_DEADLINE):
        while True:
            assert controller.process is not None
            if controller.process.poll() is not None:
                pytest.fail(f"the controller exited:\n{controller.output()}")
            with contextlib.suppress(ControllerUnavailable):
                await client.health()
                return anyio.current_time()
            await anyio.sleep(0.02)
    pytest.fail(f"no answer from the controller in {START_DEADLINE} s:\n{controller.output()}")


def make_agent(controller: ControllerProcess, certs: Path, **options: object) -> WorkerAgent:
    return WorkerAgent(
        controller.url,
        "w1",
        "https://127.0.0.1:8443",
        [capability()],
        tls=tls_for(certs, "w1"),
        rng=random.Random(1),
        **options,  # type: ignore[arg-type]
    )


async def test_killed_and_restarted_controller_sees_the_worker_healthy_within_an_interval(
    controller: ControllerProcess, certs: Path
) -> None:
    controller.start()
    async with ControllerClient(controller.url, tls=tls_for(certs, "caller")) as client:
        await wait_until_up(client, controller)
        agent = make_agent(controller, certs)
        async with agent:
            assert await client.route("classify", "image.classify") == WorkerEndpoint(
                "w1", "https://127.0.0.1:8443", "1.0.0"
            )
            await anyio.sleep(2 * INTERVAL)
            controller.kill()
            controller.start()
            up_at = await wait_until_up(client, controller)
            with anyio.fail_after(INTERVAL * 1.1 + SLACK):
                while True:
                    workers = {w.worker_id: w for w in await client.workers()}
                    # "healthy", not "unverified": the worker re-registered.
                    if "w1" in workers and workers["w1"].state.value == "healthy":
                        break
                    await anyio.sleep(0.02)
            healthy_again = anyio.current_time() - up_at
            print(f"\nhealthy again {healthy_again:.3f} s after the controller answered")
            # The agent reads the controller's answer a moment after the controller sent it.
            with anyio.fail_after(SLACK):
                while not agent.status.registered:
                    await anyio.sleep(0.02)
            assert agent.status.registrations == 2
            assert await client.route("classify", "image.classify") == WorkerEndpoint(
                "w1", "https://127.0.0.1:8443", "1.0.0"
            )
        # On exit the worker is gone at once.
        assert await client.workers() == []


async def test_a_worker_started_before_its_controller_registers_when_it_comes_up(
    controller: ControllerProcess, certs: Path
) -> None:
    agent = make_agent(
        controller, certs, registration_backoff_base=0.05, registration_backoff_cap=INTERVAL
    )
    registered: list[float] = []

    async def run_worker() -> None:
        async with agent:
            registered.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_worker)
        await anyio.sleep(1.0)
        assert registered == []
        controller.start()
        async with ControllerClient(controller.url, tls=tls_for(certs, "caller")) as client:
            up_at = await wait_until_up(client, controller)
    assert registered and registered[0] - up_at <= INTERVAL + SLACK


async def test_identities_and_certificates_are_checked(
    controller: ControllerProcess, certs: Path
) -> None:
    controller.start()
    async with ControllerClient(controller.url, tls=tls_for(certs, "caller")) as client:
        await wait_until_up(client, controller)
    # A worker may register only under the name in its certificate.
    impostor = WorkerAgent(
        controller.url,
        "w1",
        "https://127.0.0.1:8443",
        [capability()],
        tls=tls_for(certs, "caller"),  # the certificate says "caller", not "w1"
    )
    with pytest.raises(RegistrationFailed, match="forbidden") as caught:
        async with impostor:
            pass
    assert isinstance(caught.value.__cause__, ForbiddenError)
    # The controller's reason reaches the exception's text.
    assert "'spiffe://crank.local/worker/caller' may not act on worker 'w1'" in str(caught.value)
    # Without a client certificate the TLS handshake fails, and the client says why.
    no_client_cert = ControllerClient(controller.url, tls=TLSConfig(ca_certs=certs / "ca.pem"))
    with pytest.raises(ClientCertificateRequired, match="requires a client certificate"):
        await no_client_cert.health()
    await no_client_cert.aclose()
    # Without the development CA, the controller's certificate is not trusted.
    untrusting = ControllerClient(controller.url)
    with pytest.raises(ControllerUnavailable, match=r"(?i)certificate verify failed"):
        await untrusting.health()
    await untrusting.aclose()
