"""The journal on disk: recovery, damage, durability, failures, compaction, the lock."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import pytest

from crank_registry import (
    SNAPSHOT_PART_SIZE,
    CapabilityRegistry,
    Change,
    Event,
    HealthPolicy,
    HealthState,
    HeartbeatReceived,
    RegistryError,
    ReplayResult,
    WorkerEvicted,
    WorkerUnhealthy,
    encode_event,
    replay_bytes,
)
from crank_registry_asgi.effects import Effects, RegistrySnapshots
from crank_registry_asgi.http import ApiError
from crank_registry_asgi.journal import (
    JOURNAL_NAME,
    Journal,
    JournalError,
    JournalUnavailable,
)
from crank_registry_asgi.metrics import Metrics
from tests.builders import capability
from tests.journal.helpers import T0, DiskFull, ids, normalized, replayed_bytes

POLICY = HealthPolicy(heartbeat_interval=10, unhealthy_after=20, evict_after=40)


class Controller:
    """A registry and its journal, started as the service's lifespan starts them.

    Open, read, replay into a new registry, restart it; then every change goes
    through :class:`~crank_registry_asgi.effects.Effects`, which writes the lines.
    """

    def __init__(self, state_dir: pathlib.Path, **options: Any) -> None:
        self.registry = CapabilityRegistry(POLICY)
        self.journal = Journal.open(
            state_dir, snapshots=RegistrySnapshots(self.registry), **options
        )
        self.replayed: ReplayResult = replay_bytes(self.journal.read(), self.registry)
        self.registry.restart()
        self.effects = Effects(
            self.registry,
            metrics=Metrics(),
            journal_expected=True,
            heartbeat_line_every=POLICY.unhealthy_after / 2,
        )
        self.effects.journal = self.journal

    async def record(self, events: Sequence[Event]) -> None:
        """What an endpoint does with the events of a change: make them durable."""
        await self.effects.commit(events)

    async def register(self, *worker_ids: str, now: float = T0) -> None:
        """Register ``worker_ids`` concurrently, each answered once it is durable."""
        async with anyio.create_task_group() as tasks:
            for worker_id in worker_ids:

                async def one(worker_id: str = worker_id) -> None:
                    events = self.registry.decide_register(
                        worker_id, "http://h:1", [capability()], now=now
                    )
                    await self.record(events)

                tasks.start_soon(one)

    async def aclose(self) -> None:
        await self.journal.aclose()


def lines_of(events: Sequence[Event]) -> list[bytes]:
    return [encode_event(event) for event in events]


async def append(journal: Journal, events: Sequence[Event]) -> None:
    """Append the events' lines straight to the journal (durable if one is a change)."""
    await journal.append(
        lines_of(events), durable=any(isinstance(event, Change) for event in events)
    )


def on_disk(state_dir: pathlib.Path) -> CapabilityRegistry:
    """A registry replayed from the journal in ``state_dir`` (read without the journal's lock)."""
    registry, result = replayed_bytes((state_dir / JOURNAL_NAME).read_bytes(), POLICY)
    assert result.lines_skipped == 0, result.skipped
    return registry


def ids_in(state_dir: pathlib.Path) -> list[str]:
    return ids(on_disk(state_dir))


# ------------------------------------------------------------------ recovery


@pytest.mark.anyio
async def test_restart_restores_workers_as_unverified(tmp_path: pathlib.Path) -> None:
    state_dir = tmp_path / "state" / "controller"
    first = Controller(state_dir)
    assert (state_dir / JOURNAL_NAME).is_file()
    await first.register("a", "b", "c")
    await first.record(first.registry.deregister("b", now=T0 + 1))
    await first.record(first.registry.heartbeat("a", now=T0 + 15))
    await first.aclose()

    second = Controller(state_dir)
    await second.aclose()
    assert len(second.registry) == 2
    assert (second.replayed.lines_read, second.replayed.lines_skipped) == (5, 0)
    a, c = sorted(second.registry.workers(now=T0 + 25), key=lambda view: view.worker_id)
    assert (a.worker_id, a.state, a.is_healthy, a.last_heartbeat) == (
        "a",
        HealthState.UNVERIFIED,
        True,
        T0 + 15,
    )
    assert (c.worker_id, c.state, c.is_healthy) == ("c", HealthState.UNVERIFIED, False)
    # Unverified: a heartbeat makes the worker register again.
    with pytest.raises(RegistryError, match="not registered"):
        second.registry.heartbeat("a", now=T0 + 25)


