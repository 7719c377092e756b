"""HTTP benchmark: POST /route with 10 000 registered workers vs a bare Starlette endpoint.

One server process serves both, so that they share the server, its settings
and the machine: the controller app from ``create_app`` (what ``crank-registry
serve --insecure`` runs), with one extra path, ``/bare``, dispatched before the
app to a bare Starlette endpoint answering a constant JSON body of the same
shape as a route answer. Under hypercorn the server is started through
``crank_registry_asgi.server.run``, the function behind ``crank-registry
serve``, so its hypercorn settings are the command's. ``--server uvicorn`` or
``--server granian`` runs the same app under those servers instead (optional
installs: ``pip install uvicorn granian``).

The load comes from a separate process: ``wrk`` when it is installed
(``apt-get install wrk``), else an httpx load generator in this file (slower:
with it the client may be the bottleneck). Both endpoints get the same
request, ``POST {"verb": "classify", "capability": "image.classify"}``, over
32 keep-alive connections, and the workers stay healthy for the whole run.

    .venv/bin/python benchmarks/http_route.py                      # hypercorn
    .venv/bin/python benchmarks/http_route.py --server all         # + uvicorn, granian
    .venv/bin/python benchmarks/http_route.py --duration 5 --workers 1000

Targets: /route throughput >= 0.9x /bare; /route p99 <= 10 ms at 32 connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROUTE_BODY = {"verb": "classify", "capability": "image.classify"}
BARE_BODY = {"worker_id": "w00000", "worker_url": "http://127.0.0.1:20000", "version": "1.0.0"}
SERVERS = ("hypercorn", "uvicorn", "granian")
TARGET_RATIO = 0.9
TARGET_P99_MS = 10.0
# Workers must stay routable for the whole run without heartbeats.
UNHEALTHY_AFTER_S = 3600.0

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  io.write(string.format(
    'RESULT {"requests": %%d, "duration_us": %%d, "errors": %%d, "non_2xx": %%d, '
    .. '"p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
"""


# ------------------------------------------------------------------ the server side


def bench_app(state_dir: Path | None, workers: int) -> Any:
    """The controller app with ``workers`` registered workers, plus ``/bare``, as one ASGI app.

    The workers are registered in-process, through the same core call as
    ``POST /register`` (registering 10 000 over HTTP would take longer than the
    measurement itself); they are not journaled.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from crank_registry import CapabilityRegistry, HealthPolicy, Registration, structure
    from crank_registry_asgi.app import create_app
    from crank_registry_asgi.config import ServiceConfig

    policy = HealthPolicy(
        heartbeat_interval=30.0,
        unhealthy_after=UNHEALTHY_AFTER_S,
        evict_after=2 * UNHEALTHY_AFTER_S,
    )
    registry = CapabilityRegistry(policy)
    now = time.time()
    for index in range(workers):
        body = structure(registration(index), Registration)
        registry.register(body.worker_id, body.worker_url, body.capabilities, now=now)
    controller = create_app(registry, config=ServiceConfig(policy=policy, state_dir=state_dir))

    # --bare-reads-body: the bare endpoint also reads the request, as /route
    # must; under granian that read alone is a large part of /route's cost.
    reads_body = os.environ.get("BENCH_BARE_READS_BODY") == "1"

    async def bare_endpoint(request: Request) -> JSONResponse:
        if reads_body:
            await request.body()
        return JSONResponse(BARE_BODY)

    bare = Starlette(routes=[Route("/bare", bare_endpoint, methods=["GET", "POST"])])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/bare":
            await bare(scope, receive, send)
        else:
            await controller(scope, receive, send)

    return app


def granian_app() -> Any:
    """Factory for ``granian --factory``: settings come from the environment."""
    state_dir = os.environ.get("BENCH_STATE_DIR")
    return bench_app(Path(state_dir) if state_dir else None, int(os.environ["BENCH_WORKERS"]))


def serve(server: str, port: int, state_dir: Path | None, workers: int) -> None:
    """Run the benchmark app under ``server`` until SIGTERM."""
    app = bench_app(state_dir, workers)
    if server == "hypercorn":
        from crank_registry_asgi.server import ServerSettings, run

        run(app, ServerSettings(host="127.0.0.1", port=port))
    elif server == "uvicorn":
        import uvicorn

        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    else:
        raise SystemExit(f"unknown server {server!r}")


def server_command(
    server: str, port: int, state_dir: Path | None, workers: int, bare_reads_body: bool
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start the benchmark server."""
    environment = dict(os.environ)
    environment["BENCH_BARE_READS_BODY"] = "1" if bare_reads_body else "0"
    if server == "granian":
        environment["BENCH_WORKERS"] = str(workers)
        environment["BENCH_STATE_DIR"] = str(state_dir) if state_dir else ""
        return [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--no-access-log",
            "--log-level",
            "warning",
            "--working-dir",
            str(Path(__file__).parent),
            "--factory",
            "http_route:granian_app",
        ], environment
    argv = [sys.executable, __file__, "_serve", "--server", server, "--port", str(port)]
    argv += ["--workers", str(workers)]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    return argv, environment


