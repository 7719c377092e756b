"""Benchmark: rate limits shared by a fleet of controllers on Redis.

Run: ``.venv/bin/python benchmarks/fleet_limits.py`` (``--seconds``,
``--rounds``, ``--redis URL``, ``--strict``); about a minute. Needs a
Redis (the machine's 127.0.0.1:6379 by default; the benchmark's keys are
under a prefix of its own and deleted afterwards).

Two figures, each against ``crank-registry serve --insecure --redis URL``
processes on this host, with one registered worker, loaded by
``--load-processes`` processes of raw HTTP/1.1 keep-alive clients (a
request written, its answer read, again; far lighter than httpx, so that
the servers rather than the clients are the bottleneck):

1. ``/route`` throughput of one controller with ``--rate-limit`` shared in
   Redis against the same controller without a limit, measured in the
   same run, alternately, the median of ``--rounds``. The limit is one the
   load does not reach (``50000:5000``: leases of 500 tokens), as on a
   healthy service. Target: at least 0.8x of the baseline.
2. The admitted rate of 4 controller processes under
   ``--rate-limit 2000:200``, flooded above it: the ``200`` answers per
   second after the first second (the burst), against 2000. Target: within
   5%. The offered load is printed too: under 2000 a second, the figure
   measures the load, not the limit, and is reported as inconclusive.
   The same figure is then measured without HTTP, where the load is sure
   to exceed the limit: 4 processes, each the controller's limiter
   (``SharedTokenBuckets`` with its liveness) called by 32 tasks at once,
   1000 calls a second a process (twice the limit in all).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import redis

from crank_registry import RateLimit
from crank_registry_asgi.fleet_limits import ControllerLiveness, SharedTokenBuckets, fleet_client

THROUGHPUT_TARGET = 0.8
RATE_TOLERANCE = 0.05
FLEET_LIMIT = (2000, 200)
UNREACHED_LIMIT = "50000:5000"
# Figure 2 without HTTP: tasks per process, and what each process asks a second.
TASKS = 32
LIMITER_OFFER_PER_PROCESS = FLEET_LIMIT[0] / 2
ROUTE_BODY = json.dumps({"verb": "classify", "capability": "image.classify"}).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def controller(
    redis_url: str, prefix: str, name: str, directory: Path, *extra: str
) -> Iterator[tuple[str, int]]:
    """A ``serve --redis`` process with a worker-friendly health policy; yields (host, port)."""
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
            redis_url,
            "--redis-prefix",
            prefix,
            "--controller-id",
            name,
            "--unhealthy-after",
            "3600",
            "--evict-after",
            "7200",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited: {(directory / f'{name}.log').read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.05)
        yield "127.0.0.1", port
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def register_worker(urls: Sequence[str]) -> None:
    """One worker, routable on every controller of ``urls``."""
    payload = {
        "worker_id": "w1",
        "worker_url": "http://127.0.0.1:20000",
        "capabilities": [
            {
                "name": "image.classify",
                "verb": "classify",
                "version": "1.0.0",
                "input_schema": {"type": "object"},
                "output_schema": {"type": "object"},
                "requires_gpu": False,
                "max_concurrency": 4,
            }
        ],
    }
    response = httpx.post(f"{urls[0]}/register", json=payload, timeout=10)
    response.raise_for_status()
    deadline = time.monotonic() + 10
    for url in urls:
        while httpx.get(f"{url}/health", timeout=5).json()["healthy_workers"] != 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker is not routable on {url}")
            time.sleep(0.02)


# ------------------------------------------------------------------ the load


async def _connection(
    host: str, port: int, ends: float, started: float, tally: dict[str, Any]
) -> None:
    request = (
        f"POST /route HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(ROUTE_BODY)}\r\n\r\n"
    ).encode() + ROUTE_BODY
    reader, writer = await asyncio.open_connection(host, port)
    admitted_at: list[float] = tally["admitted_at"]
    try:
        while time.time() < ends:
            writer.write(request)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            tally["sent"] += 1
            if time.time() - started >= tally["window_from"]:
                tally["sent_in_window"] += 1
            if status == 200:
                admitted_at.append(time.time() - started)
            elif status != 429:
                tally["other"] += 1
    finally:
        writer.close()


def _start(start_at: float) -> None:
    """Check that this load process is ready before the common start."""
    late = time.time() - start_at
    if late > 0:
        raise RuntimeError(f"a load process was ready {late:.2f} s late: the machine is too busy")


async def _load(
    targets: list[tuple[str, int]],
    connections: int,
    seconds: float,
    window_from: float,
    start_at: float,
) -> dict[str, Any]:
    tally: dict[str, Any] = {
        "sent": 0,
        "sent_in_window": 0,
        "window_from": window_from,
        "other": 0,
        "admitted_at": [],
    }
    # Every load process starts at the same wall-clock time: one window for all.
    _start(start_at)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    started = start_at
    ends = started + seconds
    await asyncio.gather(
        *(
            _connection(*targets[index % len(targets)], ends, started, tally)
            for index in range(connections)
        )
    )
    tally["seconds"] = time.time() - started
    return tally


def load_process(
    targets: list[tuple[str, int]],
    connections: int,
    seconds: float,
    window_from: float,
    start_at: float,
) -> dict[str, Any]:
    """One load process: ``connections`` connections over ``targets`` for ``seconds``.

    It starts at the wall-clock time ``start_at``; answers from ``window_from``
    seconds on are also counted apart.
    """
    return asyncio.run(_load(targets, connections, seconds, window_from, start_at))


def load(
    pool: concurrent.futures.ProcessPoolExecutor,
    processes: int,
    targets: list[tuple[str, int]],
    connections: int,
    seconds: float,
    window_from: float = 0.0,
) -> dict[str, Any]:
    """The load of ``processes`` processes at once, added up."""
    start_at = time.time() + 1.0  # the processes are forked by then
    futures = [
        pool.submit(load_process, targets, connections, seconds, window_from, start_at)
        for _ in range(processes)
    ]
    results = [future.result() for future in futures]
    return {
        "sent": sum(r["sent"] for r in results),
        "sent_in_window": sum(r["sent_in_window"] for r in results),
        "other": sum(r["other"] for r in results),
        "admitted_at": sorted(t for r in results for t in r["admitted_at"]),
        "seconds": max(r["seconds"] for r in results),
    }


# ------------------------------------------------------------------ the figures


def throughput(
    args: argparse.Namespace, pool: concurrent.futures.ProcessPoolExecutor, directory: Path
) -> bool:
    """Figure 1: /route per second with a shared limit against without one."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    runs: dict[str, list[float]] = {"none": [], "shared": []}
    with (
        controller(args.redis, prefix, "plain", directory) as plain,
        controller(
            args.redis, prefix, "shared", directory, "--rate-limit", UNREACHED_LIMIT
        ) as shared,
    ):
        register_worker([f"http://{host}:{port}" for host, port in (plain, shared)])
        for _ in range(args.rounds):  # alternated: a busy neighbour slows both alike
            for name, target in (("none", plain), ("shared", shared)):
                tally = load(pool, args.load_processes, [target], 32, args.seconds)
                refused = tally["sent"] - len(tally["admitted_at"])
                if refused:
                    raise RuntimeError(f"{name}: {refused} of {tally['sent']} routes not 200")
                runs[name].append(tally["sent"] / tally["seconds"])
    cleanup(args.redis, prefix)
    none, with_limit = statistics.median(runs["none"]), statistics.median(runs["shared"])
    ratio = with_limit / none
    ok = ratio >= THROUGHPUT_TARGET
    print(f"/route, one controller on Redis, median of {args.rounds} rounds of {args.seconds} s")
    print(f"  without a limit (baseline):        {none:8.0f} /s")
    print(f"  --rate-limit {UNREACHED_LIMIT} (shared): {with_limit:8.0f} /s")
    print(
        f"  shared / baseline: {ratio:.2f} (target >= {THROUGHPUT_TARGET}: "
        f"{ratio / THROUGHPUT_TARGET:.2f}x) {'PASS' if ok else 'FAIL'}"
    )
    return ok


