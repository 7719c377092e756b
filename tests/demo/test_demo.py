"""``python3 dev.py demo`` end to end, as a user runs it: a subprocess, real processes."""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from crank_registry_asgi.cli import main as crank_registry
from examples.demo.calls import check_stream
from examples.workers import WORKER_NAMES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc"),
]

ROOT = Path(__file__).resolve().parents[2]
# What dev.py runs (in the checkout, with the development environment's python).
DEMO = [sys.executable, "-m", "examples.demo"]
#: What the example workers declare, ``(verb, name)``: the demo calls each of them.
CAPABILITIES = [
    capability.key
    for name in WORKER_NAMES
    for capability in importlib.import_module(f"examples.workers.{name}").CAPABILITIES
]


def processes_mentioning(text: str) -> list[int]:
    """The live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def workdir_of(output: str) -> str:
    match = re.search(r"working in (\S+)", output)
    assert match, output
    return match.group(1)


def test_the_service_command_has_no_demo(capsys: pytest.CaptureFixture[str]) -> None:
    # The demo runs the examples of a source checkout, which the wheel does not hold.
    with pytest.raises(SystemExit) as exit_info:
        crank_registry(["demo"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice" in error
    assert "demo" in error


def test_the_streamed_tokens_read_as_text_in_the_summary() -> None:
    tokens = ["Workers", "register", ",", "heartbeat", "and", "serve", "."]
    lines = [{"index": i, "token": token} for i, token in enumerate(tokens)]
    lines.append({"done": True, "count": len(tokens)})
    body = "".join(f"{json.dumps(line)}\n" for line in lines)
    response = httpx.Response(200, text=body)
    assert check_stream(response) == "8 NDJSON lines: Workers register, heartbeat and serve."


def test_the_demo_passes_end_to_end() -> None:
    started = time.monotonic()
    result = subprocess.run(DEMO, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    took = time.monotonic() - started
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert took < 60
    summary = output.split("\nSummary\n", 1)[1]
    assert len(CAPABILITIES) == 9
    for verb, name in CAPABILITIES:
        assert re.search(rf"^{re.escape(verb)}:{re.escape(name)} +\w+ +\S", summary, re.M), summary
    assert "greet:hello (after restart)" in summary
    assert "Workers register, heartbeat and serve." in summary
    assert "404 unknown_capability" in summary
    assert re.search(r"the journal restored all 9 workers", output)
    assert re.search(r"routing kept working from the warm cache: all 9 capabilities routed", output)
    assert re.search(r"all 9 workers re-registered \d+\.\d+ s after the restart", output)
    assert "hello_world left the registry" in output
    assert "Demo passed" in output
    assert not Path(workdir_of(output)).exists()
    assert processes_mentioning(workdir_of(output)) == []


def test_keep_running_stays_up_until_interrupted_and_leaves_nothing_behind() -> None:
    process = subprocess.Popen(
        [*DEMO, "--keep-running"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        output = "".join(lines)
        assert "Everything is running" in output, output
        workdir = workdir_of(output)
        # The controller and all nine workers are up (the stopped one came back).
        assert len(processes_mentioning(workdir)) == 10
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output + rest
    assert "interrupted" in rest
    assert processes_mentioning(workdir) == []
    assert not Path(workdir).exists()


def test_a_failing_step_exits_1_and_kills_every_child(tmp_path: Path) -> None:
    # Stand-in examples: eight workers that never register, one that crashes.
    workers = tmp_path / "examples" / "workers"
    workers.mkdir(parents=True)
    (tmp_path / "examples" / "__init__.py").write_text("")
    (workers / "__init__.py").write_text("")
    for name in WORKER_NAMES:
        body = (
            "raise SystemExit(3)\n" if name == "zettel_link" else "import time\ntime.sleep(600)\n"
        )
        (workers / f"{name}.py").write_text(body)
    result = subprocess.run(
        [*DEMO, "--examples", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: zettel_link exited with status 3" in result.stdout
    workdir = workdir_of(result.stdout)
    assert processes_mentioning(workdir) == []
    assert not Path(workdir).exists()


def test_without_the_examples_the_demo_says_where_to_run_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [*DEMO, "--examples", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert f"--examples {tmp_path}: there is no examples/workers/__init__.py" in result.stderr
    assert "pass the folder that holds examples/workers" in result.stderr
