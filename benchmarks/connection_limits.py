"""HTTP benchmark: POST /route over HTTPS with and without the connection limits, side by side.

One server process serves the controller app (1 000 healthy workers, as in
``http_route.py``) on two HTTPS ports at once, with the same hypercorn
settings, the same per-connection hook and the same 5 s TLS handshake
timeout (asyncio times every handshake anyway, 60 s by default: the
timeout costs nothing more). The only difference is the connection cap:

- ``limits``: the listening socket of ``crank-registry serve``, whose
  ``accept()`` goes through the :class:`ConnectionLimiter` (cap from the
  open-file limit), and whose connections report their requests to it;
- ``bare``: hypercorn's own listening socket.

Both ports are loaded at the same time by two load generators (httpx, each
in its own process, half the connections each), so that whatever else the
machine runs hits both alike; the figure is the ratio of their throughputs
over all rounds.
Two ways: keep-alive connections, and a new connection (TLS handshake
included) for every request, where the cap's bookkeeping runs every time.

    .venv/bin/python benchmarks/connection_limits.py           # ~1 min
    .venv/bin/python benchmarks/connection_limits.py --duration 3 --rounds 1

Target: the limits cost nothing measurable: ``limits`` / ``bare``
throughput >= 0.95 in both ways (about the noise between two rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

# The script's own directory is on sys.path: the HTTP benchmark's app and helpers.
from http_route import ROUTE_BODY, bench_app, free_port

TARGET_RATIO = 0.95
SERVERS = ("limits", "bare")
WAYS = ("keep-alive", "new connection")


# ------------------------------------------------------------------ the server side


def serve(ports: dict[str, int], certs_dir: Path, workers: int) -> None:
    """Serve the app on ``ports["limits"]`` through the cap and on ``ports["bare"]`` without."""
    from hypercorn.asyncio.run import worker_serve
    from hypercorn.config import Sockets
    from hypercorn.utils import wrap_app

    from crank_registry_asgi import limits, tls
    from crank_registry_asgi.server import ServerSettings, hypercorn_config

    app = bench_app(None, workers)
    settings = ServerSettings(
        port=ports["limits"],
        certfile=certs_dir / "controller.pem",
        keyfile=certs_dir / "controller.key",
    )
    config = hypercorn_config(settings)
    config.bind = [f"127.0.0.1:{ports['limits']}", f"127.0.0.1:{ports['bare']}"]
    tls.install()
    capped, bare = config.create_sockets().secure_sockets
    limiter = limits.ConnectionLimiter(limits.default_max_connections(limits.open_file_limit()))
    config.connection_limiter = limiter
    sockets = Sockets([limits.capped_listener(capped, limiter), bare], [], [])

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await worker_serve(
            wrap_app(app, config.wsgi_max_body_size, "asgi"),
            config,
            sockets=sockets,
            shutdown_trigger=stop.wait,
        )

    asyncio.run(main())


@contextlib.contextmanager
def running_server(certs_dir: Path, workers: int, log_path: Path) -> Iterator[dict[str, str]]:
    """The server, ready; yields each port's URL."""
    ports = {kind: free_port() for kind in SERVERS}
    argv = [sys.executable, __file__, "_serve", str(ports["limits"]), str(ports["bare"])]
    argv += [str(certs_dir), str(workers)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    urls = {kind: f"https://127.0.0.1:{port}" for kind, port in ports.items()}
    verify = ssl.create_default_context(cafile=str(certs_dir / "ca.pem"))
    try:
        deadline = time.monotonic() + 120
        for url in urls.values():
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"the server exited:\n{log_path.read_text()}")
                try:
                    answer = httpx.post(f"{url}/route", json=ROUTE_BODY, verify=verify)
                    if answer.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start:\n{log_path.read_text()}")
                time.sleep(0.1)
        yield urls
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ------------------------------------------------------------------ the load side