@pytest.mark.anyio
async def test_the_revision_survives_a_restart(tmp_path: pathlib.Path) -> None:
    first = Controller(tmp_path)
    await first.register("a", "b", "c")
    await first.record(first.registry.deregister("b", now=T0 + 1))
    await first.record(first.registry.heartbeat("a", now=T0 + 15))
    await first.record(first.registry.cleanup_stale(now=T0 + 21))  # c: unhealthy
    await first.journal.compact()
    await first.record(first.registry.register("d", "http://h:2", [capability()], now=T0 + 22))
    before = first.registry.revision
    assert before == 3 + 1 + 1 + 1
    await first.aclose()

    second = Controller(tmp_path)
    assert second.registry.revision == before
    # The next change goes on from there, and survives the next restart too.
    (event,) = second.registry.register("e", "http://h:3", [capability()], now=T0 + 23)
    assert isinstance(event, Change) and event.revision == before + 1
    await second.record([event])
    await second.aclose()
    third = Controller(tmp_path)
    await third.aclose()
    assert third.registry.revision == before + 1
    assert sorted(ids(third.registry)) == ["a", "c", "d", "e"]
    silent = [record.worker_id for record in third.registry.records() if record.silent]
    assert silent == ["c"]  # c stays silent: the line said so


@pytest.mark.anyio
async def test_workers_past_evict_after_are_evicted_by_the_first_sweep(
    tmp_path: pathlib.Path,
) -> None:
    first = Controller(tmp_path)
    await first.register("a")
    await first.aclose()
    second = Controller(tmp_path)
    # Held (the journal does not know the time), but not routable...
    assert second.registry.route("classify", "image.classify", now=T0 + 41) is None
    # ...and the first sweep evicts it, in the journal too.
    events = second.registry.cleanup_stale(now=T0 + 41)
    assert [type(e) for e in events] == [WorkerUnhealthy, WorkerEvicted]
    await second.record(events)
    await second.aclose()
    assert ids_in(tmp_path) == []


@pytest.mark.anyio
async def test_torn_tail_is_dropped_and_cut_before_the_next_line(tmp_path: pathlib.Path) -> None:
    first = Controller(tmp_path)
    await first.register("a", "b")
    await first.aclose()
    path = tmp_path / JOURNAL_NAME
    intact = path.read_bytes()
    with open(path, "ab") as file:
        file.write(b'{"v":2,"type":"registered","worker_id":"torn","worker_u')

    second = Controller(tmp_path)
    assert (len(second.registry), second.replayed.lines_skipped) == (2, 1)
    assert second.replayed.torn_tail
    assert path.read_bytes() == intact  # cut, so the next line starts on its own
    await second.register("c")
    await second.aclose()
    assert sorted(ids_in(tmp_path)) == ["a", "b", "c"]


@pytest.mark.anyio
async def test_corrupted_lines_are_skipped_and_counted(tmp_path: pathlib.Path) -> None:
    first = Controller(tmp_path)
    await first.register("a")
    await first.aclose()
    path = tmp_path / JOURNAL_NAME
    good = path.read_bytes()
    other = good.replace(b'"a"', b'"b"').replace(b'"revision":1', b'"revision":2')
    unreadable_version = good.replace(b'"v":3', b'"v":"3"').replace(b'"a"', b'"z"')
    path.write_bytes(good + b"\x00garbage\n" + unreadable_version + other)

    second = Controller(tmp_path)
    await second.aclose()
    result = second.replayed
    assert (len(second.registry), result.lines_read, result.lines_skipped) == (2, 4, 2)
    assert ids(second.registry) == ["a", "b"]
    assert [s.line_number for s in result.skipped] == [2, 3]
    assert "version '3'" in result.skipped[1].reason


# ------------------------------------------------------------------ start-up failures


def open_journal(state_dir: pathlib.Path, **options: Any) -> Journal:
    """The journal alone, compacting into a registry of its own."""
    return Journal.open(state_dir, snapshots=RegistrySnapshots(CapabilityRegistry()), **options)


