"""What every example worker program shares: settings, HTTPS serving, registration.

A worker program declares its capabilities and a ``make_handlers(options)``
function, then calls :func:`run_worker`. Settings come from flags or the
environment:

==================  =====================  ===========================================
flag                environment            default
==================  =====================  ===========================================
``--controller``    ``CONTROLLER_URL``     ``https://localhost:9000``
``--host``                                 ``127.0.0.1``
``--port``          ``WORKER_HTTPS_PORT``  ``0`` (any free port; the URL says which)
``--certfile``      ``WORKER_CERT_PATH``   ``certs/worker-NAME.pem``
``--keyfile``       ``WORKER_KEY_PATH``    ``certs/worker-NAME.key``
``--ca-certs``      ``CA_CERT_PATH``       ``certs/ca.pem``
``--worker-id``                            the program's name
``--insecure``                             off: plain HTTP, by name only
==================  =====================  ===========================================

The worker serves HTTPS with its own certificate and requires a client
certificate signed by the same CA from every caller (the controller's
gateway presents the controller's). It registers on start-up with a
:class:`~crank_worker_client.WorkerAgent` and, on SIGTERM or Ctrl-C,
drains (no new call is routed to it), lets the calls in flight finish,
deregisters, and only then stops serving.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from crank_registry import CapabilitySchema
from crank_worker_client import DEFAULT_CONTROLLER_URL, TLSConfig, WorkerAgent
from crank_worker_client.serving import Handler, invocation_app

if TYPE_CHECKING:
    from hypercorn.config import Config

MakeHandlers = Callable[[argparse.Namespace], Mapping[tuple[str, str], Handler]]
AddArguments = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class WorkerSettings:
    """Where a worker listens, where the controller is, and which certificates it uses."""

    worker_id: str
    host: str
    port: int
    controller_url: str
    certfile: str | None
    keyfile: str | None
    ca_certs: str | None
    insecure: bool


def parse_settings(
    name: str, argv: Sequence[str] | None = None, add_arguments: AddArguments | None = None
) -> tuple[WorkerSettings, argparse.Namespace]:
    """Read the settings of worker program ``name`` from ``argv`` and the environment."""
    env = os.environ
    parser = argparse.ArgumentParser(
        prog=f"python -m examples.workers.{name}",
        description=f"The {name} example worker: serves its capabilities over HTTPS "
        "and registers with the crank-registry controller.",
    )
    parser.add_argument(
        "--controller",
        metavar="URL",
        default=env.get("CONTROLLER_URL", DEFAULT_CONTROLLER_URL),
        help="the controller's base URL, or several controllers' separated by commas; "
        "env CONTROLLER_URL (default: %(default)s)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on, also the host of the advertised URL (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        # A string: argparse converts it with `type`, so a bad value is a usage error.
        default=env.get("WORKER_HTTPS_PORT", "0"),
        help="the port to listen on, 0 for any free one (the advertised URL says which); "
        "env WORKER_HTTPS_PORT (default: %(default)s)",
    )
    parser.add_argument(
        "--worker-id",
        metavar="ID",
        default=name,
        help="the name the worker registers under, also in its certificate's SPIFFE ID "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--certfile",
        metavar="PATH",
        default=env.get("WORKER_CERT_PATH"),
        help="the worker's certificate (PEM); env WORKER_CERT_PATH (default: certs/worker-ID.pem)",
    )
    parser.add_argument(
        "--keyfile",
        metavar="PATH",
        default=env.get("WORKER_KEY_PATH"),
        help="the worker's private key (PEM); env WORKER_KEY_PATH (default: certs/worker-ID.key)",
    )
    parser.add_argument(
        "--ca-certs",
        metavar="PATH",
        default=env.get("CA_CERT_PATH"),
        help="the CA that signs the controller's and the callers' certificates; "
        "env CA_CERT_PATH (default: certs/ca.pem)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP, no certificates, registration by name only (loopback tests; "
        "default: off)",
    )
    if add_arguments is not None:
        add_arguments(parser)
    options = parser.parse_args(argv)
    certfile, keyfile, ca_certs = options.certfile, options.keyfile, options.ca_certs
    if not options.insecure:
        certfile = certfile or f"certs/worker-{options.worker_id}.pem"
        keyfile = keyfile or f"certs/worker-{options.worker_id}.key"
        ca_certs = ca_certs or "certs/ca.pem"
        for label, path in (("certificate", certfile), ("key", keyfile), ("CA", ca_certs)):
            if not os.path.isfile(path):
                parser.error(
                    f"{label} file {path!r} not found; make development certificates with "
                    f"`crank-registry certs --out certs --worker {options.worker_id}` "
                    "or pass --insecure"
                )
    settings = WorkerSettings(
        worker_id=options.worker_id,
        host=options.host,
        port=options.port,
        controller_url=options.controller,
        certfile=certfile,
        keyfile=keyfile,
        ca_certs=ca_certs,
        insecure=options.insecure,
    )
    return settings, options


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` and listening (port 0: a free port).

    Binding before registering means the advertised URL is the real one and
    that connections made right after registration wait in the backlog
    instead of being refused.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def worker_url(settings: WorkerSettings, port: int) -> str:
    """The URL the worker advertises."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{'http' if settings.insecure else 'https'}://{host}:{port}"


