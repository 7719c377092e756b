"""Limits and timeouts of ``crank-registry serve``, through a real process and real sockets.

Connections that never send a ClientHello, or that stall in the middle of a
request, must neither lock real clients out nor fill the log.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crank_registry_asgi import certs
from tests.cli.helpers import (
    ServerProcess,
    client_context,
    command,
    free_port,
    serving,
    wait_for_health,
)

pytestmark = pytest.mark.slow

#: The stalled request: full headers, one byte of the thousand declared.
STALLED = (
    b"POST /register HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n{"
)


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


@pytest.fixture
def mtls_server(pki: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    """A controller requiring client certificates, with 256 open files at most."""
    port = free_port()
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
    with serving(
        args,
        tmp_path / "server.log",
        port=port,
        scheme="https",
        verify=worker_context(pki),
        open_files=256,
    ) as server:
        yield server


def silent_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` TCP connections that never send a byte (no ClientHello)."""
    opened = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        opened.append(sock)
    return opened


def test_silent_connections_do_not_lock_out_a_client_with_a_certificate(
    mtls_server: ServerProcess, pki: Path
) -> None:
    port = int(mtls_server.url.rsplit(":", 1)[1])
    assert "at most 128 open connections" in mtls_server.log()  # 256 files less 128
    flood = silent_connections(port, 300)
    try:
        with httpx.Client(verify=worker_context(pki), timeout=10) as client:
            for _ in range(3):
                started = time.monotonic()
                answer = client.get(f"{mtls_server.url}/health")
                elapsed = time.monotonic() - started
                assert answer.status_code == 200
                assert elapsed < 2.0, f"the answer took {elapsed:.2f} s"
        # The oldest silent connections were closed to make room.
        closed = 0
        for sock in flood[:100]:
            sock.settimeout(5)
            try:
                closed += sock.recv(1) == b""
            except ConnectionResetError:
                closed += 1
        assert closed == 100
    finally:
        for sock in flood:
            sock.close()
    assert mtls_server.stop() == 0
    size = mtls_server.log_path.stat().st_size
    assert size < 100_000, f"the log grew to {size} bytes:\n{mtls_server.log()[-3000:]}"
    assert "Traceback" not in mtls_server.log()


def test_a_cap_the_file_limit_cannot_hold_is_refused(tmp_path: Path) -> None:
    argv = ["serve", "--insecure", "--state-dir", str(tmp_path), "--max-connections", "256"]
    done = subprocess.run(
        command(*argv, open_files=256), check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2  # a configuration error
    assert (
        "error: --max-connections 256 must be below the open-file limit (ulimit -n) 256"
        in done.stderr
    )
    assert "Traceback" not in done.stderr


def test_accept_failures_are_logged_once_per_interval(pki: Path, tmp_path: Path) -> None:
    # A cap the descriptors cannot hold (250 connections, 256 files, some of
    # them the server's own): accept() fails with EMFILE, again and again.
    port = free_port()
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
        "--max-connections",
        "250",
    ]
    with serving(
        args,
        tmp_path / "server.log",
        port=port,
        scheme="https",
        verify=worker_context(pki),
        open_files=256,
    ) as server:
        flood = silent_connections(port, 300)
        try:
            time.sleep(3)  # asyncio retries a failed accept every second
        finally:
            for sock in flood:
                sock.close()
        assert server.stop() == 0
        failures = [
            line for line in server.log().splitlines() if "accepting a connection failed" in line
        ]
        assert 1 <= len(failures) <= 2, failures
        assert "Too many open files" in failures[0]
        assert "--max-connections" in failures[0]
        # asyncio retries once a second: a handful in 3 s, not one per pending connection.
        counted = re.findall(r"failed (\d+) more times", "\n".join(failures))
        assert sum(map(int, counted)) <= 10, failures
        assert "Traceback" not in server.log(), server.log()


def test_a_connection_without_a_handshake_is_closed_after_the_timeout(
    pki: Path, tmp_path: Path
) -> None:
    port = free_port()
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
        "--tls-handshake-timeout",
        "1",
    ]
    with serving(
        args, tmp_path / "server.log", port=port, scheme="https", verify=worker_context(pki)
    ) as server:
        [sock] = silent_connections(port, 1)
        with sock:
            sock.settimeout(10)
            started = time.monotonic()
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
            elapsed = time.monotonic() - started
        assert 0.5 < elapsed < 5.0, f"closed after {elapsed:.2f} s"
        assert server.stop() == 0
        assert "Traceback" not in server.log()


