"""Instructions per route with each routing option, counted by valgrind (callgrind).

Run: ``.venv/bin/python benchmarks/option_instructions.py`` (needs
``valgrind``; about 30 s). The counts do not move with the machine's load,
unlike the CPU times of ``core.py --only options``.

It runs itself under ``valgrind --tool=callgrind``: the fleet of
``core.py``'s route options at 2 000 workers, 10 per capability, then for
each option of :data:`core.OPTIONS` (and ``slo_constraints`` with an SLO
file per capability) a warm-up and :data:`ROUTES` routes. Callgrind dumps
its counts at every ``os.getppid()`` (``--dump-before=getppid``), which
marks the end of each option's routes; each dump divided by the routes is
the figure printed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The script's own directory is on sys.path: core.py's fleet and options.
import core

WORKERS = 2_000
ROUTES = 200
SLO_FILES = "slo_constraints p95 <= 100 ms, an SLO file per capability"


def routes() -> None:
    """Under callgrind: each option's routes, a marker call after each."""
    core.OPTION_WORKERS = WORKERS
    registry, names = core.option_fleet(10)
    runs = {
        label: core.option_routes(registry, names, options, ROUTES)
        for label, options in core.OPTIONS.items()
    }
    for run in runs.values():
        run()  # warm-up (affinity hashes each worker id once)
    os.getppid()  # the dump of everything before
    for run in runs.values():
        run()
        os.getppid()
    registry.set_slos(core.slo_files(names), now=core.START)
    run = core.option_routes(registry, names, core.OPTIONS["slo_constraints p95 <= 100 ms"], ROUTES)
    run()
    os.getppid()
    run()
    os.getppid()


def total(dump: Path) -> int:
    """The instructions one callgrind dump counted."""
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise ValueError(f"{dump}: no summary line")


def main() -> int:
    if "--routes" in sys.argv:
        routes()
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)")
        return 1
    with tempfile.TemporaryDirectory() as directory:
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--dump-before=getppid",
                "--dump-instr=no",
                f"--callgrind-out-file={directory}/cg.%p",
                sys.executable,
                __file__,
                "--routes",
            ],
            check=True,
            capture_output=True,
        )
        dumps = sorted(Path(directory).glob("cg.*.*"), key=lambda p: int(p.suffix[1:]))
        counts = [total(dump) for dump in dumps]
    # Dump 1 is the set-up; then one per option, the SLO files' warm-up, its routes.
    labels = list(core.OPTIONS)
    figures = dict(zip(labels, counts[1 : len(labels) + 1], strict=True))
    figures[SLO_FILES] = counts[len(labels) + 2]
    print(f"instructions per route, {WORKERS} workers, 10 per capability ({ROUTES} routes)")
    for label, count in figures.items():
        print(f"route, {label}: {count / ROUTES / 1000:.1f}k")
    return 0


if __name__ == "__main__":
    sys.exit(main())
