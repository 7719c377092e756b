"""Benchmark: how long ``GET /metrics`` holds the event loop at 100 000 workers.

Run: ``.venv/bin/python benchmarks/metrics.py`` (about 20 s; ``--workers N``
for another size).

It builds a registry of N workers (3 capabilities each over 10 000
capabilities, as ``benchmarks/core.py``; a tenth of them silent past
``unhealthy_after``, so that the states differ), an app around it whose
request histograms hold a series for every route and a few statuses, and
prints, as the median of 15 runs in CPU time of this thread:

* the scan that the gauges of workers by state and capabilities run at each
  scrape (``CapabilityRegistry.state_counts`` + ``capability_count``);
* the whole exposition, as the ``/metrics`` endpoint renders it (every
  collector of the app's registry, process figures included).

The exposition runs on the event loop (the registry must not change under
it), so it is the time every other request waits. Target: <= 20 ms at
100 000 workers; past it, the gauges would have to be kept incrementally.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

from crank_registry import CapabilityRegistry, CapabilitySchema, HealthPolicy, structure
from crank_registry_asgi import create_app
from crank_registry_asgi.metrics import metrics_response
from crank_registry_asgi.openapi import ROUTE_PATHS

START = 1_700_000_000.0
CAPABILITIES = 10_000
PER_WORKER = 3
RUNS = 15
TARGET_MS = 20.0


def capability(index: int) -> CapabilitySchema:
    """Capability ``index``, built through the converter as a request's is."""
    payload = {
        "name": f"model.task{index}",
        "verb": "infer",
        "version": "1.2.0",
        "input_schema": {"type": "object"},
        "output_schema": {"type": "object"},
        "requires_gpu": False,
        "max_concurrency": 4,
    }
    return structure(payload, CapabilitySchema)


def build(workers: int, policy: HealthPolicy) -> CapabilityRegistry:
    """``workers`` workers; every tenth last heard past ``unhealthy_after`` before the scrape."""
    capabilities = [capability(index) for index in range(CAPABILITIES)]
    registry = CapabilityRegistry(policy)
    for number in range(workers):
        at = START - (policy.unhealthy_after + 1 if number % 10 == 0 else 0.0)
        chosen = [capabilities[(number * PER_WORKER + k) % CAPABILITIES] for k in range(PER_WORKER)]
        registry.register(f"w{number}", f"https://10.0.{number // 250}.1:8443", chosen, now=at)
    return registry


def median_ms(action: Callable[[], object]) -> float:
    """The median CPU time of ``action`` in milliseconds."""
    times = []
    for _ in range(RUNS):
        started = time.thread_time()
        action()
        times.append(time.thread_time() - started)
    return statistics.median(times) * 1000


def main() -> int:
    """Build the registry and the app, time the scan and the exposition, print both."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=100_000)
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args()
    policy = HealthPolicy()
    registry = build(args.workers, policy)
    app = create_app(registry, clock=lambda: START)
    metrics = app.state.service.metrics
    for path in ROUTE_PATHS:
        for status in ("200", "404", "422", "503"):
            metrics.request_duration.labels(method="POST", path=path, status=status).observe(0.001)

    def scan() -> None:
        registry.state_counts(now=START)
        registry.capability_count()

    counts = registry.state_counts(now=START)
    body = metrics_response(app.state.metrics_registry).body
    print(
        f"{args.workers} workers ({', '.join(f'{s.value} {n}' for s, n in counts.items())}); "
        f"exposition {len(body)} bytes"
    )
    scan_ms = median_ms(scan)
    scrape_ms = median_ms(lambda: metrics_response(app.state.metrics_registry))
    print(f"state scan at scrape time:  {scan_ms:6.2f} ms")
    print(
        f"whole /metrics exposition:  {scrape_ms:6.2f} ms  "
        f"target <= {TARGET_MS:g} ms  ratio {scrape_ms / TARGET_MS:.2f}x"
    )
    return 1 if args.strict and scrape_ms > TARGET_MS else 0


if __name__ == "__main__":
    sys.exit(main())
