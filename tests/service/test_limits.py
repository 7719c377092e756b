"""The controller's limits in-process: the read deadline, the connection cap, the accept log."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from crank_registry_asgi import certs, limits
from crank_registry_asgi.config import ServiceConfig
from crank_registry_asgi.rotation import load_server_certificates, serving_config
from crank_registry_asgi.server import ServerSettings, hypercorn_config
from tests.builders import registration_payload
from tests.service.helpers import dumps, running

JSON = {"content-type": "application/json"}


async def stalled(first: bytes) -> AsyncIterator[bytes]:
    """A body that sends ``first`` and then nothing more."""
    yield first
    await anyio.sleep_forever()


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/register", "/heartbeat", "/deregister", "/route"])
async def test_a_body_not_in_by_the_deadline_is_408(path: str) -> None:
    async with running(ServiceConfig(request_read_timeout=0.2)) as api:
        with anyio.fail_after(5):
            response = await api.request("POST", path, content=stalled(b"{"), headers=JSON)
        assert response.status_code == 408
        body = response.json()
        assert body["error"] == "request_timeout"
        assert "0.2 s" in body["message"]
        assert response.headers["connection"] == "close"


@pytest.mark.anyio
async def test_a_body_in_time_is_read_as_usual() -> None:
    async def slow_but_in_time() -> AsyncIterator[bytes]:
        payload = dumps(registration_payload("w1"))
        yield payload[:10]
        await anyio.sleep(0.05)
        yield payload[10:]

    async with running(ServiceConfig(request_read_timeout=5)) as api:
        response = await api.request("POST", "/register", content=slow_but_in_time(), headers=JSON)
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), True, "10"])
def test_the_read_deadline_must_be_a_positive_number(value: Any) -> None:
    with pytest.raises(ValueError, match="request_read_timeout"):
        ServiceConfig(request_read_timeout=value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("tls_handshake_timeout", 0), ("tls_handshake_timeout", float("inf")), ("max_connections", 0)],
)
def test_server_limits_are_checked(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        ServerSettings(**{field: value})


# ------------------------------------------------------------ connection cap


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """Connected socket pairs: (the server's end, the client's end)."""
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for server_end, client_end in made:
        server_end.close()
        client_end.close()


def connection(made: list[tuple[socket.socket, socket.socket]]) -> socket.socket:
    server_end, client_end = socket.socketpair()
    client_end.settimeout(1)
    made.append((server_end, client_end))
    return server_end


def shut(made: list[tuple[socket.socket, socket.socket]], index: int) -> bool:
    """Whether the server's end of pair ``index`` was shut down (its peer sees the end)."""
    return made[index][1].recv(1) == b""