# ------------------------------------------------------------------ the app alone


async def _call_app(app: Any, path: str, body: bytes) -> None:
    """One POST through the ASGI app, with no server and no socket."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 9000),
        "extensions": {},
        "state": {},
    }
    received = False
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received:
            return {"type": "http.disconnect"}
        received = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    if statuses != [200]:
        raise SystemExit(f"{path} answered {statuses}")


async def _app_alone(workers: int, requests: int, profile: bool) -> tuple[dict[str, float], str]:
    app = bench_app(None, workers)
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, to_app.get, from_app.put)
    )
    await to_app.put({"type": "lifespan.startup"})
    await from_app.get()
    costs: dict[str, float] = {}
    for path, body in (("/bare", BARE_BODY), ("/route", ROUTE_BODY)):
        encoded = json.dumps(body).encode()
        for _ in range(requests // 10):  # warm-up
            await _call_app(app, path, encoded)
        started = time.perf_counter()
        for _ in range(requests):
            await _call_app(app, path, encoded)
        costs[path] = (time.perf_counter() - started) / requests * 1e6
    profile_text = ""
    if profile:
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        encoded = json.dumps(ROUTE_BODY).encode()
        profiler.enable()
        for _ in range(requests):
            await _call_app(app, "/route", encoded)
        profiler.disable()
        output = io.StringIO()
        pstats.Stats(profiler, stream=output).sort_stats("cumulative").print_stats(
            r"crank_registry|opentelemetry/trace/__init__|json/__init__|starlette/(routing|responses)",
            25,
        )
        profile_text = output.getvalue()
    await to_app.put({"type": "lifespan.shutdown"})
    await from_app.get()
    await lifespan
    return costs, profile_text


def report_app_alone(args: argparse.Namespace) -> None:
    costs, profile_text = asyncio.run(_app_alone(args.workers, 5000, args.profile))
    print(
        f"\napp alone (direct ASGI calls, no server, no socket), {args.workers} workers: "
        f"/bare {costs['/bare']:.0f} us, /route {costs['/route']:.0f} us per request; "
        f"/route adds {costs['/route'] - costs['/bare']:.0f} us"
    )
    if profile_text:
        print("where /route's time goes in the app (cProfile, cumulative):")
        print(profile_text)


# ------------------------------------------------------------------ the load side


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its descendants (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name (field 2) may hold spaces; fields after it are fixed.
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, of in parents.items() if of == parent and child not in tree]
        tree.update(children)
        frontier += children
    return sum(cpu.get(member, 0.0) for member in tree)


@contextlib.contextmanager
def running_server(
    server: str, state_dir: Path | None, workers: int, bare_reads_body: bool, log_path: Path
) -> Iterator[tuple[str, int]]:
    port = free_port()
    argv, environment = server_command(server, port, state_dir, workers, bare_reads_body)
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{server} exited:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{server} did not start:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def registration(index: int) -> dict[str, Any]:
    capability = {
        "name": "image.classify",
        "verb": "classify",
        "version": "1.0.0",
        "input_schema": {"type": "object"},
        "output_schema": {"type": "object"},
        "requires_gpu": False,
        "max_concurrency": 4,
    }
    # One shared capability to route to, and one of 100 others per worker so
    # that the registry holds more than one rotation.
    other = {**capability, "name": f"text.embed-{index % 100}", "verb": "embed"}
    return {
        "worker_id": f"w{index:05d}",
        "worker_url": f"http://127.0.0.1:{20000 + index % 40000}",
        "capabilities": [capability, other],
    }


def check_workers(url: str, count: int) -> None:
    """Fail unless the server has ``count`` routable workers."""
    health = httpx.get(f"{url}/health", timeout=30).json()
    if health["healthy_workers"] != count:
        raise SystemExit(f"expected {count} healthy workers, the server says {health}")
    answer = httpx.post(f"{url}/route", json=ROUTE_BODY, timeout=30)
    if answer.status_code != 200:
        raise SystemExit(f"/route answered {answer.status_code}: {answer.text}")


def load_with_wrk(
    url: str, body: dict[str, Any], connections: int, duration: float
) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % json.dumps(body))
    try:
        result = subprocess.run(
            [
                "wrk",
                "--threads",
                "1",
                "--connections",
                str(connections),
                "--duration",
                f"{max(1, round(duration))}s",
                "--script",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=duration + 60,
        )
    finally:
        os.unlink(script.name)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    raw = json.loads(line.removeprefix("RESULT "))
    return {
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "requests": raw["requests"],
        "failed": raw["errors"] + raw["non_2xx"],
    }


async def _httpx_load(
    url: str, body: dict[str, Any], connections: int, duration: float
) -> dict[str, float]:
    latencies: list[float] = []
    failed = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        stop_at = time.perf_counter() + duration
        content = json.dumps(body).encode()
        headers = {"content-type": "application/json"}

        async def one_connection() -> None:
            nonlocal failed
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                response = await client.post(url, content=content, headers=headers)
                latencies.append(time.perf_counter() - started)
                failed += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(one_connection() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": quantiles[49] * 1000,
        "p99_ms": quantiles[98] * 1000,
        "requests": len(latencies),
        "failed": failed,
    }


def load_with_httpx(
    url: str, body: dict[str, Any], connections: int, duration: float
) -> dict[str, float]:
    """Run the httpx load generator in its own process, like wrk."""
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "_load",
            "--url",
            url,
            "--body",
            json.dumps(body),
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


def measure(url: str, pid: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    load = load_with_wrk if args.load == "wrk" else load_with_httpx
    for path, body in (("/bare", BARE_BODY), ("/route", ROUTE_BODY)):
        load(f"{url}{path}", body, args.connections, args.warmup)
    results: dict[str, list[dict[str, float]]] = {"/bare": [], "/route": []}
    # Alternate the two endpoints so that drift in the machine's speed hits both.
    for _ in range(args.rounds):
        for path, body in (("/bare", BARE_BODY), ("/route", ROUTE_BODY)):
            cpu_before = process_tree_cpu_s(pid)
            result = load(f"{url}{path}", body, args.connections, args.duration)
            result["cpu_s"] = process_tree_cpu_s(pid) - cpu_before
            results[path].append(result)
    return {path: combine(runs) for path, runs in results.items()}


def combine(runs: list[dict[str, float]]) -> dict[str, float]:
    """The median round's throughput and latencies; server CPU per request over all rounds."""
    requests = sum(run["requests"] for run in runs)
    return {
        "cpu_us": sum(run["cpu_s"] for run in runs) / requests * 1e6,
        "rps": statistics.median(run["rps"] for run in runs),
        "p50_ms": statistics.median(run["p50_ms"] for run in runs),
        "p99_ms": statistics.median(run["p99_ms"] for run in runs),
        "requests": sum(run["requests"] for run in runs),
        "failed": sum(run["failed"] for run in runs),
    }


