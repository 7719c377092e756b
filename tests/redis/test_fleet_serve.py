"""Two ``crank-registry serve --gateway --redis`` processes in front of slow workers.

The workers are real HTTP servers in this process, counting the calls they
have in flight at once: the fleet's limit is checked where it matters.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis

from crank_registry_asgi.fleet_calls import FleetKeys
from crank_registry_asgi.fleet_limits import LIVENESS_TTL
from tests.builders import capability_payload, registration_payload
from tests.cli.helpers import ServerProcess
from tests.redis.helpers import fleet_prefix, machine_url, shared_controller

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


def body(capability: str) -> dict[str, Any]:
    return {"verb": "greet", "capability": capability, "payload": {"name": "Ada"}}


class SlowWorker:
    """A worker host answering ``POST /invoke/...`` after ``seconds``, or when ``gate`` opens.

    It counts its calls and the most it had in flight at once.
    """

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds
        self.gate: threading.Event | None = None
        self.calls = 0
        self.in_flight = 0
        self.most = 0
        self.arrived: list[float] = []
        self._lock = threading.Lock()
        worker = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                with worker._lock:
                    worker.calls += 1
                    worker.in_flight += 1
                    worker.most = max(worker.most, worker.in_flight)
                    worker.arrived.append(time.monotonic())
                    call = worker.calls
                try:
                    if worker.gate is not None:
                        worker.gate.wait(timeout=30)
                    else:
                        time.sleep(worker.seconds)
                finally:
                    with worker._lock:
                        worker.in_flight -= 1
                body = json.dumps({"result": {"call": call}}).encode()
                with contextlib.suppress(OSError):  # its gateway may be gone
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> SlowWorker:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.gate is not None:
            self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def gateway_process(
    tmp_path: Path, url: str, prefix: str, name: str, *options: str
) -> Iterator[ServerProcess]:
    gateway = ("--gateway", "--gateway-queue", "200", *options)
    with shared_controller(tmp_path, url, prefix, name, *gateway) as server:
        yield server


RATE_LIMIT = ("--rate-limit", "1000:1000")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two controllers on one Redis, shared by the tests that do not kill one.

    (Each test uses a capability of its own.) A rate limit too, shared in
    Redis, that the tests' calls stay under: the fleet's limits together.
    """
    url = machine_url()
    tmp_path = tmp_path_factory.mktemp("pair")
    with (
        fleet_prefix(url) as prefix,
        gateway_process(tmp_path, url, prefix, "a", *RATE_LIMIT) as a,
        gateway_process(tmp_path, url, prefix, "b", *RATE_LIMIT) as b,
    ):
        yield a, b


def register(
    server: ServerProcess, worker_id: str, worker_url: str, limit: int, capability: str = "hello"
) -> None:
    capabilities = [capability_payload(capability, "greet", max_concurrency=limit)]
    payload = registration_payload(worker_id, worker_url, capabilities)
    response = httpx.post(f"{server.url}/register", json=payload, timeout=5)
    assert response.status_code == 200, response.text


