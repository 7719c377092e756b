"""Benchmark: replication lag between two controllers sharing one registry on Redis.

Run: ``.venv/bin/python benchmarks/replication_lag.py`` (``--changes N``,
``--redis URL``, ``--strict``); about 20 s. Needs a Redis (the machine's
127.0.0.1:6379 by default; the benchmark uses keys of its own prefix and
deletes them).

Two ``crank-registry serve --insecure --redis URL`` processes, A and B, run
on this host. Every 20 ms a worker registers on A, with a capability of its
own; from the moment A's 200 arrives, a client asks B for a route to that
capability as fast as it can until B answers 200: that time is the lag
(A's answer to B's first route). Its baseline, measured in the same run
the same way, is the time from A's answer to A's own first route (what
the polling itself costs).

Figures: the lag's p50, p99 and max over the changes; the target is 50 ms
p99 on one host (DESIGN, "Shared registry on Redis"), the ratio printed,
and the ratio to the baseline. Beside them, what B's own
``crank_replication_lag_seconds`` says of the same run (every stream entry
it applied, heartbeat batches included, from its time in Redis): its
count, mean and the share within the target.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from crank_registry_asgi.redis_store import StoreKeys

TARGET_P99_S = 0.050
CHANGE_EVERY_S = 0.02


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def controller(url: str, prefix: str, name: str, directory: Path) -> Iterator[str]:
    """A ``serve --redis`` process; yields its base URL once it answers."""
    port = free_port()
    log = (directory / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "crank_registry_asgi",
            "serve",
            "--insecure",
            "--port",
            str(port),
            "--state-dir",
            str(directory / name),
            "--redis",
            url,
            "--redis-prefix",
            prefix,
            "--controller-id",
            name,
            "--log-level",
            "warning",
            "--unhealthy-after",
            "3600",
            "--evict-after",
            "7200",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"controller {name} did not start; see {log.name}")
            time.sleep(0.05)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def registration(number: int) -> dict[str, Any]:
    return {
        "worker_id": f"w{number}",
        "worker_url": f"http://w{number}.test:8080",
        "capabilities": [
            {
                "name": f"lag.c{number}",
                "verb": "probe",
                "version": "1.0.0",
                "input_schema": {"type": "object"},
                "output_schema": {"type": "object"},
                "requires_gpu": False,
                "max_concurrency": 1,
            }
        ],
    }


def time_to_route(client: httpx.Client, number: int, since: float) -> float:
    """Seconds from ``since`` until ``client``'s controller routes worker ``number``."""
    body = {"verb": "probe", "capability": f"lag.c{number}"}
    while client.post("/route", json=body).status_code != 200:
        if time.perf_counter() - since > 5:
            raise SystemExit(f"w{number} not routable within 5 s")
    return time.perf_counter() - since


def exposed_lag(client: httpx.Client) -> tuple[float, float, float]:
    """The controller's ``crank_replication_lag_seconds``: count, sum, count within the target."""
    count = total = within = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name != "crank_replication_lag_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == TARGET_P99_S:
                within = sample.value
    return count, total, within


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    lags: list[float] = []
    baseline: list[float] = []
    with (
        tempfile.TemporaryDirectory() as temporary,
        controller(args.redis, prefix, "a", Path(temporary)) as url_a,
        controller(args.redis, prefix, "b", Path(temporary)) as url_b,
        httpx.Client(base_url=url_a) as on_a,
        httpx.Client(base_url=url_b) as on_b,
    ):
        for number in range(args.changes):
            answered = on_a.post("/register", json=registration(number))
            since = time.perf_counter()
            assert answered.status_code == 200, answered.text
            if number % 2:
                lags.append(time_to_route(on_b, number, since))
            else:
                baseline.append(time_to_route(on_a, number, since))
            time.sleep(CHANGE_EVERY_S)
        exposed = exposed_lag(on_b)
    client = redis.Redis.from_url(args.redis)
    client.delete(*StoreKeys(prefix).all())
    client.close()
    p50, p99 = statistics.median(lags), percentile(lags, 0.99)
    base_p50, base_p99 = statistics.median(baseline), percentile(baseline, 0.99)
    print(f"replication lag A -> B over {len(lags)} registrations (one host, two processes)")
    print(f"  p50 {p50 * 1e3:7.2f} ms   p99 {p99 * 1e3:7.2f} ms   max {max(lags) * 1e3:7.2f} ms")
    print(
        f"  baseline (A's own first route) p50 {base_p50 * 1e3:.2f} ms, p99 {base_p99 * 1e3:.2f} ms"
    )
    print(
        f"  p99 / target ({TARGET_P99_S * 1e3:.0f} ms): {p99 / TARGET_P99_S:.2f}   "
        f"p99 / baseline p99: {p99 / base_p99:.1f}x"
    )
    count, total, within = exposed
    if count:
        print(
            f"  B's crank_replication_lag_seconds: {count:.0f} entries, mean "
            f"{total / count * 1e3:.2f} ms, {within / count:.1%} within "
            f"{TARGET_P99_S * 1e3:.0f} ms"
        )
    ok = p99 <= TARGET_P99_S
    print("  target met" if ok else "  TARGET MISSED")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    raise SystemExit(main())