def admitted_rate(
    args: argparse.Namespace, pool: concurrent.futures.ProcessPoolExecutor, directory: Path
) -> bool | None:
    """Figure 2: what 4 controller processes admit under --rate-limit 2000:200."""
    rate, burst = FLEET_LIMIT
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        targets = [
            stack.enter_context(
                controller(
                    args.redis, prefix, f"c{index}", directory, "--rate-limit", f"{rate}:{burst}"
                )
            )
            for index in range(4)
        ]
        register_worker([f"http://{host}:{port}" for host, port in targets])
        tally = load(pool, args.load_processes, targets, 64, args.seconds + 1, window_from=1.0)
    cleanup(args.redis, prefix)
    window: float = tally["seconds"] - 1.0
    admitted = sum(1 for t in tally["admitted_at"] if t >= 1.0)
    figure = admitted / window
    offered = tally["sent_in_window"] / window
    deviation = figure / rate - 1
    print(f"4 controller processes, --rate-limit {rate}:{burst}, {args.seconds} s after the first")
    print(
        f"  offered {offered:.0f} /s; admitted {figure:.0f} /s (first second, with the "
        f"burst: {len(tally['admitted_at']) - admitted})"
    )
    if offered < rate * (1 + RATE_TOLERANCE):
        print(
            f"  INCONCLUSIVE: the load ({offered:.0f} /s) does not exceed the limit; "
            "rerun on a quieter machine or with --load-processes"
        )
        return None
    ok = abs(deviation) <= RATE_TOLERANCE
    print(
        f"  admitted / limit: {figure / rate:.3f} (target within {RATE_TOLERANCE:.0%}: "
        f"{abs(deviation) / RATE_TOLERANCE:.2f}x of the tolerance) {'PASS' if ok else 'FAIL'}"
    )
    return ok


