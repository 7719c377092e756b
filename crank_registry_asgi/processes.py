"""``crank-registry serve --processes N``: N server processes on one port, each a full replica.

Each process is a whole controller: it loads the shared registry from Redis
(``--redis`` is required with N > 1), applies every change of the stream,
routes in-process and answers every endpoint. Its controller id is the
configured one (``--controller-id``, default ``HOSTNAME:PORT``) with ``#i``
appended, i = 0..N-1 (DESIGN, "Identifiers with --processes N"); ``GET
/health`` names it.

How connections are spread: each process binds the port itself with
``SO_REUSEPORT`` and listens once its app has started; Linux hashes every
new connection to one of the listening sockets of the port, so the
processes get even shares, and a process that does not listen (yet, or any
longer) gets none. One socket bound by the parent and shared would leave the
choice to whichever ``accept()`` wins: on Linux every process's epoll wakes
for each connection and the least busy one tends to take them all, so the
shares are uneven (and a process that is starting would leave connections
waiting in the shared queue).

The parent, the supervisor, serves nothing. It

- checks that the port is free and holds it with a socket bound with
  ``SO_REUSEPORT`` that never listens (so no connection waits on it): the
  port stays this serve's while a process is replaced, and ``--port 0``
  picks one port for all;
- makes a fresh metrics directory for prometheus_client's multiprocess mode
  (``PROMETHEUS_MULTIPROC_DIR``), where every process writes its counters,
  and removes it at exit (:mod:`crank_registry_asgi.metrics`: ``GET
  /metrics`` on any process adds up the figures of all);
- starts the processes with ``multiprocessing``'s ``spawn`` context (a new
  interpreter each: no copy of the parent's threads, sockets or metrics):
  process #0 first, the others once it serves, so that a configuration no
  process can serve with is reported once;
- on SIGTERM or SIGINT, sends SIGTERM to every process, waits for them (at
  most :data:`STOP_TIMEOUT` seconds, then SIGKILL) and exits 0 when all
  stopped cleanly, else 1;
- when a process ends before every process has served once (a port, a
  certificate, Redis that cannot be used), stops the others and exits with
  that process's status (2: a configuration to fix), as one ``serve`` would;
- when a process ends after that (it crashed, or was killed), logs how it
  ended and starts another with the same index, while the others keep
  serving: at once when it had served :data:`STEADY_AFTER` seconds or more,
  else after a delay that doubles while its replacements end as young
  (:func:`restart_delay`).

A process stops by itself when its supervisor is gone (killed with
SIGKILL): it watches its end of the pipe to the supervisor, which is never
written to and so becomes readable only when the supervisor's end closes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

import attrs
from prometheus_client import multiprocess

from .server import ServerSettings, ServerSetupError

__all__ = [
    "MAX_RESTART_DELAY",
    "METRICS_VARIABLE",
    "STEADY_AFTER",
    "STOP_TIMEOUT",
    "ProcessRole",
    "process_controller_id",
    "restart_delay",
    "supervise",
]

logger = logging.getLogger("crank_registry_asgi.processes")

#: The environment variable that puts prometheus_client in multiprocess mode.
METRICS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds the processes have to stop after SIGTERM before they are killed.
STOP_TIMEOUT = 30.0
#: A process that served this long before it ended is replaced at once.
STEADY_AFTER = 30.0
#: The longest wait before a process that keeps ending is started again.
MAX_RESTART_DELAY = 30.0

# What a process sends its supervisor once it serves.
_STARTED = "started"


def restart_delay(quick_ends: int) -> float:
    """Seconds to wait before starting another process in the place of one that ended.

    ``quick_ends``: how many processes in a row ended there within
    :data:`STEADY_AFTER` seconds of their start, the last one included
    (0: it had served longer). 0 s, then 1, 2, 4... up to
    :data:`MAX_RESTART_DELAY`.
    """
    return 0.0 if quick_ends == 0 else min(2.0 ** (quick_ends - 1), MAX_RESTART_DELAY)


def process_controller_id(controller_id: str, index: int) -> str:
    """The controller id of process ``index`` of a ``serve --processes N``."""
    return f"{controller_id}#{index}"


@attrs.frozen
class ProcessRole:
    """What makes a spawned process one of the N: its index, the metrics, its pipe."""

    index: int
    metrics_directory: Path
    channel: Connection

    def started(self) -> None:
        """Tell the supervisor that this process serves."""
        self.channel.send(_STARTED)


@attrs.define
class _Slot:
    """One of the N places, and the process in it."""

    index: int
    process: BaseProcess
    channel: Connection
    started_at: float
    serving: bool = False
    #: Another process was here before this one.
    replacement: bool = False
    #: Processes in a row that ended here within STEADY_AFTER of their start.
    quick_ends: int = 0
    #: The process ended (and was waited for).
    ended: bool = False
    #: When to start the next process, once this one ended.
    restart_at: float | None = None


def supervise(options: argparse.Namespace, settings: ServerSettings) -> int:
    """Run ``settings.processes`` serving processes of ``serve OPTIONS``; the exit status.

    ``options`` are the parsed, checked flags of ``serve`` (each process
    builds its app from them again); ``settings`` is where to listen. Raises
    :class:`~crank_registry_asgi.server.ServerSetupError` when the port
    cannot be had.
    """
    with contextlib.ExitStack() as stack:
        holder = stack.enter_context(_hold_port(settings))
        port: int = holder.getsockname()[1]
        directory = Path(tempfile.mkdtemp(prefix="crank-registry-metrics-"))
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        stack.enter_context(_environment(METRICS_VARIABLE, str(directory)))
        wake = stack.enter_context(_signals())
        # The flags, without what the parser added for itself; the port as picked.
        values = {
            key: value
            for key, value in vars(options).items()
            if key not in {"command_parser", "handler"}
        }
        values["port"] = port
        status = _Supervisor(values, settings.processes, directory, wake).run()
    return status


class _Supervisor:
    def __init__(self, options: dict[str, Any], count: int, directory: Path, wake: _Wake) -> None:
        self.options = options
        self.count = count
        self.directory = directory
        self.wake = wake
        self.context = multiprocessing.get_context("spawn")
        self.slots: list[_Slot] = []

    def run(self) -> int:
        # The first alone: a configuration it cannot serve with is said once,
        # and the others find the registry's keys in Redis made.
        self.slots = [self._start(0)]
        failed = self._until_all_serve()
        if failed is None and not self.wake.stopping():
            self.slots += [self._start(index) for index in range(1, self.count)]
            failed = self._until_all_serve()
        if failed is not None:
            self._stop_all()
            return failed
        if self.wake.stopping():
            return self._stop_all()
        logger.info(
            "serving with %d processes on port %d, each a replica (metrics in %s)",
            self.count,
            self.options["port"],
            self.directory,
        )
        self._keep_serving()
        return self._stop_all()

    def _start(self, index: int, previous: _Slot | None = None) -> _Slot:
        ours, theirs = self.context.Pipe()
        process = self.context.Process(
            target=_serve_process,
            args=(self.options, index, self.directory, theirs),
            name=f"crank-registry serve #{index}",
        )
        process.start()
        # The process has its end now. Closed here, ours reads the end of the
        # pipe (EOFError) once the process is gone.
        theirs.close()
        slot = _Slot(index, process, ours, started_at=time.monotonic())
        if previous is not None:
            slot.replacement = True
            slot.quick_ends = previous.quick_ends
        return slot

    def _until_all_serve(self) -> int | None:
        """Wait until every process serves: ``None``, or the status of one that ended first."""
        while not all(slot.serving for slot in self.slots) and not self.wake.stopping():
            self._wait(None)
            for slot in self.slots:
                self._read(slot)
                if not slot.process.is_alive():
                    self._ended(slot)
                    code = slot.process.exitcode
                    logger.error(
                        "process #%d ended before it served (%s): stopping the others",
                        slot.index,
                        _how_it_ended(code),
                    )
                    return code if code is not None and code > 0 else 1
        return None

    def _keep_serving(self) -> None:
        """Replace the processes that end, until SIGTERM or SIGINT."""
        while not self.wake.stopping():
            now = time.monotonic()
            due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
            self._wait(None if not due else max(0.0, min(due) - now))
            if self.wake.stopping():
                # Ctrl-C reaches the processes too: their ends are the stop's.
                break
            now = time.monotonic()
            for slot in self.slots:
                self._read(slot)
                if not slot.ended and not slot.process.is_alive():
                    self._schedule_restart(slot, now)
            for position, slot in enumerate(self.slots):
                if slot.restart_at is not None and slot.restart_at <= now:
                    self.slots[position] = self._start(slot.index, previous=slot)

    def _schedule_restart(self, slot: _Slot, now: float) -> None:
        self._ended(slot)
        if now - slot.started_at >= STEADY_AFTER:
            slot.quick_ends = 0
        else:
            slot.quick_ends += 1
        delay = restart_delay(slot.quick_ends)
        slot.restart_at = now + delay
        logger.error(
            "process #%d (pid %s) %s; starting another%s",
            slot.index,
            slot.process.pid,
            _how_it_ended(slot.process.exitcode),
            f" in {delay:g} s" if delay else "",
        )

    def _ended(self, slot: _Slot) -> None:
        slot.ended = True
        slot.process.join()
        slot.channel.close()
        # Its counters stay (they add to the totals); its live gauges go.
        if slot.process.pid is not None:
            multiprocess.mark_process_dead(slot.process.pid, str(self.directory))  # type: ignore[no-untyped-call]

    def _read(self, slot: _Slot) -> None:
        if slot.channel.closed:
            return
        try:
            while slot.channel.poll():
                if slot.channel.recv() == _STARTED:
                    if slot.replacement:
                        logger.info("process #%d serves again", slot.index)
                    slot.serving = True
        except (EOFError, OSError):
            # The process is ending; its sentinel says when it has ended.
            slot.channel.close()

    def _wait(self, timeout: float | None) -> None:
        waited: list[Any] = [self.wake.reader]
        for slot in self.slots:
            if not slot.ended:
                waited.append(slot.process.sentinel)
                if not slot.channel.closed:
                    waited.append(slot.channel)
        wait(waited, timeout)
        self.wake.drain()

    def _stop_all(self) -> int:
        """SIGTERM every running process, SIGKILL those still running at the deadline."""
        if self.wake.signal is not None:
            logger.info(
                "%s: stopping %d processes", signal.Signals(self.wake.signal).name, self.count
            )
        running = [slot for slot in self.slots if not slot.ended]
        for slot in running:
            if slot.process.is_alive():
                slot.process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        clean = True
        for slot in running:
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                logger.error(
                    "process #%d did not stop within %g s: killed", slot.index, STOP_TIMEOUT
                )
                slot.process.kill()
                slot.process.join()
            # One still starting has no handler yet: SIGTERM ends it at once.
            if slot.process.exitcode not in (0, -signal.SIGTERM):
                clean = False
                logger.error(
                    "process #%d %s while stopping",
                    slot.index,
                    _how_it_ended(slot.process.exitcode),
                )
            slot.channel.close()
        return 0 if clean else 1


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-exitcode).name}"
        return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


@contextlib.contextmanager
def _hold_port(settings: ServerSettings) -> Iterator[socket.socket]:
    """A socket bound to the port with SO_REUSEPORT, never listening, while the block runs."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET

    def bound(port: int, *, reuse_port: bool) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # As hypercorn binds (see server.hypercorn_config).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((settings.host, port))
        except OSError as error:
            sock.close()
            raise ServerSetupError(
                f"cannot listen on {settings.host} port {settings.port}: {error.strerror or error}"
            ) from None
        return sock

    # First without SO_REUSEPORT: that fails when anything listens on the port,
    # even another serve --processes, which the processes would otherwise join.
    with bound(settings.port, reuse_port=False) as probe:
        port: int = probe.getsockname()[1]
    holder = bound(port, reuse_port=True)
    try:
        yield holder
    finally:
        holder.close()


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` while the block runs (the spawned processes inherit it)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


class _Wake:
    """SIGTERM and SIGINT, noted, and a socket that becomes readable when one arrives."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.signal: int | None = None

    def note(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def stopping(self) -> bool:
        return self.signal is not None

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self.reader.recv(256):
                pass


@contextlib.contextmanager
def _signals() -> Iterator[_Wake]:
    wake = _Wake()
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.signal(signum, wake.note) for signum in handled}
    # The handler runs only between two bytecodes; the wake-up byte ends a wait().
    previous_fd = signal.set_wakeup_fd(wake.writer.fileno())
    try:
        yield wake
    finally:
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        wake.reader.close()
        wake.writer.close()


def _serve_process(
    options: dict[str, Any], index: int, metrics_directory: Path, channel: Connection
) -> None:
    """The body of a spawned process: ``serve`` as process ``index`` until told to stop."""
    from .cli import UsageError, run_serve

    role = ProcessRole(index=index, metrics_directory=metrics_directory, channel=channel)
    try:
        status = run_serve(argparse.Namespace(**options), process=role)
    except UsageError as error:
        print(f"crank-registry serve: error: {error}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)
