"""Serve an ASGI app with hypercorn: HTTPS, mutual TLS, or plain HTTP when asked for.

The command's ``serve`` builds the controller app and hands it here; anything
else that must run under exactly the same server settings (the HTTP benchmark)
does the same. The listening socket is bound before the app starts, so that a
port already in use is reported before the journal is opened, and so that
port 0 works (the log names the port that was picked).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import attrs
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.typing import ASGIFramework
from hypercorn.utils import wrap_app
from starlette.types import ASGIApp

from crank_worker_client.certificates import CertificateFiles

from . import limits, tls
from .config import is_positive_int, is_positive_number
from .rotation import (
    DEFAULT_ROTATION,
    CertificateFileError,
    RotationSettings,
    load_server_certificates,
    serving_config,
)

__all__ = ["ServerSettings", "ServerSetupError", "hypercorn_config", "run", "serve"]

logger = logging.getLogger("crank_registry_asgi.server")


class ServerSetupError(Exception):
    """The server cannot start: unreadable certificates, a port in use, ..."""


@attrs.frozen
class ServerSettings:
    """Where and how to listen.

    With ``certfile`` and ``keyfile`` the server speaks HTTPS only; adding
    ``ca_certs`` makes it require a client certificate signed by that CA
    (mutual TLS) and hand the certificate to the app in the ASGI ``tls``
    extension. With neither, it speaks plain HTTP.

    ``tls_handshake_timeout``: seconds a connection may take to complete
    its TLS handshake. ``max_connections``: open connections at most (see
    :mod:`crank_registry_asgi.limits`); ``None`` derives it from the
    process's open-file limit when serving starts. ``processes``: how many
    server processes listen on the port together (``serve --processes``,
    :mod:`crank_registry_asgi.processes`); with more than one, each binds it
    with ``SO_REUSEPORT`` and the kernel spreads the connections.
    """

    host: str = "127.0.0.1"
    port: int = 9000
    certfile: Path | None = None
    keyfile: Path | None = None
    ca_certs: Path | None = None
    tls_handshake_timeout: float = 5.0
    max_connections: int | None = None
    processes: int = 1

    def __attrs_post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together")
        if self.ca_certs is not None and self.certfile is None:
            raise ValueError("ca_certs (mutual TLS) needs a server certificate")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0 to 65535, got {self.port}")
        if not is_positive_number(self.tls_handshake_timeout):
            raise ValueError(
                f"tls_handshake_timeout must be a finite number > 0, got "
                f"{self.tls_handshake_timeout!r}"
            )
        if self.max_connections is not None and not is_positive_int(self.max_connections):
            raise ValueError(
                f"max_connections must be an integer >= 1, got {self.max_connections!r}"
            )
        if not is_positive_int(self.processes):
            raise ValueError(f"processes must be an integer >= 1, got {self.processes!r}")

    @property
    def uses_tls(self) -> bool:
        """Whether the server speaks HTTPS."""
        return self.certfile is not None

    @property
    def mutual_tls(self) -> bool:
        """Whether client certificates are required."""
        return self.ca_certs is not None

    @property
    def is_loopback(self) -> bool:
        """Whether ``host`` reaches this machine only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def hypercorn_config(settings: ServerSettings) -> limits.LimitedConfig:
    """The hypercorn configuration for ``settings`` (no access log: one line a request)."""
    config = limits.LimitedConfig()
    config.ssl_handshake_timeout = settings.tls_handshake_timeout
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    # hypercorn binds its sockets with SO_REUSEPORT when it serves with several
    # workers (hypercorn 0.18, Config._create_sockets); here the processes are
    # crank_registry_asgi.processes', each serving one worker, but they share
    # the port the same way. worker_serve reads `workers` for nothing else on Linux.
    config.workers = settings.processes
    # hypercorn's own messages go through `logging`, formatted like ours.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = None
    if settings.certfile is not None and settings.keyfile is not None:
        config.certfile = str(settings.certfile)
        config.keyfile = str(settings.keyfile)
    if settings.ca_certs is not None:
        config.ca_certs = str(settings.ca_certs)
        config.verify_mode = ssl.CERT_REQUIRED
    return config


def _load_certificates(config: Config, rotation: RotationSettings) -> CertificateFiles:
    # hypercorn would fail on these only once the app has started, with a
    # bare SSLError; load them up front to say which file is wrong.
    try:
        return load_server_certificates(config, rotation)
    except CertificateFileError as error:
        raise ServerSetupError(str(error)) from None
    except (OSError, ssl.SSLError) as error:
        raise ServerSetupError(f"cannot use certfile {config.certfile}: {error}") from None


def _bind(config: Config, settings: ServerSettings) -> Sockets:
    try:
        return config.create_sockets()
    except OSError as error:
        raise ServerSetupError(
            f"cannot listen on {settings.host} port {settings.port}: {error.strerror or error}"
        ) from None


def _url_of(sock: socket.socket, *, uses_tls: bool) -> str:
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        host = f"[{host}]"
    return f"{'https' if uses_tls else 'http'}://{host}:{port}"