def test_at_the_cap_the_oldest_idle_connection_makes_room(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    limiter = limits.ConnectionLimiter(2)
    first, second = connection(pairs), connection(pairs)
    assert limiter.admit(first) and limiter.admit(second)
    limiter.set_busy(first.fileno(), True)  # in a request: not to be closed
    third = connection(pairs)
    assert limiter.admit(third)
    assert shut(pairs, 1)  # the second, oldest idle one
    assert limiter.evicted == 1
    assert first.fileno() != -1 and second.fileno() != -1  # shut down, not closed: asyncio's
    second.close()  # as asyncio does once it sees the end
    assert len(limiter) == 2


def test_with_every_connection_busy_a_new_one_is_closed_at_once(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    limiter = limits.ConnectionLimiter(1)
    busy = connection(pairs)
    assert limiter.admit(busy)
    limiter.set_busy(busy.fileno(), True)
    new = connection(pairs)
    assert not limiter.admit(new)
    assert new.fileno() == -1
    assert limiter.refused == 1
    limiter.set_busy(busy.fileno(), False)  # the request is over: it may go now
    assert limiter.admit(connection(pairs))
    assert shut(pairs, 0)


def test_closed_connections_are_forgotten(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    limiter = limits.ConnectionLimiter(2)
    for _ in range(2):
        assert limiter.admit(connection(pairs))
    pairs[0][0].close()
    assert limiter.admit(connection(pairs))
    assert limiter.evicted == 0
    assert len(limiter) == 2


def test_accepting_pauses_while_shut_connections_await_the_loop(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    limiter = limits.ConnectionLimiter(1)
    assert limiter.admit(connection(pairs))
    for _ in range(limits.EVICTION_SLACK):
        assert limiter.may_accept()
        assert limiter.admit(connection(pairs))
    assert not limiter.may_accept()
    for server_end, _ in pairs[:-1]:
        server_end.close()
    assert limiter.may_accept()


def test_the_default_cap_leaves_room_for_files() -> None:
    assert limits.default_max_connections(1024) == 1024 - limits.FILE_RESERVE
    assert limits.default_max_connections(None) > 0
    with pytest.raises(ValueError, match=r"ulimit -n.*--max-connections"):
        limits.default_max_connections(100)
    with pytest.raises(ValueError, match="--max-connections 256 must be below"):
        limits.check_max_connections(256, 256)
    limits.check_max_connections(255, 256)
    limits.check_max_connections(10**6, None)


# ------------------------------------------------------------ accept errors


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def accept_failure() -> dict[str, Any]:
    return {
        "message": "socket.accept() out of system resource",
        "exception": OSError(24, "Too many open files"),
    }


def test_accept_failures_are_logged_once_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, "crank_registry_asgi.limits")
    clock = Clock()
    scheduled: list[Any] = []
    other: list[dict[str, Any]] = []
    log = limits.AcceptErrorLog(
        interval=10,
        clock=clock,
        fallback=other.append,
        schedule=lambda delay, callback: scheduled.append((delay, callback)),
    )
    loop: Any = None
    for _ in range(1000):
        log(loop, accept_failure())
        clock.now += 0.001
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1
    assert "Too many open files" in lines[0]
    clock.now = 10
    scheduled[0][1]()  # the interval ends
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert "999 more times in the last 10 s" in lines[1]
    # Failures go on: still one line per interval.
    for _ in range(50):
        log(loop, accept_failure())
    assert len(caplog.records) == 2
    scheduled[-1][1]()
    assert "50 more times" in caplog.records[-1].getMessage()
    # A quiet interval ends it: the next failure is logged at once.
    scheduled[-1][1]()
    assert len(caplog.records) == 3
    clock.now = 100
    log(loop, accept_failure())
    assert len(caplog.records) == 4
    # The retry asyncio schedules after EMFILE is part of accepting too.
    retry = {
        "message": "Exception in callback",
        "exception": ValueError("Invalid file descriptor: -1"),
        "handle": "<TimerHandle BaseSelectorEventLoop._start_serving(...)>",
    }
    clock.now = 200
    log(loop, retry)
    assert "ValueError: Invalid file descriptor: -1" in caplog.records[-1].getMessage()
    # Anything else goes to the loop's other handler.
    log(loop, {"message": "something else"})
    assert other == [{"message": "something else"}]


def test_the_config_serving_reloadable_certificates_still_reports_to_the_cap(
    tmp_path: Path,
) -> None:
    """With TLS the server serves a copy of its config holding the live context.

    Its connections find the limiter through that copy (``tls.py`` asks for a
    :class:`~crank_registry_asgi.limits.LimitedConfig`), so the copy must be one.
    """
    certs.write_development_certificates(tmp_path, workers=[])
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        certfile=tmp_path / "controller.pem",
        keyfile=tmp_path / "controller.key",
        ca_certs=tmp_path / "ca.pem",
    )
    config = hypercorn_config(settings)
    served = serving_config(config, load_server_certificates(config).context)
    assert isinstance(served, limits.LimitedConfig)
    assert served.ssl_handshake_timeout == settings.tls_handshake_timeout
