"""``crank-registry serve --processes N``: N processes on one port, each a replica, one /metrics."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crank_registry_asgi import certs
from crank_registry_asgi.processes import MAX_RESTART_DELAY, restart_delay
from crank_registry_asgi.server import ServerSettings, hypercorn_config
from tests.builders import registration_payload
from tests.cli.helpers import (
    ServerProcess,
    clean_environment,
    client_context,
    command,
    free_port,
    serving,
)
from tests.redis.helpers import machine_url, unique_prefix

ROUTE = {"verb": "classify", "capability": "image.classify"}
CONTROLLER_ID = "fleet"


@contextlib.contextmanager
def processes(
    tmp_path: Path,
    url: str,
    prefix: str,
    *security: str,
    scheme: str = "http",
    verify: ssl.SSLContext | bool = True,
) -> Iterator[ServerProcess]:
    """``serve --processes 2`` on a free port, once both of its processes serve.

    ``security``: the TLS flags (default ``--insecure``).
    """
    port = free_port()
    with serving(
        [
            *(security or ["--insecure"]),
            "--port",
            str(port),
            "--state-dir",
            str(tmp_path / "state"),
            "--redis",
            url,
            "--redis-prefix",
            prefix,
            "--controller-id",
            CONTROLLER_ID,
            "--processes",
            "2",
        ],
        tmp_path / "serve.log",
        port=port,
        scheme=scheme,
        verify=verify,
    ) as server:
        wait_for(lambda: "serving with" in server.log(), timeout=30, what="all processes serve")
        yield server


def wait_for(predicate: object, *, timeout: float, what: str) -> None:
    """Poll ``predicate`` (another process's progress, in real time) until it is true."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def children(pid: int) -> set[int]:
    """The processes ``pid`` started (Linux: /proc)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(child) for child in (task / "children").read_text().split())
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has ended; only its parent has not collected it yet.
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    return False


def servers_of(server: ServerProcess) -> list[int]:
    """The pids of the serving processes, oldest first (the multiprocessing helpers left out).

    Process #0 is started first, the others once it serves: until one is
    replaced, the list is in index order.
    """
    started: list[tuple[int, int]] = []
    for pid in children(server.process.pid):
        with contextlib.suppress(FileNotFoundError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                fields = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()
                started.append((int(fields[19]), pid))  # starttime, field 22
    return [pid for _, pid in sorted(started)]


@contextlib.contextmanager
def client_on(
    server: ServerProcess, index: int, verify: ssl.SSLContext | bool = True
) -> Iterator[httpx.Client]:
    """A client whose kept-alive connection reached process ``index``.

    The kernel spreads new connections over the processes: new clients until one does.
    """
    wanted = f"{CONTROLLER_ID}#{index}"
    for _ in range(200):
        with httpx.Client(base_url=server.url, timeout=5, verify=verify) as client:
            if client.get("/health").json()["controller_id"] == wanted:
                yield client
                return
    raise AssertionError(f"no connection reached {wanted} in 200 tries")


def metrics_directory(server: ServerProcess) -> Path:
    """Where the processes of ``server`` write their metrics (its start-up line says)."""
    found = re.search(r"metrics in (\S+)\)", server.log())
    assert found is not None, server.log()
    return Path(found.group(1))


def figure(exposition: str, sample: str) -> float:
    """The value of one sample (name and labels, as written) of a Prometheus exposition."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", exposition, re.MULTILINE)
    assert match is not None, f"{sample} not in:\n{exposition}"
    return float(match.group(1))


def worker_count(exposition: str) -> float:
    return sum(
        figure(exposition, f'crank_workers{{state="{state}"}}')
        for state in ("healthy", "unhealthy", "unverified")
    )


def test_processes_above_one_need_redis(tmp_path: Path) -> None:
    result = subprocess.run(
        command("serve", "--insecure", "--processes", "2", "--state-dir", str(tmp_path)),
        capture_output=True,
        check=False,
        text=True,
        env=clean_environment(),
        timeout=60,
    )
    assert result.returncode == 2
    assert "--processes 2 needs --redis (or CRANK_REDIS_URL)" in result.stderr
    assert "drop --processes" in result.stderr
    assert not (tmp_path / "registry.jsonl").exists()


