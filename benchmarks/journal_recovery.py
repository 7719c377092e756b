"""Benchmark: how long a controller takes to recover its journal on start.

Run: ``.venv/bin/python benchmarks/journal_recovery.py`` (``--quick`` for a
smoke run).

For 10 000 and 100 000 workers it writes a journal as compaction leaves it
(a snapshot alone) and as it is just before the next compaction (a snapshot,
then heartbeat lines up to the same size again: the largest the file gets
with the default ratio of 2), then times what the service's lifespan does
on start: ``Journal.open`` + ``Journal.read``, ``replay_bytes`` into an
empty registry (every value read back passes the wire model's checks and,
once per distinct schema, the service's JSON Schema check; every change goes
through the registry's one fold) and
``CapabilityRegistry.restart``, each run in a new process, as a restarted
controller starts, with the cyclic collector paused as ``crank-registry
serve`` pauses it, and the recovered objects frozen as it freezes them
(then the first full collection is timed, frozen and unfrozen). Two fleet
shapes:

* ``replicas``: workers are replicas of 100 services (each service offers 3
  capabilities), as in a typical deployment;
* ``distinct``: every worker offers 3 of 10 000 capabilities (the shape of
  ``benchmarks/core.py``): 10 000 capability sets of 10 workers each, the
  hard case for recovery, which works each set out once.

Target (DESIGN.md, "Targets"): 100 000 workers recovered in <= 2 s.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import anyio

from crank_registry import (
    CapabilityRegistry,
    CapabilitySchema,
    HeartbeatReceived,
    Snapshot,
    WorkerRecord,
    encode_event,
    encode_snapshot,
    replay_bytes,
    structure,
)
from crank_registry_asgi.effects import RegistrySnapshots
from crank_registry_asgi.journal import JOURNAL_NAME, Journal
from crank_registry_asgi.schemas import capability_schema_problems

START = 1_700_000_000.0
TARGET_SECONDS = 2.0
TARGET_WORKERS = 100_000


def capability(index: int) -> CapabilitySchema:
    payload: dict[str, Any] = {
        "name": f"model.task{index}",
        "verb": "infer",
        "version": "1.2.0",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
        "output_schema": {"type": "object"},
        "requires_gpu": index % 2 == 0,
        "max_concurrency": 4,
    }
    return structure(payload, CapabilitySchema)


def fleet(workers: int, shape: str) -> list[WorkerRecord]:
    """Records as a live registry holds them: each worker its own capability tuple."""
    pool = {i: capability(i) for i in range(300 if shape == "replicas" else 10_000)}
    records = []
    for w in range(workers):
        if shape == "replicas":
            service = w % 100
            indexes = [service * 3 + k for k in range(3)]
        else:
            indexes = [(w * 3 + k) % 10_000 for k in range(3)]
        records.append(
            WorkerRecord(
                worker_id=f"worker-{w:06d}",
                worker_url=f"https://10.{w >> 16 & 255}.{w >> 8 & 255}.{w & 255}:8443",
                capabilities=tuple(pool[i] for i in indexes),
                # Within the last 10 s before the snapshot, as a live fleet's are.
                last_heartbeat=START + w * 10 / workers,
            )
        )
    return records


def write_journal(state_dir: pathlib.Path, records: list[WorkerRecord], fill: float) -> int:
    """A snapshot, then heartbeats until the file is ``fill`` times its size; returns its size."""
    # The revision of a registry whose workers each registered once.
    snapshot = b"".join(encode_snapshot(Snapshot(len(records), tuple(records))))
    lines = [snapshot]
    size = len(snapshot)
    beat = 0
    while size < fill * len(snapshot):
        record = records[beat % len(records)]
        # Written after the snapshot, so later than any time in it (and in order).
        at = START + 10 + beat * 1e-4
        line = encode_event(HeartbeatReceived(record.worker_id, at))
        lines.append(line)
        size += len(line)
        beat += 1
    (state_dir / JOURNAL_NAME).write_bytes(b"".join(lines))
    return len(snapshot)


def recover_once(state_dir: pathlib.Path) -> tuple[float, float, float, float, int, float, float]:
    """Recover ``state_dir`` in a new process, as a restarted controller does.

    Returns wall and CPU seconds for the whole start (open, read, replay,
    restart), then replay and restart timed apart, the workers held, and the
    first full collection after recovery, frozen (as ``serve`` leaves it) and
    unfrozen.
    A process of its own starts with a heap as a restarted controller's
    (not this one's, which holds the fleet and the garbage of earlier runs
    for the collector to walk).
    """
    output = subprocess.run(
        [sys.executable, __file__, "--recover", str(state_dir)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    elapsed, cpu, replayed, restarted, workers, frozen, unfrozen = json.loads(output)
    return elapsed, cpu, replayed, restarted, workers, frozen, unfrozen


def recover_here(state_dir: pathlib.Path) -> None:
    """The child of :func:`recover_once`: prints its figures as JSON.

    The steps of the service's lifespan (``_open_journal``), timed.
    """
    registry = CapabilityRegistry()
    started, started_cpu = time.perf_counter(), time.process_time()
    journal = Journal.open(state_dir, snapshots=RegistrySnapshots(registry))
    data = journal.read()
    # As `crank-registry serve` recovers (ServiceConfig.pause_gc_during_recovery).
    gc.disable()
    replay_started = time.perf_counter()
    result = replay_bytes(data, registry, capability_check=capability_schema_problems)
    restart_started = time.perf_counter()
    registry.restart()
    gc.freeze()  # ServiceConfig.freeze_gc_after_recovery
    ended = time.perf_counter()
    gc.enable()
    elapsed, cpu = ended - started, time.process_time() - started_cpu
    anyio.run(journal.aclose)
    assert result.lines_skipped == 0, result.skipped[:3]
    # The first full collection after recovery, frozen; then as it would be
    # unfrozen (walking every recovered object).
    collected = time.perf_counter()
    gc.collect()
    frozen_collection = time.perf_counter() - collected
    gc.unfreeze()
    collected = time.perf_counter()
    gc.collect()
    unfrozen_collection = time.perf_counter() - collected
    print(
        json.dumps(
            [
                elapsed,
                cpu,
                restart_started - replay_started,
                ended - restart_started,
                len(registry),
                frozen_collection,
                unfrozen_collection,
            ]
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 000 and 10 000 workers, 1 run")
    parser.add_argument("--recover", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recover is not None:
        recover_here(args.recover)
        return 0
    sizes = (1_000, 10_000) if args.quick else (10_000, 100_000)
    runs = 1 if args.quick else 3
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(
        f"{'workers':>8} {'shape':>9} {'snapshot':>10} {'file':>10} {'wall s':>8} "
        f"{'cpu s':>7} {'replay':>7} {'restart':>8} {'wall/target':>12} {'cpu/target':>11}"
        f" {'gc frozen':>10} {'unfrozen':>9}"
    )
    verdicts = []
    for workers in sizes:
        for shape in ("replicas", "distinct"):
            records = fleet(workers, shape)
            # Just after a compaction (the snapshot alone), and just before
            # the next (the file at compact_ratio = 2 times the snapshot).
            for fill in (1.0, 2.0):
                with tempfile.TemporaryDirectory() as directory:
                    state_dir = pathlib.Path(directory)
                    snapshot_size = write_journal(state_dir, records, fill)
                    file_size = (state_dir / JOURNAL_NAME).stat().st_size
                    timings = [recover_once(state_dir) for _ in range(runs)]
                elapsed = statistics.median(t[0] for t in timings)
                cpu = statistics.median(t[1] for t in timings)
                replayed = statistics.median(t[2] for t in timings)
                restarted = statistics.median(t[3] for t in timings)
                frozen = statistics.median(t[5] for t in timings)
                unfrozen = statistics.median(t[6] for t in timings)
                assert all(t[4] == workers for t in timings), "not every worker was restored"
                # The target is for 100 000 workers; a smaller fleet is scaled to it.
                budget = TARGET_SECONDS * workers / TARGET_WORKERS
                ratio, cpu_ratio = elapsed / budget, cpu / budget
                verdicts.append((workers, shape, fill, ratio, cpu_ratio))
                print(
                    f"{workers:>8} {shape:>9} {snapshot_size / 1e6:>8.1f}MB "
                    f"{file_size / 1e6:>8.1f}MB {elapsed:>8.3f} {cpu:>7.3f} {replayed:>7.3f} "
                    f"{restarted:>8.3f} {ratio:>11.2f}x {cpu_ratio:>10.2f}x"
                    f" {frozen * 1e3:>8.2f}ms {unfrozen:>8.3f}s"
                )
    print()
    print("wall s, cpu s: Journal.open + read + replay_bytes + restart (median of runs);")
    print("replay, restart: those two steps in wall seconds. ratio = time / target, the target")
    print(
        f"(100 000 workers in <= {TARGET_SECONDS:g} s) scaled to the fleet size; <= 1.00x meets it."
    )
    print("gc frozen, unfrozen: the first full collection after recovery, frozen as serve")
    print("leaves the recovered objects, then unfrozen (the collector walks them all).")
    for workers, shape, fill, ratio, cpu_ratio in verdicts:
        if workers == max(sizes):
            verdict = "meets" if ratio <= 1 else "misses"
            moment = "after a compaction" if fill == 1 else "before a compaction"
            print(
                f"{workers} workers, {shape}, {moment}: {ratio:.2f}x of the target in wall "
                f"time ({verdict} it), {cpu_ratio:.2f}x in CPU time"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
