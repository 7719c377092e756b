"""Benchmark: registration throughput with the durable journal versus without it.

Run: ``.venv/bin/python benchmarks/journal_throughput.py`` (``--quick`` for a
smoke run).

32 concurrent clients (anyio tasks) register new workers as fast as they
can, in-process: each request's body is parsed and structured as the
service does, applied to a ``CapabilityRegistry``, and, with the journal,
handed to the service's ``Effects``, which appends its line with
``Journal.append(..., durable=True)`` (written and fsynced before it
returns, one fsync shared by the registrations that arrive meanwhile). The same run
measures both modes, alternating them, on a fresh registry and state
directory each time; then the same through the controller app
(``create_app`` over ``httpx.ASGITransport``, with and without a state
directory), where each registration also pays for HTTP parsing, tracing
and the answer.

Target: durable >= 0.5x the registrations per second of journaling off.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import anyio
import anyio.lowlevel
import httpx

from crank_registry import CapabilityRegistry, Registration, replay_bytes, structure
from crank_registry_asgi.app import create_app
from crank_registry_asgi.config import ServiceConfig
from crank_registry_asgi.effects import Effects, RegistrySnapshots
from crank_registry_asgi.journal import Journal
from crank_registry_asgi.metrics import Metrics

START = 1_700_000_000.0
CLIENTS = 32
TARGET_RATIO = 0.5


def body(worker: int) -> bytes:
    """The JSON a worker sends to POST /register (3 capabilities)."""
    capabilities: list[dict[str, Any]] = [
        {
            "name": f"model.task{(worker * 3 + k) % 1000}",
            "verb": "infer",
            "version": "1.2.0",
            "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
            "output_schema": {"type": "object"},
            "requires_gpu": False,
            "max_concurrency": 4,
        }
        for k in range(3)
    ]
    return json.dumps(
        {
            "worker_id": f"worker-{worker:06d}",
            "worker_url": f"https://10.0.{worker >> 8 & 255}.{worker & 255}:8443",
            "capabilities": capabilities,
        }
    ).encode()


async def run(bodies: list[bytes], state_dir: pathlib.Path | None) -> tuple[float, int]:
    """Registrations per second of CLIENTS tasks sharing ``bodies``, and compactions."""
    registry = CapabilityRegistry()
    journal = None
    effects = Effects(
        registry,
        metrics=Metrics(),
        journal_expected=state_dir is not None,
        heartbeat_line_every=registry.policy.unhealthy_after / 2,
    )
    if state_dir is not None:
        journal = Journal.open(state_dir, snapshots=RegistrySnapshots(registry))
        replay_bytes(journal.read(), registry)
        registry.restart()
        effects.journal = journal
    per_client = len(bodies) // CLIENTS

    async def client(index: int) -> None:
        for raw in bodies[index * per_client : (index + 1) * per_client]:
            registration = structure(json.loads(raw), Registration)
            events = registry.decide_register(
                registration.worker_id,
                registration.worker_url,
                registration.capabilities,
                now=START,
            )
            await effects.commit(events)
            if journal is None:
                await anyio.lowlevel.checkpoint()  # a request's turn of the event loop

    started = time.perf_counter()
    async with anyio.create_task_group() as tasks:
        for index in range(CLIENTS):
            tasks.start_soon(client, index)
    elapsed = time.perf_counter() - started
    assert len(registry) == per_client * CLIENTS
    compactions = 0
    if journal is not None:
        compactions = journal.compactions
        await journal.aclose()
    return per_client * CLIENTS / elapsed, compactions


async def run_app(bodies: list[bytes], state_dir: pathlib.Path | None) -> tuple[float, int]:
    """The same through the controller app (ASGITransport): registrations/s, compactions."""
    app = create_app(config=ServiceConfig(state_dir=state_dir))
    per_client = len(bodies) // CLIENTS
    headers = {"content-type": "application/json"}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http,
    ):

        async def client(index: int) -> None:
            for raw in bodies[index * per_client : (index + 1) * per_client]:
                response = await http.post("/register", content=raw, headers=headers)
                assert response.status_code == 200, response.text

        started = time.perf_counter()
        async with anyio.create_task_group() as tasks:
            for index in range(CLIENTS):
                tasks.start_soon(client, index)
        elapsed = time.perf_counter() - started
        journal = app.state.service.effects.journal
        compactions = journal.compactions if journal is not None else 0
    return per_client * CLIENTS / elapsed, compactions


async def measure(
    registrations: int, rounds: int, via_app: bool
) -> tuple[list[float], list[float], int]:
    bodies = [body(i) for i in range(registrations)]
    off: list[float] = []
    durable: list[float] = []
    compactions = 0
    for _ in range(rounds):
        if via_app:
            off.append((await run_app(bodies, None))[0])
            with tempfile.TemporaryDirectory() as directory:
                rate, compactions = await run_app(bodies, pathlib.Path(directory))
                durable.append(rate)
            continue
        off.append((await run(bodies, None))[0])
        with tempfile.TemporaryDirectory() as directory:
            rate, compactions = await run(bodies, pathlib.Path(directory))
            durable.append(rate)
    return off, durable, compactions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer registrations and rounds")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()
    rounds = 1 if args.quick else 3
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    verdicts = []
    for via_app, full_size in ((False, 19_200), (True, 6_400)):
        registrations = full_size // 6 if args.quick else full_size
        off, durable, compactions = anyio.run(
            measure, registrations, rounds, via_app, backend=args.backend
        )
        off_rate, durable_rate = statistics.median(off), statistics.median(durable)
        ratio = durable_rate / off_rate
        where = (
            "through the app (ASGITransport)"
            if via_app
            else "in-process (registry + Effects + Journal)"
        )
        print()
        print(f"{where}: {CLIENTS} concurrent clients, {registrations} new workers per run")
        print(f"  journaling off:  {off_rate:>9.0f} registrations/s  (runs: {_rates(off)})")
        print(f"  durable journal: {durable_rate:>9.0f} registrations/s  (runs: {_rates(durable)})")
        print(f"  compactions during a durable run: {compactions}")
        verdicts.append((where, ratio))
    print()
    for where, ratio in verdicts:
        verdict = "meets" if ratio >= TARGET_RATIO else "misses"
        print(
            f"{where}: durable / off = {ratio:.2f} (target >= {TARGET_RATIO}: "
            f"{ratio / TARGET_RATIO:.2f}x of the target, {verdict} it)"
        )
    missed = any(ratio < TARGET_RATIO for _, ratio in verdicts)
    return 1 if args.strict and missed else 0


def _rates(rates: list[float]) -> str:
    return ", ".join(f"{rate:.0f}" for rate in rates)


if __name__ == "__main__":
    sys.exit(main())
