"""Benchmark: a change reaching 1,000 watchers of ``GET /watch``, long polls and streams.

Run: ``.venv/bin/python benchmarks/feed.py`` (``--watchers N``,
``--changes N``, ``--heartbeat-workers N``; ``--quick`` for a smoke run of
5 changes); about 40 s. Exits 1 when a
target is missed (or no change reached every watcher).

The controller app runs in process. ``--watchers`` followers follow the
feed while a client heartbeats ``--heartbeat-workers`` workers back to
back and a worker registers every 100 ms (a change), in three phases:

* long polls: each follower holds ``GET /watch?since=R`` open and, once
  answered, polls again from the revision answered;
* streams: each follower holds one ``GET /watch`` with ``Accept:
  text/event-stream`` open;
* baseline: the same long polls against a bare Starlette app (one route,
  no middleware) whose endpoint waits on one event and answers a fixed
  body: what waking and answering 1,000 requests costs the framework and
  the loop alone, measured in the same run.

The followers call the app through the bare ASGI interface, the lightest
client there is. A follower that has its answer yields to the loop once
before it reads the answer and asks again, as a peer on the network would
(its next request arrives after the answers of that wake are on their way),
so that the answers of one wake are not held up by the next requests.

Figures, over the changes, p50 and max:

* wake-up: from the moment a change is applied (the service's hook that
  wakes the watchers, timed) to the moment the app has sent the last
  watcher its answer (the controller's figure; target 50 ms, DESIGN
  "Targets": 50 ms wake), and to the moment the last follower has read it
  (the followers' JSON parsing runs on the same loop and cores);
* heartbeat latency (p50, p99): without watchers, with the long polls
  open, with the streams open;
* the controller's ``/heartbeat`` and ``/route`` rates (one client
  sending back to back, one path after the other) with no watcher, then
  with the 1,000 watchers open and parked, before the first change of
  their phase (the best of ``RATE_RUNS`` runs; over wall time and over the
  loop's CPU time): the cost of holding them, target >= 0.8x the rate without
  watchers (the issue's "many followers must cost little"), ratio
  printed. While the changes come, the heartbeat latencies above say what
  the wakes cost the requests; they also carry the followers' own work
  (parsing each answer, asking again), which runs on this loop here and
  on other machines in a deployment.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from crank_registry import HealthPolicy
from crank_registry_asgi import ServiceConfig, create_app

WAKE_TARGET_S = 0.050
RATE_TARGET_RATIO = 0.8
#: How long each rate is measured (in ``RATE_RUNS`` runs, the best counts).
HELD_S = 4.0
RATE_RUNS = 8
ROUTE_BODY = {"verb": "classify", "capability": "image.classify"}
CHANGE_EVERY_S = 0.1
_EVENT_ID = re.compile(rb"^id: [^:\r\n]+:([0-9]+)\r?$", re.MULTILINE)


def registration_payload(worker_id: str) -> dict[str, Any]:
    """A registration of ``worker_id`` offering one capability."""
    capability = {
        "name": "image.classify",
        "verb": "classify",
        "version": "1.0.0",
        "input_schema": {"type": "object"},
        "output_schema": {"type": "object"},
        "requires_gpu": False,
        "max_concurrency": 4,
    }
    return {
        "worker_id": worker_id,
        "worker_url": f"http://{worker_id}.test:8080",
        "capabilities": [capability],
    }


def _scope(path: str, query: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"bench"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("bench", 80),
        "state": {},
    }


async def call(app: Any, path: str, query: str) -> tuple[int, bytes, tuple[float, float]]:
    """``GET PATH?QUERY`` through the ASGI interface: status, body, when its end was sent."""
    status = 0
    chunks: list[bytes] = []
    sent = (0.0, 0.0)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, sent
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                sent = now()

    await app(_scope(path, query, []), receive, send)
    return status, b"".join(chunks), sent


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def requests(
    client: httpx.AsyncClient, path: str, bodies: Callable[[int], Any], stop: anyio.Event
) -> list[float]:
    """POST ``bodies(i)`` to ``path`` back to back until ``stop``; each request's latency."""
    latencies: list[float] = []
    index = 0
    while not stop.is_set():
        started = time.perf_counter()
        response = await client.post(path, json=bodies(index))
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        index += 1
        # In process, a request may run to its end without suspending: let the
        # rest of the loop (watchers, registrations) run, as a network would.
        await anyio.sleep(0)
    return latencies


