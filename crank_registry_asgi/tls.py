"""Hand each request the verified client certificate of its TLS connection.

The ASGI TLS extension (``scope["extensions"]["tls"]``) is how an ASGI app
learns who is on the other end of a mutual-TLS connection, but hypercorn does
not fill it in (hypercorn issue #62), nor do uvicorn or granian yet. This
module fills it in for hypercorn's asyncio worker, and only for the version it
was written against: on another hypercorn it refuses to import.

How: hypercorn 0.18 runs one ``hypercorn.asyncio.tcp_server.TCPServer`` per
accepted connection, looked up by name in ``hypercorn.asyncio.run`` when the
connection arrives. :func:`install` points that name at a subclass whose
``run`` reads the peer certificate from the connection's ``ssl_object`` (the
handshake is over by then, so the certificate has been verified against the
configured CA) and wraps the connection's app so that every request on that
connection, HTTP/1.1 or HTTP/2, gets the extension in its scope. Nothing is
shared between connections, so one connection's certificate can never be
seen by another.

The extension follows the ASGI TLS extension spec: ``client_cert_chain`` is a
list of PEM strings, the client's own certificate first (Python's ``ssl``
exposes only that one, so the list has at most one entry) and empty when the
client sent no certificate; ``client_cert_name`` is its subject (RFC 4514);
``tls_version`` is the protocol's 16-bit code. Plain-HTTP connections get no
``tls`` extension at all, as the spec asks.

The same per-connection server tells the connection cap
(:mod:`crank_registry_asgi.limits`) when each request starts and ends, so
that only connections between requests are closed to make room.

The same hook contains two hypercorn 0.18 bugs that turn a request answered
before its body was read into tracebacks at ERROR level (the client still
gets its answer). The service reads the rest of such a body before answering
(:class:`~crank_registry_asgi.http.DrainRequestBody`), but a body too large
to read still ends in one of them:

- HTTP/1.1 over TLS: hypercorn closes the connection while the client is
  still sending, and the TLS shutdown then fails with
  ``APPLICATION_DATA_AFTER_CLOSE_NOTIFY`` (or times out); its ``_close``
  lets that escape, into the app's ``send`` and again out of the connection
  task (hypercorn issues #67, #261, #291). :class:`CertificateCapturingTCPServer`
  first reads on until the client has sent its body or closed, for at most
  :data:`LINGER_SECONDS` (a lingering close: closed with unread data, the
  connection would be reset, possibly before the client read its answer),
  and treats an error while closing as the connection being closed.
- HTTP/2: once a stream's answer is complete hypercorn forgets the stream,
  and a DATA frame the client still sends on it raises ``KeyError`` and
  kills the connection task (hypercorn issue #329, unmerged pull requests
  #312, #334, #365). :class:`ContainedH2Protocol` drops that data, still
  returning its flow-control credit so the connection does not stall.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import ssl
from collections.abc import Callable
from typing import Any, cast

import h11
import hypercorn.asyncio.run
import hypercorn.protocol
from cryptography import x509
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.events import Event, RawData, Updated
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.typing import AppWrapper, ASGIReceiveCallable, ASGISendCallable, Scope

from .limits import ConnectionLimiter, LimitedConfig

__all__ = [
    "LINGER_SECONDS",
    "SUPPORTED_HYPERCORN",
    "CaptureNotInstalled",
    "CertificateCapturingTCPServer",
    "ContainedH2Protocol",
    "check_hypercorn_version",
    "install",
    "installed",
    "require_installed",
    "tls_extension",
]

#: The hypercorn release series this module's hook is written against.
SUPPORTED_HYPERCORN = "0.18"

#: How long a connection closed after an answer goes on reading a request
#: body the client is still sending (see ``CertificateCapturingTCPServer``).
LINGER_SECONDS = 5.0

_TLS_VERSION_CODES = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def check_hypercorn_version(version: str) -> None:
    """Raise ``ImportError`` unless ``version`` is a hypercorn 0.18 release."""
    if version.split(".")[:2] != SUPPORTED_HYPERCORN.split("."):
        raise ImportError(
            f"crank_registry_asgi.tls captures client certificates through hypercorn "
            f"{SUPPORTED_HYPERCORN}.x internals, but hypercorn {version} is installed; "
            f"install hypercorn=={SUPPORTED_HYPERCORN}.*"
        )


check_hypercorn_version(importlib.metadata.version("hypercorn"))


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, Any]:
    """The ASGI ``tls`` extension for a connection whose handshake is complete."""
    der = ssl_object.getpeercert(binary_form=True)
    chain: list[str] = []
    name: str | None = None
    if der:
        chain.append(ssl.DER_cert_to_PEM_cert(der))
        try:
            name = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        except ValueError:
            # OpenSSL accepted it; a name cryptography cannot parse is only
            # left out, the certificate itself still goes to the app.
            name = None
    version = ssl_object.version()
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSION_CODES.get(version) if version else None,
        "cipher_suite": None,
    }


class _ConnectionApp:
    """The app of one TLS connection: adds that connection's ``tls`` extension."""

    def __init__(self, app: AppWrapper, extension: dict[str, Any]) -> None:
        self._app = app
        self._extension = extension

    async def __call__(
        self,
        scope: Scope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        sync_spawn: Callable[..., Any],
        call_soon: Callable[..., Any],
    ) -> None:
        if scope["type"] in ("http", "websocket"):
            extensions = scope.setdefault("extensions", {})
            # A copy per request: an app that edits its scope must not change
            # what the next request on the connection sees.
            extensions["tls"] = {
                **self._extension,
                "client_cert_chain": list(self._extension["client_cert_chain"]),
            }
        await self._app(scope, receive, send, sync_spawn, call_soon)


