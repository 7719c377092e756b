"""Connection limits: a cap below the open-file limit, and accept errors logged once per interval.

Pinned to hypercorn 0.18 on asyncio's selector event loop (CPython 3.11+),
the server :mod:`crank_registry_asgi.server` runs. Without a cap, every
connection a client opens holds a file descriptor, before its TLS handshake
too; once the process's open-file limit is reached, ``accept()`` fails, no
real client gets in, and asyncio logs every failure with a traceback.

How, in three parts:

- hypercorn serves each listening socket with ``asyncio.start_server(sock=...)``,
  and asyncio's accept loop calls that very socket's ``accept()``.
  :func:`capped_listener` hands hypercorn a listening socket whose
  ``accept()`` asks a :class:`ConnectionLimiter` first. At the cap, a new
  connection makes room by closing the oldest connection that is not in
  the middle of a request (one still in its TLS handshake, or idle between
  requests); when every open connection is busy, the new one is closed at
  once. A connection is closed with ``shutdown()``, never ``close()``:
  asyncio's transport owns the descriptor and closes it when it sees the
  end of the stream, so the number cannot be reused while the loop still
  watches it.
- hypercorn's per-connection server (:class:`crank_registry_asgi.tls.CertificateCapturingTCPServer`)
  tells the limiter when a request starts and ends (hypercorn's ``Updated``
  events), so that a busy connection is never the one closed.
- :class:`AcceptErrorLog` is the event loop's exception handler while the
  server runs: an accept failure is logged once per interval with a count,
  never once per event; everything else goes to the previous handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

from hypercorn.config import Config

__all__ = [
    "ACCEPT_LOG_INTERVAL",
    "EVICTION_SLACK",
    "FILE_RESERVE",
    "AcceptErrorLog",
    "ConnectionLimiter",
    "LimitedConfig",
    "capped_listener",
    "default_max_connections",
    "open_file_limit",
]

logger = logging.getLogger("crank_registry_asgi.limits")

#: Descriptors kept out of the connection cap: the journal and its
#: compaction file, the log, the listening sockets, the event loop's own,
#: the gateway's connections to workers (httpx keeps up to 100).
FILE_RESERVE = 128

#: Connections closed to make room whose descriptors asyncio has not yet
#: released; beyond this many, accepting waits for the next loop iteration.
EVICTION_SLACK = 16

#: Seconds between two log lines about failed accepts.
ACCEPT_LOG_INTERVAL = 10.0

#: accept() failures that mean "no descriptor or memory left for now".
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: After such a failure, accept() rests until asyncio's own retry (one second).
_PAUSE_AFTER_FAILURE = 0.9

#: The smallest cap the default may come to; a lower file limit is an error.
_MINIMUM_CAP = 16


def open_file_limit() -> int | None:
    """The process's soft open-file limit (``ulimit -n``), ``None`` when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def default_max_connections(file_limit: int | None) -> int:
    """The connection cap for ``file_limit`` open files: the limit less :data:`FILE_RESERVE`.

    Raises ``ValueError`` when the limit leaves too little room.
    """
    if file_limit is None:
        return 65_536
    cap = file_limit - FILE_RESERVE
    if cap < _MINIMUM_CAP:
        raise ValueError(
            f"the open-file limit (ulimit -n) is {file_limit}: too low to serve connections "
            f"with {FILE_RESERVE} descriptors kept for files; raise it to at least "
            f"{FILE_RESERVE + _MINIMUM_CAP}, or pass --max-connections below {file_limit}"
        )
    return cap


def check_max_connections(max_connections: int, file_limit: int | None) -> None:
    """Refuse a cap that the open-file limit cannot hold (``ValueError`` naming the flag)."""
    if file_limit is not None and max_connections >= file_limit:
        raise ValueError(
            f"--max-connections {max_connections} must be below the open-file limit "
            f"(ulimit -n) {file_limit}: raise the limit or lower the cap"
        )