def bodies(path: str, count: int) -> Callable[[int], Any]:
    """The body of the ``i``-th request to ``path``: heartbeats of ``count`` workers in turn."""
    if path == "/heartbeat":
        return lambda index: {"worker_id": f"hb{index % count}"}
    return lambda _: ROUTE_BODY


async def rates(client: httpx.AsyncClient, count: int) -> dict[str, tuple[float, float]]:
    """Requests a second of ``/heartbeat`` and of ``/route``, the best of ``RATE_RUNS`` runs.

    The runs take turns (``/heartbeat``, ``/route``, ``/heartbeat``...), each
    ``HELD_S / RATE_RUNS`` long: the best run is the one the machine's other
    work disturbed least. Each rate twice: over wall time, and over the CPU
    time of the loop's thread.
    """
    runs: dict[str, list[tuple[float, float]]] = {"/heartbeat": [], "/route": []}
    for _ in range(RATE_RUNS):
        for path, measured in runs.items():
            measured.append(await rate(client, path, count, HELD_S / RATE_RUNS))
    return {
        path: (max(wall for wall, _ in measured), max(cpu for _, cpu in measured))
        for path, measured in runs.items()
    }


async def rate(
    client: httpx.AsyncClient, path: str, count: int, seconds: float
) -> tuple[float, float]:
    """Requests to ``path`` a second, back to back for ``seconds``: over wall and CPU time."""
    stop = anyio.Event()
    answered: list[float] = []

    async def run() -> None:
        answered.extend(await requests(client, path, bodies(path, count), stop))

    started = now()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run)
        await anyio.sleep(seconds)
        stop.set()
    ended = now()
    return (
        len(answered) / (ended[0] - started[0]),
        len(answered) / (ended[1] - started[1]),
    )


def now() -> tuple[float, float]:
    """The wall clock and the CPU time of this thread (the event loop's)."""
    return time.perf_counter(), time.thread_time()


class Arrivals:
    """When each change was applied, sent to each watcher, and read by each.

    Each moment is ``(wall, cpu)``: on a machine shared with other work the
    wall time of a wake includes the time the loop's thread was not running;
    its CPU time is what the wake cost the loop.
    """

    def __init__(self) -> None:
        self.applied: dict[int, tuple[float, float]] = {}
        self.sent: dict[int, list[tuple[float, float]]] = {}
        self.read: dict[int, list[tuple[float, float]]] = {}

    def wakes(self, watchers: int) -> dict[str, list[float]]:
        """For each change every watcher had: applied -> last sent and last read, wall and CPU."""
        figures: dict[str, list[float]] = {"sent": [], "read": [], "sent cpu": [], "read cpu": []}
        for revision, (wall, cpu) in self.applied.items():
            sent, read = self.sent.get(revision, []), self.read.get(revision, [])
            if len(sent) == len(read) == watchers:
                figures["sent"].append(max(t for t, _ in sent) - wall)
                figures["read"].append(max(t for t, _ in read) - wall)
                figures["sent cpu"].append(max(c for _, c in sent) - cpu)
                figures["read cpu"].append(max(c for _, c in read) - cpu)
        return figures


async def follow_long_polls(app: Any, path: str, since: int, arrivals: Arrivals) -> None:
    """A follower: long polls from ``since``, each answer's changes noted."""
    while True:
        status, raw, sent = await call(app, path, f"since={since}&timeout=60")
        assert status == 200, raw
        await anyio.sleep(0)  # the answer travels; the other answers go out meanwhile
        body = json.loads(raw)
        read = now()
        for event in body["events"]:
            arrivals.sent.setdefault(event["revision"], []).append(sent)
            arrivals.read.setdefault(event["revision"], []).append(read)
        since = body["revision"]


async def follow_stream(app: Any, since: int, arrivals: Arrivals) -> None:
    """A follower: one stream from ``since``, each event noted as the app sends it."""
    pending: list[tuple[tuple[float, float], bytes]] = []
    more = anyio.Event()

    async def receive() -> dict[str, Any]:
        if not started:
            started.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        nonlocal more
        if message["type"] == "http.response.body" and message.get("body"):
            pending.append((now(), message["body"]))
            more.set()

    async def read() -> None:
        nonlocal more
        while True:
            await more.wait()
            more = anyio.Event()
            await anyio.sleep(0)  # as for a long poll: read once the wake is over
            batch = pending[:]
            pending.clear()
            for sent, chunk in batch:
                for event in chunk.split(b"\r\n\r\n"):
                    match = _EVENT_ID.search(event)
                    if match is None or b"event: bookmark" in event:
                        continue
                    json.loads(event[event.index(b"data: ") + 6 :])
                    revision = int(match[1])
                    arrivals.sent.setdefault(revision, []).append(sent)
                    arrivals.read.setdefault(revision, []).append(now())

    started: list[bool] = []
    headers = [(b"accept", b"text/event-stream")]
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(read)
        await app(_scope("/watch", f"since={since}", headers), receive, send)


