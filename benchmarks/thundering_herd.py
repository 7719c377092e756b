"""Thundering herd: do 500 workers re-register in one burst after a controller restart?

Run: ``.venv/bin/python benchmarks/thundering_herd.py`` (``--agents``,
``--interval``, ``--seed``; ``--no-jitter`` shows the burst that jitter
prevents).

500 ``WorkerAgent`` instances run in one process against the real controller
app, in-process (``httpx.ASGITransport``), in virtual time (trio's
``MockClock(autojump_threshold=0)``; the app's clock reads the same virtual
time), so a run over several heartbeat intervals takes seconds and is
deterministic for a seed. Every agent starts at the same instant, the worst
case (a fleet restarted together). After a few heartbeat cycles the controller
is restarted without state: each agent learns it is unknown from its next
heartbeat (404 ``worker_not_registered``) and re-registers at once. The
script prints the histogram of those re-registrations over the interval after
the restart.

Targets: every agent re-registered within one heartbeat interval of the
restart; no bin of 1% of the interval holds more than 10% of the agents; the
re-registrations span at least the jitter window (10% of the interval).
Without jitter (``--no-jitter``) all of them land in one bin.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import httpx

from crank_registry import CapabilitySchema, HealthPolicy
from crank_registry_asgi import ServiceConfig, create_app
from crank_worker_client import MAX_JITTER_FRACTION, WorkerAgent

EPOCH = 1_800_000_000.0
CONTROLLER_URL = "https://controller.test"
#: The restart falls between the 4th and the 5th heartbeat of every agent.
RESTART_AFTER_INTERVALS = 4.4
BINS = 100
PEAK_BIN_TARGET = 0.10
SPREAD_TARGET = MAX_JITTER_FRACTION


class _NoJitter(random.Random):
    """Every draw is the lowest value: heartbeats exactly one interval apart."""

    def random(self) -> float:
        return 0.0


class _HerdTransport(httpx.AsyncBaseTransport):
    """Sends requests to the current app (refused while there is none); records registrations."""

    def __init__(self) -> None:
        self.app: Any = None
        self.registrations: list[float] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.app is None:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if request.url.path == "/register":
            self.registrations.append(anyio.current_time())
        return await httpx.ASGITransport(app=self.app).handle_async_request(request)


@dataclass(frozen=True)
class HerdResult:
    """When each agent re-registered, relative to the restart, in seconds."""

    agents: int
    interval: float
    delays: list[float]

    def bins(self, count: int = BINS) -> list[int]:
        """Re-registrations per bin of ``interval / count`` after the restart."""
        width = self.interval / count
        counts = [0] * count
        for delay in self.delays:
            counts[min(int(delay / width), count - 1)] += 1
        return counts

    @property
    def peak_share(self) -> float:
        """The largest bin's share of the agents."""
        return max(self.bins()) / self.agents

    @property
    def spread(self) -> float:
        """From the first re-registration to the last, as a fraction of the interval."""
        return (max(self.delays) - min(self.delays)) / self.interval


class _Controller:
    """One controller app at a time, its lifespan running in a task of ``task_group``."""

    def __init__(self, task_group: anyio.abc.TaskGroup, make_app: Callable[[], Any]) -> None:
        self.transport = _HerdTransport()
        self._task_group = task_group
        self._make_app = make_app
        self._stop = anyio.Event()
        self._stopped = anyio.Event()

    async def start(self) -> None:
        app, stop, stopped = self._make_app(), anyio.Event(), anyio.Event()

        async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            try:
                async with app.router.lifespan_context(app):
                    self.transport.app = app
                    task_status.started()
                    await stop.wait()
                    self.transport.app = None
            finally:
                stopped.set()

        await self._task_group.start(serve)
        self._stop, self._stopped = stop, stopped

    async def stop(self) -> None:
        self._stop.set()
        await self._stopped.wait()


async def run_herd(
    agents: int = 500,
    interval: float = 10.0,
    *,
    seed: int = 0,
    jitter: bool = True,
) -> HerdResult:
    """Run the herd under the current async backend; needs a virtual clock to be quick."""
    policy = HealthPolicy(interval, 2 * interval, 4 * interval)
    capability = CapabilitySchema(
        name="image.classify",
        verb="classify",
        version="1.0.0",
        input_schema={"type": "object"},
        output_schema={"type": "object"},
        requires_gpu=False,
        max_concurrency=4,
    )

    def make_app() -> Any:
        return create_app(
            config=ServiceConfig(policy=policy), clock=lambda: EPOCH + anyio.current_time()
        )

    def rng_for(index: int) -> random.Random:
        return random.Random(seed * 1_000_003 + index) if jitter else _NoJitter()

    async def worker(agent: WorkerAgent, leave: anyio.Event) -> None:
        async with agent:
            await leave.wait()

    leave = anyio.Event()
    async with anyio.create_task_group() as tg:
        controller = _Controller(tg, make_app)
        await controller.start()
        start = anyio.current_time()
        for index in range(agents):
            agent = WorkerAgent(
                CONTROLLER_URL,
                f"worker-{index}",
                f"https://worker-{index}.test:8443",
                [capability],
                transport=controller.transport,
                rng=rng_for(index),
            )
            tg.start_soon(worker, agent, leave)
        await anyio.sleep_until(start + RESTART_AFTER_INTERVALS * interval)
        await controller.stop()
        await controller.start()
        restart = anyio.current_time()
        registrations = controller.transport.registrations
        before = len(registrations)
        await anyio.sleep(1.5 * interval)
        delays = [at - restart for at in registrations[before:]]
        leave.set()
        await anyio.sleep(interval)  # the agents deregister
        await controller.stop()
    return HerdResult(agents, interval, delays)


def format_histogram(result: HerdResult, rows: int = 20, width: int = 50) -> str:
    """The re-registrations after the restart, one row per 1/rows of the interval."""
    bins = result.bins(rows)
    scale = max(bins) or 1
    step = result.interval / rows
    lines = [
        f"re-registrations after the restart ({result.agents} agents, "
        f"heartbeat interval {result.interval:g} s, one row = {step:g} s):"
    ]
    for row, count in enumerate(bins):
        bar = "#" * math.ceil(count * width / scale) if count else ""
        lines.append(f"  +{row * step:6.2f} s .. +{(row + 1) * step:6.2f} s {count:5d} {bar}")
    return "\n".join(lines)


def report(result: HerdResult) -> str:
    """The histogram, the figures and their ratios to the targets."""
    within = sum(1 for d in result.delays if d <= result.interval)
    return "\n".join(
        [
            format_histogram(result),
            "",
            f"re-registered: {len(result.delays)}/{result.agents} agents, "
            f"{within} within one interval of the restart",
            f"peak bin (1% of the interval): {result.peak_share:.1%} of the agents "
            f"(target <= {PEAK_BIN_TARGET:.0%}; ratio {result.peak_share / PEAK_BIN_TARGET:.2f})",
            f"spread, first to last: {result.spread:.1%} of the interval "
            f"(target >= {SPREAD_TARGET:.0%}, the jitter window; "
            f"ratio {result.spread / SPREAD_TARGET:.2f})",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-jitter", action="store_true")
    args = parser.parse_args(argv)

    import trio.testing

    async def run() -> HerdResult:
        return await run_herd(args.agents, args.interval, seed=args.seed, jitter=not args.no_jitter)

    result = anyio.run(
        run,
        backend="trio",
        backend_options={"clock": trio.testing.MockClock(autojump_threshold=0)},
    )
    print(report(result))


if __name__ == "__main__":
    main()