def describe_capabilities(capabilities: Sequence[CapabilitySchema]) -> str:
    """``"1 capability (greet:hello)"``, ``"2 capabilities (a:b, c:d)"``: for the start-up log."""
    count = len(capabilities)
    keys = ", ".join(f"{capability.verb}:{capability.name}" for capability in capabilities)
    return f"{count} {'capability' if count == 1 else 'capabilities'} ({keys})"


def server_config(settings: WorkerSettings, fd: int, *, shutdown_grace: float) -> Config:
    """The hypercorn configuration: serve on descriptor ``fd``, with TLS unless insecure.

    Hypercorn's log lines go to the logger ``hypercorn.error`` and from there
    to the program's handlers. Left to its default (``errorlog="-"``),
    hypercorn adds a handler of its own to that logger as well, and every
    line of it ("Running on ...") appears twice.
    """
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"fd://{fd}"]
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = None
    config.graceful_timeout = shutdown_grace
    if not settings.insecure:
        config.certfile = settings.certfile
        config.keyfile = settings.keyfile
        config.ca_certs = settings.ca_certs
        config.verify_mode = ssl.CERT_REQUIRED  # callers must present a certificate of our CA
    return config


async def serve(
    settings: WorkerSettings,
    capabilities: Sequence[CapabilitySchema],
    handlers: Mapping[tuple[str, str], Handler],
    *,
    shutdown_grace: float = 2.0,
) -> None:
    """Serve ``handlers``, stay registered until SIGTERM or SIGINT, then leave and stop.

    The order on the way out matters: the worker drains first (so no new
    call is routed to it) and waits for its calls in flight (the agent's
    ``drain_timeout``), then deregisters, then the server stops, waiting at
    most ``shutdown_grace`` seconds for what is left. The agent is not run
    in the ASGI lifespan here because hypercorn runs the lifespan shutdown
    only after every connection has closed, and a client's idle TLS
    keep-alive connection can hold that up for half a minute.
    """
    from hypercorn.asyncio import serve as hypercorn_serve

    sock = listening_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    url = worker_url(settings, port)
    tls = (
        None
        if settings.insecure
        else TLSConfig(
            ca_certs=settings.ca_certs, certfile=settings.certfile, keyfile=settings.keyfile
        )
    )
    agent = WorkerAgent(
        settings.controller_url,
        settings.worker_id,
        url,
        capabilities,
        tls=tls,
        insecure=settings.insecure,
    )
    app = invocation_app(handlers, capabilities, health=lambda: {"agent": agent.status.as_dict()})
    # The agent runs around the server (not in its lifespan): it reports the app's
    # load, and waits for its calls in flight when it drains.
    agent.load = app.load.report
    meter = app.load
    agent.calls_in_flight = lambda: meter.in_flight
    # Hypercorn takes over the descriptor; detach so that this object does not close it.
    config = server_config(settings, sock.detach(), shutdown_grace=shutdown_grace)
    log = logging.getLogger("examples.workers")
    stop_serving = anyio.Event()
    server_done = anyio.Event()

    async def run_server() -> None:
        try:
            await hypercorn_serve(app, config, shutdown_trigger=stop_serving.wait)  # type: ignore[arg-type]
        finally:
            server_done.set()

    leave = anyio.CancelScope()

    async def leave_on_signal(signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            log.info("%s: leaving the registry, then stopping", signal.Signals(signum).name)
            leave.cancel()  # also while still registering at start-up
            return

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as group:
            group.start_soon(run_server)
            group.start_soon(leave_on_signal, signals)
            # The socket listens already: calls routed here right after
            # registration wait in its backlog until the server accepts them.
            with leave:
                async with agent:  # drains, then deregisters, on the way out, even when cancelled
                    log.info(
                        "worker %s serving %s at %s",
                        settings.worker_id,
                        describe_capabilities(capabilities),
                        url,
                    )
                    await anyio.sleep_forever()
            stop_serving.set()
            with anyio.move_on_after(shutdown_grace + 0.5):
                await server_done.wait()
            group.cancel_scope.cancel()  # connections that linger past the grace period


def run_worker(
    name: str,
    capabilities: Sequence[CapabilitySchema],
    make_handlers: MakeHandlers,
    *,
    argv: Sequence[str] | None = None,
    add_arguments: AddArguments | None = None,
) -> None:
    """The ``main`` of a worker program."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s"
    )
    settings, options = parse_settings(name, argv, add_arguments)
    handlers = make_handlers(options)
    try:
        asyncio.run(serve(settings, capabilities, handlers))
    except KeyboardInterrupt:
        pass
    except Exception as error:
        # A start-up failure (controller refused us, bad certificate) is one
        # line, not a traceback.
        print(f"{name}: {'; '.join(_messages(error))}", file=sys.stderr)
        raise SystemExit(1) from None


def _messages(error: BaseException) -> list[str]:
    if isinstance(error, BaseExceptionGroup):
        return [message for inner in error.exceptions for message in _messages(inner)]
    return [f"{type(error).__name__}: {error}"]


def schema(
    verb: str,
    name: str,
    *,
    input_schema: dict[str, Any],
    output_schema: dict[str, Any],
    max_concurrency: int,
    version: str = "1.0.0",
) -> CapabilitySchema:
    """A capability of an example worker (all run on the CPU, in Python)."""
    return CapabilitySchema(
        name=name,
        verb=verb,
        version=version,
        input_schema=input_schema,
        output_schema=output_schema,
        requires_gpu=False,
        max_concurrency=max_concurrency,
        runtime="python3.11",
    )