async def phase(
    watchers: int,
    changes: int,
    start: Callable[[anyio.abc.TaskGroup], Awaitable[None]],
    change: Callable[[int], Awaitable[None]],
    background: Callable[[anyio.Event], Coroutine[Any, Any, None]] | None = None,
) -> None:
    """Open the watchers (``start``), make ``changes`` changes 100 ms apart, close all."""
    async with anyio.create_task_group() as tasks:
        await start(tasks)
        stop = anyio.Event()
        if background is not None:
            tasks.start_soon(background, stop)
        for index in range(changes):
            await anyio.sleep(CHANGE_EVERY_S)
            await change(index)
        await anyio.sleep(1.0)
        stop.set()
        await anyio.sleep(0.2)
        tasks.cancel_scope.cancel()


async def run_controller(watchers: int, changes: int, heartbeat_workers: int) -> dict[str, Any]:
    """The controller's phases: heartbeats alone, then long polls, then streams."""
    # A long interval: nothing turns unhealthy during the run.
    config = ServiceConfig(policy=HealthPolicy(300.0, 600.0, 1200.0))
    app = create_app(config=config)
    service = app.state.service
    broadcast = service.broadcast
    long_polls, streams = Arrivals(), Arrivals()
    arrivals = long_polls
    wake = service.effects.applied

    def timed_wake() -> None:
        arrivals.applied[service.registry.revision] = now()
        wake()

    service.effects.applied = timed_wake
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    transport = httpx.ASGITransport(app=app)
    figures: dict[str, Any] = {}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://bench", limits=limits) as client,
    ):
        for index in range(heartbeat_workers):
            await client.post("/register", json=registration_payload(f"hb{index}"))
        revision = service.registry.revision

        await rates(client, heartbeat_workers)  # warm up: the first second runs slower
        figures["rates alone"] = await rates(client, heartbeat_workers)
        stop = anyio.Event()
        async with anyio.create_task_group() as tasks:

            async def alone() -> None:
                figures["alone"] = await requests(
                    client, "/heartbeat", bodies("/heartbeat", heartbeat_workers), stop
                )

            tasks.start_soon(alone)
            await anyio.sleep(2.0)
            stop.set()

        async def measure(stop: anyio.Event, name: str) -> None:
            figures[name] = await requests(
                client, "/heartbeat", bodies("/heartbeat", heartbeat_workers), stop
            )

        async def register(index: int) -> None:
            response = await client.post("/register", json=registration_payload(f"new{index}"))
            assert response.status_code == 200, response.text

        async def open_long_polls(tasks: anyio.abc.TaskGroup) -> None:
            for _ in range(watchers):
                tasks.start_soon(follow_long_polls, app, "/watch", revision, long_polls)
            while broadcast.waiting() < watchers:
                await anyio.sleep(0.01)
            figures["rates held long polls"] = await rates(client, heartbeat_workers)

        await phase(
            watchers,
            changes,
            open_long_polls,
            register,
            lambda stop: measure(stop, "with long polls"),
        )
        arrivals = streams
        revision = service.registry.revision

        async def open_streams(tasks: anyio.abc.TaskGroup) -> None:
            for _ in range(watchers):
                tasks.start_soon(follow_stream, app, revision, streams)
            while broadcast.waiting() < watchers:
                await anyio.sleep(0.01)
            figures["rates held streams"] = await rates(client, heartbeat_workers)

        await phase(
            watchers,
            changes,
            open_streams,
            lambda index: register(changes + index),
            lambda stop: measure(stop, "with streams"),
        )
        service.end_streams()
    figures["long polls"] = long_polls.wakes(watchers)
    figures["streams"] = streams.wakes(watchers)
    return figures


