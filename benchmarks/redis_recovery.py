"""Benchmark: how long a controller takes to load the shared registry from Redis on start.

Run: ``.venv/bin/python benchmarks/redis_recovery.py`` (``--workers N``,
``--shape replicas|distinct``, ``--runs N``, ``--redis URL``,
``--strict``); about 30 s. Needs a Redis (the machine's 127.0.0.1:6379 by
default; the benchmark uses keys of its own prefix and deletes them).

It writes the snapshot key of a registry of ``--workers`` workers as the
sweeper lease holder writes it, and 1,000 heartbeat batch entries after
it, then times, in a new process (as a starting controller),
``RedisStore.open``: reading the snapshot, decoding it with the journal
codec (every value read back passes the wire model's checks), applying it
with the core's fold, and catching up with the stream. The baseline, each
run in a new process too, alternating with it, is the journal's replay of
the same snapshot bytes (``replay_bytes``), which the file journal does on
start. The fleet's shape is ``journal_recovery.py``'s: ``replicas`` of 100
services (3 capabilities each), or ``distinct`` (each worker 3 of 10 000
capabilities).

Both are timed in wall time (the target's figure) and in CPU time of the
process (what the work costs: on a machine shared with other work, wall
time also counts waiting for a core; Redis' own time to send the key is
not in it). The load average is printed before and after.

Target (DESIGN, "Targets"): 100 000 workers recovered in <= 2 s.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import time
import uuid

import anyio
import redis

# The script's own directory is on sys.path: journal_recovery.py's fleet, the same
# 100 services of 3 capabilities, so that both recoveries read the same registry.
from journal_recovery import START, fleet

from crank_registry import (
    JOURNAL_FORMAT_VERSION,
    CapabilityRegistry,
    HeartbeatReceived,
    Snapshot,
    encode_event,
    encode_snapshot,
    replay_bytes,
)
from crank_registry_asgi.redis_store import RedisStore, StoreKeys

TARGET_SECONDS = 2.0


def write(url: str, prefix: str, workers: int, shape: str = "replicas") -> bytes:
    """The snapshot key and 1,000 heartbeat entries after it; returns the snapshot's lines."""
    records = fleet(workers, shape)
    lines = b"".join(encode_snapshot(Snapshot(workers, tuple(records))))
    keys = StoreKeys(prefix)
    client = redis.Redis.from_url(url)
    client.set(keys.epoch, "bench")
    client.set(keys.revision, workers)
    client.hset(
        keys.snapshot,
        mapping={
            "v": JOURNAL_FORMAT_VERSION,
            "revision": workers,
            "entry": "0-1",
            "lines": lines,
            "records": json.dumps({r.worker_id: n + 1 for n, r in enumerate(records)}),
        },
    )
    for batch in range(1000):
        beats = records[batch * 10 % workers : batch * 10 % workers + 10]
        body = b"".join(
            encode_event(HeartbeatReceived(r.worker_id, START + 20 + batch)) for r in beats
        )
        client.xadd(keys.stream, {"v": JOURNAL_FORMAT_VERSION, "revision": workers, "beats": body})
    client.close()
    return lines


def recover_here(url: str, prefix: str, lines_path: str, what: str) -> None:
    """The child: time RedisStore.open (``redis``) or the journal's replay of the snapshot.

    Prints ``[wall, cpu, snapshot, workers]``: ``snapshot`` is the part of
    the wall time the store logs for reading and applying the snapshot key
    (``None`` for the journal).
    """
    gc.disable()  # as crank-registry serve pauses it during recovery
    if what == "journal":
        with open(lines_path, "rb") as file:
            data = file.read()
        registry = CapabilityRegistry()
        started, started_cpu = time.perf_counter(), time.process_time()
        replay_bytes(data, registry)
        cpu = time.process_time() - started_cpu
        print(json.dumps([time.perf_counter() - started, cpu, None, len(registry)]))
        return

    logged: list[float] = []

    class SnapshotSeconds(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("redis snapshot loaded"):
                logged.append(float(record.getMessage().rpartition("seconds=")[2]))

    logger = logging.getLogger("crank_registry_asgi.redis")
    logger.setLevel(logging.INFO)
    logger.addHandler(SnapshotSeconds())

    async def load() -> tuple[float, float, float, int]:
        registry = CapabilityRegistry()
        store = RedisStore(registry, url=url, prefix=prefix, controller_id="bench", clock=time.time)
        started, started_cpu = time.perf_counter(), time.process_time()
        await store.open()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        await store.aclose()
        return elapsed, cpu, logged[-1], len(registry)

    print(json.dumps(anyio.run(load)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=100_000)
    parser.add_argument("--shape", choices=("replicas", "distinct"), default="replicas")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    parser.add_argument("--recover", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recover:
        recover_here(*args.recover)
        return 0
    import tempfile

    load_before = os.getloadavg()[0]
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        lines = write(args.redis, prefix, args.workers, args.shape)
        with tempfile.NamedTemporaryFile(suffix=".jsonl") as file:
            file.write(lines)
            file.flush()
            runs: dict[str, list[list[float]]] = {"redis": [], "journal": []}
            for _ in range(args.runs):
                # Each in a new process, as a starting controller; alternated.
                for what, times in runs.items():
                    output = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--recover",
                            args.redis,
                            prefix,
                            file.name,
                            what,
                        ],
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout
                    times.append(json.loads(output.strip().splitlines()[-1]))
    finally:
        client = redis.Redis.from_url(args.redis)
        client.delete(*StoreKeys(prefix).all())
        client.close()
    assert all(run[-1] == args.workers for both in runs.values() for run in both), runs
    elapsed, snapshot_part = min((run[0], run[2]) for run in runs["redis"])
    cpu = min(run[1] for run in runs["redis"])
    baseline = min(run[0] for run in runs["journal"])
    baseline_cpu = min(run[1] for run in runs["journal"])
    print(
        f"load from Redis, {args.workers} workers, {args.shape} (snapshot "
        f"{len(lines) / 1e6:.1f} MB, 1,000 heartbeat entries after it), best of {args.runs}; "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, "
        f"on {os.cpu_count()} CPUs"
    )
    print(
        f"  RedisStore.open: {elapsed:.2f} s wall (the snapshot key read and applied: "
        f"{snapshot_part:.2f} s), {cpu:.2f} s CPU"
    )
    print(
        f"  target {TARGET_SECONDS:.0f} s: wall {elapsed / TARGET_SECONDS:.2f}x, "
        f"CPU {cpu / TARGET_SECONDS:.2f}x"
    )
    print(
        f"  baseline, the journal's replay of the same snapshot: {baseline:.2f} s wall, "
        f"{baseline_cpu:.2f} s CPU (ratio to it: wall {elapsed / baseline:.2f}, "
        f"CPU {cpu / baseline_cpu:.2f})"
    )
    ok = elapsed <= TARGET_SECONDS
    print("  target met" if ok else "  TARGET MISSED (in wall time)")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    raise SystemExit(main())