async def _load(
    url: str, ca_file: str, connections: int, duration: float, new_connections: bool
) -> dict[str, float]:
    verify = ssl.create_default_context(cafile=ca_file)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"content-type": "application/json"}
    if new_connections:
        headers["connection"] = "close"
    content = json.dumps(ROUTE_BODY).encode()
    done = failed = 0
    async with httpx.AsyncClient(limits=limits, verify=verify, timeout=30) as client:
        stop_at = time.perf_counter() + duration

        async def one_connection() -> None:
            nonlocal done, failed
            while time.perf_counter() < stop_at:
                response = await client.post(url, content=content, headers=headers)
                done += 1
                failed += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(one_connection() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return {"rps": done / elapsed, "requests": done, "failed": failed}


def load(
    url: str, ca_file: Path, connections: int, duration: float, new_connections: bool
) -> dict[str, float]:
    """Run the load generator in its own process and return what it measured."""
    argv = [sys.executable, __file__, "_load", url, str(ca_file), str(connections)]
    argv += [str(duration), "1" if new_connections else "0"]
    result = subprocess.run(
        argv, capture_output=True, text=True, check=True, timeout=duration + 120
    )
    loaded: dict[str, float] = json.loads(result.stdout.splitlines()[-1])
    return loaded


# ------------------------------------------------------------------ the run


def make_certificates(directory: Path) -> None:
    from crank_registry_asgi import certs

    authority = certs.make_authority()
    authority.write(directory / "ca.pem", directory / "ca.key")
    certs.make_controller_certificate(authority).write(
        directory / "controller.pem", directory / "controller.key"
    )


def run_benchmark(args: argparse.Namespace) -> int:
    load_1m = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPUs, load average {load_1m:.2f} before the run")
    if load_1m > 0.5:
        print("  (other processes are busy: lower figures; the ratio is what counts)")
    results: dict[tuple[str, str], list[float]] = {
        (kind, way): [] for kind in SERVERS for way in WAYS
    }
    failed = 0
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        make_certificates(directory)
        ca_file = directory / "ca.pem"
        with running_server(directory, args.workers, directory / "server.log") as urls:
            half = max(1, args.connections // 2)
            with ThreadPoolExecutor(len(SERVERS)) as pool:
                for round_number in range(-1, args.rounds):  # round -1: warm-up
                    for way in WAYS:
                        duration = 1.0 if round_number < 0 else args.duration
                        # Both ports at once: the same machine, the same moment.
                        futures = {
                            kind: pool.submit(
                                load,
                                urls[kind] + "/route",
                                ca_file,
                                half,
                                duration,
                                way == "new connection",
                            )
                            for kind in SERVERS
                        }
                        for kind, future in futures.items():
                            result = future.result()
                            failed += int(result["failed"])
                            if round_number >= 0:
                                results[(kind, way)].append(result["rps"])
    print(
        f"\nPOST /route over HTTPS, {args.workers} workers; both ports loaded at once, "
        f"{half} connections each, {args.rounds} x {args.duration:g} s per way; load: httpx"
    )
    print(f"  {'way':<15} {'port':<7} {'req/s (median of rounds)':>25}")
    all_met = failed == 0
    for way in WAYS:
        for kind in SERVERS:
            print(f"  {way:<15} {kind:<7} {statistics.median(results[(kind, way)]):>25.0f}")
        # Each round's two figures were measured together; the ratio is that of
        # their sums (the two load generators also compete for the CPUs, so a
        # single round can favour either port).
        ratios = [
            capped / bare
            for capped, bare in zip(results[("limits", way)], results[("bare", way)], strict=True)
        ]
        ratio = sum(results[("limits", way)]) / sum(results[("bare", way)])
        met = ratio >= TARGET_RATIO
        all_met &= met
        print(
            f"  {way}: limits / bare throughput {ratio:.2f} (rounds: "
            f"{', '.join(f'{r:.2f}' for r in ratios)}; target >= {TARGET_RATIO}: "
            f"{'met' if met else 'NOT met'})"
        )
    if failed:
        print(f"  {failed} requests failed")
    return 0 if all_met else 1


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        limits_port, bare_port, certs_dir, workers = sys.argv[2:6]
        ports = {"limits": int(limits_port), "bare": int(bare_port)}
        serve(ports, Path(certs_dir), int(workers))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        url, ca_file, connections, duration, new = sys.argv[2:7]
        result = asyncio.run(_load(url, ca_file, int(connections), float(duration), new == "1"))
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per round and way")
    parser.add_argument("--rounds", type=int, default=8)
    return run_benchmark(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
