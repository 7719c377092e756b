"""SIGTERM to a worker under load: it drains, its calls in flight finish, no caller sees a failure.

Real processes: ``crank-registry serve --gateway`` and two worker programs
(:mod:`tests.client.slow_worker`, served by the example workers' runner)
whose calls take a few hundred milliseconds each. Callers keep the gateway
busy the whole time; in the middle, one worker gets SIGTERM. The worker
reports every call it took (arrival and end); the callers see which worker
answered each call (the gateway's ``x-crank-worker-id`` header).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.cli.helpers import ServerProcess, clean_environment, free_port, serving

# Asyncio alone: the processes are real, the test's own loop only drives the callers.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.anyio,
    pytest.mark.parametrize("anyio_backend", ["asyncio"]),
]

REPOSITORY = Path(__file__).resolve().parents[2]
#: How long each call takes at the worker.
CALL_SECONDS = 0.3
#: Callers, each making one call after another: more than the two workers take at
#: once (``max_concurrency`` 6 each), so some always wait in the gateway's queue, and
#: those woken by a slot freed on the draining worker must go to the other one.
CALLERS = 16
#: The agent's default: the longest the worker may wait for its calls before it leaves.
DRAIN_TIMEOUT = 30.0
#: Generous real-time deadlines for a loaded machine (conditions are polled, never slept on).
START_DEADLINE = 30.0
#: Also how long the worker may take to leave: well within its drain timeout.
EXIT_DEADLINE = 15.0
BODY = {"verb": "greet", "capability": "hello", "payload": {"name": "Ada"}}


@dataclass(frozen=True)
class Answer:
    """One call as its caller saw it: when it was sent, its status, which worker answered."""

    sent_at: float
    status: int
    worker_id: str | None
    body: str


@dataclass
class WorkerProcess:
    """A :mod:`tests.client.slow_worker` child process, its stdout and its log."""

    worker_id: str
    process: subprocess.Popen[bytes]
    out_path: Path
    log_path: Path

    def calls(self) -> list[tuple[float, float | None]]:
        """The calls it took, ``(arrived, ended or None)``, as it reported them on exit."""
        lines = self.out_path.read_text().splitlines()
        assert lines, f"{self.worker_id} printed no report:\n{self.log()}"
        return [(arrived, ended) for arrived, ended in json.loads(lines[-1])["calls"]]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def worker_process(
    tmp_path: Path, controller: ServerProcess, worker_id: str
) -> Iterator[WorkerProcess]:
    """Run the slow worker registered with ``controller``; killed if still running at the end."""
    out_path, log_path = tmp_path / f"{worker_id}.out", tmp_path / f"{worker_id}.log"
    argv = [
        sys.executable,
        "-m",
        "tests.client.slow_worker",
        "--controller",
        controller.url,
        "--insecure",
        "--worker-id",
        worker_id,
        "--delay",
        str(CALL_SECONDS),
        # The server stops soon after the deregistration (its own grace is
        # shorter than a call): a call the agent did not wait for would be cut.
        "--shutdown-grace",
        "0.1",
    ]
    with out_path.open("wb") as out, log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, stdout=out, stderr=log, cwd=REPOSITORY, env=clean_environment()
        )
    try:
        yield WorkerProcess(worker_id, process, out_path, log_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def until(check: Callable[[], Awaitable[bool]], *, deadline_s: float, what: str) -> float:
    """Poll ``check`` until it is true; the monotonic time it was seen true."""
    deadline = time.monotonic() + deadline_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {deadline_s} s: {what}")
        await anyio.sleep(0.01)
    return time.monotonic()


async def exit_status(worker: WorkerProcess, *, deadline_s: float) -> int:
    """Wait (without blocking the callers) for ``worker`` to exit; its status."""

    async def exited() -> bool:
        return worker.process.poll() is not None

    await until(exited, deadline_s=deadline_s, what=f"{worker.worker_id} exits")
    return worker.process.returncode


async def test_sigterm_under_load_loses_no_call_and_routes_nothing_new_to_the_worker(
    tmp_path: Path,
) -> None:
    port = free_port()
    args = ["--insecure", "--port", str(port), "--state-dir", str(tmp_path / "state"), "--gateway"]
    with (
        serving(args, tmp_path / "controller.log", port=port, scheme="http") as controller,
        worker_process(tmp_path, controller, "w1") as staying,
        worker_process(tmp_path, controller, "w2") as leaving,
    ):
        limits = httpx.Limits(max_connections=CALLERS + 4)
        async with httpx.AsyncClient(base_url=controller.url, timeout=30, limits=limits) as client:

            async def workers() -> dict[str, dict[str, Any]]:
                response = await client.get("/workers")
                assert response.status_code == 200, response.text
                return {entry["worker_id"]: entry for entry in response.json()["workers"]}

            async def both_registered() -> bool:
                for worker in (staying, leaving):
                    if worker.process.poll() is not None:
                        raise AssertionError(f"{worker.worker_id} exited:\n{worker.log()}")
                return {"w1", "w2"} <= set(await workers())

            await until(both_registered, deadline_s=START_DEADLINE, what="both workers registered")
            answers: list[Answer] = []
            stop = anyio.Event()

            async def caller(number: int) -> None:
                # Staggered starts: calls end all the time, not in waves, so the
                # SIGTERM finds calls in flight whenever it comes.
                await anyio.sleep(number * CALL_SECONDS / CALLERS)
                while not stop.is_set():
                    sent_at = time.monotonic()
                    try:
                        response = await client.post("/execute", json=BODY)
                    except httpx.HTTPError as error:  # a lost call too: status 0
                        answers.append(Answer(sent_at, 0, None, repr(error)))
                        continue
                    worker_id = response.headers.get("x-crank-worker-id")
                    answers.append(Answer(sent_at, response.status_code, worker_id, response.text))

            def answered_by(worker_id: str) -> int:
                return sum(answer.worker_id == worker_id for answer in answers)

            async def both_serving() -> bool:
                return answered_by("w1") >= CALLERS and answered_by("w2") >= CALLERS

            async def drain_applied() -> bool:
                # Seen draining, or already gone (a quick drain can end between two looks).
                entry = (await workers()).get("w2")
                return entry is None or entry["draining"]

            async with anyio.create_task_group() as callers:
                for number in range(CALLERS):
                    callers.start_soon(caller, number)
                await until(both_serving, deadline_s=START_DEADLINE, what="load on both workers")
                sigterm_at = time.monotonic()
                leaving.process.send_signal(signal.SIGTERM)
                drain_seen_at = await until(
                    drain_applied, deadline_s=EXIT_DEADLINE, what="w2 draining"
                )
                status = await exit_status(leaving, deadline_s=EXIT_DEADLINE)
                exited_after = time.monotonic() - sigterm_at
                # The agent deregistered before the server stopped.
                assert "w2" not in await workers()
                # The load goes on for a while on the worker that stayed.
                left_at = time.monotonic()

                async def served_on() -> bool:
                    return sum(a.sent_at > left_at for a in answers) >= CALLERS

                await until(served_on, deadline_s=EXIT_DEADLINE, what="calls after w2 left")
                stop.set()
            staying.process.send_signal(signal.SIGTERM)
            assert await exit_status(staying, deadline_s=EXIT_DEADLINE) == 0, staying.log()
        assert controller.stop() == 0, controller.log()
        assert "Traceback" not in controller.log(), controller.log()

    # Every call issued got its answer, from one of the two workers.
    failures = [answer for answer in answers if answer.status != 200]
    assert not failures, failures[:5]
    assert {answer.worker_id for answer in answers} == {"w1", "w2"}
    # The worker left cleanly and in time: drained, its calls done, deregistered.
    log = leaving.log()
    assert status == 0, log
    assert "draining at" in log, log
    assert "calls still in flight" not in log, log
    calls = leaving.calls()
    # SIGTERM came while calls were in flight there, and none of them was cut.
    in_flight = [
        (arrived, ended)
        for arrived, ended in calls
        if arrived <= sigterm_at and (ended is None or ended > sigterm_at)
    ]
    assert in_flight, "no call was in flight at the SIGTERM: the test proves nothing"
    assert all(ended is not None for _, ended in calls), "a call in flight never finished"
    # Every call the worker took reached its caller, and no call sent once the
    # drain was applied was routed to it.
    assert len(calls) == answered_by("w2")
    assert not [a for a in answers if a.worker_id == "w2" and a.sent_at > drain_seen_at]
    assert len(staying.calls()) == answered_by("w1")
    print(
        f"{len(answers)} calls, {answered_by('w2')} by w2; {len(in_flight)} in flight on w2 at "
        f"its SIGTERM; w2 exited {exited_after:.2f} s after it (drain timeout {DRAIN_TIMEOUT:g} s)"
    )
