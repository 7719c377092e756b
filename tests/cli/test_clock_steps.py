"""A real ``crank-registry serve`` whose wall clock is stepped under libfaketime.

libfaketime fakes the process's wall clock only
(``FAKETIME_DONT_FAKE_MONOTONIC=1``) and rereads its offset from a file on
every call (``FAKETIME_NO_CACHE=1``), so the test steps the server's clock
while it runs. Health must follow real (monotonic) time regardless.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.builders import registration_payload
from tests.cli.helpers import clean_environment, free_port, require_tool, serving

pytestmark = pytest.mark.slow

DEADLINE_S = 60.0


def states(client: httpx.Client) -> dict[str, str]:
    answer = client.get("/workers")
    assert answer.status_code == 200, answer.text
    return {worker["worker_id"]: worker["state"] for worker in answer.json()["workers"]}


def heartbeat(client: httpx.Client, worker_id: str) -> None:
    answer = client.post("/heartbeat", json={"worker_id": worker_id})
    assert answer.status_code == 200, answer.text


def libfaketime_preload(faketime: str) -> str:
    """The ``LD_PRELOAD`` value with which the ``faketime`` command loads the library.

    The server runs with it directly rather than under ``faketime``, which
    would stand between the test and the server's process (and its SIGTERM).
    """
    shown = subprocess.run(
        [faketime, "-f", "+0", "sh", "-c", 'printf %s "$LD_PRELOAD"'],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert "faketime" in shown.stdout, shown
    return shown.stdout


def set_offset(path: Path, offset: str) -> None:
    """Give the server's wall clock a new offset, atomically: it rereads the file on every call."""
    staged = path.with_suffix(".new")
    staged.write_text(f"{offset}\n")
    os.replace(staged, path)


def test_wall_clock_steps_change_no_health_decision(tmp_path: Path) -> None:
    preload = libfaketime_preload(require_tool("faketime", package="faketime"))
    offset_file = tmp_path / "faketime"
    set_offset(offset_file, "+0")
    # Without FAKETIME set, the library reads the offset from the file.
    environment = clean_environment(
        LD_PRELOAD=preload,
        FAKETIME_DONT_FAKE_MONOTONIC="1",
        FAKETIME_TIMESTAMP_FILE=str(offset_file),
        FAKETIME_NO_CACHE="1",
    )
    port = free_port()
    args = ["--insecure", "--port", str(port), "--state-dir", str(tmp_path / "state")]
    # Wide enough that a loaded machine's stalls do not make the talking worker silent.
    args += ["--heartbeat-interval", "1", "--unhealthy-after", "5", "--evict-after", "10"]
    with (
        serving(
            args,
            tmp_path / "server.log",
            port=port,
            scheme="http",
            environment=environment,
        ) as server,
        httpx.Client(base_url=server.url, timeout=10.0) as client,
    ):
        for name in ("silent", "talking"):
            assert client.post("/register", json=registration_payload(name)).is_success

        # One hour back: the silent worker still goes unhealthy, then is evicted, on time.
        set_offset(offset_file, "-3600")
        seen: list[str] = []
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and "evicted" not in seen:
            heartbeat(client, "talking")
            now = states(client)
            assert now.get("talking") == "healthy", (now, server.log())
            state = now.get("silent", "evicted")
            if not seen or seen[-1] != state:
                seen.append(state)
            time.sleep(0.2)
        assert seen == ["healthy", "unhealthy", "evicted"], server.log()

        # Two hours forward (an hour ahead of real time): nobody is evicted.
        set_offset(offset_file, "+3600")
        # The old clamped clock evicted everyone at the next sweep (one per second at most).
        until = time.monotonic() + 4.0
        while time.monotonic() < until:
            heartbeat(client, "talking")
            now = states(client)
            assert now == {"talking": "healthy"}, (now, server.log())
            time.sleep(0.2)
        log = server.log()
        assert server.stop() == 0, log
    assert log.count("wall clock stepped backward") == 1, log
    assert log.count("wall clock stepped forward") == 1, log
    assert "step_s=-3600." in log
    assert "step_s=+7200." in log
    assert "Traceback" not in log


def test_a_missing_tool_skips_locally_and_fails_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"faketime is not installed \(apt-get"):
        require_tool("faketime", package="faketime")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must have it"):
        require_tool("faketime", package="faketime")
