"""The demo's child processes: each in its own process group, with its own log.

:class:`Processes` starts a command with the source checkout on its
``PYTHONPATH``, sends signals to its whole group, and stops every group on
the way out: SIGTERM first, then SIGKILL for what is left. On Linux each
child also gets SIGKILL when the demo itself dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import attrs

__all__ = ["DemoFailure", "Processes", "free_port"]


class DemoFailure(Exception):
    """A step of the demo did not do what it should; the message says what."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at this moment."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _die_with_parent() -> None:
    # Runs in the child before exec: ask Linux to SIGKILL it when the demo dies.
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@attrs.define
class Processes:
    """Named child processes started in ``root``, their logs under ``log_dir``."""

    root: Path
    log_dir: Path
    running: dict[str, subprocess.Popen[bytes]] = attrs.field(factory=dict)
    logs: dict[str, Path] = attrs.field(factory=dict)

    def spawn(self, name: str, command: list[str]) -> None:
        """Start ``command`` as ``name``; its output goes to ``log_dir/NAME.log``."""
        log = self.log_dir / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.logs[name] = log
        env = dict(os.environ)
        # The worker programs are modules of the checkout (examples.workers.NAME).
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.root), *filter(None, [env.get("PYTHONPATH")])]
        )
        env["PYTHONUNBUFFERED"] = "1"
        with log.open("ab") as output:
            self.running[name] = subprocess.Popen(
                command,
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as one
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )

    def send(self, name: str, signum: signal.Signals) -> None:
        """Send ``signum`` to the process group of ``name``."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.running[name].pid, signum)

    def wait_exit(self, name: str, timeout: float) -> int | None:
        """Wait for ``name`` to exit; its status, or ``None`` if it is still running."""
        try:
            return self.running[name].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def check_alive(self, *names: str) -> None:
        """Raise :class:`DemoFailure` if one of ``names`` has exited."""
        for name in names:
            status = self.running[name].poll()
            if status is not None:
                raise DemoFailure(f"{name} exited with status {status}")

    def stop_all(self) -> None:
        """SIGTERM every group still running, then SIGKILL what is left after 5 s."""
        alive = [name for name, process in self.running.items() if process.poll() is None]
        for name in alive:
            self.send(name, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for name in alive:
            if self.wait_exit(name, max(0.0, deadline - time.monotonic())) is None:
                self.send(name, signal.SIGKILL)
                self.wait_exit(name, 5.0)
        # A group may outlive its leader (a grandchild); make sure it is gone.
        for name in self.running:
            self.send(name, signal.SIGKILL)

    def tails(self, lines: int) -> dict[Path, list[str]]:
        """The last ``lines`` lines of every child's log that has any, by log file."""
        found = {}
        for path in self.logs.values():
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                if tail:
                    found[path] = tail
        return found
