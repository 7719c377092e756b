"""``serve --eject-after-failures/--max-ejected-percent``, and ejection in the ``workers`` table."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest

from crank_registry import EjectionSettings, HealthState, WorkerState
from crank_registry_asgi import cli
from crank_registry_asgi.client_cli import workers_table
from crank_worker_client import WorkerInfo
from tests.cli.test_cli import run_main
from tests.cli.test_client_commands import columns


def test_the_flags_reach_the_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from crank_registry_asgi import gateway, server

    started: list[Any] = []
    monkeypatch.setattr(server, "run", lambda app, settings, **options: started.append(app))
    monkeypatch.setattr(gateway, "serve_with_gateway", lambda controller, config, **tls: controller)
    serve = ["serve", "--insecure", "--state-dir", str(tmp_path), "--gateway"]
    assert cli.main(serve) == 0
    assert cli.main([*serve, "--eject-after-failures", "3", "--max-ejected-percent", "25"]) == 0
    assert cli.main([*serve, "--eject-after-failures", "0"]) == 0
    defaults, chosen, off = (app.state.service.registry for app in started)
    assert defaults.ejection_settings == EjectionSettings()
    assert (
        defaults.ejection_settings.after_failures,
        defaults.ejection_settings.max_ejected_percent,
    ) == (5, 10)
    assert chosen.ejection_settings == EjectionSettings(after_failures=3, max_ejected_percent=25)
    assert not off.ejection_settings.enabled


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--gateway", "--eject-after-failures", "-1"], "--eject-after-failures"),
        (["--gateway", "--eject-after-failures", "2.5"], "--eject-after-failures"),
        (["--gateway", "--max-ejected-percent", "101"], "--max-ejected-percent"),
        (["--gateway", "--max-ejected-percent", "nan"], "--max-ejected-percent"),
        (["--gateway", "--max-ejected-percent", "some"], "--max-ejected-percent"),
        (["--eject-after-failures", "3"], "need --gateway"),
        (["--max-ejected-percent", "20"], "need --gateway"),
        (
            ["--gateway", "--eject-after-failures", "0", "--max-ejected-percent", "20"],
            "--max-ejected-percent needs --eject-after-failures above 0",
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


def test_the_workers_table_says_how_long_an_ejection_lasts_still() -> None:
    moment = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.UTC)

    def info(worker_id: str, until: datetime.datetime | None) -> WorkerInfo:
        return WorkerInfo(
            worker_id=worker_id,
            worker_url=f"https://{worker_id}:8443",
            last_heartbeat=moment,
            is_healthy=until is None,
            state=WorkerState.HEALTHY if until is None else WorkerState.EJECTED,
            capabilities=(("run", "x"),),
            health=HealthState.HEALTHY,
            ejected_until=until,
        )

    workers = [info("fine", None), info("out", moment + datetime.timedelta(seconds=30))]
    _, *rows = columns(workers_table(workers, now=moment.timestamp() + 5))
    assert [row[2] for row in rows] == ["healthy", "ejected 25s"]