def report(
    server: str, setup_s: float, results: dict[str, dict[str, float]], args: argparse.Namespace
) -> bool:
    bare, route = results["/bare"], results["/route"]
    ratio = route["rps"] / bare["rps"]
    print(
        f"\n{server}: {args.workers} workers, server ready in {setup_s:.1f} s; "
        f"load: {args.load}, {args.connections} connections, "
        f"{args.rounds} x {args.duration:g} s per endpoint"
    )
    print(
        f"  {'endpoint':<8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9} {'failed':>7}"
        f" {'server CPU us/req':>18}"
    )
    for path, result in results.items():
        print(
            f"  {path:<8} {result['rps']:>9.0f} {result['p50_ms']:>8.2f} {result['p99_ms']:>8.2f}"
            f" {result['requests']:>9.0f} {result['failed']:>7.0f} {result['cpu_us']:>18.0f}"
        )
    met_ratio = ratio >= TARGET_RATIO
    met_p99 = route["p99_ms"] <= TARGET_P99_MS
    # CPU per request does not depend on what else the machine runs: its
    # ratio is what the throughput ratio would be on an otherwise idle host.
    print(
        f"  server CPU per request, /bare / /route: {bare['cpu_us'] / route['cpu_us']:.2f} "
        "(the throughput ratio of a CPU-bound server)"
    )
    print(
        f"  /route / /bare throughput: {ratio:.2f} (target >= {TARGET_RATIO}: "
        f"{'met' if met_ratio else 'NOT met'})"
    )
    print(
        f"  /route p99: {route['p99_ms']:.2f} ms (target <= {TARGET_P99_MS:g} ms: "
        f"{'met' if met_p99 else 'NOT met'})"
    )
    return met_ratio and met_p99 and route["failed"] == 0 and bare["failed"] == 0


