"""The journal on disk: ``STATE_DIR/registry.jsonl``.

The core's codec (:mod:`crank_registry._journal`) turns events into lines
and replays them; this module only reads, appends and replaces the bytes
of one file, so that the registry survives a restart, a crash and a full
disk without losing an acknowledged registration. What goes into the file
is the effects module's to decide (:mod:`crank_registry_asgi.effects`).

* Durability. :meth:`Journal.append` with ``durable=True`` returns only
  once its lines are written and fsynced. Callers that arrive while an
  fsync is in flight wait for the next one, which covers all of them
  (group commit): one fsync per batch, not per request. Lines appended
  with ``durable=False`` (heartbeats) are written without waiting for an
  fsync: a lost heartbeat costs nothing that the next one does not repair.
* Failure. A failed write or fsync (a full disk) raises
  :class:`JournalUnavailable` for every caller of that batch, cuts the file
  back to its last good length, and leaves the journal usable for the next
  batch. The batch filling behind it fails too, unwritten: its lines were
  decided while the failed ones were taken as done (the registry applies a
  change only once it is durable, and decides the next one on the changes
  decided before it).
* Outcome. A caller may pass ``settled``: it is called on the event loop as
  soon as its batch's outcome is known, before any other caller runs and in
  the order the lines were appended, with ``None`` (durable) or the error.
  The service applies or discards the registry's pending changes there, so
  that they follow revision order whatever order the callers wake in.
* Compaction. When the file grows past ``compact_ratio`` times the size of
  a snapshot of the live workers (and past ``compact_min_bytes``), the
  :class:`SnapshotSource` given to :meth:`Journal.open` renders a snapshot,
  which is written to ``registry.jsonl.compact`` in the same directory,
  fsynced, renamed over the journal and the directory fsynced. A crash at
  any point leaves either the old journal or the new one, both complete; a
  leftover temporary file is removed on the next start.
* Timings. The :class:`JournalTimings` given to :meth:`Journal.open` hears
  how long each append and each batch fsync took (the service's metrics).
* One writer. :meth:`Journal.open` takes an exclusive ``flock`` on
  ``STATE_DIR/registry.lock``; a second controller on the same directory
  gets :class:`JournalError` saying who holds it.

Errors::

    JournalError          the journal cannot be used at start-up (locked,
                          unreadable, a directory in its place)
    JournalUnavailable    a write or fsync failed: answer 503
                          {"error": "journal_unavailable"}
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pathlib
import stat
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import anyio
import anyio.to_thread

__all__ = [
    "DEFAULT_COMPACT_MIN_BYTES",
    "JOURNAL_NAME",
    "LOCK_NAME",
    "Journal",
    "JournalError",
    "JournalTimings",
    "JournalUnavailable",
    "SnapshotSource",
]

logger = logging.getLogger(__name__)

#: The journal's file name inside the state directory.
JOURNAL_NAME = "registry.jsonl"
#: The lock file's name inside the state directory.
LOCK_NAME = "registry.lock"
#: No compaction while the journal is smaller than this (bytes).
DEFAULT_COMPACT_MIN_BYTES = 1 << 20

_COMPACT_SUFFIX = ".compact"
# Until the first compaction tells the real figure, a snapshot is assumed to
# take this many bytes per worker.
_ASSUMED_BYTES_PER_WORKER = 256


class JournalError(Exception):
    """The journal cannot be used: the controller must not start.

    The message names the path and says why (another controller holds the
    directory, the journal is a directory, it cannot be read).
    """


class JournalUnavailable(Exception):
    """A write or fsync of the journal failed (e.g. the disk is full).

    What the caller did is not known to be durable: the service answers
    HTTP 503 ``{"error": "journal_unavailable"}``.
    """

    code = "journal_unavailable"
    status_hint = 503


class SnapshotSource(Protocol):
    """What the journal compacts into: the registry it records."""

    def __len__(self) -> int:
        """How many workers a snapshot would hold now."""

    def capture(self) -> Callable[[], bytes]:
        """Take a snapshot now (on the event loop); the function returned renders its lines.

        The rendering runs in a worker thread, so it must not read live state.
        """


class JournalTimings(Protocol):
    """Hears how long the journal's writes take (:class:`~crank_registry_asgi.metrics.Metrics`)."""

    def appended(self, seconds: float) -> None:
        """An :meth:`Journal.append` returned (or raised) after ``seconds``."""

    def fsynced(self, seconds: float) -> None:
        """A batch's fsync took ``seconds`` (called from the writing thread)."""


