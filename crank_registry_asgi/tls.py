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
"""

from __future__ import annotations

import importlib.metadata
import ssl
from collections.abc import Callable
from typing import Any

import hypercorn.asyncio.run
from cryptography import x509
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.typing import AppWrapper, ASGIReceiveCallable, ASGISendCallable, Scope

__all__ = [
    "SUPPORTED_HYPERCORN",
    "CertificateCapturingTCPServer",
    "check_hypercorn_version",
    "install",
    "installed",
    "tls_extension",
]

#: The hypercorn release series this module's hook is written against.
SUPPORTED_HYPERCORN = "0.18"

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
    """hypercorn's per-connection server, adding the ASGI ``tls`` extension."""

    async def run(self) -> None:
        """Wrap the app with this connection's certificate, then serve as usual."""
        ssl_object = self.writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = _ConnectionApp(self.app, tls_extension(ssl_object))
        await super().run()


def install() -> None:
    """Make hypercorn's asyncio worker fill in the ``tls`` extension (idempotent).

    Affects every hypercorn asyncio server started in this process afterwards.
    """
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
