"""SIGKILL a real controller while clients register: no acknowledged registration is lost.

The controller runs as ``python -m crank_registry_asgi serve --insecure``
with a state directory. Concurrent clients register new workers as fast as
they can; the controller is killed with SIGKILL at seeded random moments,
restarted on the same directory, and every registration that was answered
200 before the kill must be in ``/workers``. The second test kills it while
a compaction is writing its temporary file: workers re-register with large
schemas and ``--journal-compact-min-bytes 0``, so that compactions are
frequent and long.
"""

from __future__ import annotations

import contextlib
import pathlib
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from crank_registry_asgi.journal import JOURNAL_NAME
from tests.cli.helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

CLIENTS = 8
READY_TIMEOUT = 30.0
CAPABILITY = {
    "name": "image.classify",
    "verb": "classify",
    "version": "1.0.0",
    "input_schema": {"type": "object"},
    "output_schema": {"type": "object"},
    "requires_gpu": False,
    "max_concurrency": 2,
}


class Controller:
    """One controller process on a state directory, restarted at will."""

    def __init__(self, state_dir: pathlib.Path, log: pathlib.Path, flags: list[str]) -> None:
        self.state_dir = state_dir
        self.log = log
        self.flags = flags
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    async def start(self) -> None:
        # A free port can be taken by someone else before the controller
        # binds it: try another one then.
        for _ in range(3):
            if await self._start_once():
                return
        raise AssertionError(f"no free port for the controller: {self.log.read_text()[-2000:]}")

    async def _start_once(self) -> bool:
        """Start and wait until it answers; ``False`` if it exited early over its port."""
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable,
            "-m",
            "crank_registry_asgi",
            "serve",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--state-dir",
            str(self.state_dir),
            # Long enough that no worker is evicted or turns unroutable
            # while the test runs: what is checked is only durability.
            "--heartbeat-interval",
            "60",
            "--unhealthy-after",
            "600",
            "--evict-after",
            "3600",
            "--log-level",
            "warning",
            *self.flags,
        ]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log)
        deadline = time.monotonic() + READY_TIMEOUT
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0) as client:
            while True:
                if self.process.poll() is not None:
                    log = self.log.read_text()
                    if "in use" in log[-2000:].lower():
                        return False
                    raise AssertionError(f"the controller exited: {log[-2000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/health")).status_code == 200:
                        return True
                if time.monotonic() > deadline:
                    raise AssertionError(f"the controller did not start: {self.log.read_text()}")
                await anyio.sleep(0.02)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    async def worker_ids(self) -> set[str]:
        """Every listed worker, page by page."""
        ids: set[str] = set()
        params = {"limit": "5000"}
        async with httpx.AsyncClient(base_url=self.url, timeout=30.0) as client:
            while True:
                response = await client.get("/workers", params=params)
                assert response.status_code == 200
                page = response.json()
                ids.update(worker["worker_id"] for worker in page["workers"])
                if "next_cursor" not in page:
                    return ids
                params["cursor"] = page["next_cursor"]


@contextlib.contextmanager
def controller(tmp_path: pathlib.Path, *flags: str) -> Iterator[Controller]:
    instance = Controller(tmp_path / "state", tmp_path / "controller.log", list(flags))
    try:
        yield instance
    finally:
        instance.stop()


