"""Many worker agents in one process, for tests that cut them off together (SIGSTOP).

``python -m tests.cli.agents_process URL COUNT`` registers ``COUNT``
:class:`~crank_worker_client.WorkerAgent` (``a0``, ``a1``, ...) with the
controller at ``URL`` over plain HTTP, prints ``ready`` once every one is
registered, then keeps them heartbeating until the process is killed.
Stopping this one process (SIGSTOP) is a network partition of all of them.
"""

from __future__ import annotations

import random
import sys

import anyio
import anyio.abc
import httpx

from crank_worker_client import WorkerAgent
from tests.builders import capability

# Agents registering at once: a few at a time, so that a loaded machine keeps up.
BATCH = 20


async def main(url: str, count: int) -> None:
    # One connection pool for all: the process stays light (one transport, a socket each).
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=count))

    async def keep(number: int, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        agent = WorkerAgent(
            url,
            f"a{number}",
            f"http://10.9.{number // 250}.{number % 250 + 1}:8080",
            [capability()],
            insecure=True,
            rng=random.Random(number),
            transport=transport,
        )
        async with agent:  # registered; heartbeats until the process ends
            task_status.started()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tasks:
        for start in range(0, count, BATCH):
            async with anyio.create_task_group() as batch:
                for number in range(start, min(start + BATCH, count)):
                    batch.start_soon(tasks.start, keep, number)
        print("ready", flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], int(sys.argv[2]))