class CertificateCapturingTCPServer(TCPServer):
    """hypercorn's per-connection server, adding the ASGI ``tls`` extension.

    Also closes with a lingering close (none after a 408: that client is
    too slow to wait for), and without an error when the TLS shutdown fails
    (see the module docstring and ``_linger``). Under a
    :class:`~crank_registry_asgi.limits.ConnectionLimiter` it reports when
    a request starts and ends, so that a busy connection is never closed to
    make room for a new one.
    """

    #: Set when an answer on this connection was 408 ``request_timeout``.
    request_timed_out = False
    _limiter: ConnectionLimiter | None = None
    _fd = -1

    async def run(self) -> None:
        """Wrap the app with this connection's certificate, then serve as usual."""
        ssl_object = self.writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = _ConnectionApp(self.app, tls_extension(ssl_object))
        if isinstance(self.config, LimitedConfig) and self.config.connection_limiter is not None:
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                self._limiter = self.config.connection_limiter
                self._fd = sock.fileno()
        await super().run()

    async def protocol_send(self, event: Event) -> None:
        """hypercorn's, noting a 408 and telling the limiter when a request starts and ends."""
        if isinstance(event, RawData):
            # An HTTP/1.x answer's head starts its own write: "HTTP/1.1 408 ...".
            if event.data[9:13] == b"408 " and event.data.startswith(b"HTTP/1."):
                self.request_timed_out = True
        elif isinstance(event, Updated) and self._limiter is not None:
            self._limiter.set_busy(self._fd, not event.idle)
        await super().protocol_send(event)

    async def _read_data(self) -> None:
        self._reader = asyncio.current_task()
        await super()._read_data()

    async def _close(self) -> None:
        await self._linger()
        # hypercorn 0.18 catches only some errors of `wait_closed()`. The TLS
        # shutdown's own (ssl.SSLError APPLICATION_DATA_AFTER_CLOSE_NOTIFY
        # when the client was still sending, TimeoutError when it never
        # answers the close) are OSErrors as well: the connection is closed
        # either way, and there is no one left to tell.
        with contextlib.suppress(OSError):
            await super()._close()

    async def _linger(self) -> None:
        # A lingering close: hypercorn closes an HTTP/1.1 connection as soon
        # as an answer is complete, also while the client is still sending
        # the request body (the answer did not need it). Closed with unread
        # data, a connection is reset, and a reset can destroy the answer
        # before the client reads it. So the body is read on (and dropped by
        # the read loop, the request being over) until the client has sent
        # it all or closed, for at most LINGER_SECONDS.
        if getattr(self, "_reader", None) is asyncio.current_task():
            return  # closing from the read loop itself: nothing would read
        if self.request_timed_out:
            return  # the client sends too slowly to be waited for
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINGER_SECONDS
        while self._client_sending() and not self.reader.at_eof() and loop.time() < deadline:
            await asyncio.sleep(0.02)

    def _client_sending(self) -> bool:
        protocol = getattr(getattr(self, "protocol", None), "protocol", None)
        connection = getattr(protocol, "connection", None)
        return isinstance(connection, h11.Connection) and connection.their_state is h11.SEND_BODY


