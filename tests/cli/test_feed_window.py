"""``serve --feed-window N``: how many recent changes ``GET /watch`` keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from crank_registry import DEFAULT_FEED_WINDOW
from crank_registry_asgi import ServiceConfig, cli
from tests.cli.test_cli import run_main


def test_the_flag_reaches_the_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from crank_registry_asgi import server

    started: list[Any] = []
    monkeypatch.setattr(server, "run", lambda app, settings, **options: started.append(app))
    state = ["--insecure", "--state-dir", str(tmp_path)]
    assert cli.main(["serve", *state]) == 0
    assert cli.main(["serve", *state, "--feed-window", "7"]) == 0
    defaults, given = (app.state.service for app in started)
    assert defaults.registry.feed.capacity == DEFAULT_FEED_WINDOW == 100_000
    assert given.config.feed_window == given.registry.feed.capacity == 7


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_a_bad_window_exits_2_naming_the_flag(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_main(["serve", "--insecure", "--feed-window", value], capsys)
    assert status == 2
    assert "--feed-window" in err


def test_the_setting_refuses_a_window_below_one() -> None:
    with pytest.raises(ValueError, match="feed_window must be an integer >= 1"):
        ServiceConfig(feed_window=0)