def wait_routable(server: ServerProcess, capability: str = "hello") -> None:
    deadline = time.monotonic() + 5
    route = {"verb": "greet", "capability": capability}
    while httpx.post(f"{server.url}/route", json=route, timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "not routable"
        time.sleep(0.01)


async def test_200_calls_over_two_controllers_never_exceed_max_concurrency(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with SlowWorker(0.05) as w1, SlowWorker(0.05) as w2:
        register(a, "w1", w1.url, 4)
        register(a, "w2", w2.url, 4)
        wait_routable(b)
        statuses: list[int] = []
        limits = httpx.Limits(max_connections=200)
        async with (
            httpx.AsyncClient(timeout=60, limits=limits) as client,
            anyio.create_task_group() as group,
        ):

            async def call(server: ServerProcess) -> None:
                response = await client.post(f"{server.url}/execute", json=body("hello"))
                statuses.append(response.status_code)

            for number in range(200):
                group.start_soon(call, a if number % 2 else b)
        assert statuses == [200] * 200
        assert w1.calls + w2.calls == 200
        # Each controller alone would have allowed 4 a worker: together, still 4.
        assert (w1.most, w2.most) == (4, 4)
    for server in pair:
        ready = httpx.get(f"{server.url}/ready", timeout=5).json()
        assert ready["rate_limit"] == {
            "mode": "shared",
            "rate": 1000.0,
            "burst": 1000,
            "controllers": 2,
        }
        assert "Traceback" not in server.log()


async def test_a_killed_controllers_reservations_are_freed_within_a_lease_period(
    tmp_path: Path,
) -> None:
    url = machine_url()
    worker = SlowWorker()
    worker.gate = threading.Event()
    keys_client = redis.Redis.from_url(url)
    with (
        fleet_prefix(url) as prefix,
        worker,
        gateway_process(tmp_path, url, prefix, "a") as a,
        gateway_process(tmp_path, url, prefix, "b") as b,
    ):
        keys = FleetKeys(prefix)
        register(a, "w1", worker.url, 2)
        wait_routable(b)
        statuses: list[int] = []
        async with (
            httpx.AsyncClient(timeout=30) as client,
            anyio.create_task_group() as group,
        ):

            async def call(server: ServerProcess) -> None:
                with contextlib.suppress(httpx.TransportError):  # A's, when it is killed
                    response = await client.post(f"{server.url}/execute", json=body("hello"))
                    statuses.append(response.status_code)

            # A holds both of w1's calls; three calls queue on B.
            group.start_soon(call, a)
            group.start_soon(call, a)
            while worker.calls < 2:
                await anyio.sleep(0.01)
            for _ in range(3):
                group.start_soon(call, b)
            await anyio.sleep(0.3)
            assert worker.calls == 2, "B sent w1 a third call"
            assert keys_client.hgetall(keys.reservations("a")) == {b"w1": b"2"}
            a.process.send_signal(signal.SIGKILL)
            a.process.wait()
            killed = time.monotonic()
            while worker.calls < 3:
                assert time.monotonic() - killed < LIVENESS_TTL + 5, "B never took over"
                await anyio.sleep(0.01)
            freed = worker.arrived[2] - killed
            # A's two calls still run at the worker (nobody can stop them): B
            # sends its own up to the limit, and serves its queue as they end.
            worker.gate.set()
        assert statuses == [200, 200, 200]
        # Within one liveness period (with room for a loaded machine's scheduling).
        assert freed <= LIVENESS_TTL + 1.0, freed
        # B's next renewal finds A dead, and drops its reservations.
        deadline = time.monotonic() + 2
        while keys_client.exists(keys.reservations("a")):
            assert time.monotonic() < deadline, "A's reservations were kept"
            time.sleep(0.01)
        assert "Traceback" not in b.log()
    keys_client.close()


async def test_an_idempotency_key_is_called_once_whichever_controller_gets_it(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with SlowWorker(0.2) as worker, httpx.Client(timeout=10) as client:
        register(a, "once", worker.url, 4, "hello-once")
        wait_routable(b, "hello-once")

        def post(server: ServerProcess, key: str) -> httpx.Response:
            return client.post(
                f"{server.url}/execute", json=body("hello-once"), headers={"Idempotency-Key": key}
            )

        first = post(a, "one")
        again = post(b, "one")
        assert (first.json(), again.json()) == ({"result": {"call": 1}},) * 2
        assert "idempotent-replayed" not in first.headers
        assert again.headers["Idempotent-Replayed"] == "true"
        assert worker.calls == 1

        answers: list[httpx.Response] = []
        async with (
            httpx.AsyncClient(timeout=10) as concurrent,
            anyio.create_task_group() as group,
        ):

            async def call(server: ServerProcess) -> None:
                answers.append(
                    await concurrent.post(
                        f"{server.url}/execute",
                        json=body("hello-once"),
                        headers={"Idempotency-Key": "two"},
                    )
                )

            for server in (a, b, a, b):
                group.start_soon(call, server)
        assert worker.calls == 2
        assert [answer.json() for answer in answers] == [{"result": {"call": 2}}] * 4
        replayed = sorted(str(answer.headers.get("Idempotent-Replayed")) for answer in answers)
        assert replayed == ["None", "true", "true", "true"]
