"""A real partition: a controller and 200 agents in another process, stopped with SIGSTOP.

The agents heartbeat every second; the controller makes a silent worker
unhealthy after 6 s (six missed beats: a loaded machine's late beats are
not silence) and evicts it after 10 s. The agents' process is stopped
for 11 s (5 s beyond ``unhealthy_after``), then resumed. With
self-preservation on (the default threshold), the controller takes the
silence for its own isolation: no worker is evicted, none is held
unhealthy while it lasts (those its sweep made unhealthy as the silences
came in, one by one over a heartbeat interval, are reinstated when it
begins), routes go on, and the resumed agents heartbeat on without
registering again. With
``--self-preservation-threshold 0`` the same partition evicts them all,
and each registers again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cli.helpers import ServerProcess, clean_environment, free_port, serving

pytestmark = pytest.mark.slow

AGENTS = 200
TIMINGS = ["--heartbeat-interval", "1", "--unhealthy-after", "6", "--evict-after", "10"]
PAUSE = 6 + 5  # seconds: 5 s beyond unhealthy_after
ROOT = Path(__file__).resolve().parents[2]


def journal_directory(tmp_path: Path) -> Path:
    """Where the journal goes: in memory (tmpfs) when the machine has one.

    What is tested is the controller's view of silence; on a loaded disk a
    registration's fsync can hold heartbeat answers for seconds, which
    would be a silence of the test's making.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="crank-partition-", dir=shm))
    return tmp_path / "state"


@contextlib.contextmanager
def controller(tmp_path: Path, *flags: str) -> Iterator[ServerProcess]:
    port = free_port()
    state = journal_directory(tmp_path)
    args = ["--insecure", "--port", str(port), "--state-dir", str(state)]
    with serving(
        [*args, *TIMINGS, "--log-level", "warning", *flags],
        tmp_path / "controller.log",
        port=port,
        scheme="http",
    ) as server:
        try:
            yield server
            server.stop()
        finally:
            shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def agents(url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The agents' process, once every agent is registered."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.cli.agents_process", url, str(AGENTS)],
            stdout=subprocess.PIPE,
            stderr=output,
            cwd=ROOT,
            env=clean_environment(),
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until ready (or the process ends)
        assert line.strip() == b"ready", log.read_text()
        yield process
    finally:
        process.kill()
        process.wait()


def counts(client: httpx.Client) -> dict[str, float]:
    """Workers held, whether in self-preservation, and registrations, from the controller.

    Also ``silent``: the workers held unhealthy (made so by the sweep), as
    ``/snapshot`` says, read after ``/health``: no sweep makes a worker
    unhealthy once self-preservation has begun, so a look that says it has
    begun must find none.
    """
    health = client.get("/health").json()
    figures = {"workers": health["total_workers"], "preserving": health["self_preservation"]}
    workers = client.get("/snapshot").json()["workers"]
    figures["silent"] = sum(1 for worker in workers if worker.get("silent", False))
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "crank_registrations":
            figures["registrations"] = sum(
                sample.value for sample in family.samples if sample.name.endswith("_total")
            )
    return figures


def wait_until(check: object, deadline_s: float) -> None:
    assert callable(check)
    end = time.monotonic() + deadline_s
    while not check():
        assert time.monotonic() < end, "not within the deadline"
        time.sleep(0.2)


Counts = dict[str, float]


def partition(
    tmp_path: Path, settled: Callable[[Counts], bool], *flags: str
) -> tuple[Counts, list[Counts], Counts, int]:
    """Before, during (one look a second), and once ``settled`` after the partition.

    Also how many routes were answered with a worker during it.
    """
    with controller(tmp_path, *flags) as server, httpx.Client(base_url=server.url) as client:
        with agents(server.url, tmp_path / "agents.log") as process:
            time.sleep(2)  # a window starts with every agent heard from
            before = counts(client)
            process.send_signal(signal.SIGSTOP)
            during: list[dict[str, float]] = []
            routed = 0
            for _ in range(PAUSE):
                time.sleep(1)
                during.append(counts(client))
                answer = client.post(
                    "/route", json={"verb": "classify", "capability": "image.classify"}
                )
                routed += answer.status_code == 200
            process.send_signal(signal.SIGCONT)
            wait_until(lambda: settled(counts(client)), 20)
            after = counts(client)
        return before, during, after, routed


def test_self_preservation_keeps_every_worker_through_a_partition(tmp_path: Path) -> None:
    def settled(now: Counts) -> bool:
        return now["workers"] == AGENTS and not now["preserving"]

    before, during, after, routed = partition(tmp_path, settled)
    held = {"workers": AGENTS, "preserving": False, "registrations": AGENTS, "silent": 0}
    assert before == held
    assert any(look["preserving"] for look in during), during
    assert all(look["workers"] == AGENTS for look in during), during  # none evicted
    # Every agent routable while it lasts: none held unhealthy.
    assert all(look["silent"] == 0 for look in during if look["preserving"]), during
    assert routed == PAUSE  # routing continued
    # Resumed agents heartbeat on: no registration since, and it ended.
    assert after == held


def test_with_threshold_zero_the_partition_evicts_them(tmp_path: Path) -> None:
    def settled(now: Counts) -> bool:
        return now["registrations"] > AGENTS

    before, during, after, _ = partition(tmp_path, settled, "--self-preservation-threshold", "0")
    assert before["workers"] == AGENTS
    assert not any(look["preserving"] for look in during)
    assert during[-1]["workers"] == 0  # evicted 10 s after their last heartbeat
    # The agents are told they are not registered, and register again.
    assert after["registrations"] > AGENTS
    assert after["workers"] > 0
