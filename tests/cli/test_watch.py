"""The change feed against a real ``crank-registry serve``: shutdown with streams open,
and the ``crank-registry watch`` command.

Real processes and sockets: short configured intervals, generous deadlines.
"""

from __future__ import annotations

import contextlib
import io
import json
import queue
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from crank_registry_asgi.client_cli import change_line, follow
from crank_worker_client import ControllerClient, InvalidRequest
from tests.builders import registration_payload
from tests.cli.helpers import ServerProcess, clean_environment, command, free_port, serving

# Far more than any step takes, even on a loaded machine.
DEADLINE_S = 20.0


def insecure_server(tmp_path: Path, port: int, *extra: str) -> Any:
    return serving(
        ["--insecure", "--port", str(port), "--state-dir", str(tmp_path / "state"), *extra],
        tmp_path / "server.log",
        port=port,
        scheme="http",
    )


def register(server: ServerProcess, *worker_ids: str) -> None:
    with httpx.Client(base_url=server.url) as client:
        for worker_id in worker_ids:
            response = client.post("/register", json=registration_payload(worker_id))
            assert response.status_code == 200, response.text


def server_revision(server: ServerProcess) -> int:
    revision: int = httpx.get(f"{server.url}/snapshot").json()["revision"]
    return revision


# ----------------------------------------------------------- shutdown with streams


def test_shutdown_ends_open_streams_and_long_polls_at_once(tmp_path: Path) -> None:
    port = free_port()
    with insecure_server(tmp_path, port) as server:
        register(server, "w1")
        outcome: dict[str, Any] = {}
        reading = threading.Event()

        def read_stream() -> None:
            lines = []
            try:
                with (
                    httpx.Client(base_url=server.url, timeout=DEADLINE_S) as client,
                    client.stream(
                        "GET", "/watch?since=0", headers={"accept": "text/event-stream"}
                    ) as response,
                ):
                    outcome["status"] = response.status_code
                    for line in response.iter_lines():
                        lines.append(line)
                        if line.startswith("data:"):
                            reading.set()
            except httpx.HTTPError as error:  # a connection cut mid-stream
                outcome["error"] = repr(error)
            outcome["lines"] = lines
            outcome["ended"] = time.monotonic()

        def long_poll() -> None:
            with httpx.Client(base_url=server.url, timeout=DEADLINE_S + 60) as client:
                outcome["poll"] = client.get("/watch?since=1&timeout=60")

        threads = [threading.Thread(target=read_stream), threading.Thread(target=long_poll)]
        for thread in threads:
            thread.start()
        assert reading.wait(DEADLINE_S), outcome
        time.sleep(0.2)  # the long poll is parked too (nothing else tells from outside)
        stopping = time.monotonic()
        assert server.stop() == 0, server.log()
        for thread in threads:
            thread.join(DEADLINE_S)
    # The stream ended cleanly (its last chunk sent), not cut at hypercorn's
    # graceful timeout (3 s: a cut connection for the stream, a 500 for the
    # long poll), and the long poll was answered with its bookmark.
    assert "error" not in outcome, outcome
    assert outcome["status"] == 200
    assert "event: registered" in outcome["lines"]
    assert outcome["poll"].status_code == 200
    assert outcome["poll"].json()["events"] == []
    assert outcome["ended"] > stopping
    assert "Traceback" not in server.log()


# ------------------------------------------------------------- crank-registry watch


