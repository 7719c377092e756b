#!/usr/bin/env python3
"""Bootstrap a development environment in .venv and run a task in it.

    python3 dev.py demo      # the controller, nine workers and the gateway
    python3 dev.py test      # the test suite
    python3 dev.py nox ...   # any nox session (lint, typecheck, bench, ...)

Needs only Python 3.11+. The first run creates .venv and installs the three
distributions (editable) and the development requirements; later runs
reinstall only when a pyproject or requirements file changed.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import venv
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
    print("installing the distributions and the development requirements ...", flush=True)
    editable = []
    for name in DISTRIBUTIONS:
        editable += ["-e", f"{ROOT / 'distributions' / name}{EXTRAS.get(name, '')}"]
    subprocess.run(
        [
            str(_bin("python")),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *editable,
            "-r",
            str(ROOT / "requirements-dev.txt"),
        ],
        check=True,
    )
    stamp.write_text(_fingerprint())


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