async def serve(
    app: ASGIApp,
    settings: ServerSettings,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    certificates: CertificateFiles | None = None,
    rotation: RotationSettings = DEFAULT_ROTATION,
    on_started: Callable[[], None] | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns, then shut it down cleanly.

    ``on_started`` is called once the app's lifespan has started and the
    sockets accept connections. ``on_shutdown`` is called as soon as the
    trigger returns, before the
    server waits for the open connections (up to its graceful timeout) and
    only then runs the app's lifespan shutdown: the moment to end
    never-ending answers (the controller's ``end_streams``).

    With TLS, the certificate files are checked every
    ``rotation.watch_interval`` seconds and renewed ones are used for new
    connections (:mod:`crank_registry_asgi.rotation`); ``certificates`` are
    the files already loaded, else they are loaded from ``settings``.
    Raises :class:`ServerSetupError` before the app starts when the
    certificates cannot be loaded or the port cannot be bound.
    """
    config = hypercorn_config(settings)
    if settings.uses_tls:
        if certificates is None:
            certificates = _load_certificates(config, rotation)
        config = serving_config(config, certificates.context)
    else:
        certificates = None
    # Always: besides capturing client certificates (an empty chain without
    # mutual TLS), the hook closes connections the way hypercorn 0.18 does
    # not, and contains its errors (tracebacks at ERROR) when a request is
    # answered before its body was read; see crank_registry_asgi.tls.
    tls.install()
    max_connections = _max_connections(settings)
    sockets = _bind(config, settings)
    limiter = limits.ConnectionLimiter(max_connections)
    config.connection_limiter = limiter
    sockets = Sockets(
        secure_sockets=[limits.capped_listener(s, limiter) for s in sockets.secure_sockets],
        insecure_sockets=[limits.capped_listener(s, limiter) for s in sockets.insecure_sockets],
        quic_sockets=sockets.quic_sockets,
    )
    loop = asyncio.get_running_loop()
    previous_handler = loop.get_exception_handler()
    accept_errors = limits.AcceptErrorLog(
        clock=loop.time,
        fallback=_fallback_handler(loop, previous_handler),
        schedule=loop.call_later,
        advice=(
            f" (open connections are capped at {max_connections}, --max-connections; "
            "the rest of the open-file limit, ulimit -n, is in use by other files)"
        ),
    )
    loop.set_exception_handler(accept_errors)
    try:
        logger.info(
            "limits: at most %d open connections%s",
            max_connections,
            f", TLS handshake within {settings.tls_handshake_timeout:g} s"
            if settings.uses_tls
            else "",
        )
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            logger.info(
                "starting on %s (%s)",
                _url_of(sock, uses_tls=settings.uses_tls),
                _security_of(settings),
            )
        watcher = (
            None
            if certificates is None
            else asyncio.create_task(certificates.watch(rotation.watch_interval))
        )

        async def trigger() -> None:
            # hypercorn awaits the trigger once it serves: after the lifespan's
            # start and with every socket listening.
            if on_started is not None:
                on_started()
            await shutdown_trigger()
            if on_shutdown is not None:
                on_shutdown()

        try:
            await worker_serve(
                wrap_app(cast(ASGIFramework, app), config.wsgi_max_body_size, "asgi"),
                config,
                sockets=sockets,
                shutdown_trigger=trigger,
            )
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        # hypercorn returns only after the app's lifespan shutdown has run.
        logger.info("stopped: connections closed, app shut down")
    finally:
        accept_errors.flush()
        loop.set_exception_handler(previous_handler)
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            sock.close()


def _max_connections(settings: ServerSettings) -> int:
    file_limit = limits.open_file_limit()
    try:
        if settings.max_connections is None:
            return limits.default_max_connections(file_limit)
        limits.check_max_connections(settings.max_connections, file_limit)
    except ValueError as error:
        raise ServerSetupError(str(error)) from None
    return settings.max_connections


def _fallback_handler(
    loop: asyncio.AbstractEventLoop,
    previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None,
) -> Callable[[dict[str, Any]], None]:
    def fallback(context: dict[str, Any]) -> None:
        if previous is None:
            loop.default_exception_handler(context)
        else:
            previous(loop, context)

    return fallback


def _stop_once(loop: asyncio.AbstractEventLoop, fd: int, stop: asyncio.Event) -> None:
    # Readable stays readable: one wake-up is the news.
    loop.remove_reader(fd)
    logger.warning("stopping: the process that started this one is gone")
    stop.set()


def _security_of(settings: ServerSettings) -> str:
    if settings.mutual_tls:
        return "HTTPS with mutual TLS: client certificates required"
    if settings.uses_tls:
        return "HTTPS without client certificates"
    return "plain HTTP"


def run(
    app: ASGIApp,
    settings: ServerSettings,
    *,
    certificates: CertificateFiles | None = None,
    rotation: RotationSettings = DEFAULT_ROTATION,
    on_started: Callable[[], None] | None = None,
    on_shutdown: Callable[[], None] | None = None,
    stop_when_readable: int | None = None,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM; the app's lifespan shutdown runs before return.

    ``certificates``, ``rotation``, ``on_started`` and ``on_shutdown`` are
    as for :func:`serve`. ``stop_when_readable``: a file descriptor whose
    becoming readable stops the server too (the supervisor's end of a pipe
    that it never writes to: it is readable once the supervisor is gone).
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for signum in signals:
            loop.add_signal_handler(signum, stop.set)
        if stop_when_readable is not None:
            loop.add_reader(stop_when_readable, _stop_once, loop, stop_when_readable, stop)
        try:
            await serve(
                app,
                settings,
                shutdown_trigger=stop.wait,
                certificates=certificates,
                rotation=rotation,
                on_started=on_started,
                on_shutdown=on_shutdown,
            )
        finally:
            for signum in signals:
                with contextlib.suppress(ValueError, RuntimeError):
                    loop.remove_signal_handler(signum)
            if stop_when_readable is not None:
                loop.remove_reader(stop_when_readable)

    asyncio.run(main())
