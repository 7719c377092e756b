"""The journal on disk: recovery, damage, durability, failures, compaction, the lock."""

from __future__ import annotations

import errno
import gc
import json
import os
import pathlib
import subprocess
import sys
import threading
from collections.abc import Callable

import anyio
import pytest

from crank_registry import CapabilityRegistry, HealthPolicy, HealthState, replay
from crank_registry._journal import SNAPSHOT_PART_SIZE
from crank_registry_asgi import journal as journal_module
from crank_registry_asgi.journal import (
    COMPACT_MIN_BYTES_ENV,
    JOURNAL_NAME,
    Journal,
    JournalError,
    JournalUnavailable,
)
from tests.journal.helpers import T0, capability, normalized

POLICY = HealthPolicy(heartbeat_interval=10, unhealthy_after=20, evict_after=40)


def start(state_dir: pathlib.Path, **options: object) -> tuple[Journal, CapabilityRegistry]:
    """Open and recover, as the service's lifespan does."""
    journal = Journal.open(state_dir, **options)  # type: ignore[arg-type]
    registry = CapabilityRegistry(POLICY)
    journal.recover(registry, now=T0)
    return journal, registry


async def register_many(
    journal: Journal, registry: CapabilityRegistry, ids: list[str], *, now: float = T0
) -> None:
    async with anyio.create_task_group() as tasks:
        for worker_id in ids:

            async def one(worker_id: str = worker_id) -> None:
                events = registry.register(worker_id, "http://h:1", [capability()], now=now)
                await journal.record(events)

            tasks.start_soon(one)


def ids_in(state_dir: pathlib.Path) -> list[str]:
    with open(state_dir / JOURNAL_NAME, "rb") as file:
        return [r.worker_id for r in replay(file).records]


# ------------------------------------------------------------------ recovery


@pytest.mark.anyio
async def test_recovery_puts_the_restored_registry_out_of_the_collectors_reach(
    tmp_path: pathlib.Path,
) -> None:
    journal, registry = start(tmp_path)
    await register_many(journal, registry, ["a", "b"])
    await journal.aclose()
    gc.unfreeze()
    journal = Journal.open(tmp_path)
    restored = CapabilityRegistry(POLICY)
    journal.recover(restored, now=T0 + 1)
    await journal.aclose()
    # Frozen (never walked by a collection again), and the collector is back on.
    assert gc.get_freeze_count() > 0
    assert gc.isenabled()


@pytest.mark.anyio
async def test_restart_restores_workers_as_unverified(tmp_path: pathlib.Path) -> None:
    state_dir = tmp_path / "state" / "controller"
    journal, registry = start(state_dir)
    assert (state_dir / JOURNAL_NAME).is_file()
    await register_many(journal, registry, ["a", "b", "c"])
    await journal.record(registry.deregister("b", now=T0 + 1))
    await journal.record(registry.heartbeat("a", now=T0 + 15))
    await journal.aclose()

    journal = Journal.open(state_dir)
    restored = CapabilityRegistry(POLICY)
    report = journal.recover(restored, now=T0 + 25)
    await journal.aclose()
    assert report.workers_restored == 2
    assert (report.lines_read, report.lines_skipped) == (5, 0)
    assert report.seconds >= 0
    a, c = sorted(restored.workers(now=T0 + 25), key=lambda view: view.worker_id)
    assert (a.worker_id, a.state, a.is_healthy, a.last_heartbeat) == (
        "a",
        HealthState.UNVERIFIED,
        True,
        T0 + 15,
    )
    assert (c.worker_id, c.state, c.is_healthy) == ("c", HealthState.UNVERIFIED, False)


@pytest.mark.anyio
async def test_workers_past_evict_after_are_not_restored(tmp_path: pathlib.Path) -> None:
    journal, registry = start(tmp_path)
    await register_many(journal, registry, ["a"])
    await journal.aclose()
    journal = Journal.open(tmp_path)
    restored = CapabilityRegistry(POLICY)
    assert journal.recover(restored, now=T0 + 41).workers_restored == 0
    await journal.aclose()


