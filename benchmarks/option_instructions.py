"""Instructions and cache misses per route with each routing option, counted by valgrind.

Run: ``.venv/bin/python benchmarks/option_instructions.py`` (needs
``valgrind``; about a minute at 2 000 workers, ``--workers 10000`` for the
fleet of ``core.py`` in about 6). The counts do not move with the
machine's load, unlike the CPU times of ``core.py --only options``.

It runs itself under ``valgrind --tool=callgrind --cache-sim=yes``: the
fleet of ``core.py``'s route options (10 workers per capability), then
for each option of :data:`core.OPTIONS` (``slo_constraints`` with an SLO
file per capability too, and the access policy's cases of
:data:`core.POLICY_CASES`) a warm-up and :data:`ROUTES` routes over every
capability in turn. Callgrind dumps its counts at every ``os.getppid()``
(``--dump-before=getppid``), which marks the end of each option's routes;
each dump divided by the routes is the figure printed: instructions, and
the data reads and writes that missed the first-level cache (D1) and the
last level (LL) of the simulated caches, :data:`CACHES` (fixed, so that
the figures are the same on every machine: a 32 KiB D1 and a 2 MiB LL,
this machine's per-core L1 and L2). At 10 000 workers the members a route
reads are scattered over a heap far larger than D1: its misses measure the
memory a route touches.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# The script's own directory is on sys.path: core.py's fleet and options.
import core

from crank_registry import BuiltinPolicy

ROUTES = 1_000
SLO_FILES = "slo_constraints p95 <= 100 ms, an SLO file per capability"
#: The simulated caches: size, associativity, line size.
CACHES = ("--I1=32768,8,64", "--D1=32768,8,64", "--LL=2097152,16,64")


def routes(workers: int) -> list[str]:
    """Under callgrind: each case's routes, a marker call after each; the cases' labels."""
    core.OPTION_WORKERS = workers
    registry, names = core.option_fleet(10)
    cases: dict[str, Callable[[], None]] = {
        label: core.option_routes(registry, names, options, ROUTES)
        for label, options in core.OPTIONS.items()
    }
    labels = list(cases)
    for run in cases.values():
        run()  # warm-up (affinity hashes each worker id once)
    os.getppid()  # the dump of everything before
    for run in cases.values():
        run()
        os.getppid()
    registry.set_slos(core.slo_files(names), now=core.START)
    run = core.option_routes(registry, names, core.OPTIONS["slo_constraints p95 <= 100 ms"], ROUTES)
    for _ in range(2):  # a warm-up, then the routes counted
        run()
        os.getppid()
    labels.append(SLO_FILES)
    registry.set_slos((), now=core.START)
    for label, rules, options, _target in core.POLICY_CASES:
        registry.set_access_policy(BuiltinPolicy(rules, registry.required_targets))
        asked = [names[n] for n in core.REQUIRED] if "required" in label else names
        run = core.option_routes(registry, asked, options, ROUTES)
        for _ in range(2):
            run()
            os.getppid()
        labels.append(f"policy: {label}")
    return labels


def counts(dump: Path) -> dict[str, int]:
    """The events one callgrind dump counted, by name (Ir, D1mr, DLmw...)."""
    names: list[str] = []
    for line in dump.read_text().splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        if line.startswith(("summary:", "totals:")):
            return dict(zip(names, map(int, line.split()[1:]), strict=False))
    raise ValueError(f"{dump}: no summary line")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2_000, help="the fleet's size")
    parser.add_argument("--routes", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.routes:
        routes(args.workers)
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)")
        return 1
    with tempfile.TemporaryDirectory() as directory:
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--cache-sim=yes",
                *CACHES,
                "--dump-before=getppid",
                "--dump-instr=no",
                f"--callgrind-out-file={directory}/cg.%p",
                sys.executable,
                __file__,
                "--routes",
                f"--workers={args.workers}",
            ],
            check=True,
            capture_output=True,
            # Fixed string hashes: the dicts probe alike from run to run.
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        dumps = sorted(Path(directory).glob("cg.*.*"), key=lambda p: int(p.suffix[1:]))
        figures = [counts(dump) for dump in dumps]
    # Dump 1 is the set-up, then one per option; the later cases each a
    # warm-up dump, then their routes'.
    core.OPTION_WORKERS = args.workers
    options = list(core.OPTIONS)
    later = [SLO_FILES, *(f"policy: {case[0]}" for case in core.POLICY_CASES)]
    by_label = dict(zip(options, figures[1 : len(options) + 1], strict=True))
    rest = figures[len(options) + 1 :]
    by_label.update(zip(later, rest[1::2], strict=True))
    print(
        f"per route, {args.workers} workers, 10 per capability ({ROUTES} routes): "
        "instructions, D1 misses (reads + writes), LL misses"
    )
    for label, events in by_label.items():
        # A dump leaves out the events it counted none of.
        d1 = events.get("D1mr", 0) + events.get("D1mw", 0)
        ll = events.get("DLmr", 0) + events.get("DLmw", 0)
        print(
            f"route, {label}: {events['Ir'] / ROUTES / 1000:.1f}k instructions, "
            f"{d1 / ROUTES:.0f} D1, {ll / ROUTES:.1f} LL"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
