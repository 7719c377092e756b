"""``serve --self-preservation-threshold/-max/-min-workers``: checked, and given to the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from crank_registry import SelfPreservationSettings
from crank_registry_asgi import cli
from tests.cli.test_cli import run_main


def test_the_flags_reach_the_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from crank_registry_asgi import server

    started: list[Any] = []
    monkeypatch.setattr(server, "run", lambda app, settings, **options: started.append(app))
    state = ["--insecure", "--state-dir", str(tmp_path)]
    assert cli.main(["serve", *state]) == 0
    given = [
        "--self-preservation-threshold",
        "0.7",
        "--self-preservation-max",
        "90",
        "--self-preservation-min-workers",
        "3",
    ]
    assert cli.main(["serve", *state, *given]) == 0
    assert cli.main(["serve", *state, "--self-preservation-threshold", "0"]) == 0
    defaults, chosen, off = (app.state.service.registry for app in started)
    assert defaults.self_preservation_settings == SelfPreservationSettings()
    assert (
        defaults.self_preservation_settings.threshold,
        defaults.self_preservation_settings.min_workers,
    ) == (0.5, 10)
    assert chosen.self_preservation_settings == SelfPreservationSettings(
        threshold=0.7, max_duration=90, min_workers=3
    )
    assert not off.self_preservation_settings.enabled


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--self-preservation-threshold", "1"], "--self-preservation-threshold"),
        (["--self-preservation-threshold", "-0.1"], "--self-preservation-threshold"),
        (["--self-preservation-threshold", "half"], "--self-preservation-threshold"),
        (["--self-preservation-max", "0"], "--self-preservation-max"),
        (["--self-preservation-min-workers", "0"], "--self-preservation-min-workers"),
        (["--self-preservation-min-workers", "2.5"], "--self-preservation-min-workers"),
        (
            ["--self-preservation-threshold", "0", "--self-preservation-max", "60"],
            "need --self-preservation-threshold above 0",
        ),
    ],
)
def test_a_bad_value_exits_2_naming_the_flag(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_main(["serve", "--insecure", *flags], capsys)
    assert status == 2
    assert says in err
    assert "Traceback" not in err
