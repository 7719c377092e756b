"""``python -m examples.demo [--keep-running] [--examples DIR] [--shared [--redis URL]]``.

Runs :func:`examples.demo.steps.run` (with ``--shared``,
:func:`examples.demo.shared.run`) in a fresh temporary directory.
Exit status 0 when every check passed, 1 when one failed (with the last
lines of every child's log), 2 for a usage error, 130 when interrupted
before the end. With ``--keep-running`` everything stays up after the
summary until Ctrl-C (then 0).

Every child runs in its own process group and is stopped on the way out,
whatever the way out is: a failed step, Ctrl-C, SIGTERM or SIGHUP; on Linux
the children also die with the demo if it is killed outright.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from . import shared, steps
from .processes import DemoFailure, Processes
from .report import Report
from .system import System

__all__ = ["CHECKOUT", "build_parser", "main"]

#: The source checkout this demo belongs to (it holds ``examples/workers``).
CHECKOUT = Path(__file__).resolve().parents[2]


class _Interrupted(BaseException):
    """SIGTERM or SIGHUP: leave like Ctrl-C does."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def build_parser() -> argparse.ArgumentParser:
    """The demo's flags."""
    parser = argparse.ArgumentParser(
        prog="python3 dev.py demo",
        description=(
            "Make development certificates in a temporary directory, start the controller "
            "(with its gateway) and the nine example workers as separate processes over "
            "mutual TLS, invoke every capability through POST /execute and check the answers, "
            "kill the controller with SIGKILL and restart it (the warm cache keeps routing, the "
            "workers re-register within a heartbeat interval), stop one worker and watch it "
            "leave, then print a summary. Exit status 0 when every check passed, 1 otherwise. "
            "Every process it starts is stopped on the way out, also on Ctrl-C."
        ),
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave everything running and print the URLs, until Ctrl-C",
    )
    parser.add_argument(
        "--shared",
        action="store_true",
        help=(
            "two controllers on one Redis instead: start redis-server on a free port (in the "
            "temporary directory), two controllers and the workers, SIGKILL one controller and "
            "watch routing go on through the other and the workers fail over to it"
        ),
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        help=(
            "with --shared: use this Redis instead of starting one (the demo's keys, under a "
            "prefix of its own, are deleted at the end)"
        ),
    )
    parser.add_argument(
        "--examples",
        type=Path,
        default=CHECKOUT,
        metavar="DIR",
        help="run the worker programs of DIR/examples/workers (default: this checkout)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    root: Path = args.examples.resolve()
    if not (root / "examples" / "workers" / "__init__.py").is_file():
        parser.error(
            f"--examples {args.examples}: there is no examples/workers/__init__.py in it; "
            "pass the folder that holds examples/workers (a clone of crank-registry)"
        )
    if args.redis is not None and not args.shared:
        parser.error("--redis URL goes with --shared (the shared registry's variant)")
    if args.shared and args.redis is None and shutil.which("redis-server") is None:
        parser.error(
            "--shared starts a redis-server, and none is installed: apt-get install "
            "redis-server, or give a running Redis with --redis URL"
        )
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    workdir = Path(tempfile.mkdtemp(prefix="crank-demo-"))
    report = Report(sys.stdout)
    processes = Processes(root, workdir / "logs")
    system = (
        shared.SharedSystem(workdir, processes, redis_given=args.redis)
        if args.shared
        else System(workdir, processes)
    )
    keeping = False
    try:
        if isinstance(system, shared.SharedSystem):
            shared.run(system, report)
        else:
            steps.run(system, report)
        if args.keep_running:
            keeping = True
            steps.keep_running(system, report)
    except DemoFailure as failure:
        report.say(f"FAILED: {failure}")
        report.print_logs(system.processes.tails(15))
        return 1
    except (KeyboardInterrupt, _Interrupted):
        report.say("interrupted")
        return 0 if keeping else 130
    finally:
        system.stop_everything()
        shutil.rmtree(workdir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
