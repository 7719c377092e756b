"""``serve --rate-limit RATE:BURST``: validated, and handed to the service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from crank_registry import RateLimit
from crank_registry_asgi import cli
from tests.cli.test_cli import run_main


def test_the_flag_reaches_the_service(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from crank_registry_asgi import server

    started: list[Any] = []
    monkeypatch.setattr(server, "run", lambda app, settings, **options: started.append(app))
    state = ["--insecure", "--state-dir", str(tmp_path)]
    assert cli.main(["serve", *state]) == 0
    assert cli.main(["serve", *state, "--rate-limit", "2000:200"]) == 0
    unlimited, limited = (app.state.service for app in started)
    assert unlimited.config.rate_limit is None and unlimited.admission is None
    assert limited.config.rate_limit == RateLimit(2000, 200)
    assert limited.admission.limit == RateLimit(2000, 200)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("100", "expected RATE:BURST"),
        ("0:5", "RATE must be a finite number > 0"),
        ("fast:5", "RATE is not a number"),
        ("10:0", "BURST must be at least 1"),
        ("10:1.5", "BURST is not a whole number"),
    ],
)
def test_a_bad_value_exits_2_naming_the_flag_and_the_fix(
    value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_main(["serve", "--insecure", "--rate-limit", value], capsys)
    assert status == 2
    assert "argument --rate-limit" in err
    assert says in err
    assert "such as 100:20" in err