class _NoTimings:
    def appended(self, seconds: float) -> None:
        pass

    def fsynced(self, seconds: float) -> None:
        pass


class _Batch:
    """Lines waiting to be written together, and the outcome all their callers share."""

    __slots__ = ("done", "durable", "error", "finished", "leader", "lines", "settled")

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        # Called with the outcome once it is known, in order.
        self.settled: list[Callable[[OSError | None], None]] = []
        self.durable = False
        # A caller has taken on writing this batch.
        self.leader = False
        self.done = False
        self.error: OSError | None = None
        # Set once done, for the callers waiting on it (made by the first).
        self.finished: anyio.Event | None = None

    def settle(self, error: OSError | None) -> None:
        """Record the batch's outcome and tell the callers' ``settled`` functions, in order."""
        self.error = error
        self.done = True
        for settled in self.settled:
            settled(error)

    def wake(self) -> None:
        """Let the callers waiting for this batch go on."""
        if self.finished is not None:
            self.finished.set()


class Journal:
    """An append-only journal in one state directory.

    Use: :meth:`open`, then :meth:`read` once (the bytes to replay), then
    :meth:`append` the lines of every change in the order they happened,
    and :meth:`aclose` at shutdown.
    """

    def __init__(
        self,
        state_dir: pathlib.Path,
        *,
        snapshots: SnapshotSource,
        lock_fd: int,
        fd: int,
        size: int,
        fsync: bool,
        compact_ratio: float,
        compact_min_bytes: int,
        timings: JournalTimings,
    ) -> None:
        """Use :meth:`open`."""
        self._timings = timings
        self.state_dir = state_dir
        self.path = state_dir / JOURNAL_NAME
        self._snapshots = snapshots
        self._lock_fd = lock_fd
        self._fd = fd
        self._size = size
        self._fsync = fsync
        self._compact_ratio = compact_ratio
        self._compact_min_bytes = compact_min_bytes
        self._read_done = False
        self._closed = False
        # fast_acquire: a batch leader that finds the lock free writes at once,
        # without first letting every other caller join its batch.
        self._lock = anyio.Lock(fast_acquire=True)
        self._pending = _Batch()
        # Bytes written since the last fsync (heartbeats are not fsynced).
        self._unsynced = False
        # A failed write left bytes past _size that must be cut first.
        self._damaged_tail = False
        # A compaction's rename is not known to be durable yet.
        self._directory_unsynced = False
        self._snapshot_bytes_per_worker: float = _ASSUMED_BYTES_PER_WORKER
        self._no_compaction_below = 0
        self.compactions = 0

    # ------------------------------------------------------------- start-up

    @classmethod
    def open(
        cls,
        state_dir: pathlib.Path,
        *,
        snapshots: SnapshotSource,
        fsync: bool = True,
        compact_ratio: float = 2.0,
        compact_min_bytes: int = DEFAULT_COMPACT_MIN_BYTES,
        timings: JournalTimings | None = None,
    ) -> Journal:
        """Create the directory if needed, lock it, and open ``registry.jsonl`` for append.

        ``snapshots`` gives the snapshot that replaces the file when it is
        compacted. ``fsync=False`` skips every fsync (for tests and
        benchmarks: a crash of the machine may then lose acknowledged
        registrations). Compaction starts when the file exceeds
        ``compact_ratio`` times a snapshot's size and ``compact_min_bytes``.
        ``timings`` hears the duration of every append and batch fsync.
        Raises :class:`JournalError` when the directory is held by another
        controller or the journal cannot be opened.
        """
        state_dir = pathlib.Path(state_dir)
        if compact_ratio <= 1:
            raise ValueError("compact_ratio must be > 1")
        if compact_min_bytes < 0:
            raise ValueError("compact_min_bytes must be >= 0")
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise JournalError(
                f"cannot create the state directory {state_dir}: {_reason(error)}"
            ) from error
        lock_fd = _lock(state_dir)
        try:
            path = state_dir / JOURNAL_NAME
            _remove_leftover(path.with_name(path.name + _COMPACT_SUFFIX))
            existed = path.exists()
            try:
                # O_NONBLOCK: a FIFO in the journal's place must not hang the start.
                fd = os.open(
                    path,
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK,
                    0o644,
                )
            except OSError as error:
                raise JournalError(f"cannot open the journal {path}: {_reason(error)}") from error
            try:
                status = os.fstat(fd)
                if not stat.S_ISREG(status.st_mode):
                    raise JournalError(f"cannot open the journal {path}: not a regular file")
                size = status.st_size
                if not existed:
                    _fsync_directory(state_dir)
            except OSError as error:
                os.close(fd)
                raise JournalError(f"cannot open the journal {path}: {_reason(error)}") from error
            except JournalError:
                os.close(fd)
                raise
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(
            state_dir,
            snapshots=snapshots,
            lock_fd=lock_fd,
            fd=fd,
            size=size,
            fsync=fsync,
            compact_ratio=compact_ratio,
            compact_min_bytes=compact_min_bytes,
            timings=timings if timings is not None else _NoTimings(),
        )

    def read(self) -> bytes:
        """The journal's bytes, to replay; call it once, before the first :meth:`append`.

        A torn last line (no newline: the process died while writing it, so
        it was never acknowledged) is returned, for the replay to report,
        and cut off the file, so that the next line does not continue it.
        Raises :class:`JournalError` when the file cannot be read or cut.
        """
        if self._read_done:
            raise RuntimeError("the journal was already read")
        if self._closed:
            raise RuntimeError("the journal is closed")
        try:
            with open(self.path, "rb") as file:
                data = file.read()
        except OSError as error:
            raise JournalError(f"cannot read the journal {self.path}: {_reason(error)}") from error
        complete = data.rfind(b"\n") + 1
        if complete < self._size:
            try:
                os.ftruncate(self._fd, complete)
                self._sync()
            except OSError as error:
                raise JournalError(
                    f"cannot cut the torn last line of the journal {self.path}: {_reason(error)}"
                ) from error
            self._size = complete
        self._read_done = True
        return data

    # ---------------------------------------------------------------- writes

    @property
    def size(self) -> int:
        """The journal's length in bytes, as this process wrote it."""
        return self._size

    async def append(
        self,
        lines: Sequence[bytes],
        *,
        durable: bool,
        settled: Callable[[OSError | None], None] | None = None,
    ) -> None:
        """Append ``lines`` (each ending in a newline).

        ``durable``: return only once they are written and fsynced. The
        lines join the pending batch before this first waits, so lines
        appended in some order are written in that order. ``settled`` is
        called with the batch's outcome as soon as it is known (module
        docstring), also when this caller is cancelled meanwhile. Raises
        :class:`JournalUnavailable` when the write of a durable batch fails
        (nothing of its batch is then in the file); then ``settled`` was
        called with the error, except when the journal is closed (raised
        before the lines join a batch, and ``settled`` is not called). May
        compact the file.
        """
        started = time.perf_counter()
        try:
            await self._append(lines, durable=durable, settled=settled)
        finally:
            if lines:
                self._timings.appended(time.perf_counter() - started)

    async def _append(
        self,
        lines: Sequence[bytes],
        *,
        durable: bool,
        settled: Callable[[OSError | None], None] | None,
    ) -> None:
        if not self._read_done:
            raise RuntimeError("read() must run before append()")
        if self._closed:
            raise JournalUnavailable(f"the journal {self.path} is closed")
        if not lines:
            if settled is not None:
                settled(None)
            return
        batch = self._pending
        batch.lines.extend(lines)
        if settled is not None:
            batch.settled.append(settled)
        if durable:
            batch.durable = True
        if batch.leader:
            # Someone is already waiting to write this batch.
            if durable:
                if not batch.done:
                    if batch.finished is None:
                        batch.finished = anyio.Event()
                    await batch.finished.wait()
                self._raise_for(batch)
            return
        # The first caller of a batch writes it once the previous batch is
        # written; callers arriving meanwhile join it and wait for it. So
        # one batch is being fsynced while the next one fills.
        batch.leader = True
        # Shielded: the callers that joined this batch depend on its leader.
        with anyio.CancelScope(shield=True):
            async with self._lock:
                if not batch.done:
                    if self._pending is batch:
                        self._pending = _Batch()
                    await self._flush(batch)
            # Wake the callers that joined only now: the next batch's leader,
            # already waiting for the lock, then runs first and writes what
            # arrived during this write, while they go on computing (instead
            # of all callers joining one batch and all waiting for its fsync).
            batch.wake()
            if self._compaction_due():
                async with self._lock:
                    if self._compaction_due():
                        await self._compact()
        if durable:
            self._raise_for(batch)

    def _compaction_due(self) -> bool:
        return not self._closed and self._size > max(
            self._compaction_threshold(), self._no_compaction_below
        )

    def _raise_for(self, batch: _Batch) -> None:
        if batch.error is not None:
            raise JournalUnavailable(
                f"cannot write the journal {self.path}: {_reason(batch.error)}"
            ) from batch.error

    async def _flush(self, batch: _Batch) -> None:
        """Write ``batch`` (fsynced if it holds a durable line); its callers share the outcome."""
        data = b"".join(batch.lines)
        sync = batch.durable and self._fsync
        outcome: OSError | None = None
        try:
            if self._closed:
                raise OSError(errno.EBADF, "the journal is closed")
            await anyio.to_thread.run_sync(self._write, data, sync)
        except OSError as error:
            outcome = error
            logger.warning("journal %s: write failed: %s", self.path, _reason(error))
        except BaseException:
            # Not known to be durable: its callers are told it failed.
            batch.settle(OSError(errno.EIO, "the write was interrupted"))
            raise
        # Told at once, before any other task runs: the outcome and the
        # registry's changes then agree (module docstring, Outcome).
        batch.settle(outcome)
        following = self._pending
        if outcome is not None and following is not batch and following.lines:
            # Decided while this batch's lines were taken as done: it fails too.
            self._pending = _Batch()
            following.settle(outcome)
            following.wake()

    def _write(self, data: bytes, sync: bool) -> None:
        """Append ``data`` (in a worker thread, one at a time); on failure cut it off again."""
        if self._damaged_tail:
            os.ftruncate(self._fd, self._size)
            self._damaged_tail = False
        if sync and self._directory_unsynced:
            _fsync_directory(self.state_dir)
            self._directory_unsynced = False
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            if sync:
                started = time.perf_counter()
                os.fsync(self._fd)
                self._timings.fsynced(time.perf_counter() - started)
        except OSError:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                self._damaged_tail = True
            raise
        self._size += len(data)
        self._unsynced = not sync

    def _sync(self) -> None:
        if self._fsync:
            os.fsync(self._fd)
        self._unsynced = False

    # ------------------------------------------------------------ compaction

    def _compaction_threshold(self) -> int:
        snapshot_size = len(self._snapshots) * self._snapshot_bytes_per_worker
        return max(self._compact_min_bytes, int(self._compact_ratio * snapshot_size))

    async def compact(self) -> None:
        """Replace the journal with a snapshot of the live workers now.

        Runs by itself when the file grows too large; this forces it.
        Raises :class:`JournalUnavailable` when the snapshot cannot be
        written (the old journal is then still in place).
        """
        if not self._read_done:
            raise RuntimeError("read() must run before compact()")
        async with self._lock:
            await self._compact(raise_errors=True)

    async def _compact(self, *, raise_errors: bool = False) -> None:
        # Lines still pending hold changes the snapshot already has (their
        # revisions say so to the replay); heartbeats never go backwards.
        workers = len(self._snapshots)
        render = self._snapshots.capture()
        try:
            # Rendered in the worker thread: a large registry takes a while
            # to render, and the event loop goes on meanwhile.
            written = await anyio.to_thread.run_sync(self._replace_with, render)
        except OSError as error:
            # The old journal is intact. Try again after it grew by half.
            self._no_compaction_below = self._size + self._size // 2
            logger.warning("journal %s: compaction failed: %s", self.path, _reason(error))
            if raise_errors:
                raise JournalUnavailable(
                    f"cannot compact the journal {self.path}: {_reason(error)}"
                ) from error
            return
        self._no_compaction_below = 0
        self.compactions += 1
        if workers:
            self._snapshot_bytes_per_worker = written / workers
        logger.info("journal %s compacted: %d workers, %d bytes", self.path, workers, written)

    def _replace_with(self, render: Callable[[], bytes]) -> int:
        """Write a rendered snapshot to a temporary file, fsync it, rename it over the journal.

        Returns the snapshot's length.
        """
        data = render()
        temporary = self.path.with_name(self.path.name + _COMPACT_SUFFIX)
        # Opened for append: once renamed, this descriptor is the journal's.
        fd = os.open(
            temporary, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
        )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self._fsync:
                os.fsync(fd)
            os.replace(temporary, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        old, self._fd = self._fd, fd
        os.close(old)
        self._size = len(data)
        self._damaged_tail = False
        self._unsynced = False
        if self._fsync:
            try:
                _fsync_directory(self.state_dir)
            except OSError as error:
                # Until the rename is durable, no new line may be
                # acknowledged: the next durable write retries this first.
                self._directory_unsynced = True
                logger.warning("journal %s: directory fsync failed: %s", self.path, _reason(error))
        return len(data)

    # --------------------------------------------------------------- closing

    async def aclose(self) -> None:
        """Write what is pending, fsync, close the file and release the directory lock."""
        if self._closed:
            return
        async with self._lock:
            batch = self._pending
            try:
                if batch.lines:
                    self._pending = _Batch()
                    batch.durable = True
                    await self._flush(batch)
                    batch.wake()
                elif self._unsynced:
                    await anyio.to_thread.run_sync(self._sync)
            except OSError as error:
                logger.warning("journal %s: final fsync failed: %s", self.path, _reason(error))
            finally:
                self._closed = True
                os.close(self._fd)
                os.close(self._lock_fd)


def _lock(state_dir: pathlib.Path) -> int:
    """Take the state directory's lock; raises :class:`JournalError` when it is held."""
    path = state_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise JournalError(f"cannot open the lock file {path}: {_reason(error)}") from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _read_holder(fd)
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise JournalError(
                f"another controller{holder} holds the state directory {state_dir} "
                f"(lock {path}); stop it or use another --state-dir"
            ) from error
        raise JournalError(f"cannot lock {path}: {_reason(error)}") from error
    # Say who holds it, for the message above in another process.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _remove_leftover(temporary: pathlib.Path) -> None:
    """Remove a compaction's temporary file left by a crash: the journal is complete without it."""
    try:
        temporary.unlink()
    except FileNotFoundError:
        return
    except IsADirectoryError as error:
        raise JournalError(f"cannot remove {temporary}: it is a directory") from error
    except OSError as error:
        raise JournalError(f"cannot remove {temporary}: {_reason(error)}") from error
    logger.warning("removed %s, left by an interrupted compaction", temporary)


def _fsync_directory(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reason(error: OSError) -> str:
    return error.strerror or str(error)
