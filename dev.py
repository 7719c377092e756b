#!/usr/bin/env python3
"""Bootstrap a development environment in .venv and run a task in it.

    python3 dev.py demo            # the controller, nine workers and the gateway
    python3 dev.py demo --shared   # two controllers on one Redis, one of them killed
    python3 dev.py test            # the test suite
    python3 dev.py nox ...         # any nox session (lint, typecheck, bench, ...)

Needs only Python 3.11+. The first run creates .venv and installs the three
distributions (editable) and the development requirements, one line per
package as pip collects it; later runs reinstall only when a pyproject or
requirements file changed.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import venv
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
# Each after the ones it depends on: pip resolves an editable install with
# extras only when it comes before the distributions that depend on it.
DISTRIBUTIONS = ["crank-registry", "crank-worker-client", "crank-registry-asgi"]
# The examples' workers serve with crank_worker_client.serving.
EXTRAS = {"crank-worker-client": "[serving]"}
INPUTS = [
    ROOT / "requirements-dev.txt",
    *(ROOT / "distributions" / name / "pyproject.toml" for name in DISTRIBUTIONS),
]


def _bin(name: str) -> Path:
    return VENV / ("Scripts" if os.name == "nt" else "bin") / name


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for path in INPUTS:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_environment() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py may be started by an older python3
        sys.exit(f"crank-registry needs Python 3.11 or newer, this is {sys.version.split()[0]}")
    stamp = VENV / ".crank-installed"
    if stamp.exists() and stamp.read_text() == _fingerprint():
        return
    if not _bin("python").exists():
        print(f"creating {VENV.relative_to(ROOT)} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing the distributions and the development requirements:", flush=True)
    editable = []
    for name in DISTRIBUTIONS:
        editable += ["-e", f"{ROOT / 'distributions' / name}{EXTRAS.get(name, '')}"]
    pip = subprocess.Popen(
        [
            str(_bin("python")),
            "-m",
            "pip",
            "install",
            "--progress-bar",
            "off",
            "--disable-pip-version-check",
            *editable,
            "-r",
            str(ROOT / "requirements-dev.txt"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # pip's lines as it writes them, not in blocks when its buffer fills.
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert pip.stdout is not None
    progress = PipProgress()
    for line in progress.lines(pip.stdout):
        print(line, flush=True)
    if pip.wait() != 0:
        # What was left out is what says why: show it all.
        sys.stdout.write("".join(progress.seen))
        sys.exit(f"pip failed (exit status {pip.returncode}); the environment is not ready")
    stamp.write_text(_fingerprint())


class PipProgress:
    """pip's output, one short line per step: what it collects, builds and installs.

    pip is silent for seconds at a time only between its own lines; the
    rest of them (downloads, already satisfied, warnings) is kept in
    :attr:`seen` and shown if pip fails.
    """

    # A requirement, a checkout's folder (-e), or a local wheel (an index of files).
    _COLLECTING = re.compile(r"(?:Collecting|Obtaining|Processing) (\S+)")
    _BUILDING = re.compile(r"Building (?:editable|wheel) for (\S+)")
    _INSTALLING = re.compile(r"Installing collected packages: (.*)")
    _INSTALLED = re.compile(r"Successfully installed (.*)")

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.collected = 0
        self._built: set[str] = set()

    def lines(self, output: Iterable[str]) -> Iterable[str]:
        """The line to print for each of pip's that says how far it is."""
        for raw in output:
            self.seen.append(raw)
            line = self.line(raw.strip())
            if line is not None:
                yield line

    def line(self, text: str) -> str | None:
        """What to print for one line of pip's output, or ``None``."""
        if text.startswith("ERROR:"):
            return text
        if match := self._COLLECTING.match(text):
            self.collected += 1
            what = match.group(1)
            if what.startswith("file:"):
                what = Path(what.removeprefix("file://")).name + " (this checkout)"
            elif what.endswith(".whl"):
                what = "==".join(Path(what).name.split("-")[:2])
            return f"  collecting {self.collected:3d}: {what}"
        if match := self._BUILDING.match(text):
            # pip says when each build starts and when it ends.
            name = match.group(1)
            if name in self._built:
                return None
            self._built.add(name)
            return f"  building {name}"
        if match := self._INSTALLING.match(text):
            count = len(match.group(1).split(", "))
            return f"  installing {count} packages ..."
        if match := self._INSTALLED.match(text):
            return f"  installed {len(match.group(1).split())} packages"
        return None


def main(argv: list[str]) -> int:
    tasks = {
        # The demo lives in the source tree (examples/demo), beside the workers it runs.
        "demo": [str(_bin("python")), "-m", "examples.demo"],
        "test": [str(_bin("python")), "-m", "pytest"],
        "nox": [str(_bin("nox"))],
    }
    if not argv or argv[0] not in tasks:
        print(__doc__)
        return 2
    ensure_environment()
    command = tasks[argv[0]] + argv[1:]
    child = subprocess.Popen(command, cwd=ROOT)
    # Ctrl-C reaches the child through the terminal; let it shut down in its
    # own time (the demo stops its processes) instead of being killed here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
