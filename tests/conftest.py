"""Fixtures for every test: the one ``anyio_backend`` of the suite, spans, the collector."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio.testing
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.client.helpers import VirtualClockEventLoop

TESTS = Path(__file__).parent

#: Directories whose async tests run on asyncio only, and why.
ASYNCIO_ONLY = {
    "cli": "the TLS identity capture hooks hypercorn's asyncio worker",
    "service": "the controller is served by hypercorn's asyncio worker",
    "gateway": "the gateway is served with the controller, by hypercorn's asyncio worker",
    "examples": "the example workers are served by hypercorn's asyncio worker",
    "redis": "redis.asyncio runs on asyncio only",
}

#: Directories whose async tests run in virtual time, except those marked ``slow``.
VIRTUAL_TIME = frozenset({"client"})


def directory_of(node: pytest.Item | pytest.Function | Any) -> str:
    """The directory under ``tests/`` that holds a test (``core``, ``client``...)."""
    return Path(node.path).relative_to(TESTS).parts[0]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every async test on asyncio and trio, except where asyncio alone is chosen.

    Asyncio alone: the directories of :data:`ASYNCIO_ONLY`, and a test or
    module that parametrizes ``anyio_backend`` itself (which then wins).
    """
    if "anyio_backend" not in metafunc.fixturenames:
        return
    if directory_of(metafunc.definition) in ASYNCIO_ONLY or chooses_its_backends(metafunc):
        return
    metafunc.parametrize("anyio_backend", ["asyncio", "trio"], indirect=True)


def chooses_its_backends(metafunc: pytest.Metafunc) -> bool:
    """Whether the test says itself, with ``parametrize``, which backends it runs on."""
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        if isinstance(names, str):
            names = [name.strip() for name in names.split(",")]
        if "anyio_backend" in names:
            return True
    return False


@pytest.fixture
def anyio_backend(request: pytest.FixtureRequest) -> str | tuple[str, dict[str, Any]]:
    """The backend of an async test: asyncio and trio, in real or virtual time.

    Every async test runs on both backends, except in the directories of
    :data:`ASYNCIO_ONLY`, which run on asyncio only (each with its reason),
    and a test that parametrizes ``anyio_backend`` itself:
    :func:`pytest_generate_tests` chooses the parameters.

    In :data:`VIRTUAL_TIME` (the worker client's tests), time jumps to the
    next timer when every task waits (trio's ``MockClock(autojump_threshold=0)``
    and :class:`tests.client.helpers.VirtualClockEventLoop`), so heartbeat
    schedules over minutes run in milliseconds and always the same way.
    Tests marked ``slow`` (a real server process, a restart in real time)
    keep real time.
    """
    backend = str(getattr(request, "param", "asyncio"))
    virtual = directory_of(request.node) in VIRTUAL_TIME
    if not virtual or request.node.get_closest_marker("slow") is not None:
        return backend
    if backend == "asyncio":
        return ("asyncio", {"loop_factory": VirtualClockEventLoop})
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


@pytest.fixture(scope="session")
def session_exporter() -> InMemorySpanExporter:
    """An in-memory exporter on the global tracer provider, installed once per session.

    The global provider can be set only once per process; if another test
    already installed an SDK provider, the exporter is added to that one.
    """
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans(session_exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    session_exporter.clear()
    yield session_exporter
    session_exporter.clear()


@pytest.fixture(autouse=True)
def _collector_reaches_every_object() -> Iterator[None]:
    """Undo a journal recovery's ``gc.freeze``: one test's objects must not outlive it."""
    yield
    gc.unfreeze()
