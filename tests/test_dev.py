"""``dev.py``: the first install says how far it is, one line per step of pip's."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]

# pip 23's own lines (non-interactive), as it installs the environment.
PIP_OUTPUT = """\
Obtaining file:///src/crank/distributions/crank-registry
  Installing build dependencies: started
Looking in indexes: https://pypi.org/simple
Collecting pytest>=8 (from -r requirements-dev.txt (line 2))
  Downloading pytest-9.2.0-py3-none-any.whl (411 kB)
Processing /opt/pypi/files/pytest_timeout-2.4.0-py3-none-any.whl (from -r requirements-dev.txt)
Requirement already satisfied: pip in ./.venv/lib/python3.11/site-packages (23.2.1)
WARNING: Location 'file:///opt/pypi/simple/x/' is ignored: it is neither a file nor a directory.
Building wheels for collected packages: crank-registry
  Building editable for crank-registry (pyproject.toml): started
  Building editable for crank-registry (pyproject.toml): finished with status 'done'
Installing collected packages: pytest-timeout, pytest, crank-registry
Successfully installed crank-registry-0.1.0 pytest-9.2.0 pytest-timeout-2.4.0
"""


def load_dev() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_line_per_package_collected_built_and_installed() -> None:
    progress = load_dev().PipProgress()
    lines = list(progress.lines(PIP_OUTPUT.splitlines(keepends=True)))
    assert lines == [
        "  collecting   1: crank-registry (this checkout)",
        "  collecting   2: pytest>=8",
        "  collecting   3: pytest_timeout==2.4.0",
        "  building crank-registry",
        "  installing 3 packages ...",
        "  installed 3 packages",
    ]
    # The rest is kept, for when pip fails.
    assert "".join(progress.seen) == PIP_OUTPUT


def test_pip_errors_are_shown() -> None:
    progress = load_dev().PipProgress()
    error = "ERROR: Could not find a version that satisfies the requirement nope"
    assert list(progress.lines([f"{error}\n"])) == [error]


def test_without_a_task_it_prints_its_help_and_installs_nothing() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "dev.py")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "python3 dev.py test" in result.stdout
    assert "one line per" in result.stdout
    assert "installing" not in result.stdout