class _FinishedStream:
    """What a stream hypercorn has forgotten receives: nothing more happens."""

    async def handle(self, event: StreamEvent) -> None:
        return None


_FINISHED = _FinishedStream()


class _Streams(dict[int, HTTPStream | WSStream]):
    """``H2Protocol.streams`` where a forgotten stream is a finished one."""

    def __missing__(self, stream_id: int) -> HTTPStream | WSStream:
        # hypercorn 0.18 looks streams up by subscript only where a frame
        # arrives for them (DATA, end of stream), and by `in`/`pop` elsewhere.
        return cast(HTTPStream, _FINISHED)


class ContainedH2Protocol(H2Protocol):
    """hypercorn's HTTP/2 protocol, dropping data that arrives for a finished stream.

    hypercorn 0.18 forgets a stream once its answer is complete; the
    client's DATA frames still in flight then raise ``KeyError`` and end the
    connection task with a traceback (hypercorn issue #329). Here they go
    to a stream that ignores them, and the protocol still acknowledges
    them, so the connection's flow-control window is not lost.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streams = _Streams()


def install() -> None:
    """Make hypercorn's asyncio worker fill in the ``tls`` extension (idempotent).

    The public capture: ``crank-registry serve`` calls it, and an
    application that embeds :func:`~crank_registry_asgi.create_app` with
    worker identity checks on calls it before hypercorn starts serving
    (at import of the module that builds the app, for ``hypercorn
    module:app``); without it, that app refuses to start
    (:func:`require_installed`). Also contains the two hypercorn bugs of the
    module docstring. Affects every hypercorn asyncio server started in
    this process afterwards, and only those: hypercorn's trio worker and
    other ASGI servers still pass no certificate.
    """
    if hypercorn.protocol.H2Protocol is H2Protocol:
        hypercorn.protocol.H2Protocol = ContainedH2Protocol  # type: ignore[misc]
    current = hypercorn.asyncio.run.TCPServer
    if current is CertificateCapturingTCPServer:
        return
    if current is not TCPServer:
        raise RuntimeError(
            f"hypercorn.asyncio.run.TCPServer is already replaced by {current!r}; "
            "cannot capture client certificates"
        )
    hypercorn.asyncio.run.TCPServer = CertificateCapturingTCPServer  # type: ignore[misc]


def installed() -> bool:
    """Whether :func:`install` has taken effect in this process."""
    return hypercorn.asyncio.run.TCPServer is CertificateCapturingTCPServer


class CaptureNotInstalled(RuntimeError):
    """Identity checks are on, but nothing hands the app client certificates."""


def require_installed() -> None:
    """Raise :class:`CaptureNotInstalled` unless :func:`install` has taken effect.

    What the controller's lifespan checks before it serves with identity
    checks on and no trusted proxy header: without the capture no request
    carries a certificate, and every worker would be refused 403.
    """
    if installed():
        return
    raise CaptureNotInstalled(
        "worker identity checks are on (ServiceConfig.require_identity) but no client "
        "certificate reaches the application, so every worker would be refused (403 "
        "forbidden): call crank_registry_asgi.tls.install() before hypercorn starts serving "
        "(asyncio worker), or, behind a TLS-terminating proxy, trust its certificate header "
        "with ServiceConfig.proxy_cert_header (crank-registry serve --trust-proxy-cert-header)"
    )
