"""Benchmark: the journal's size after 24 hours of heartbeats from 10 000 workers.

Run: ``.venv/bin/python benchmarks/journal_size.py`` (``--hours 1`` for a
short run; the full day takes a few minutes).

10 000 workers register, then heartbeat for 24 simulated hours on a fake
clock with the default timings (heartbeat every 30 s less a jitter of up to
10 %, as the worker client does; unhealthy after 60 s, evicted after 120 s).
Each heartbeat goes to the registry, and its events through the service's
``Effects`` to ``Journal.append`` in time order (fsync is off: it does not
change the size, only the run time): the effects journal at most one
heartbeat per worker per 30 s, and the journal compacts the file (a
snapshot of the registry) when it outgrows the live state. At the end, the
file is compared with a fresh snapshot of the same workers.

Target: the journal is <= 3x the size of a fresh snapshot.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import sys
import tempfile
import time

import anyio

from crank_registry import (
    CapabilityRegistry,
    CapabilitySchema,
    Event,
    HealthPolicy,
    encode_snapshot,
    replay_bytes,
    structure,
)
from crank_registry_asgi.effects import Effects, RegistrySnapshots
from crank_registry_asgi.journal import JOURNAL_NAME, Journal
from crank_registry_asgi.metrics import Metrics

START = 1_700_000_000.0
WORKERS = 10_000
TARGET_RATIO = 3.0
WINDOW = 30.0


def capabilities(service: int) -> list[CapabilitySchema]:
    return [
        structure(
            {
                "name": f"model.task{service * 3 + k}",
                "verb": "infer",
                "version": "1.2.0",
                "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
                "output_schema": {"type": "object"},
                "requires_gpu": False,
                "max_concurrency": 4,
            },
            CapabilitySchema,
        )
        for k in range(3)
    ]


async def simulate(hours: float, workers: int) -> tuple[int, int, int, int, float]:
    policy = HealthPolicy()
    rng = random.Random(20261126)
    registry = CapabilityRegistry(policy)
    with tempfile.TemporaryDirectory() as directory:
        state_dir = pathlib.Path(directory)
        journal = Journal.open(state_dir, snapshots=RegistrySnapshots(registry), fsync=False)
        replay_bytes(journal.read(), registry)
        effects = Effects(
            registry,
            metrics=Metrics(),
            journal_expected=True,
            heartbeat_line_every=policy.unhealthy_after / 2,
        )
        effects.journal = journal
        ids = [f"worker-{w:06d}" for w in range(workers)]
        services = [capabilities(service) for service in range(100)]
        registrations: list[Event] = []
        for w, worker_id in enumerate(ids):
            url = f"https://10.0.{w >> 8 & 255}.{w & 255}:8443"
            registrations += registry.register(worker_id, url, services[w % 100], now=START)
        await effects.commit(registrations)
        interval = policy.heartbeat_interval
        # Each worker beats every 30 s less its jitter, from a random phase.
        periods = [interval * (1 - 0.1 * rng.random()) for _ in ids]
        upcoming = [START + rng.random() * interval for _ in ids]
        largest = journal.size
        end = START + hours * 3600
        window_end = START + WINDOW
        while window_end <= end:
            beats: list[tuple[float, str]] = []
            for w, worker_id in enumerate(ids):
                at = upcoming[w]
                while at < window_end:
                    beats.append((at, worker_id))
                    at += periods[w]
                upcoming[w] = at
            beats.sort()
            events: list[Event] = []
            for at, worker_id in beats:
                events += registry.heartbeat(worker_id, now=at)
            await effects.commit(events)
            largest = max(largest, journal.size)
            window_end += WINDOW
        await journal.aclose()
        data = (state_dir / JOURNAL_NAME).read_bytes()
        # A fresh snapshot of the same workers, as compaction would write it now.
        live = CapabilityRegistry(policy)
        result = replay_bytes(data, live)
        assert result.lines_skipped == 0 and len(live) == workers
        snapshot = sum(map(len, encode_snapshot(live.snapshot())))
        return len(data), snapshot, largest, journal.compactions, len(live)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0, help="simulated hours (24)")
    parser.add_argument("--workers", type=int, default=WORKERS, help="workers (10 000)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    started = time.perf_counter()
    size, snapshot, largest, compactions, live = anyio.run(simulate, args.hours, args.workers)
    elapsed = time.perf_counter() - started
    ratio = size / snapshot
    print(f"{args.workers} workers, {args.hours:g} h of heartbeats simulated in {elapsed:.0f} s")
    print(f"  live workers at the end:     {live}")
    print(f"  fresh snapshot:              {snapshot / 1e6:8.2f} MB")
    print(f"  journal after {args.hours:g} h:          {size / 1e6:8.2f} MB  ({ratio:.2f}x)")
    print(f"  largest during the run:      {largest / 1e6:8.2f} MB  ({largest / snapshot:.2f}x)")
    print(f"  compactions:                 {compactions}")
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    print(
        f"journal / snapshot = {ratio:.2f} (target <= {TARGET_RATIO:g}: "
        f"{ratio / TARGET_RATIO:.2f}x of the limit, {verdict} it)"
    )
    return 1 if args.strict and ratio > TARGET_RATIO else 0


if __name__ == "__main__":
    sys.exit(main())