@pytest.mark.anyio
async def test_torn_tail_is_dropped_and_cut_before_the_next_line(tmp_path: pathlib.Path) -> None:
    journal, registry = start(tmp_path)
    await register_many(journal, registry, ["a", "b"])
    await journal.aclose()
    path = tmp_path / JOURNAL_NAME
    intact = path.read_bytes()
    with open(path, "ab") as file:
        file.write(b'{"v":1,"type":"registered","worker_id":"torn","worker_u')

    journal = Journal.open(tmp_path)
    restored = CapabilityRegistry(POLICY)
    report = journal.recover(restored, now=T0)
    assert (report.workers_restored, report.lines_skipped) == (2, 1)
    assert path.read_bytes() == intact  # cut, so the next line starts on its own
    await journal.record(restored.register("c", "http://h:1", [capability()], now=T0))
    await journal.aclose()
    assert sorted(ids_in(tmp_path)) == ["a", "b", "c"]
    with open(path, "rb") as file:
        assert replay(file).lines_skipped == 0


@pytest.mark.anyio
async def test_corrupted_lines_are_skipped_counted_and_logged(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal, registry = start(tmp_path)
    await register_many(journal, registry, ["a"])
    await journal.aclose()
    path = tmp_path / JOURNAL_NAME
    good = path.read_bytes()
    other = good.replace(b'"a"', b'"b"')
    unknown_version = good.replace(b'"v":1', b'"v":7').replace(b'"a"', b'"z"')
    path.write_bytes(good + b"\x00garbage\n" + unknown_version + other)

    journal = Journal.open(tmp_path)
    restored = CapabilityRegistry(POLICY)
    report = journal.recover(restored, now=T0)
    await journal.aclose()
    assert (report.workers_restored, report.lines_read, report.lines_skipped) == (2, 4, 2)
    assert [w.worker_id for w in restored.workers(now=T0)] == ["a", "b"]
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("line 2 skipped" in m for m in messages)
    assert any("line 3 skipped" in m and "version 7" in m for m in messages)


# ------------------------------------------------------------------ start-up failures


def test_second_controller_on_the_same_directory_refuses(tmp_path: pathlib.Path) -> None:
    journal = Journal.open(tmp_path)
    try:
        with pytest.raises(JournalError, match="another controller") as caught:
            Journal.open(tmp_path)
        assert str(tmp_path) in str(caught.value)
        assert f"pid {os.getpid()}" in str(caught.value)
        # Another process, too (the lock is an flock on the directory's lock file).
        code = (
            "import sys, pathlib\n"
            "from crank_registry_asgi.journal import Journal, JournalError\n"
            "try:\n"
            "    Journal.open(pathlib.Path(sys.argv[1]))\n"
            "except JournalError as error:\n"
            "    print(error); sys.exit(3)\n"
        )
        child = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert child.returncode == 3, child.stderr
        assert "another controller" in child.stdout and str(tmp_path) in child.stdout
    finally:
        anyio.run(journal.aclose)
    # Released on close.
    anyio.run(Journal.open(tmp_path).aclose)


def test_a_directory_in_place_of_the_journal_stops_the_start(tmp_path: pathlib.Path) -> None:
    (tmp_path / JOURNAL_NAME).mkdir()
    with pytest.raises(JournalError) as caught:
        Journal.open(tmp_path)
    assert str(tmp_path / JOURNAL_NAME) in str(caught.value)
    assert "directory" in str(caught.value).lower()
    # The lock was released: the start can be retried once the damage is repaired.
    (tmp_path / JOURNAL_NAME).rmdir()
    anyio.run(Journal.open(tmp_path).aclose)


def test_a_fifo_in_place_of_the_journal_stops_the_start(tmp_path: pathlib.Path) -> None:
    os.mkfifo(tmp_path / JOURNAL_NAME)
    with pytest.raises(JournalError, match=r"not a regular file|No such device") as caught:
        Journal.open(tmp_path)
    assert str(tmp_path / JOURNAL_NAME) in str(caught.value)


def test_a_file_in_place_of_the_state_directory_stops_the_start(tmp_path: pathlib.Path) -> None:
    (tmp_path / "state").write_text("not a directory")
    with pytest.raises(JournalError, match="state directory") as caught:
        Journal.open(tmp_path / "state")
    assert str(tmp_path / "state") in str(caught.value)


def test_unreadable_journal_stops_the_recovery(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests run as root, for whom mode 000 still reads: fail the read itself.
    journal = Journal.open(tmp_path)
    real_open = open

    def failing_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if file == tmp_path / JOURNAL_NAME and "r" in mode:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(JournalError, match="cannot read the journal") as caught:
        journal.recover(CapabilityRegistry(), now=T0)
    assert str(tmp_path / JOURNAL_NAME) in str(caught.value)
    assert "Permission denied" in str(caught.value)
    monkeypatch.undo()
    anyio.run(journal.aclose)


def test_bad_compaction_settings_are_refused(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="compact_ratio"):
        Journal.open(tmp_path, compact_ratio=1.0)
    with pytest.raises(ValueError, match="compact_min_bytes"):
        Journal.open(tmp_path, compact_min_bytes=-1)
    monkeypatch.setenv(COMPACT_MIN_BYTES_ENV, "lots")
    with pytest.raises(JournalError, match=COMPACT_MIN_BYTES_ENV):
        Journal.open(tmp_path)


@pytest.mark.anyio
async def test_record_before_recover_is_refused(tmp_path: pathlib.Path) -> None:
    journal = Journal.open(tmp_path)
    with pytest.raises(RuntimeError, match="recover"):
        await journal.record(())
    journal.recover(CapabilityRegistry(), now=T0)
    with pytest.raises(RuntimeError, match="already"):
        journal.recover(CapabilityRegistry(), now=T0)
    await journal.aclose()
    await journal.aclose()  # idempotent
    with pytest.raises(JournalUnavailable, match="closed"):
        await journal.record(
            CapabilityRegistry().register("a", "http://h:1", [capability()], now=T0)
        )


# ------------------------------------------------------------------ durability


class FsyncCounter:
    """Counts os.fsync calls on the journal file (and can make them fail)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: pathlib.Path) -> None:
        self.path = path
        self.calls = 0
        self.fail_with: int | None = None
        self._real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", self)

    def is_journal(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            return False

    def __call__(self, fd: int) -> None:
        if self.is_journal(fd):
            self.calls += 1
            if self.fail_with is not None:
                raise OSError(self.fail_with, os.strerror(self.fail_with))
        self._real_fsync(fd)


@pytest.mark.anyio
async def test_concurrent_registrations_share_fsyncs(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal, registry = start(tmp_path)
    fsyncs = FsyncCounter(monkeypatch, tmp_path / JOURNAL_NAME)
    ids = [f"w{i}" for i in range(64)]
    await register_many(journal, registry, ids)
    # Every registration is in the file once record() returned...
    assert sorted(ids_in(tmp_path)) == sorted(ids)
    # ...and the 64 concurrent callers did not pay one fsync each.
    assert 1 <= fsyncs.calls < 64 / 4
    await journal.aclose()


@pytest.mark.anyio
async def test_heartbeats_are_coalesced_and_flushed_on_close(tmp_path: pathlib.Path) -> None:
    journal, registry = start(tmp_path)
    await register_many(journal, registry, ["a"])
    size = journal.size
    for second in range(1, 10):  # within unhealthy_after / 2 = 10 s: no line
        await journal.record(registry.heartbeat("a", now=T0 + second))
    assert journal.size == size
    await journal.record(registry.heartbeat("a", now=T0 + 10))
    # Written at once (not fsynced): a crash of the process does not lose it.
    assert journal.size > size
    assert (tmp_path / JOURNAL_NAME).stat().st_size == journal.size
    await journal.aclose()
    with open(tmp_path / JOURNAL_NAME, "rb") as file:
        lines = file.readlines()
    assert [json.loads(line)["type"] for line in lines] == ["registered", "heartbeat"]
    assert json.loads(lines[1])["at"] == T0 + 10


@pytest.mark.anyio
async def test_failed_write_raises_and_the_journal_keeps_working(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal, registry = start(tmp_path)
    await register_many(journal, registry, ["a"])
    path = tmp_path / JOURNAL_NAME
    before = path.read_bytes()
    real_write = os.write
    journal_inode = os.stat(path).st_ino

    def disk_full(fd: int, data: bytes) -> int:
        if os.fstat(fd).st_ino == journal_inode:
            # A partial write, then the disk is full: as a real ENOSPC goes.
            written = real_write(fd, bytes(data)[:7])
            monkeypatch.setattr(os, "write", refusing)
            return written
        return real_write(fd, data)

    def refusing(fd: int, data: bytes) -> int:
        if os.fstat(fd).st_ino == journal_inode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", disk_full)
    errors: list[JournalUnavailable] = []

    async def refused(worker_id: str) -> None:
        try:
            await journal.record(registry.register(worker_id, "http://h:1", [capability()], now=T0))
        except JournalUnavailable as error:
            errors.append(error)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(refused, "b")
        tasks.start_soon(refused, "c")
    # Both callers shared the failed batch, so both are told.
    assert len(errors) == 2
    assert "No space left on device" in str(errors[0]) and str(path) in str(errors[0])
    assert (errors[0].code, errors[0].status_hint) == ("journal_unavailable", 503)
    assert path.read_bytes() == before  # the partial line was cut off

    monkeypatch.setattr(os, "write", real_write)
    await register_many(journal, registry, ["d"])
    await journal.aclose()
    with open(path, "rb") as file:
        result = replay(file)
    assert result.lines_skipped == 0
    # b and c were refused; the journal only claims what it acknowledged.
    assert [r.worker_id for r in result.records] == ["a", "d"]


@pytest.mark.anyio
async def test_failed_fsync_raises_journal_unavailable(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal, registry = start(tmp_path)
    fsyncs = FsyncCounter(monkeypatch, tmp_path / JOURNAL_NAME)
    fsyncs.fail_with = errno.EIO
    with pytest.raises(JournalUnavailable, match="Input/output error"):
        await journal.record(registry.register("a", "http://h:1", [capability()], now=T0))
    fsyncs.fail_with = None
    await journal.record(registry.register("b", "http://h:1", [capability()], now=T0))
    await journal.aclose()
    assert ids_in(tmp_path) == ["b"]


@pytest.mark.anyio
async def test_real_full_disk(tmp_path: pathlib.Path) -> None:
    """A tiny tmpfs fills up for real (needs permission to mount; skipped otherwise)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        journal, registry = start(mount_point, compact_min_bytes=1 << 30)
        big = capability(constraints={"padding": "x" * 3000})
        acknowledged: list[str] = []
        refused = 0
        for i in range(60):
            events = registry.register(f"w{i}", "http://h:1", [big], now=T0)
            try:
                await journal.record(events)
            except JournalUnavailable:
                refused += 1
            else:
                acknowledged.append(f"w{i}")
        assert refused > 0 and acknowledged
        await journal.aclose()
        assert ids_in(mount_point) == acknowledged
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


# ------------------------------------------------------------------ compaction


async def churn(journal: Journal, registry: CapabilityRegistry, rounds: int) -> None:
    """Registrations, heartbeats and departures, so that the file outgrows the live state."""
    now = T0
    for round_ in range(rounds):
        now += 11
        await register_many(journal, registry, [f"w{round_}-{i}" for i in range(5)], now=now)
        await journal.record(registry.cleanup_stale(now=now))
        for worker in registry.records():
            if not worker.worker_id.endswith(("-3", "-4")):  # the others fall silent
                await journal.record(registry.heartbeat(worker.worker_id, now=now))
        if round_ % 2:
            await journal.record(registry.deregister(f"w{round_ - 1}-0", now=now))


@pytest.mark.anyio
async def test_compaction_keeps_exactly_the_live_state(tmp_path: pathlib.Path) -> None:
    journal, registry = start(tmp_path, compact_min_bytes=4096)
    await churn(journal, registry, 30)
    assert journal.compactions >= 2
    with open(tmp_path / JOURNAL_NAME, "rb") as file:
        result = replay(file)
    assert result.lines_skipped == 0
    live = registry.records()
    replayed = {r.worker_id: r for r in result.records}
    assert list(replayed) == [r.worker_id for r in live]
    for record in live:
        kept = replayed[record.worker_id]
        assert (kept.worker_url, kept.capabilities) == (record.worker_url, record.capabilities)
        # Heartbeats are journaled at most every unhealthy_after / 2.
        assert 0 <= record.last_heartbeat - kept.last_heartbeat < POLICY.unhealthy_after / 2
    # The file stays proportional to the live state.
    snapshot_size = sum(map(len, journal._state.snapshot()))
    assert journal.size <= max(4096, 2 * snapshot_size) + 4096
    assert not list(tmp_path.glob("*.compact"))
    await journal.aclose()


@pytest.mark.anyio
async def test_forced_compaction_then_restart(tmp_path: pathlib.Path) -> None:
    journal, registry = start(tmp_path, fsync=False)
    await register_many(journal, registry, [f"w{i}" for i in range(2500)])
    for i in range(0, 2500, 2):
        await journal.record(registry.deregister(f"w{i}", now=T0 + 1))
    size = journal.size
    await journal.compact()
    assert journal.size < size / 5
    await journal.record(registry.deregister("w1", now=T0 + 2))
    await journal.aclose()
    journal = Journal.open(tmp_path)
    restored = CapabilityRegistry(POLICY)
    report = journal.recover(restored, now=T0 + 3)
    await journal.aclose()
    assert report.workers_restored == 1249
    # The snapshot's parts (of 1250 workers), then the one line after them.
    assert report.lines_read == -(-1250 // SNAPSHOT_PART_SIZE) + 1
    assert normalized(restored.records()) == normalized(registry.records())


@pytest.mark.anyio
@pytest.mark.parametrize("leftover", [b"", b'{"v":1,"type":"snapshot","part":0,"par'])
async def test_compaction_leftovers_are_harmless(tmp_path: pathlib.Path, leftover: bytes) -> None:
    journal, registry = start(tmp_path)
    await register_many(journal, registry, ["a", "b"])
    await journal.aclose()
    # A crash between writing the temporary file and renaming it.
    temporary = tmp_path / (JOURNAL_NAME + ".compact")
    temporary.write_bytes(leftover)
    journal, restored = start(tmp_path)
    assert not temporary.exists()
    assert sorted(w.worker_id for w in restored.workers(now=T0)) == ["a", "b"]
    await journal.record(restored.register("c", "http://h:1", [capability()], now=T0))
    await journal.compact()
    await journal.aclose()
    assert sorted(ids_in(tmp_path)) == ["a", "b", "c"]


@pytest.mark.anyio
async def test_failed_compaction_leaves_the_journal_in_place(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal, registry = start(tmp_path)
    await register_many(journal, registry, ["a", "b"])
    before = (tmp_path / JOURNAL_NAME).read_bytes()
    real_replace: Callable[..., None] = os.replace

    def no_rename(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(JournalUnavailable, match="cannot compact"):
        await journal.compact()
    assert (tmp_path / JOURNAL_NAME).read_bytes() == before
    assert not list(tmp_path.glob("*.compact"))
    monkeypatch.setattr(os, "replace", real_replace)
    await journal.record(registry.register("c", "http://h:1", [capability()], now=T0))
    await journal.aclose()
    assert sorted(ids_in(tmp_path)) == ["a", "b", "c"]


@pytest.mark.anyio
async def test_a_cancelled_batch_leader_still_writes_for_the_callers_that_joined(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal, registry = start(tmp_path)
    entered, gate = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def held_fsync(fd: int) -> None:
        # The first batch's fsync waits until the test lets it go.
        entered.set()
        gate.wait(timeout=30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", held_fsync)

    async def register(worker_id: str) -> None:
        await journal.record(registry.register(worker_id, "http://h:1", [capability()], now=T0))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(register, "first")
            while not entered.is_set():
                await anyio.sleep(0.001)
            # The next batch: its leader waits for the first one to be written...
            leader_scope = anyio.CancelScope()

            async def leader() -> None:
                with leader_scope:
                    await register("leader")

            tasks.start_soon(leader)
            await anyio.sleep(0.01)
            # ...and these join it and wait for it.
            for name in ("f1", "f2", "f3"):
                tasks.start_soon(register, name)
            await anyio.sleep(0.01)
            leader_scope.cancel()  # the leader's request goes away
            await anyio.sleep(0.01)
            gate.set()
    await journal.aclose()
    assert sorted(ids_in(tmp_path)) == ["f1", "f2", "f3", "first", "leader"]


@pytest.mark.anyio
async def test_an_unsynced_rename_is_synced_before_the_next_acknowledgement(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal, registry = start(tmp_path)
    await register_many(journal, registry, ["a"])
    calls: list[str] = []
    real = journal_module._fsync_directory

    def flaky(directory: pathlib.Path) -> None:
        calls.append("dir")
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real(directory)

    monkeypatch.setattr(journal_module, "_fsync_directory", flaky)
    await journal.compact()  # the snapshot is in place; its rename is not yet durable
    assert calls == ["dir"]
    await register_many(journal, registry, ["b"])
    assert calls == ["dir", "dir"]  # retried before "b" was acknowledged
    await register_many(journal, registry, ["c"])
    assert calls == ["dir", "dir"]
    await journal.aclose()
    assert sorted(ids_in(tmp_path)) == ["a", "b", "c"]