@pytest.mark.parametrize(("processes", "reuse_port"), [(1, False), (2, True)])
def test_the_sockets_share_the_port_only_with_several_processes(
    processes: int, reuse_port: bool
) -> None:
    # hypercorn 0.18 sets SO_REUSEPORT when it serves with several workers:
    # server.hypercorn_config relies on it.
    config = hypercorn_config(ServerSettings(port=0, processes=processes))
    sockets = config.create_sockets()
    try:
        (sock,) = sockets.insecure_sockets
        assert bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)) == reuse_port
    finally:
        for sock in sockets.insecure_sockets:
            sock.close()


def test_a_process_that_keeps_dying_is_started_again_later_and_later() -> None:
    assert [restart_delay(ends) for ends in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]
    assert MAX_RESTART_DELAY == 30


@pytest.mark.slow
def test_processes_share_the_port_the_registry_and_the_metrics(tmp_path: Path) -> None:
    url = machine_url()
    with unique_prefix(url) as prefix, processes(tmp_path, url, prefix) as server:
        directory = metrics_directory(server)
        assert directory.is_dir()
        pids = servers_of(server)
        assert len(pids) == 2
        # Both answer on the one port, each under its own id.
        with client_on(server, 0) as first, client_on(server, 1) as second:
            assert first.post("/register", json=registration_payload("w1")).status_code == 200
            routed: list[int] = []  # the status of every route asked, on either process

            def route(client: httpx.Client) -> int:
                routed.append(client.post("/route", json=ROUTE).status_code)
                return routed[-1]

            wait_for(lambda: route(second) == 200, timeout=5, what="w1 routable through the other")
            assert second.get("/health").json()["controller_id"] == f"{CONTROLLER_ID}#1"
            for client in (first, second, first, first, second):
                assert route(client) == 200
            # Counted by whichever process routed, summed by either.
            on_first, on_second = first.get("/metrics").text, second.get("/metrics").text
            for exposition in (on_first, on_second):
                assert figure(exposition, 'crank_routes_total{outcome="routed"}') == routed.count(
                    200
                )
                assert sum(
                    figure(exposition, f'crank_routes_total{{outcome="{outcome}"}}')
                    for outcome in ("routed", "no_worker", "unknown_capability")
                ) == len(routed)
            registered = 'crank_registrations_total{replaced="false"}'
            assert figure(on_first, registered) == figure(on_second, registered) == 1
            # The fleet has one worker, whichever replica is asked (not one per process).
            assert worker_count(on_first) == worker_count(on_second) == 1
            assert figure(on_first, "crank_capabilities") == 1
            assert on_first.count("# TYPE crank_build_info gauge") == 1
            assert "process_resident_memory_bytes" not in on_first

            # A long poll held by one process counts on either: what each holds, summed.
            waiting = 'crank_feed_watchers{form="long_poll"}'
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                revision = second.get("/health").json()["revision"]
                poll = pool.submit(second.get, f"/watch?since={revision}&timeout=30", timeout=40)
                for client in (first, second):
                    wait_for(
                        lambda client=client: figure(client.get("/metrics").text, waiting) == 1,
                        timeout=5,
                        what=f"the long poll counted on {client.get('/health').json()}",
                    )
                assert first.post("/register", json=registration_payload("w2")).status_code == 200
                assert [event["worker_id"] for event in poll.result().json()["events"]] == ["w2"]
            assert figure(first.get("/metrics").text, waiting) == 0

        assert server.stop() == 0
        for pid in pids:
            wait_for(lambda pid=pid: not alive(pid), timeout=5, what=f"process {pid} ended")
        assert not directory.exists()
        assert "SIGTERM: stopping 2 processes" in server.log()