def read_answer(sock: socket.socket, deadline: float) -> tuple[bytes, float]:
    """Everything ``sock`` receives until the server closes it, and when that was."""
    received = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            break
        except TimeoutError:
            raise AssertionError(f"still open at the bound; received {received!r}") from None
        if not chunk:
            break
        received += chunk
    return received, time.monotonic()


def stalled_bodies_are_answered_408(
    port: int,
    count: int,
    deadline_s: float,
    request: bytes = STALLED,
    tls: ssl.SSLContext | None = None,
) -> None:
    """``count`` stalled bodies: each answered 408 ``request_timeout`` and closed in time."""
    stalled = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        sock.sendall(request)
        stalled.append((sock, time.monotonic()))
    bound = 3.0  # generous: the machine running the tests may be loaded
    try:
        for sock, sent in stalled:
            answer, closed = read_answer(sock, sent + deadline_s + bound)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), answer
            assert b"connection: close" in head.lower(), head
            assert json.loads(body)["error"] == "request_timeout"
            assert closed - sent >= deadline_s * 0.9
    finally:
        for sock, _ in stalled:
            sock.close()


def test_stalled_bodies_are_answered_408_and_closed(tmp_path: Path) -> None:
    port = free_port()
    args = [
        "--insecure",
        "--port",
        str(port),
        "--state-dir",
        str(tmp_path / "state"),
        "--request-read-timeout",
        "1",
    ]
    with serving(args, tmp_path / "server.log", port=port, scheme="http") as server:
        stalled_bodies_are_answered_408(port, 50, 1.0)
        # The controller still answers.
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert server.stop() == 0
        assert "Traceback" not in server.log()


def test_stalled_bodies_over_mutual_tls_are_answered_408_and_closed(
    pki: Path, tmp_path: Path
) -> None:
    port = free_port()
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
        "--request-read-timeout",
        "1",
    ]
    tls = worker_context(pki)
    with serving(args, tmp_path / "server.log", port=port, scheme="https", verify=tls) as server:
        stalled_bodies_are_answered_408(port, 50, 1.0, tls=tls)
        assert server.stop() == 0
        assert "Traceback" not in server.log()


def test_stalled_headers_are_closed_by_the_keep_alive_timeout(tmp_path: Path) -> None:
    port = free_port()
    args = ["--insecure", "--port", str(port), "--state-dir", str(tmp_path / "state")]
    with serving(args, tmp_path / "server.log", port=port, scheme="http") as server:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        with sock:
            started = time.monotonic()
            sock.sendall(b"POST /register HTTP/1.1\r\nHost: loc")
            for _ in range(3):  # a byte now and then does not keep it open
                time.sleep(1)
                sock.sendall(b"a")
            answer, closed = read_answer(sock, started + 5.0 + 3.0)
        assert answer == b""
        assert closed - started >= 4.5
        assert server.stop() == 0


WORKER_APP = """
from crank_registry import CapabilitySchema
from crank_worker_client.serving import invocation_app

async def echo(payload):
    return payload

capability = CapabilitySchema(
    name="text.echo", verb="echo", version="1.0.0", input_schema={}, output_schema={},
    requires_gpu=False, max_concurrency=4,
)
app = invocation_app({("echo", "text.echo"): echo}, [capability], read_timeout=1.0)
"""


def test_the_worker_serving_helper_answers_stalled_bodies_408(tmp_path: Path) -> None:
    (tmp_path / "stalled_worker.py").write_text(textwrap.dedent(WORKER_APP))
    port = free_port()
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hypercorn",
                "--bind",
                f"127.0.0.1:{port}",
                # Serve in this process: the worker hypercorn spawns by default would
                # outlive a kill of its parent.
                "--workers",
                "0",
                "stalled_worker:app",
            ],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_health(f"http://127.0.0.1:{port}", process=process)
        request = STALLED.replace(b"/register", b"/invoke/echo/text.echo")
        stalled_bodies_are_answered_408(port, 50, 1.0, request)
    finally:
        process.kill()
        process.wait()
    # Nothing outlives the process: a worker hypercorn spawned would still hold the port.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert "Traceback" not in log_path.read_text(errors="replace")