def run_benchmark(args: argparse.Namespace) -> int:
    if args.load == "auto":
        args.load = "wrk" if shutil.which("wrk") else "httpx"
    servers = list(SERVERS) if args.server == "all" else [args.server]
    load_1m = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPUs, load average {load_1m:.2f} before the run")
    if load_1m > 0.5:
        print("  (other processes are busy: expect lower, noisier figures)")
    os.environ["BENCH_BARE_READS_BODY"] = "1" if args.bare_reads_body else "0"
    print(
        "/bare "
        + ("reads the request body, then answers" if args.bare_reads_body else "answers at once")
        + " with a constant JSON body"
    )
    report_app_alone(args)
    all_met = True
    for server in servers:
        if server != "hypercorn" and importlib.util.find_spec(server) is None:
            print(f"\n{server}: not installed (pip install {server}); skipped")
            continue
        with tempfile.TemporaryDirectory() as scratch:
            state_dir = None if args.in_memory else Path(scratch) / "state"
            log_path = Path(scratch) / "server.log"
            started = time.perf_counter()
            with running_server(
                server, state_dir, args.workers, args.bare_reads_body, log_path
            ) as (url, pid):
                setup_s = time.perf_counter() - started
                check_workers(url, args.workers)
                results = measure(url, pid, args)
            all_met &= report(server, setup_s, results, args)
    return 0 if all_met else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command")
    parser.add_argument("--server", choices=[*SERVERS, "all"], default="hypercorn")
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds per round per endpoint"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--load", choices=["auto", "wrk", "httpx"], default="auto")
    parser.add_argument("--in-memory", action="store_true", help="no journal (no --state-dir)")
    parser.add_argument(
        "--bare-reads-body",
        action="store_true",
        help="/bare reads the request body before answering, as /route must",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile /route through the app alone and print it"
    )

    serve_parser = commands.add_parser("_serve", help="(internal) run the benchmark server")
    serve_parser.add_argument("--server", choices=["hypercorn", "uvicorn"], required=True)
    serve_parser.add_argument("--port", type=int, required=True)
    serve_parser.add_argument("--state-dir", type=Path)
    serve_parser.add_argument("--workers", type=int, required=True)

    load_parser = commands.add_parser("_load", help="(internal) the httpx load generator")
    load_parser.add_argument("--url", required=True)
    load_parser.add_argument("--body", required=True)
    load_parser.add_argument("--connections", type=int, required=True)
    load_parser.add_argument("--duration", type=float, required=True)

    args = parser.parse_args()
    if args.command == "_serve":
        serve(args.server, args.port, args.state_dir, args.workers)
        return 0
    if args.command == "_load":
        result = asyncio.run(
            _httpx_load(args.url, json.loads(args.body), args.connections, args.duration)
        )
        print(json.dumps(result))
        return 0
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
