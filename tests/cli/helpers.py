"""Helpers for tests that talk to real servers over real sockets."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def client_context(
    ca_file: Path, certificate: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A client TLS context trusting ``ca_file``, presenting a certificate if given."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if certificate is not None:
        context.load_cert_chain(str(certificate), str(key) if key is not None else None)
    return context


def wait_for_health(
    url: str,
    *,
    verify: ssl.SSLContext | bool = True,
    deadline_s: float = 30.0,
    process: subprocess.Popen[bytes] | None = None,
) -> httpx.Response:
    """Poll ``url`` + ``/health`` until it answers 200.

    Fails after ``deadline_s``, or as soon as ``process`` (the server) exits.
    """
    deadline = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with status {process.returncode}")
        try:
            response = httpx.get(f"{url}/health", verify=verify, timeout=2.0)
        except httpx.HTTPError as error:
            last_error = error
        else:
            if response.status_code == 200:
                return response
        time.sleep(0.05)
    raise AssertionError(f"{url} did not become ready in {deadline_s} s: {last_error!r}")


@dataclasses.dataclass
class ServerProcess:
    """A ``crank-registry serve`` child process and where it logs."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, *, timeout_s: float = 20.0) -> int:
        """Send SIGTERM and return the exit status; kill it if it does not stop in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            message = f"the server ignored SIGTERM for {timeout_s} s:\n{self.log()}"
            raise AssertionError(message) from None


#: Sets the open-file limit to argv[1], then runs the rest of argv in this interpreter
#: (a preexec_fn would do the same, but is not safe in a process with threads).
_WITH_OPEN_FILES = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


def command(*args: str, open_files: int | None = None) -> list[str]:
    """The argv that runs ``crank-registry ARGS`` in this interpreter's environment.

    ``open_files`` sets the process's open-file limit (``ulimit -n``) first.
    """
    argv = [sys.executable, "-m", "crank_registry_asgi", *args]
    if open_files is None:
        return argv
    return [sys.executable, "-c", _WITH_OPEN_FILES, str(open_files), *argv[1:]]


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without the command's variables, plus ``extra``."""
    environment = {key: value for key, value in os.environ.items() if key not in COMMAND_VARIABLES}
    environment.update(extra)
    return environment


COMMAND_VARIABLES = frozenset(
    {"CONTROLLER_HTTPS_PORT", "CONTROLLER_CERT_PATH", "CONTROLLER_KEY_PATH", "CA_CERT_PATH"}
)


@contextlib.contextmanager
def serving(
    args: Sequence[str],
    log_path: Path,
    *,
    port: int,
    scheme: str,
    verify: ssl.SSLContext | bool = True,
    environment: dict[str, str] | None = None,
    open_files: int | None = None,
) -> Iterator[ServerProcess]:
    """Run ``crank-registry serve ARGS`` until the block ends; ready once /health answers.

    ``open_files`` sets the process's open-file limit (``ulimit -n``).
    """
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command("serve", *args, open_files=open_files),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment if environment is not None else clean_environment(),
        )
    server = ServerProcess(process, f"{scheme}://127.0.0.1:{port}", log_path)
    try:
        try:
            wait_for_health(server.url, verify=verify, process=process)
        except AssertionError as error:
            raise AssertionError(f"{error}\nserver log:\n{server.log()}") from None
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def require_tool(name: str, *, package: str) -> str:
    """The path of the executable ``name``; skip the test without it (fail when ``CI=true``).

    CI installs every tool the tests use (``.ci/run``), so there a missing
    one is an error rather than a silently skipped test.
    """
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (apt-get install {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must have it", pytrace=False)
        pytest.skip(reason)
    return path