class _Connection:
    """An open connection: its socket, and whether it is in a request."""

    __slots__ = ("busy", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.busy = False


class ConnectionLimiter:
    """Counts the open connections of one server and closes some at the cap.

    Connections are kept by file descriptor in the order they were
    accepted (oldest first). A closed connection is forgotten lazily, when
    the count reaches the cap: its descriptor is then ``-1``.
    """

    def __init__(self, max_connections: int) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.max_connections = max_connections
        #: Connections refused at once, every open one being busy.
        self.refused = 0
        #: Connections closed to make room for a new one.
        self.evicted = 0
        # By descriptor, oldest first.
        self._open: dict[int, _Connection] = {}
        self._closing: list[socket.socket] = []

    def __len__(self) -> int:
        """How many connections are open (closed ones forgotten first)."""
        self._forget_closed()
        return len(self._open)

    def may_accept(self) -> bool:
        """Whether to accept now: not while :data:`EVICTION_SLACK` closed ones await asyncio."""
        if len(self._closing) >= EVICTION_SLACK:
            self._forget_closed()
        return len(self._closing) < EVICTION_SLACK

    def admit(self, conn: socket.socket) -> bool:
        """Whether to serve the newly accepted ``conn``; if not, it has been closed.

        At the cap, the oldest connection not in a request is closed to make
        room; with every open connection busy, ``conn`` itself is.
        """
        if len(self._open) >= self.max_connections:
            self._forget_closed()
            if len(self._open) >= self.max_connections and not self._close_oldest_idle():
                self.refused += 1
                conn.close()
                return False
        fd = conn.fileno()
        self._open.pop(fd, None)  # a descriptor number reused: the old one is closed
        self._open[fd] = _Connection(conn)
        return True

    def set_busy(self, fd: int, busy: bool) -> None:
        """Mark the connection on ``fd`` as in a request (``True``) or idle."""
        connection = self._open.get(fd)
        if connection is not None:
            connection.busy = busy

    def shed_one(self) -> bool:
        """Close the oldest connection not in a request, if any (descriptors ran out)."""
        self._forget_closed()
        return self._close_oldest_idle()

    def _forget_closed(self) -> None:
        self._open = {fd: c for fd, c in self._open.items() if c.sock.fileno() != -1}
        self._closing = [sock for sock in self._closing if sock.fileno() != -1]

    def _close_oldest_idle(self) -> bool:
        for fd, connection in self._open.items():
            if not connection.busy:
                del self._open[fd]  # and stop iterating
                # An OSError: already reset by the peer; asyncio closes it all the same.
                with contextlib.suppress(OSError):
                    connection.sock.shutdown(socket.SHUT_RDWR)
                self._closing.append(connection.sock)
                self.evicted += 1
                return True
        return False


class LimitedConfig(Config):
    """hypercorn's configuration, carrying the server's :class:`ConnectionLimiter`.

    hypercorn hands its configuration to every per-connection server; that
    is how a connection finds the limiter to report its requests to.
    """

    connection_limiter: ConnectionLimiter | None = None


class _CappedListener(socket.socket):
    """A listening socket whose ``accept()`` asks a :class:`ConnectionLimiter` first."""

    limiter: ConnectionLimiter
    _paused_until = 0.0

    def accept(self) -> tuple[socket.socket, Any]:
        """The next connection the limiter admits (raises ``BlockingIOError`` when none)."""
        while True:
            if not self.limiter.may_accept() or time.monotonic() < self._paused_until:
                # Let asyncio close what was shut down; the rest waits in the
                # kernel's queue, and asyncio calls again next iteration.
                raise BlockingIOError
            try:
                conn, address = super().accept()
            except OSError as error:
                if error.errno in _OUT_OF_RESOURCES:
                    self._out_of_resources()
                raise
            if self.limiter.admit(conn):
                return conn, address

    def _out_of_resources(self) -> None:
        # Other files hold the descriptors the cap left free. asyncio then
        # retries a second later, but (CPython 3.11 to 3.13) it first goes
        # on calling accept() up to `backlog` times, and schedules a retry
        # for each failure: the failures, and their log lines, multiply.
        # So the next calls say "nothing to accept" until asyncio's retry;
        # meanwhile the oldest idle connection gives up its descriptor.
        self._paused_until = time.monotonic() + _PAUSE_AFTER_FAILURE
        self.limiter.shed_one()


def capped_listener(sock: socket.socket, limiter: ConnectionLimiter) -> socket.socket:
    """``sock`` (a bound, listening socket) as one whose accepts ``limiter`` governs.

    ``sock`` gives up its descriptor to the new socket object.
    """
    listener = _CappedListener(sock.family, sock.type, sock.proto, fileno=sock.detach())
    listener.limiter = limiter
    return listener


def _is_accept_error(context: dict[str, Any]) -> bool:
    # asyncio reports EMFILE and its kin with this message; any other
    # error of accept() escapes its accept callback, named in the handle,
    # as does one of the retry it schedules after EMFILE (which CPython 3.11
    # does not cancel when the server closes: the socket is gone by then).
    if str(context.get("message", "")).startswith("socket.accept()"):
        return True
    handle = repr(context.get("handle"))
    return "._accept_connection(" in handle or "._start_serving(" in handle


def _describe(exception: BaseException | None, message: str) -> str:
    if exception is None:
        return message
    if isinstance(exception, OSError):
        return str(exception)
    return f"{type(exception).__name__}: {exception}"


class AcceptErrorLog:
    """An event-loop exception handler logging accept failures once per ``interval``.

    The first failure is logged at once; those that follow within the
    interval are counted and logged in one line when it ends (:meth:`flush`,
    scheduled on the loop). Other contexts go to ``fallback``.
    """

    def __init__(
        self,
        *,
        interval: float = ACCEPT_LOG_INTERVAL,
        clock: Callable[[], float],
        fallback: Callable[[dict[str, Any]], None],
        schedule: Callable[[float, Callable[[], None]], object] | None = None,
        advice: str = "",
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._fallback = fallback
        self._schedule = schedule
        self._advice = advice
        self._window_end: float | None = None
        self._suppressed = 0
        self._last_error = ""

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Handle one exception context of ``loop``."""
        if not _is_accept_error(context):
            self._fallback(context)
            return
        self._last_error = _describe(context.get("exception"), str(context.get("message")))
        now = self._clock()
        if self._window_end is not None and now < self._window_end:
            self._suppressed += 1
            return
        logger.error("accepting a connection failed: %s%s", self._last_error, self._advice)
        self._window_end = now + self.interval
        if self._schedule is not None:
            self._schedule(self.interval, self.flush)

    def flush(self) -> None:
        """End the interval: log the failures counted in it, if any.

        After a count, another interval starts (failures go on being
        counted, one line per interval); after a quiet one, the next
        failure is logged at once.
        """
        if not self._suppressed:
            self._window_end = None
            return
        logger.error(
            "accepting a connection failed %d more times in the last %g s: %s%s",
            self._suppressed,
            self.interval,
            self._last_error,
            self._advice,
        )
        self._suppressed = 0
        self._window_end = self._clock() + self.interval
        if self._schedule is not None:
            self._schedule(self.interval, self.flush)
