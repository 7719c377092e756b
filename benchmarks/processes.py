"""Benchmark: /route and /heartbeat over HTTP with ``serve --processes 1`` and ``--processes 2``.

Run: ``.venv/bin/python benchmarks/processes.py`` (``--workers N``,
``--duration S``, ``--rounds N``, ``--connections N``, ``--redis URL``,
``--strict``); about 2 minutes. Needs a Redis (the machine's
127.0.0.1:6379 by default; the benchmark uses keys of its own prefix and
deletes them).

Three ``crank-registry serve --insecure`` commands, one after the other,
each with the same ``--workers`` registered over HTTP (and healthy for the
whole run):

- ``journal``: the default, one process and its journal file (the baseline
  of what Redis costs);
- ``redis x1``: ``--redis URL --processes 1``;
- ``redis x2``: ``--redis URL --processes 2``, the kernel spreading the
  connections over both (SO_REUSEPORT).

Load: a raw asyncio HTTP/1.1 client in a process of its own (cheaper per
request than httpx, so that it takes less of the machine from the servers),
``--connections`` keep-alive connections, alternating rounds of ``/route``
(one capability every worker offers) and ``/heartbeat`` (each request the
next worker's). Figures per command and endpoint: requests/s (median
round), p50, p99, failed requests and the servers' CPU time per request.

Target: ``redis x2`` serves at least :data:`TARGET_SCALING` times the
requests/s of ``redis x1`` (the baseline, measured in the same run) on each
endpoint. On a 2-core machine the load generator and Redis share the cores
with the servers, so twice is out of reach. The servers' CPU time per
request, x2 against x1, says what a second process costs per request
whatever else the machine runs (1.00: nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import redis

# Beside this file: the HTTP benchmark's helpers.
from http_route import ROUTE_BODY, free_port, process_tree_cpu_s, registration

from crank_registry_asgi.redis_store import StoreKeys

TARGET_SCALING = 1.4
ENDPOINTS = ("/route", "/heartbeat")


@contextlib.contextmanager
def serving(extra: list[str], directory: Path, processes: int) -> Iterator[tuple[str, int]]:
    """A ``serve --insecure`` command; yields its base URL and pid once every process answers."""
    port = free_port()
    log = (directory / "serve.log").open("wb")
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
            str(directory / "state"),
            "--log-level",
            "warning",
            "--heartbeat-interval",
            "600",
            "--unhealthy-after",
            "3600",
            "--evict-after",
            "7200",
            "--controller-id",
            "bench",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        seen: set[str] = set()
        # Every process answers once it is up; new connections land on either.
        while len(seen) < processes:
            try:
                with httpx.Client(timeout=2) as client:
                    answer = client.get(f"{base}/health")
                    if answer.status_code == 200:
                        seen.add(answer.json()["controller_id"])
            except httpx.HTTPError:
                time.sleep(0.05)
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"serve did not start:\n{(directory / 'serve.log').read_text()}")
        yield base, process.pid
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def register(base: str, workers: int) -> None:
    with httpx.Client(base_url=base, timeout=30) as client:
        for index in range(workers):
            answer = client.post("/register", json=registration(index))
            if answer.status_code != 200:
                raise SystemExit(f"/register answered {answer.status_code}: {answer.text}")


def routable_everywhere(base: str, workers: int, processes: int) -> None:
    """Wait until every process has every worker (a replica applies the stream a moment later)."""
    deadline = time.monotonic() + 60
    ready: set[str] = set()
    while len(ready) < processes:
        with httpx.Client(timeout=5) as client:
            health = client.get(f"{base}/health").json()
            if health["healthy_workers"] == workers:
                ready.add(health["controller_id"])
        if time.monotonic() > deadline:
            raise SystemExit(f"not every process has {workers} workers within 60 s")


def bodies(endpoint: str, workers: int) -> list[bytes]:
    """The request bodies the load cycles through."""
    if endpoint == "/route":
        return [json.dumps(ROUTE_BODY).encode()]
    return [json.dumps({"worker_id": f"w{index:05d}"}).encode() for index in range(workers)]


async def _load(
    host: str, port: int, path: str, payloads: list[bytes], connections: int, duration: float
) -> dict[str, float]:
    """``connections`` keep-alive connections asking in turn until ``duration`` is over."""
    requests = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in payloads
    ]
    latencies: list[float] = []
    failed = 0
    stop_at = time.perf_counter() + duration

    async def one_connection(offset: int) -> None:
        nonlocal failed
        reader, writer = await asyncio.open_connection(host, port)
        turn = offset
        try:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                writer.write(requests[turn % len(requests)])
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as closed:
                    if closed.partial:
                        raise
                    # hypercorn closes a keep-alive connection after 1000
                    # requests (keep_alive_max_requests): open another, ask again.
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                turn += connections
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                failed += not head.startswith(b"HTTP/1.1 200")
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one_connection(offset) for offset in range(connections)))
    elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": quantiles[49] * 1000,
        "p99_ms": quantiles[98] * 1000,
        "requests": len(latencies),
        "failed": failed,
    }


def load(base: str, path: str, workers: int, connections: int, duration: float) -> dict[str, float]:
    """Run the load generator in its own process."""
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "_load",
            "--url",
            base,
            "--path",
            path,
            "--workers",
            str(workers),
            "--connections",
            str(connections),
            "--duration",
            str(duration),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 120,
    )
    loaded: dict[str, float] = json.loads(result.stdout.splitlines()[-1])
    return loaded


def measure(base: str, pid: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    for path in ENDPOINTS:
        load(base, path, args.workers, args.connections, args.warmup)
    runs: dict[str, list[dict[str, float]]] = {path: [] for path in ENDPOINTS}
    # Alternate the endpoints so that drift in the machine's speed hits both.
    for _ in range(args.rounds):
        for path in ENDPOINTS:
            cpu_before = process_tree_cpu_s(pid)
            result = load(base, path, args.workers, args.connections, args.duration)
            result["cpu_s"] = process_tree_cpu_s(pid) - cpu_before
            runs[path].append(result)
    return {
        path: {
            "rps": statistics.median(run["rps"] for run in results),
            "p50_ms": statistics.median(run["p50_ms"] for run in results),
            "p99_ms": statistics.median(run["p99_ms"] for run in results),
            "failed": sum(run["failed"] for run in results),
            "cpu_us": sum(run["cpu_s"] for run in results)
            / sum(run["requests"] for run in results)
            * 1e6,
        }
        for path, results in runs.items()
    }


#: The workers' heartbeat interval (the default), for the fleet a host holds.
HEARTBEAT_INTERVAL = 30.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    load_parser = commands.add_parser("_load", help="(internal) the load generator")
    load_parser.add_argument("--url", required=True)
    load_parser.add_argument("--path", required=True)
    load_parser.add_argument("--workers", type=int, required=True)
    load_parser.add_argument("--connections", type=int, required=True)
    load_parser.add_argument("--duration", type=float, required=True)
    args = parser.parse_args()
    if args.command == "_load":
        url = httpx.URL(args.url)
        assert url.port is not None
        payloads = bodies(args.path, args.workers)
        print(
            json.dumps(
                asyncio.run(
                    _load(url.host, url.port, args.path, payloads, args.connections, args.duration)
                )
            )
        )
        return 0

    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the run; "
        f"{args.workers} workers, {args.connections} connections, "
        f"{args.rounds} x {args.duration:g} s per endpoint"
    )
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    commands_run = {
        "journal": ([], 1),
        "redis x1": (["--redis", args.redis, "--redis-prefix", prefix + "-1"], 1),
        "redis x2": (
            ["--redis", args.redis, "--redis-prefix", prefix + "-2", "--processes", "2"],
            2,
        ),
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for name, (extra, processes) in commands_run.items():
            with (
                tempfile.TemporaryDirectory() as scratch,
                serving(extra, Path(scratch), processes) as (base, pid),
            ):
                register(base, args.workers)
                routable_everywhere(base, args.workers, processes)
                results[name] = measure(base, pid, args)
    finally:
        client = redis.Redis.from_url(args.redis)
        for suffix in ("-1", "-2"):
            client.delete(*StoreKeys(prefix + suffix).all())
        client.close()

    print(
        f"\n  {'command':<9} {'endpoint':<11} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'failed':>6} {'server CPU us/req':>18}"
    )
    for name, measured in results.items():
        for path, result in measured.items():
            print(
                f"  {name:<9} {path:<11} {result['rps']:>7.0f} {result['p50_ms']:>7.1f}"
                f" {result['p99_ms']:>7.1f} {result['failed']:>6.0f} {result['cpu_us']:>18.0f}"
            )
    met = True
    for path in ENDPOINTS:
        one, two = results["redis x1"][path]["rps"], results["redis x2"][path]["rps"]
        journal = results["journal"][path]["rps"]
        scaling = two / one
        met &= scaling >= TARGET_SCALING
        met &= all(results[name][path]["failed"] == 0 for name in results)
        print(
            f"  {path}: redis x2 / redis x1 = {scaling:.2f} (target >= {TARGET_SCALING}: "
            f"{'met' if scaling >= TARGET_SCALING else 'NOT met'}; "
            f"{scaling / TARGET_SCALING:.2f}x the target); "
            f"redis x1 / journal = {one / journal:.2f}, redis x2 / journal = {two / journal:.2f}"
        )
        # CPU per request does not depend on what else the machine runs: equal
        # figures mean a second process costs nothing per request (its metrics
        # in files included), and the throughput scales with the free cores.
        cpu_one, cpu_two = results["redis x1"][path]["cpu_us"], results["redis x2"][path]["cpu_us"]
        print(f"  {path}: server CPU per request, redis x2 / redis x1 = {cpu_two / cpu_one:.2f}")
    # The heartbeat capacity of one controller host: each worker heartbeats
    # once per interval, so a host answering R heartbeats a second holds a
    # fleet of R x the interval (less the headroom an operator keeps).
    for name in results:
        beats = results[name]["/heartbeat"]["rps"]
        print(
            f"  heartbeat capacity, {name}: {beats:.0f} heartbeats/s, a fleet of "
            f"{beats * HEARTBEAT_INTERVAL:,.0f} workers at a {HEARTBEAT_INTERVAL:g} s interval"
        )
    print(f"load average after the run: {os.getloadavg()[0]:.2f}")
    return 0 if met or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
