"""Benchmark: how long a controller takes to load the shared registry from Redis on start.

Run: ``.venv/bin/python benchmarks/redis_recovery.py`` (``--workers N``,
``--redis URL``, ``--strict``); about 30 s. Needs a Redis (the machine's
127.0.0.1:6379 by default; the benchmark uses keys of its own prefix and
deletes them).

It writes the snapshot key of a registry of ``--workers`` workers (replicas
of 100 services, 3 capabilities each) as the sweeper lease holder writes
it, and 1,000 heartbeat batch entries after it, then times, in a new
process (as a starting controller), ``RedisStore.open``: reading the
snapshot, decoding it with the journal codec (every value read back passes
the wire model's checks), applying it with the core's fold, and catching up
with the stream. The baseline, each run in a new process too, alternating
with it, is the journal's replay of the same snapshot bytes
(``replay_bytes``), which the file journal does on start.

Target (DESIGN, "Targets"): 100 000 workers recovered in <= 2 s.
"""

from __future__ import annotations

import argparse
import gc
import json
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
    CapabilityRegistry,
    HeartbeatReceived,
    Snapshot,
    encode_event,
    encode_snapshot,
    replay_bytes,
)
from crank_registry_asgi.redis_store import RedisStore, StoreKeys

TARGET_SECONDS = 2.0


def write(url: str, prefix: str, workers: int) -> bytes:
    """The snapshot key and 1,000 heartbeat entries after it; returns the snapshot's lines."""
    records = fleet(workers, "replicas")
    lines = b"".join(encode_snapshot(Snapshot(workers, tuple(records))))
    keys = StoreKeys(prefix)
    client = redis.Redis.from_url(url)
    client.set(keys.epoch, "bench")
    client.set(keys.revision, workers)
    client.hset(
        keys.snapshot,
        mapping={
            "v": 2,
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
        client.xadd(keys.stream, {"v": 2, "revision": workers, "beats": body})
    client.close()
    return lines


def recover_here(url: str, prefix: str, lines_path: str, what: str) -> None:
    """The child: time RedisStore.open (``redis``) or the journal's replay of the snapshot."""
    gc.disable()  # as crank-registry serve pauses it during recovery
    if what == "journal":
        with open(lines_path, "rb") as file:
            data = file.read()
        registry = CapabilityRegistry()
        started = time.perf_counter()
        replay_bytes(data, registry)
        print(json.dumps([time.perf_counter() - started, len(registry)]))
        return

    async def load() -> tuple[float, int]:
        registry = CapabilityRegistry()
        store = RedisStore(registry, url=url, prefix=prefix, controller_id="bench", clock=time.time)
        started = time.perf_counter()
        await store.open()
        elapsed = time.perf_counter() - started
        await store.aclose()
        return elapsed, len(registry)

    print(json.dumps(anyio.run(load)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=100_000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    parser.add_argument("--recover", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recover:
        recover_here(*args.recover)
        return 0
    import tempfile

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        lines = write(args.redis, prefix, args.workers)
        with tempfile.NamedTemporaryFile(suffix=".jsonl") as file:
            file.write(lines)
            file.flush()
            runs: dict[str, list[tuple[float, int]]] = {"redis": [], "journal": []}
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
                    elapsed, loaded = json.loads(output.strip().splitlines()[-1])
                    times.append((elapsed, loaded))
    finally:
        client = redis.Redis.from_url(args.redis)
        client.delete(*StoreKeys(prefix).all())
        client.close()
    elapsed, workers = min(runs["redis"])
    baseline, replayed = min(runs["journal"])
    assert workers == replayed == args.workers, (workers, replayed)
    print(
        f"load from Redis, {workers} workers (snapshot {len(lines) / 1e6:.1f} MB, "
        f"1,000 heartbeat entries after it), best of {args.runs}"
    )
    print(
        f"  RedisStore.open: {elapsed:.2f} s   "
        f"target {TARGET_SECONDS:.0f} s: {elapsed / TARGET_SECONDS:.2f}"
    )
    print(
        f"  baseline, the journal's replay of the same snapshot: {baseline:.2f} s "
        f"(ratio {elapsed / baseline:.2f})"
    )
    ok = elapsed <= TARGET_SECONDS
    print("  target met" if ok else "  TARGET MISSED")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    raise SystemExit(main())