def test_second_controller_on_the_same_directory_refuses(tmp_path: pathlib.Path) -> None:
    journal = open_journal(tmp_path)
    try:
        with pytest.raises(JournalError, match="another controller") as caught:
            open_journal(tmp_path)
        assert str(tmp_path) in str(caught.value)
        assert f"pid {os.getpid()}" in str(caught.value)
        # Another process, too (the lock is an flock on the directory's lock file).
        code = (
            "import sys, pathlib\n"
            "from crank_registry import CapabilityRegistry\n"
            "from crank_registry_asgi.effects import RegistrySnapshots\n"
            "from crank_registry_asgi.journal import Journal, JournalError\n"
            "try:\n"
            "    Journal.open(pathlib.Path(sys.argv[1]),"
            " snapshots=RegistrySnapshots(CapabilityRegistry()))\n"
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
    anyio.run(open_journal(tmp_path).aclose)


def test_a_directory_in_place_of_the_journal_stops_the_start(tmp_path: pathlib.Path) -> None:
    (tmp_path / JOURNAL_NAME).mkdir()
    with pytest.raises(JournalError) as caught:
        open_journal(tmp_path)
    assert str(tmp_path / JOURNAL_NAME) in str(caught.value)
    assert "directory" in str(caught.value).lower()
    # The lock was released: the start can be retried once the damage is repaired.
    (tmp_path / JOURNAL_NAME).rmdir()
    anyio.run(open_journal(tmp_path).aclose)


def test_a_fifo_in_place_of_the_journal_stops_the_start(tmp_path: pathlib.Path) -> None:
    os.mkfifo(tmp_path / JOURNAL_NAME)
    with pytest.raises(JournalError, match=r"not a regular file|No such device") as caught:
        open_journal(tmp_path)
    assert str(tmp_path / JOURNAL_NAME) in str(caught.value)


def test_a_file_in_place_of_the_state_directory_stops_the_start(tmp_path: pathlib.Path) -> None:
    (tmp_path / "state").write_text("not a directory")
    with pytest.raises(JournalError, match="state directory") as caught:
        open_journal(tmp_path / "state")
    assert str(tmp_path / "state") in str(caught.value)


def test_unreadable_journal_stops_the_start(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests run as root, for whom mode 000 still reads: fail the read itself.
    journal = open_journal(tmp_path)
    real_open = open

    def failing_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if file == tmp_path / JOURNAL_NAME and "r" in mode:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(JournalError, match="cannot read the journal") as caught:
        journal.read()
    assert str(tmp_path / JOURNAL_NAME) in str(caught.value)
    assert "Permission denied" in str(caught.value)
    monkeypatch.undo()
    anyio.run(journal.aclose)


def test_bad_compaction_settings_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="compact_ratio"):
        open_journal(tmp_path, compact_ratio=1.0)
    with pytest.raises(ValueError, match="compact_min_bytes"):
        open_journal(tmp_path, compact_min_bytes=-1)


def test_the_journal_reads_no_environment(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its settings come from its caller (ServiceConfig), not from the environment."""
    monkeypatch.setenv("CRANK_REGISTRY_COMPACT_MIN_BYTES", "lots")
    anyio.run(open_journal(tmp_path).aclose)


@pytest.mark.anyio
async def test_append_before_read_is_refused(tmp_path: pathlib.Path) -> None:
    journal = open_journal(tmp_path)
    line = encode_event(HeartbeatReceived("a", T0))
    with pytest.raises(RuntimeError, match=r"read\(\)"):
        await journal.append([line], durable=True)
    with pytest.raises(RuntimeError, match=r"read\(\)"):
        await journal.compact()
    assert journal.read() == b""
    with pytest.raises(RuntimeError, match="already"):
        journal.read()
    await journal.aclose()
    await journal.aclose()  # idempotent
    with pytest.raises(JournalUnavailable, match="closed"):
        await journal.append([line], durable=True)


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
    controller = Controller(tmp_path)
    fsyncs = FsyncCounter(monkeypatch, tmp_path / JOURNAL_NAME)
    worker_ids = [f"w{i}" for i in range(64)]
    await controller.register(*worker_ids)
    # Every registration is in the file once its record() returned...
    assert sorted(ids_in(tmp_path)) == sorted(worker_ids)
    # ...and the 64 concurrent callers did not pay one fsync each.
    assert 1 <= fsyncs.calls < 64 / 4
    await controller.aclose()


@pytest.mark.anyio
async def test_heartbeats_are_coalesced_not_fsynced_and_flushed_on_close(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    controller = Controller(tmp_path)
    registry, journal = controller.registry, controller.journal
    await controller.register("a")
    size = journal.size
    fsyncs = FsyncCounter(monkeypatch, tmp_path / JOURNAL_NAME)
    for second in range(1, 10):  # within unhealthy_after / 2 = 10 s: no line
        await controller.record(registry.heartbeat("a", now=T0 + second))
    assert journal.size == size
    await controller.record(registry.heartbeat("a", now=T0 + 10))
    # Written at once (not fsynced): a crash of the process does not lose it.
    assert journal.size > size
    assert (tmp_path / JOURNAL_NAME).stat().st_size == journal.size
    assert fsyncs.calls == 0
    await controller.aclose()
    assert fsyncs.calls == 1  # on close
    with open(tmp_path / JOURNAL_NAME, "rb") as file:
        lines = file.readlines()
    assert [json.loads(line)["type"] for line in lines] == ["registered", "heartbeat"]
    assert json.loads(lines[1])["at"] == T0 + 10
    assert on_disk(tmp_path).records()[0].last_heartbeat == T0 + 10


@pytest.mark.anyio
async def test_a_heartbeat_that_makes_a_worker_healthy_again_is_durable(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    controller = Controller(tmp_path)
    registry = controller.registry
    await controller.register("a")
    await controller.record(registry.cleanup_stale(now=T0 + 21))  # unhealthy
    fsyncs = FsyncCounter(monkeypatch, tmp_path / JOURNAL_NAME)
    # Within the coalescing period of the registration's line, but a change.
    await controller.record(registry.heartbeat("a", now=T0 + 22))
    assert fsyncs.calls == 1
    await controller.aclose()
    (record,) = on_disk(tmp_path).records()
    assert (record.silent, record.last_heartbeat) == (False, T0 + 22)


@pytest.mark.anyio
async def test_failed_write_raises_and_the_journal_keeps_working(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    controller = Controller(tmp_path)
    journal, registry = controller.journal, controller.registry
    await controller.register("a")
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
    answers: list[ApiError] = []

    async def refused(worker_id: str) -> None:
        events = registry.register(worker_id, "http://h:1", [capability()], now=T0)
        try:
            await append(journal, events)
        except JournalUnavailable as error:
            errors.append(error)

    async def answered(worker_id: str) -> None:
        try:
            await controller.register(worker_id)
        except* ApiError as group:
            answers.extend(group.exceptions)  # type: ignore[arg-type]

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(refused, "b")
        tasks.start_soon(refused, "c")
        tasks.start_soon(answered, "x")
    # The callers shared the failed batch, so all are told.
    assert len(errors) == 2
    assert "No space left on device" in str(errors[0]) and str(path) in str(errors[0])
    assert (errors[0].code, errors[0].status_hint) == ("journal_unavailable", 503)
    # The endpoint's answer: 503 journal_unavailable.
    (answer,) = answers
    assert (answer.status, answer.code) == (503, "journal_unavailable")
    assert path.read_bytes() == before  # the partial line was cut off

    monkeypatch.setattr(os, "write", real_write)
    await controller.register("d")
    await controller.aclose()
    # b, c and x were refused; the journal only claims what it acknowledged.
    assert ids_in(tmp_path) == ["a", "d"]


@pytest.mark.anyio
async def test_a_failed_batch_fails_the_batch_behind_it_and_settles_in_order(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch that filled while a failed one was written was decided on it: it fails too."""
    controller = Controller(tmp_path)
    journal, registry = controller.journal, controller.registry
    disk = DiskFull(monkeypatch, tmp_path / JOURNAL_NAME)
    disk.full = True
    outcomes: list[tuple[str, bool]] = []
    refused: list[str] = []
    decided: list[str] = []  # the order of revisions (trio starts tasks in any order)

    async def write(worker_id: str) -> None:
        events = registry.decide_register(worker_id, "http://h:1", [capability()], now=T0)
        decided.append(worker_id)
        try:
            await journal.append(
                lines_of(events),
                durable=True,
                settled=lambda error: outcomes.append((worker_id, error is None)),
            )
        except JournalUnavailable:
            refused.append(worker_id)

    async with anyio.create_task_group() as tasks:
        # The first one's batch is being written (and fails) while the
        # others fill the next one.
        for worker_id in ("a", "b", "c"):
            tasks.start_soon(write, worker_id)
    assert outcomes == [(worker_id, False) for worker_id in decided]
    assert sorted(refused) == ["a", "b", "c"]
    assert disk.refused == 1  # b and c's batch was never written
    disk.full = False
    await write("d")
    assert outcomes[-1] == ("d", True)
    await controller.aclose()
    assert (tmp_path / JOURNAL_NAME).read_bytes().count(b"\n") == 1


@pytest.mark.anyio
async def test_failed_fsync_raises_journal_unavailable(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    controller = Controller(tmp_path)
    journal, registry = controller.journal, controller.registry
    fsyncs = FsyncCounter(monkeypatch, tmp_path / JOURNAL_NAME)
    fsyncs.fail_with = errno.EIO
    with pytest.raises(JournalUnavailable, match="Input/output error"):
        await append(journal, registry.register("a", "http://h:1", [capability()], now=T0))
    fsyncs.fail_with = None
    await append(journal, registry.register("b", "http://h:1", [capability()], now=T0))
    await controller.aclose()
    # The revision of "a"'s refused line is gone from the file, not reused.
    restored = on_disk(tmp_path)
    assert (ids(restored), restored.revision) == (["b"], 2)


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
        controller = Controller(mount_point, compact_min_bytes=1 << 30)
        big = capability(constraints={"padding": "x" * 3000})
        acknowledged: list[str] = []
        refused = 0
        for i in range(60):
            events = controller.registry.register(f"w{i}", "http://h:1", [big], now=T0)
            try:
                await controller.record(events)
            except ApiError as error:
                assert (error.status, error.code) == (503, "journal_unavailable")
                refused += 1
            else:
                acknowledged.append(f"w{i}")
        assert refused > 0 and acknowledged
        await controller.aclose()
        assert ids_in(mount_point) == acknowledged
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


# ------------------------------------------------------------------ compaction


async def churn(controller: Controller, rounds: int) -> None:
    """Registrations, heartbeats and departures, so that the file outgrows the live state."""
    registry = controller.registry
    now = T0
    for round_ in range(rounds):
        now += 11
        await controller.register(*[f"w{round_}-{i}" for i in range(5)], now=now)
        await controller.record(registry.cleanup_stale(now=now))
        for worker in registry.records():
            if not worker.worker_id.endswith(("-3", "-4")):  # the others fall silent
                await controller.record(registry.heartbeat(worker.worker_id, now=now))
        if round_ % 2:
            await controller.record(registry.deregister(f"w{round_ - 1}-0", now=now))


@pytest.mark.anyio
async def test_compaction_keeps_exactly_the_live_state(tmp_path: pathlib.Path) -> None:
    controller = Controller(tmp_path, compact_min_bytes=4096)
    await churn(controller, 30)
    journal, registry = controller.journal, controller.registry
    assert journal.compactions >= 2
    restored = on_disk(tmp_path)
    assert restored.revision == registry.revision
    live = registry.records()
    kept = restored.records()
    assert ids(restored) == [r.worker_id for r in live]
    for record, replayed_record in zip(live, kept, strict=True):
        assert (replayed_record.worker_url, replayed_record.capabilities) == (
            record.worker_url,
            record.capabilities,
        )
        assert (replayed_record.verified, replayed_record.silent) == (
            record.verified,
            record.silent,
        )
        # Heartbeats are journaled at most every unhealthy_after / 2.
        lag = record.last_heartbeat - replayed_record.last_heartbeat
        assert 0 <= lag < POLICY.unhealthy_after / 2
    # The file stays proportional to the live state.
    snapshot_size = len(RegistrySnapshots(registry).capture()())
    assert journal.size <= max(4096, 2 * snapshot_size) + 4096
    assert not list(tmp_path.glob("*.compact"))
    await controller.aclose()


@pytest.mark.anyio
async def test_forced_compaction_then_restart(tmp_path: pathlib.Path) -> None:
    controller = Controller(tmp_path, fsync=False)
    journal, registry = controller.journal, controller.registry
    await controller.register(*[f"w{i}" for i in range(2500)])
    for i in range(0, 2500, 2):
        await controller.record(registry.deregister(f"w{i}", now=T0 + 1))
    size = journal.size
    await journal.compact()
    assert journal.size < size / 5
    await controller.record(registry.deregister("w1", now=T0 + 2))
    await controller.aclose()
    restarted = Controller(tmp_path)
    await restarted.aclose()
    assert len(restarted.registry) == 1249
    # The snapshot's parts (of 1250 workers), then the one line after them.
    assert restarted.replayed.lines_read == -(-1250 // SNAPSHOT_PART_SIZE) + 1
    assert normalized(restarted.registry.records()) == normalized(registry.records())
    assert restarted.registry.revision == registry.revision == 2500 + 1250 + 1


@pytest.mark.anyio
async def test_a_line_pending_while_the_snapshot_was_taken_is_not_applied_twice(
    tmp_path: pathlib.Path,
) -> None:
    """Lines written after a compaction may hold changes its snapshot has already."""
    controller = Controller(tmp_path)
    registry, journal = controller.registry, controller.journal
    await controller.register("a")
    await controller.register("b")
    gone = registry.deregister("a", now=T0 + 1)
    await journal.compact()  # the snapshot holds the deregistration already
    await append(journal, gone)  # its line lands after the snapshot
    await controller.aclose()
    restarted = Controller(tmp_path)
    await restarted.aclose()
    assert ids(restarted.registry) == ["b"]
    assert (restarted.replayed.lines_read, restarted.replayed.lines_skipped) == (2, 0)
    assert restarted.registry.revision == 3


@pytest.mark.anyio
@pytest.mark.parametrize("leftover", [b"", b'{"v":2,"type":"snapshot","revision":2,"part":0,"par'])
async def test_compaction_leftovers_are_harmless(tmp_path: pathlib.Path, leftover: bytes) -> None:
    first = Controller(tmp_path)
    await first.register("a", "b")
    await first.aclose()
    # A crash between writing the temporary file and renaming it.
    temporary = tmp_path / (JOURNAL_NAME + ".compact")
    temporary.write_bytes(leftover)
    second = Controller(tmp_path)
    assert not temporary.exists()
    assert sorted(ids(second.registry)) == ["a", "b"]
    await second.register("c")
    await second.journal.compact()
    await second.aclose()
    assert sorted(ids_in(tmp_path)) == ["a", "b", "c"]


@pytest.mark.anyio
async def test_failed_compaction_leaves_the_journal_in_place(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    controller = Controller(tmp_path)
    await controller.register("a", "b")
    before = (tmp_path / JOURNAL_NAME).read_bytes()
    real_replace: Callable[..., None] = os.replace

    def no_rename(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(JournalUnavailable, match="cannot compact"):
        await controller.journal.compact()
    assert (tmp_path / JOURNAL_NAME).read_bytes() == before
    assert not list(tmp_path.glob("*.compact"))
    monkeypatch.setattr(os, "replace", real_replace)
    await controller.register("c")
    await controller.aclose()
    assert sorted(ids_in(tmp_path)) == ["a", "b", "c"]


@pytest.mark.anyio
async def test_a_cancelled_batch_leader_still_writes_for_the_callers_that_joined(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    controller = Controller(tmp_path)
    entered, gate = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def held_fsync(fd: int) -> None:
        # The first batch's fsync waits until the test lets it go.
        entered.set()
        gate.wait(timeout=30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", held_fsync)

    async def register(worker_id: str) -> None:
        await controller.register(worker_id)

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
    await controller.aclose()
    assert sorted(ids_in(tmp_path)) == ["f1", "f2", "f3", "first", "leader"]


@pytest.mark.anyio
async def test_an_unsynced_rename_is_synced_before_the_next_acknowledgement(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    controller = Controller(tmp_path)
    await controller.register("a")
    calls: list[str] = []
    real_fsync = os.fsync
    state_dir = os.stat(tmp_path)

    def flaky(fd: int) -> None:
        seen = os.fstat(fd)
        if (seen.st_dev, seen.st_ino) == (state_dir.st_dev, state_dir.st_ino):
            calls.append("dir")  # the state directory itself, i.e. its renames
            if len(calls) == 1:
                raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky)
    await controller.journal.compact()  # the snapshot is in place; its rename is not yet durable
    assert calls == ["dir"]
    await controller.register("b")
    assert calls == ["dir", "dir"]  # retried before "b" was acknowledged
    await controller.register("c")
    assert calls == ["dir", "dir"]
    await controller.aclose()
    assert sorted(ids_in(tmp_path)) == ["a", "b", "c"]