def cleanup(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{{{prefix}}}:*"))
    if keys:
        client.delete(*keys)
    client.close()


async def _limiter_flood(
    redis_url: str, prefix: str, name: str, seconds: float, window_from: float, start_at: float
) -> dict[str, Any]:
    liveness = ControllerLiveness(fleet_client(redis_url), prefix=prefix, controller_id=name)
    await liveness.renew()
    buckets = SharedTokenBuckets(RateLimit(*FLEET_LIMIT), liveness, time.time, prefix=prefix)
    _start(start_at)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    started = start_at  # the same wall-clock time in every process: one window for all
    ends = started + seconds
    tally = {"admitted": 0, "admitted_in_window": 0, "asked": 0}

    async def caller() -> None:
        while (now := time.time()) < ends:
            tally["asked"] += 1
            if await buckets.admit("127.0.0.1") == 0.0:
                tally["admitted"] += 1
                if now - started >= window_from:
                    tally["admitted_in_window"] += 1
            # Paced to twice the limit in all: a flood that spins would take the
            # CPU from Redis itself on a small machine.
            await asyncio.sleep(TASKS / LIMITER_OFFER_PER_PROCESS)

    await asyncio.gather(*(caller() for _ in range(TASKS)))
    await liveness.aclose()
    return {**tally, "round_trips": buckets.round_trips}


def limiter_process(
    redis_url: str, prefix: str, name: str, seconds: float, window_from: float, start_at: float
) -> dict[str, Any]:
    """One process flooding its limiter from ``start_at`` (figure 2, without HTTP)."""
    return asyncio.run(_limiter_flood(redis_url, prefix, name, seconds, window_from, start_at))


def admitted_rate_of_limiters(args: argparse.Namespace) -> bool:
    """Figure 2 without HTTP: 4 processes' limiters, each flooded by 32 tasks."""
    rate = FLEET_LIMIT[0]
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    start_at = time.time() + 2.0  # the processes are started and connected by then
    with concurrent.futures.ProcessPoolExecutor(4) as limiters:
        futures = [
            limiters.submit(
                limiter_process, args.redis, prefix, f"c{i}", args.seconds + 1, 1.0, start_at
            )
            for i in range(4)
        ]
        results = [future.result() for future in futures]
    cleanup(args.redis, prefix)
    figure: float = sum(r["admitted_in_window"] for r in results) / args.seconds
    asked = sum(r["asked"] for r in results) / (args.seconds + 1)
    trips = sum(r["round_trips"] for r in results)
    admitted = sum(r["admitted"] for r in results)
    ok = abs(figure / rate - 1) <= RATE_TOLERANCE
    print(
        f"  without HTTP, 4 processes x {TASKS} tasks: asked {asked:.0f} /s; "
        f"admitted {figure:.0f} /s"
    )
    print(
        f"  admitted / limit: {figure / rate:.3f} (target within {RATE_TOLERANCE:.0%}: "
        f"{abs(figure / rate - 1) / RATE_TOLERANCE:.2f}x of the tolerance) "
        f"{'PASS' if ok else 'FAIL'}; {trips / max(admitted, 1):.2f} round trips an admission"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="each measurement's length")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load-processes", type=int, default=2)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--only", choices=("throughput", "admitted"), help="one of the two figures")
    args = parser.parse_args()
    results: list[bool | None] = []
    with (
        tempfile.TemporaryDirectory() as temporary,
        concurrent.futures.ProcessPoolExecutor(args.load_processes) as pool,
    ):
        if args.only in (None, "throughput"):
            results.append(throughput(args, pool, Path(temporary)))
        if args.only in (None, "admitted"):
            results.append(admitted_rate(args, pool, Path(temporary)))
            results.append(admitted_rate_of_limiters(args))
    missed = any(result is False for result in results)
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