async def run_baseline(watchers: int, changes: int) -> dict[str, list[float]]:
    """The same long polls against a bare Starlette app: the floor of a wake."""
    arrivals = Arrivals()
    state: dict[str, Any] = {"revision": 0, "event": anyio.Event(), "waiting": 0}

    async def wait(request: Request) -> Response:
        since = int(request.query_params["since"])
        if state["revision"] <= since:
            state["waiting"] += 1
            await state["event"].wait()
            state["waiting"] -= 1
        return Response(state["body"], media_type="application/json")

    app = Starlette(routes=[Route("/wait", wait)])

    async def open_long_polls(tasks: anyio.abc.TaskGroup) -> None:
        for _ in range(watchers):
            tasks.start_soon(follow_long_polls, app, "/wait", 0, arrivals)
        while state["waiting"] < watchers:
            await anyio.sleep(0.01)

    async def change(index: int) -> None:
        revision = state["revision"] = index + 1
        event = {"type": "registered", "worker_id": f"new{index}", "revision": revision}
        state["body"] = json.dumps({"epoch": "bench", "revision": revision, "events": [event]})
        arrivals.applied[revision] = now()
        state["event"], woken = anyio.Event(), state["event"]
        woken.set()

    await phase(watchers, changes, open_long_polls, change)
    return arrivals.wakes(watchers)


def report_rates(figures: dict[str, Any], watchers: int) -> list[str]:
    """Print the /heartbeat and /route rates with and without watchers; the targets missed."""
    missed = []
    print(
        f"rates, requests a second back to back, the best of {RATE_RUNS} runs of "
        f"{HELD_S / RATE_RUNS:.1f} s, over wall time / over the loop's CPU time:"
    )
    for path in ("/heartbeat", "/route"):
        alone = figures["rates alone"][path]
        print(f"  {path} without watchers: {alone[0]:.0f}/s / {alone[1]:.0f}/s")
        for name in ("long polls", "streams"):
            rate = figures[f"rates held {name}"][path]
            ratios = [rate[clock] / alone[clock] for clock in (0, 1)]
            verdicts = ["PASS" if ratio >= RATE_TARGET_RATIO else "FAIL" for ratio in ratios]
            print(
                f"  {path} with {watchers} {name} open: {rate[0]:.0f}/s / {rate[1]:.0f}/s "
                f"({ratios[0]:.2f}x / {ratios[1]:.2f}x; target >= {RATE_TARGET_RATIO}x) "
                f"{verdicts[0]} / {verdicts[1]}"
            )
            for clock, ratio in zip(("wall", "cpu"), ratios, strict=True):
                if ratio < RATE_TARGET_RATIO:
                    missed.append(f"{path} rate with {name} ({clock})")
    return missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--heartbeat-workers", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5 changes")
    args = parser.parse_args()
    if args.quick:
        args.changes = 5
    figures = anyio.run(run_controller, args.watchers, args.changes, args.heartbeat_workers)
    figures["baseline"] = anyio.run(run_baseline, args.watchers, args.changes)
    missed = []
    print(f"{args.watchers} watchers, {args.changes} changes 100 ms apart")
    for clock in ("wall", "cpu"):
        suffix = "" if clock == "wall" else " cpu"
        print(
            "wall time (the machine's other work included):"
            if clock == "wall"
            else "CPU time of the loop's thread (what the wake cost it):"
        )
        base_sent = figures["baseline"]["sent" + suffix]
        base = statistics.median(base_sent) if base_sent else None
        for name in ("long polls", "streams", "baseline"):
            sent, read = figures[name]["sent" + suffix], figures[name]["read" + suffix]
            if not sent:
                print(f"  {name}: no change reached every watcher")
                missed.append(name)
                continue
            median, worst = statistics.median(sent), max(sent)
            ratio = f"{median / WAKE_TARGET_S:.2f}x the {WAKE_TARGET_S * 1000:.0f} ms target"
            if base is not None and name != "baseline":
                ratio += f", {median / base:.2f}x baseline"
            print(
                f"  {name}: change applied -> last watcher sent its answer: p50 "
                f"{median * 1000:.1f} ms ({ratio}), max {worst * 1000:.1f} ms; "
                f"-> last watcher read it: p50 {statistics.median(read) * 1000:.1f} ms "
                f"({len(sent)} of {args.changes} changes reached every watcher)"
            )
            if name != "baseline" and median > WAKE_TARGET_S:
                missed.append(f"{name} ({clock})")
    for name in ("alone", "with long polls", "with streams"):
        values = figures[name]
        print(
            f"heartbeat {name}: p50 {statistics.median(values) * 1e6:.0f} us, "
            f"p99 {percentile(values, 0.99) * 1e6:.0f} us ({len(values)} heartbeats)"
        )
    missed += report_rates(figures, args.watchers)
    if missed:
        print(f"MISSED: {', '.join(missed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
