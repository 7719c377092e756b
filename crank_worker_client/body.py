"""Request bodies over ASGI: read one within a bound, or drain it before an early answer.

Two rules, kept here once for every server of the project:

- :func:`read_body` reads a request body whole, refusing it with
  :class:`BodyTooLarge` as soon as its declared or received size passes a
  limit (so an undeclared or lying length is cut off at the limit plus one
  chunk), with :class:`BodyTimeout` when it is not all in by a deadline
  (answered 408 ``request_timeout``, so that a client sending one byte of a
  declared thousand cannot hold a connection), and with
  :class:`ClientDisconnected` when the client leaves first.
- :class:`DrainRequestBody` is an ASGI middleware that reads the rest of an
  unread body, within a bound, before an answer starts (never before a
  408: that client is too slow to wait for).

The worker's invocation server (:mod:`crank_worker_client.serving`) and the
controller's service (:mod:`crank_registry_asgi.http`) both use them. They
live in the worker client because that is the one place both may import: a
worker must not import the service (it would pull in starlette and
hypercorn), and the core ``crank_registry`` does no I/O. This module needs
anyio only.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

__all__ = [
    "DRAIN_LIMIT",
    "DRAIN_SECONDS",
    "READ_TIMEOUT",
    "BodyTimeout",
    "BodyTooLarge",
    "ClientDisconnected",
    "DrainRequestBody",
    "content_length",
    "declared_length",
    "read_body",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: An unread body is read and dropped before an answer while it stays
#: within this many bytes in all.
DRAIN_LIMIT = 1_048_576

#: And for at most this long; a client that sends more, or slower, is
#: answered anyway (over HTTP/1.x with ``Connection: close``).
DRAIN_SECONDS = 5.0


#: Seconds a request body may take to arrive whole, by default.
READ_TIMEOUT = 10.0


class BodyTimeout(Exception):
    """The request body was not all received by its deadline."""


class BodyTooLarge(Exception):
    """A request body declared or received larger than ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")
        self.limit = limit


class ClientDisconnected(Exception):
    """The client went away before it had sent the whole body."""


def content_length(value: bytes) -> int | None:
    """A Content-Length value as a number, or ``None`` if it is not one.

    A value of more than 18 digits counts as ``sys.maxsize``: larger than
    any limit, and ``int()`` refuses strings of over 4300 digits.
    """
    digits = value.strip()
    if not digits.isdigit():  # bytes.isdigit is ASCII digits only
        return None
    return int(digits) if len(digits) <= 18 else sys.maxsize


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length as a number, or ``None`` (absent or not a number)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return content_length(value)
    return None


async def read_body(
    receive: Receive, *, limit: int, declared: int | None = None, deadline: float | None = None
) -> bytes:
    """The whole request body, read from ``receive``.

    ``declared`` is the request's Content-Length (see :func:`declared_length`):
    over ``limit``, the body is refused before anything is read.
    ``deadline`` is when the body must be in, on anyio's clock
    (``anyio.current_time() + seconds``); ``None``: no deadline. Raises
    :class:`BodyTooLarge`, :class:`BodyTimeout` or :class:`ClientDisconnected`.
    """
    if declared is not None and declared > limit:
        raise BodyTooLarge(limit)
    if deadline is None:
        return await _read_body(receive, limit)
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not asyncio (trio): anyio's own deadline
        with anyio.CancelScope(deadline=deadline):
            return await _read_body(receive, limit)
        # Only a cancelled scope ends without returning: the deadline passed.
        raise BodyTimeout from None
    # On asyncio, asyncio's own timeout (anyio's clock is the loop's): an
    # anyio cancel scope adds about 15 us to /route in the app, this about 8
    # (benchmarks/read_deadline.py). The tests run both, on asyncio and trio.
    timeout = asyncio.timeout_at(deadline)
    try:
        async with timeout:
            return await _read_body(receive, limit)
    except TimeoutError:
        if timeout.expired():
            raise BodyTimeout from None
        raise


async def _read_body(receive: Receive, limit: int) -> bytes:
    # The ASGI messages are read directly: an async generator over them
    # is a measurable cost on a hot path of one-chunk bodies.
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _without_body(scope: Scope) -> bool:
    """Whether a GET or HEAD over HTTP/1.x declares no body (HTTP/2 may send one anyway)."""
    if scope.get("http_version") not in ("1.0", "1.1") or scope.get("method") not in (
        "GET",
        "HEAD",
    ):
        return False
    for name, value in scope["headers"]:
        if name == b"transfer-encoding":
            return False
        if name == b"content-length":
            return content_length(value) == 0
    return True


class DrainRequestBody:
    """Read the rest of the request body, up to a bound, before the answer starts.

    An answer that does not depend on the body (404, 405, 415, a declared
    size over the limit, a refusal before parsing) would otherwise start
    while the client is still sending it. The server is then left with a
    request it must either read to its end or cut off: hypercorn 0.18 closes
    an HTTP/1.1 connection whose request was not read to its end, over TLS
    racing the client's next bytes, and on HTTP/2 it receives data for a
    stream it already forgot. Reading the rest first keeps the connection
    usable for the next request.

    The body is read on while it stays within ``limit`` bytes in all (what
    the app read counts), for at most ``seconds``; a body declared larger,
    or already read past that, is not read further: a body refused as too
    large is never read whole, nor is the body of a 408 (the client sends
    too slowly to wait for). An answer that leaves the body unread
    carries ``Connection: close`` over HTTP/1.x, so the client knows the
    connection ends with it (HTTP/2 has no such header: the server ends just
    the stream). What the client sends after that is the server's to read
    and drop before it closes. Scopes other than HTTP pass through.
    """

    def __init__(
        self, app: ASGIApp, *, limit: int = DRAIN_LIMIT, seconds: float = DRAIN_SECONDS
    ) -> None:
        self.app = app
        self.limit = limit
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app with ``receive`` watched and the answer held until the body is in."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0
        # Whether the body has been read to its end, or the client went away.
        # A read (GET, HEAD) over HTTP/1.x that declares no body has none
        # (RFC 9112, 6.3): nothing to drain, and a thousand long polls
        # answered at once skip a deadline each (benchmarks/feed.py).
        ended = _without_body(scope)

        async def watched_receive() -> Message:
            nonlocal received, ended
            message = await receive()
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                ended = True
            return message

        async def drain() -> bool:
            # True when the body was read to its end.
            declared = declared_length(scope)
            if declared is not None and declared > self.limit:
                return False
            with anyio.move_on_after(self.seconds):
                while not ended and received <= self.limit:
                    await watched_receive()
            return ended

        async def answer(message: Message) -> None:
            if (
                message["type"] == "http.response.start"
                and not ended
                # A 408 says the client sends too slowly: it is not waited for.
                and (message["status"] == 408 or not await drain())
                and scope.get("http_version") in ("1.0", "1.1")
            ):
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, watched_receive, answer)