class Registrars:
    """Clients registering new workers as fast as they can; remembers what got a 200."""

    def __init__(self, url: str, prefix: str, *, pool: int = 0, padding: int = 0) -> None:
        self.url = url
        self.prefix = prefix
        # pool: re-register this many ids per client (0: always a new id);
        # padding: bytes of schema text per worker, unique to it.
        self.pool = pool
        self.padding = padding
        self.acknowledged: set[str] = set()
        self.refused = 0

    async def run(self) -> None:
        async with (
            httpx.AsyncClient(base_url=self.url, timeout=10.0) as client,
            anyio.create_task_group() as tasks,
        ):
            for index in range(CLIENTS):
                tasks.start_soon(self._client, client, index)

    async def _client(self, client: httpx.AsyncClient, index: int) -> None:
        for number in range(1_000_000):
            worker_id = f"{self.prefix}-c{index}-{number % self.pool if self.pool else number}"
            capability = CAPABILITY
            if self.padding:
                schema = {"type": "object", "description": worker_id * (self.padding // 10)}
                capability = {**CAPABILITY, "input_schema": schema}
            body: dict[str, Any] = {
                "worker_id": worker_id,
                "worker_url": f"http://10.1.{index}.{number % 250 + 1}:8080",
                "capabilities": [capability],
            }
            try:
                response = await client.post("/register", json=body)
            except httpx.TransportError:
                return  # the controller is gone
            if response.status_code == 200:
                self.acknowledged.add(worker_id)
            else:
                self.refused += 1


async def register_then_kill(
    instance: Controller, prefix: str, kill_when: Any, **options: int
) -> tuple[set[str], int]:
    """Register until ``kill_when()`` returns, SIGKILL, and return what was acknowledged."""
    registrars = Registrars(instance.url, prefix, **options)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(registrars.run)
        await kill_when()
        instance.kill()
    assert registrars.refused == 0, "a registration was refused"
    return registrars.acknowledged, len(registrars.acknowledged)


@pytest.mark.anyio
async def test_acknowledged_registrations_survive_sigkill(tmp_path: pathlib.Path) -> None:
    rng = random.Random(20261126)
    kills = 20
    acknowledged: set[str] = set()
    counts: list[int] = []
    with controller(tmp_path) as instance:
        for round_ in range(kills):
            await instance.start()
            present = await instance.worker_ids()
            missing = acknowledged - present
            assert not missing, f"after kill {round_}: {len(missing)} acknowledged workers lost"

            async def at_random_moment() -> None:
                await anyio.sleep(rng.uniform(0.05, 0.6))

            newly, count = await register_then_kill(instance, f"r{round_}", at_random_moment)
            acknowledged |= newly
            counts.append(count)
        await instance.start()
        present = await instance.worker_ids()
        instance.stop()
    assert not acknowledged - present
    # The kills landed while registrations were being acknowledged.
    assert sum(1 for count in counts if count > 0) >= kills * 3 // 4
    with open(tmp_path / "state" / JOURNAL_NAME, "rb") as file:
        assert file.read()  # the journal held it all, not some other store


@pytest.mark.anyio
async def test_acknowledged_registrations_survive_sigkill_during_compaction(
    tmp_path: pathlib.Path,
) -> None:
    rng = random.Random(3)
    wanted, most_rounds = 5, 16
    temporary = tmp_path / "state" / (JOURNAL_NAME + ".compact")
    acknowledged: set[str] = set()
    mid_compaction = kills = 0
    # No minimum: a compaction each time the file doubles past a snapshot.
    with controller(tmp_path, "--journal-compact-min-bytes", "0") as instance:
        while mid_compaction < wanted and kills < most_rounds:
            await instance.start()
            assert not temporary.exists(), "a compaction's leftover survived a restart"
            present = await instance.worker_ids()
            missing = acknowledged - present
            assert not missing, f"after kill {kills}: {len(missing)} acknowledged workers lost"

            async def while_compacting() -> None:
                # Kill as soon as a compaction's temporary file appears (or
                # give up waiting after a while and kill anyway).
                deadline = time.monotonic() + 8.0
                while not temporary.exists() and time.monotonic() < deadline:
                    await anyio.sleep(0.0005)
                await anyio.sleep(rng.uniform(0, 0.001))

            # The same workers register again and again with large,
            # unique schemas: the file outgrows the live state fast, and
            # each compaction writes megabytes (a wide window to kill in).
            newly, _ = await register_then_kill(
                instance, "k", while_compacting, pool=40, padding=16_000
            )
            kills += 1
            acknowledged |= newly
            if temporary.exists():
                mid_compaction += 1
        await instance.start()
        present = await instance.worker_ids()
        instance.stop()
    assert not acknowledged - present
    print(f"kills mid-compaction: {mid_compaction} of {kills}")
    assert mid_compaction >= wanted, f"only {mid_compaction} of {kills} kills hit a compaction"
