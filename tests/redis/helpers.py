"""Redis for the shared registry's tests: the machine's, or one started for a test.

Tests use the machine's ``redis-server`` on 127.0.0.1:6379 (it keeps
nothing on disk), each with its own key prefix, removed afterwards. Tests
that kill Redis or need persistence start their own (:class:`RedisServer`)
on a free port with ``--appendonly yes --appendfsync always`` in a
temporary directory. Without ``redis-server`` they skip, saying how to
install it; with ``CI=true`` they fail instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import redis
import redis.asyncio as aioredis

from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig
from crank_registry_asgi.redis_store import StoreKeys
from tests.cli.helpers import ServerProcess, free_port, serving
from tests.service.helpers import Controller, running

#: The machine's Redis.
MACHINE_URL = "redis://127.0.0.1:6379/0"


def missing(reason: str) -> None:
    """Skip (fail under ``CI=true``) a test that needs Redis, saying why and how to get it."""
    message = f"{reason}: apt-get install redis-server"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def server_binary() -> str:
    """The path of ``redis-server`` (or the test skips / fails)."""
    path = shutil.which("redis-server")
    if path is None:
        missing("redis-server not found")
    assert path is not None
    return path


def machine_url() -> str:
    """The machine's Redis URL, once it answered a PING (or the test skips / fails)."""
    server_binary()
    try:
        redis.Redis.from_url(MACHINE_URL, socket_timeout=2).ping()
    except redis.RedisError as error:
        missing(f"no Redis on 127.0.0.1:6379 ({error})")
    return MACHINE_URL


@contextlib.contextmanager
def unique_prefix(url: str) -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(url, socket_timeout=2)
        with contextlib.suppress(redis.RedisError):
            client.delete(*StoreKeys(prefix).all())
        client.close()


class RedisServer:
    """A ``redis-server`` of a test's own, with every write fsynced (``appendfsync always``)."""

    def __init__(self, directory: Path, *, persistent: bool = True) -> None:
        self.binary = server_binary()
        self.directory = directory
        self.port = free_port()
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(self.directory),
                *persistence,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        client = redis.Redis(port=self.port, socket_timeout=1)
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        """SIGKILL: nothing is flushed beyond what was fsynced."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def shared_config(url: str, prefix: str, controller_id: str, **fields: Any) -> ServiceConfig:
    """The settings of one controller of a shared registry."""
    return ServiceConfig(redis_url=url, redis_prefix=prefix, controller_id=controller_id, **fields)


@contextlib.asynccontextmanager
async def controller(
    url: str, prefix: str, controller_id: str, clock: FakeClock, **fields: Any
) -> AsyncIterator[Controller]:
    """One controller of the shared registry, its lifespan running."""
    async with running(shared_config(url, prefix, controller_id, **fields), clock=clock) as api:
        yield api


async def wait_until(predicate: Any, *, timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` (a real-time wait for another process or connection)."""

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await anyio.sleep(0.005)


async def wait_until_async(check: Any, *, timeout: float = 5.0, what: str = "") -> None:
    """Poll the coroutine function ``check`` until its result is true."""

    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await anyio.sleep(0.005)


async def raw_client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, socket_timeout=5)


class Partition:
    """A TCP proxy to Redis that a test can cut (a network partition) and heal.

    Use ``async with Partition(port) as proxy:``; connect to ``proxy.url``.
    :meth:`cut` closes every connection and refuses new ones until :meth:`heal`.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.open = True
        self._scopes: set[Any] = set()
        self._tasks: Any = None
        self._listener: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> Partition:
        import anyio

        self._listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = self._listener.extra(anyio.abc.SocketAttribute.local_port)
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        self._tasks.start_soon(self._listener.serve, self._handle)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._tasks.cancel_scope.cancel()
        await self._tasks.__aexit__(None, None, None)
        await self._listener.aclose()

    def cut(self) -> None:
        self.open = False
        for scope in list(self._scopes):
            scope.cancel()

    def heal(self) -> None:
        self.open = True

    async def _handle(self, client: Any) -> None:
        import anyio

        async with client:
            if not self.open:
                return
            try:
                upstream = await anyio.connect_tcp("127.0.0.1", self.upstream_port)
            except OSError:
                return
            async with upstream, anyio.create_task_group() as pumps:
                self._scopes.add(pumps.cancel_scope)
                pumps.start_soon(_pump, client, upstream, pumps.cancel_scope)
                pumps.start_soon(_pump, upstream, client, pumps.cancel_scope)
            self._scopes.discard(pumps.cancel_scope)


async def _pump(source: Any, target: Any, scope: Any) -> None:

    try:
        async for chunk in source:
            await target.send(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
    scope.cancel()


@contextlib.contextmanager
def fleet_prefix(url: str) -> Iterator[str]:
    """:func:`unique_prefix`, and the gateways' keys under it removed too (``fleet_calls``)."""
    with unique_prefix(url) as prefix:
        try:
            yield prefix
        finally:
            client = redis.Redis.from_url(url, socket_timeout=2)
            with contextlib.suppress(redis.RedisError):
                stale = list(client.scan_iter(match=f"{{{prefix}}}:*"))
                if stale:
                    client.delete(*stale)
            client.close()


@contextlib.contextmanager
def shared_controller(
    tmp_path: Path, url: str, prefix: str, name: str, *extra: str
) -> Iterator[ServerProcess]:
    """A ``crank-registry serve --insecure`` process of the registry under ``prefix`` on ``url``."""
    port = free_port()
    with serving(
        [
            "--insecure",
            "--port",
            str(port),
            "--state-dir",
            str(tmp_path / name),
            "--redis",
            url,
            "--redis-prefix",
            prefix,
            "--controller-id",
            name,
            *extra,
        ],
        tmp_path / f"{name}.log",
        port=port,
        scheme="http",
    ) as server:
        yield server