class WatchProcess:
    """``crank-registry watch ARGS`` with its stdout and stderr read line by line."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            command("watch", *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_environment(),
            text=True,
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        self.errors: list[str] = []
        assert self.process.stdout is not None and self.process.stderr is not None
        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _pump(stream: IO[str], lines: queue.Queue[str]) -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))

    def line(self, timeout: float = DEADLINE_S) -> str:
        """The next line of stdout."""
        try:
            return self.out.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line on stdout; stderr: {self.errors}") from None

    def error_containing(self, text: str) -> str:
        """The first line of stderr (from now on) containing ``text``."""
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            try:
                line = self.err.get(timeout=0.1)
            except queue.Empty:
                continue
            self.errors.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} on stderr: {self.errors}")

    def interrupt(self) -> int:
        """Ctrl-C; the exit status."""
        self.process.send_signal(signal.SIGINT)
        status = self.process.wait(DEADLINE_S)
        while not self.err.empty():
            self.errors.append(self.err.get())
        return status


@contextlib.contextmanager
def watching(*args: str) -> Iterator[WatchProcess]:
    watch = WatchProcess(*args)
    try:
        yield watch
    finally:
        if watch.process.poll() is None:
            watch.process.kill()
            watch.process.wait()


def test_watch_retries_until_the_controller_answers_then_prints_changes_as_json(
    tmp_path: Path,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with watching("--controller", url, "--insecure", "--json") as watch:
        retry = watch.error_containing("retrying in")
        assert url in retry
        with insecure_server(tmp_path, port) as server:
            # Said once it had an answer (the snapshot at revision 0); it follows from there.
            watch.error_containing("answering again")
            register(server, "w1", "w2")
            events = [watch.line(), watch.line()]
            assert watch.interrupt() == 0
    parsed = [json.loads(line) for line in events]
    assert [(e["revision"], e["type"], e["worker_id"]) for e in parsed] == [
        (1, "registered", "w1"),
        (2, "registered", "w2"),
    ]
    assert not any("Traceback" in line for line in watch.errors), watch.errors


def test_watch_from_the_current_revision_says_when_changes_were_missed(tmp_path: Path) -> None:
    port = free_port()
    with insecure_server(tmp_path, port, "--feed-window", "2") as server:
        register(server, "w1", "w2", "w3")
        url = server.url
        with watching("--controller", url, "--insecure", "--since", "0") as watch:
            missed = watch.error_containing("missed")
            assert "revision_compacted" in missed
            register(server, "w4")
            revision, kind, worker_id, at = watch.line().split("  ")
            assert (revision, kind, worker_id) == ("4", "registered", "w4")
            assert at.endswith("Z")
            assert watch.interrupt() == 0
        with watching("--controller", url, "--insecure") as watch:
            # From the current revision: nothing of the past. Changes come until
            # one is printed (the first may come before the command's snapshot).
            first = None
            deadline = time.monotonic() + DEADLINE_S
            while first is None and time.monotonic() < deadline:
                register(server, f"w{server_revision(server) + 1}")
                with contextlib.suppress(AssertionError):
                    first = watch.line(timeout=0.2)
            assert first is not None
            revision, kind, worker_id, _ = first.split("  ")
            assert int(revision) >= 5
            assert (kind, worker_id) == ("registered", f"w{revision}")
            assert watch.interrupt() == 0
    assert not any("Traceback" in line for line in watch.errors), watch.errors


def test_watch_refuses_a_bad_since(tmp_path: Path) -> None:
    result = subprocess.run(
        command("watch", "--controller", "http://127.0.0.1:1", "--insecure", "--since", "-1"),
        capture_output=True,
        text=True,
        env=clean_environment(),
        timeout=DEADLINE_S,
        check=False,
    )
    assert result.returncode == 2
    assert "--since" in result.stderr


def test_a_change_line_shows_a_dash_for_what_the_event_lacks() -> None:
    line = change_line({"type": "imported", "revision": 9})
    assert line == "9  imported  -  -"
    line = change_line({"type": "evicted", "revision": 3, "worker_id": "w1", "at": 0.25})
    assert line == "3  evicted  w1  1970-01-01T00:00:00.250Z"


@pytest.mark.anyio
async def test_follow_retries_reloads_after_a_410_and_stops_at_another_error() -> None:
    policy = {"heartbeat_interval": 30.0, "unhealthy_after": 60.0, "evict_after": 120.0}
    registered = {"type": "registered", "worker_id": "w6", "revision": 6, "at": 1.5}
    answers = [
        ("/snapshot", httpx.Response(503, json={"error": "journal_unavailable", "message": "m"})),
        ("/snapshot", httpx.Response(200, json=snapshot_body(5, policy))),
        ("/watch", httpx.Response(200, json={"epoch": "e", "revision": 6, "events": [registered]})),
        ("/watch", httpx.Response(410, json=gone("revision_compacted", oldest=8))),
        ("/snapshot", httpx.Response(200, json=snapshot_body(9, policy))),
        ("/watch", httpx.Response(422, json=gone("invalid_request", detail=[]))),
    ]
    asked: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        path, response = answers.pop(0)
        assert request.url.path == path, (request.url, path)
        asked.append(str(request.url.params))
        return response

    out, err = io.StringIO(), io.StringIO()
    client = ControllerClient(
        "http://controller.test", insecure=True, transport=httpx.MockTransport(handle)
    )
    async with client:
        with pytest.raises(InvalidRequest):
            await follow(client, since=None, as_json=False, out=out, err=err, rng=random.Random(0))
    assert out.getvalue() == "6  registered  w6  1970-01-01T00:00:01.500Z\n"
    said = err.getvalue().splitlines()
    assert "503" in said[0] and "retrying in" in said[0]
    assert "answering again" in said[1]
    assert "changes after revision 6 were missed (revision_compacted)" in said[2]
    # Each poll from the revision held, with the epoch of its snapshot.
    watches = [params for params in asked if "since" in params]
    assert [dict(httpx.QueryParams(p))["since"] for p in watches] == ["5", "6", "9"]
    assert all(dict(httpx.QueryParams(p))["epoch"] == "e" for p in watches)


def snapshot_body(revision: int, policy: dict[str, float]) -> dict[str, Any]:
    return {"epoch": "e", "revision": revision, "health_policy": policy, "workers": []}


def gone(code: str, **fields: Any) -> dict[str, Any]:
    return {"error": code, "message": f"{code} for the test", **fields}