@pytest.mark.slow
def test_a_killed_process_is_replaced_and_the_others_serve_on(tmp_path: Path) -> None:
    url = machine_url()
    with unique_prefix(url) as prefix, processes(tmp_path, url, prefix) as server:
        with client_on(server, 1) as second:
            assert second.post("/register", json=registration_payload("w1")).status_code == 200
            for _ in range(4):
                assert second.post("/route", json=ROUTE).status_code == 200
            victim = servers_of(server)[0]
            os.kill(victim, signal.SIGKILL)
            # The other keeps its connection and its answers.
            assert second.post("/route", json=ROUTE).status_code == 200
            wait_for(
                lambda: "process #0 serves again" in server.log(),
                timeout=30,
                what="process #0 replaced",
            )
            assert f"process #0 (pid {victim}) was killed by SIGKILL" in server.log()
            assert not alive(victim)
            assert server.process.poll() is None
            with client_on(server, 0) as replacement:
                # The dead process's counts stay in the totals.
                exposition = replacement.get("/metrics").text
                assert figure(exposition, 'crank_routes_total{outcome="routed"}') >= 5
                assert worker_count(exposition) == 1
                assert replacement.post("/route", json=ROUTE).json()["worker_id"] == "w1"
        # Without their supervisor, the processes stop by themselves.
        pids = servers_of(server)
        assert len(pids) == 2
        server.process.kill()
        server.process.wait()
        for pid in pids:
            wait_for(lambda pid=pid: not alive(pid), timeout=20, what=f"process {pid} ended")
        # Killed, the supervisor could not remove its metrics directory.
        shutil.rmtree(metrics_directory(server), ignore_errors=True)


def test_a_port_in_use_is_refused_before_any_process_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            command(
                "serve",
                "--insecure",
                "--port",
                str(port),
                "--processes",
                "2",
                "--state-dir",
                str(tmp_path),
                # Never reached: the port is checked first.
                "--redis",
                "redis://127.0.0.1:1/0",
            ),
            capture_output=True,
            check=False,
            text=True,
            env=clean_environment(),
            timeout=60,
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1 port {port}: Address already in use" in result.stderr
    assert "Redis" not in result.stderr


@pytest.mark.slow
def test_every_process_sees_the_client_certificate(tmp_path: Path) -> None:
    url = machine_url()
    authority = certs.make_authority()
    for stem, certified in [
        ("ca", authority),
        ("controller", certs.make_controller_certificate(authority)),
        ("worker-a", certs.make_worker_certificate(authority, "a")),
    ]:
        certified.write(tmp_path / f"{stem}.pem", tmp_path / f"{stem}.key")
    worker_a = client_context(
        tmp_path / "ca.pem", tmp_path / "worker-a.pem", tmp_path / "worker-a.key"
    )
    tls_flags = [
        "--certfile",
        str(tmp_path / "controller.pem"),
        "--keyfile",
        str(tmp_path / "controller.key"),
        "--ca-certs",
        str(tmp_path / "ca.pem"),
    ]
    with (
        unique_prefix(url) as prefix,
        processes(tmp_path, url, prefix, *tls_flags, scheme="https", verify=worker_a) as server,
    ):
        for index in (0, 1):
            with client_on(server, index, verify=worker_a) as client:
                # Its own record, and no other: the identity reached this process's app.
                mine = client.post("/register", json=registration_payload("a"))
                assert mine.status_code == 200, mine.text
                other = client.post("/register", json=registration_payload("b"))
                assert other.status_code == 403
                assert other.json()["error"] == "forbidden"
        assert server.stop() == 0


def test_a_start_no_process_can_make_is_said_once_and_exits_2(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        command(
            "serve",
            "--insecure",
            "--port",
            str(port),
            "--processes",
            "2",
            "--state-dir",
            str(tmp_path),
            "--redis",
            f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        ),
        capture_output=True,
        check=False,
        text=True,
        env=clean_environment(),
        timeout=120,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "serve: error:" in line]
    assert len(errors) == 1, result.stderr
    assert "cannot reach Redis" in errors[0]
    assert "process #0 ended before it served (exited with status 2)" in result.stderr
    assert "process #1" not in result.stderr
