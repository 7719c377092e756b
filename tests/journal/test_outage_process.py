"""A real ``crank-registry serve`` whose journal writes fail: a 503 write changes nothing.

The controller's file-size limit (``RLIMIT_FSIZE``, set from outside with
``prlimit``) is lowered to the journal's current length: every write that
would grow a file then fails with EFBIG (Python ignores SIGXFSZ), as on a
full disk (the controller's log file included, so the test reads the
answers, not the log). Raising it again is the disk getting space back.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import resource
from collections.abc import Iterator

import httpx
import pytest

from crank_registry_asgi.journal import JOURNAL_NAME
from tests.builders import registration_payload
from tests.cli.helpers import ServerProcess, free_port, serving

pytestmark = pytest.mark.slow

if not hasattr(resource, "prlimit") and os.environ.get("CI") != "true":
    pytest.skip(
        "resource.prlimit (Linux) is needed to fail the journal's writes", allow_module_level=True
    )


@contextlib.contextmanager
def serve(state_dir: pathlib.Path, log: pathlib.Path) -> Iterator[ServerProcess]:
    port = free_port()
    args = ["--insecure", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--state-dir", str(state_dir), "--log-level", "warning"]
    with serving(args, log, port=port, scheme="http") as server:
        yield server


def limit_file_size(server: ServerProcess, size: int) -> None:
    _, hard = resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (size, hard))


def lift_file_size_limit(server: ServerProcess) -> None:
    _, hard = resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (hard, hard))


def worker_ids(client: httpx.Client) -> set[str]:
    response = client.get("/workers")
    assert response.status_code == 200, response.text
    return {worker["worker_id"] for worker in response.json()["workers"]}


def route(client: httpx.Client) -> str:
    response = client.post("/route", json={"verb": "classify", "capability": "image.classify"})
    assert response.status_code == 200, response.text
    return str(response.json()["worker_id"])


def test_writes_refused_by_the_disk_change_nothing_and_nothing_survives_them(
    tmp_path: pathlib.Path,
) -> None:
    state_dir = tmp_path / "state"
    with serve(state_dir, tmp_path / "first.log") as server:
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            assert client.post("/register", json=registration_payload("w1")).status_code == 200
            limit_file_size(server, (state_dir / JOURNAL_NAME).stat().st_size)

            refused = client.post("/register", json=registration_payload("w2"))
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"] == "journal_unavailable"
            assert "File too large" in refused.json()["message"]
            assert refused.headers["Retry-After"].isdigit()
            assert worker_ids(client) == {"w1"}
            assert {route(client) for _ in range(4)} == {"w1"}
            beat = client.post("/heartbeat", json={"worker_id": "w2"})
            assert (beat.status_code, beat.json()["error"]) == (404, "worker_not_registered")

            leaving = client.post("/deregister", json={"worker_id": "w1"})
            assert leaving.status_code == 503, leaving.text
            assert leaving.json()["error"] == "journal_unavailable"
            assert worker_ids(client) == {"w1"}
            assert route(client) == "w1"
            assert client.post("/heartbeat", json={"worker_id": "w1"}).status_code == 200

            lift_file_size_limit(server)
            assert client.post("/deregister", json={"worker_id": "w1"}).status_code == 200
            assert client.post("/register", json=registration_payload("w3")).status_code == 200
            assert worker_ids(client) == {"w3"}
        assert server.stop() == 0
    with (
        serve(state_dir, tmp_path / "second.log") as server,
        httpx.Client(base_url=server.url, timeout=30.0) as client,
    ):
        assert worker_ids(client) == {"w3"}
