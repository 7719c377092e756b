"""``serve`` and the SLO files, ``--slo-poll-interval`` and ``--idempotency-ttl``."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from crank_registry_asgi import cli
from tests.cli.helpers import clean_environment, command, free_port, serving
from tests.cli.test_cli import no_command_variables, run_main

__all__ = ["no_command_variables"]  # the fixture, used here too


def test_an_invalid_slo_file_refuses_the_start_in_one_line_naming_file_and_field(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    (state_dir / "slos").mkdir(parents=True)
    path = state_dir / "slos" / "classify.yaml"
    path.write_text("verb: classify\ncapability: image.classify\navailability: 99.5\n")
    result = subprocess.run(
        command("serve", "--insecure", "--port", str(free_port()), "--state-dir", str(state_dir)),
        check=False,
        capture_output=True,
        text=True,
        env=clean_environment(),
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    # The log lines before it (level, logger, message) come from the logging setup.
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line or "error:" in line]
    assert errors == [
        "crank-registry serve: error: the controller failed to start: "
        f"{path}: field availability: must be a fraction between 0 and 1, got 99.5"
    ], result.stderr
    assert "Traceback" not in result.stderr
    # Refused before the journal was opened.
    assert not (state_dir / "registry.jsonl").exists()


def test_serve_reloads_a_changed_file_and_keeps_the_previous_on_an_invalid_one(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    (state_dir / "slos").mkdir(parents=True)
    path = state_dir / "slos" / "classify.yaml"
    path.write_text("verb: classify\ncapability: image.classify\nlatency_p95_ms: 250\n")
    port = free_port()
    args = ["--insecure", "--port", str(port), "--state-dir", str(state_dir)]
    with serving(
        [*args, "--slo-poll-interval", "0.1"], tmp_path / "serve.log", port=port, scheme="http"
    ) as server:

        def latency() -> Any:
            (entry,) = httpx.get(f"{server.url}/slos", timeout=5).json()["slos"]
            return entry["slo"]["latency_p95_ms"]

        def wait_for(text: str) -> None:
            # Generous: the poll runs every 0.1 s; a loaded machine may take longer.
            deadline = time.monotonic() + 30
            while text not in server.log():
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.05)

        assert latency() == 250.0
        path.write_text("verb: classify\ncapability: image.classify\nlatency_p95_ms: 90.5\n")
        wait_for("SLO files reloaded")
        assert latency() == 90.5
        path.write_text("verb: classify\ncapability: image.classify\nlatency_p95_ms: soon\n")
        wait_for("SLO files not reloaded")
        assert latency() == 90.5
        assert f"{path}: field latency_p95_ms: must be a number" in server.log()
        assert server.stop() == 0, server.log()


def test_the_flags_reach_the_service(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from crank_registry_asgi import server

    started: list[Any] = []
    monkeypatch.setattr(server, "run", lambda app, settings, **options: started.append(app))
    state = ["--insecure", "--state-dir", str(tmp_path)]
    assert cli.main(["serve", *state]) == 0
    assert cli.main(["serve", *state, "--idempotency-ttl", "90", "--slo-poll-interval", "0.5"]) == 0
    defaults, given = (app.state.service for app in started)
    assert defaults.registry.routing.idempotency_ttl == 3600
    assert defaults.slo_watcher.interval == 5
    assert defaults.slo_watcher.directory == tmp_path / "slos"
    assert given.registry.routing.idempotency_ttl == 90
    assert given.config.routing.idempotency_ttl == 90
    assert given.slo_watcher.interval == 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--idempotency-ttl", "0"], "--idempotency-ttl: must be a finite number of seconds > 0"),
        (["--idempotency-ttl", "hour"], "not a number of seconds: 'hour'"),
        (["--idempotency-ttl", "1e13"], "--idempotency-ttl: must be less than 1e+12 seconds"),
        (["--slo-poll-interval", "-1"], "--slo-poll-interval: must be a finite number of seconds"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_main(["serve", "--insecure", *args], capsys)
    assert status == 2
    assert message in err


def test_help_names_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(["serve", "--help"], capsys)
    assert status == 0
    assert "--idempotency-ttl SECONDS" in out
    assert "--slo-poll-interval SECONDS" in out
