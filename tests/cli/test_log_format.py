"""``serve --log-format json``: one JSON object a line, from a real process."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crank_registry_asgi import cli
from tests.builders import WORKER_URL, registration_payload
from tests.cli.helpers import free_port, serving

pytestmark = pytest.mark.slow

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_json_lines_from_a_real_server(tmp_path: Path) -> None:
    port = free_port()
    args = ["--insecure", "--port", str(port), "--state-dir", str(tmp_path / "state")]
    with serving(
        [*args, "--log-format", "json"], tmp_path / "server.log", port=port, scheme="http"
    ) as server:
        with httpx.Client(base_url=server.url) as client:
            assert client.post("/register", json=registration_payload("w1")).status_code == 200
            assert client.post("/deregister", json={"worker_id": "w1"}).status_code == 200
            metrics = client.get("/metrics")
        assert server.stop() == 0, server.log()
    lines: list[dict[str, Any]] = [json.loads(line) for line in server.log().splitlines()]

    for line in lines:
        assert list(line)[:4] == ["time", "level", "logger", "message"], line
        assert ISO_UTC.match(line["time"]), line
    (registered,) = [line for line in lines if line["message"].startswith("worker registered")]
    assert registered["level"] == "info"
    assert registered["logger"] == "crank_registry_asgi"
    assert registered["worker_id"] == "w1"
    assert registered["worker_url"] == WORKER_URL
    assert registered["capabilities"] == "classify:image.classify"
    assert registered["revision"] == 2  # after the access policy's change
    (left,) = [line for line in lines if line["message"].startswith("worker deregistered")]
    assert (left["worker_id"], left["revision"]) == ("w1", 3)
    (policy,) = [line for line in lines if line["message"].startswith("access policy changed")]
    assert (policy["default"], policy["revision"]) == ("allow", 1)
    # The command's and the server's own lines take the same form.
    loggers = {line["logger"] for line in lines}
    assert {"crank_registry_asgi.cli", "crank_registry_asgi.server", "hypercorn.error"} <= loggers
    assert any(line["level"] == "warning" for line in lines)

    # /metrics from the real server parses and counts what it served.
    figures = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.text)
        for sample in family.samples
    }
    assert figures[("crank_registrations_total", (("replaced", "false"),))] == 1
    assert figures[("crank_deregistrations_total", ())] == 1


def test_an_unknown_log_format_is_refused_with_the_choices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_status:
        cli.main(["serve", "--insecure", "--log-format", "xml"])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err
    assert "--log-format" in error and "'text', 'json'" in error
