"""Benchmark of rate limits in the core: what ``admit`` adds to a route.

Run: ``.venv/bin/python benchmarks/admission.py`` (about 20 s; ``--quick``
for a smoke run, ``--workers N`` for another registry size).

In-process, a registry of 10 000 workers (3 capabilities each over 10 000
capabilities, as in ``core.py``), routes over the same 64 hot capabilities:

* baseline: ``route`` alone;
* with a limit: ``admit`` of the caller (1 000 callers in turn, each with a
  bucket of its own, a limit none of them reaches) then ``route``, as the
  service does for every ``/route``;
* for information, ``admit`` alone when it refuses (a caller over its limit),
  and ``admit`` of a new caller with the most buckets kept by default.

Each figure is the median of repeated runs in CPU time of this thread, the
two routes measured alternately so that a busy neighbour slows both alike.
Target (DESIGN, Settled questions, "Targets", which replaces the admission
issue's 1.2x of the baseline): at most 0.5 µs added to an in-process
``admit`` + ``route``. The ratio to the baseline is printed against that
older 1.2x too, for information. Exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit

# The script's own directory is on sys.path: core.py's registry builder.
from core import populate

from crank_registry import (
    DEFAULT_MAX_KEYS,
    MAX_BURST,
    MAX_RATE,
    CapabilityRegistry,
    RateLimit,
    TokenBuckets,
)

START = 1_700_000_000.0
ROUTE_SAMPLE = 64
CALLERS = 1000
ADDED_TARGET_US = 0.5
RATIO_TARGET = 1.2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="fewer calls, for a smoke run")
    args = parser.parse_args()
    calls, repeat = (20_000, 5) if args.quick else (200_000, 15)

    registry = CapabilityRegistry()
    populate(registry, args.workers, START)
    now = START
    route = registry.route
    sample = [("infer", f"model.task{i}") for i in range(ROUTE_SAMPLE)]
    callers = [f"spiffe://crank.local/client/caller-{c}" for c in range(CALLERS)]
    asks = [(callers[i % CALLERS], *sample[i % ROUTE_SAMPLE]) for i in range(calls)]
    # A limit no caller reaches: every admit takes a token, as on a healthy service.
    buckets = TokenBuckets(RateLimit(rate=MAX_RATE, burst=MAX_BURST))
    admit = buckets.admit

    # Both loops walk the same (caller, verb, name) tuples: the difference is admit's.
    def routes() -> None:
        for _caller, verb, name in asks:
            route(verb, name, now=now)

    def admitted_routes() -> None:
        for caller, verb, name in asks:
            if admit(caller, now=now):
                raise AssertionError("refused under a limit no caller reaches")
            route(verb, name, now=now)

    refusing = TokenBuckets(RateLimit(rate=1, burst=1))
    for caller in callers:
        refusing.admit(caller, now=now)
    refused_keys = [caller for caller, _, _ in asks]

    def refusals() -> None:
        for caller in refused_keys:
            refusing.admit(caller, now=now)

    for warm_up in (routes, admitted_routes, refusals):
        warm_up()
    baseline: list[float] = []
    limited: list[float] = []
    refused: list[float] = []
    for _ in range(repeat):  # alternated: a busy neighbour slows both alike
        baseline.append(timeit.timeit(routes, number=1, timer=time.thread_time) / calls)
        limited.append(timeit.timeit(admitted_routes, number=1, timer=time.thread_time) / calls)
        refused.append(timeit.timeit(refusals, number=1, timer=time.thread_time) / calls)

    route_us = statistics.median(baseline) * 1e6
    limited_us = statistics.median(limited) * 1e6
    added_us = limited_us - route_us
    ratio = limited_us / route_us
    added_ok = added_us <= ADDED_TARGET_US
    ratio_ok = ratio <= RATIO_TARGET
    print(f"{args.workers} workers, {CALLERS} callers, {calls} calls x {repeat} runs (CPU time)")
    print(f"route alone (baseline):     {route_us:.3f} µs")
    print(f"admit + route:              {limited_us:.3f} µs")
    print(
        f"added by the rate limit:    {added_us:.3f} µs (target <= {ADDED_TARGET_US} µs: "
        f"{added_us / ADDED_TARGET_US:.2f}x) {'PASS' if added_ok else 'FAIL'}"
    )
    print(
        f"admit + route / route:      {ratio:.3f} (the issue's older <= {RATIO_TARGET}: "
        f"{ratio / RATIO_TARGET:.2f}x, {'met' if ratio_ok else 'missed'}; not the target)"
    )
    print(f"admit, refused (no target): {statistics.median(refused) * 1e6:.3f} µs")
    print(f"buckets kept: {len(buckets)} (one per caller)")
    # New callers at the most buckets kept by default: each looks at the two
    # buckets at the front of the queue and forgets the full ones.
    crowded = TokenBuckets(RateLimit(rate=1, burst=1))
    for number in range(DEFAULT_MAX_KEYS):
        crowded.admit(f"10.0.{number // 256}.{number % 256}", now=now)  # full again at now + 1
    newcomers = [f"10.1.{number // 256}.{number % 256}" for number in range(DEFAULT_MAX_KEYS // 2)]
    started = time.thread_time()
    for caller in newcomers:
        crowded.admit(caller, now=now + 2)
    new_us = (time.thread_time() - started) / len(newcomers) * 1e6
    print(
        f"admit of a new caller, {DEFAULT_MAX_KEYS} buckets kept (no target): {new_us:.3f} µs; "
        f"{len(crowded)} kept after {len(newcomers)} new callers"
    )
    return 0 if added_ok else 1


if __name__ == "__main__":
    sys.exit(main())
