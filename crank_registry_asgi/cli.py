"""The ``crank-registry`` command (also ``python -m crank_registry_asgi``).

Subcommands:

- ``serve``: run the controller over HTTPS (mutual TLS with ``--ca-certs``),
  or over plain HTTP when ``--insecure`` asks for it by name;
- ``certs``: write a development CA, a controller certificate and one client
  certificate per worker.

Each subcommand is one ``add_*_command`` function that declares its flags and
sets its handler; :func:`build_parser` calls them in turn. Exit status: 0 on
success (``serve``: after a clean shutdown on SIGTERM or SIGINT), 2 for a
usage error (bad flags, missing certificates), 1 when the server cannot start.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from .config import GatewayConfig, is_positive_number, is_whole_number

if TYPE_CHECKING:
    from .server import ServerSettings

__all__ = ["UsageError", "add_certs_command", "add_serve_command", "build_parser", "main"]

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

LOG_LEVELS = ("debug", "info", "warning", "error")

_HOW_TO_GET_CERTIFICATES = """\
serve speaks HTTPS only and needs a certificate. For development:

    crank-registry certs --out certs --worker NAME
    crank-registry serve --certfile certs/controller.pem --keyfile certs/controller.key \\
        --ca-certs certs/ca.pem

(or set CONTROLLER_CERT_PATH, CONTROLLER_KEY_PATH and CA_CERT_PATH). To serve
plain HTTP instead, on a trusted network only, pass --insecure."""


class UsageError(Exception):
    """A flag, or a combination of flags, that the command cannot act on (exit 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UsageError as error:
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``crank-registry`` with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="crank-registry",
        description="The crank capability registry: controller service and tools.",
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_command(subcommands)
    add_certs_command(subcommands)
    return parser


# ------------------------------------------------------------------ serve


def add_serve_command(subcommands: Subcommands) -> argparse.ArgumentParser:
    """Declare ``serve`` and its flags."""
    parser = subcommands.add_parser(
        "serve",
        help="run the controller (HTTPS; mutual TLS with --ca-certs)",
        description=(
            "Run the controller. It speaks HTTPS only, unless --insecure asks for plain "
            "HTTP; with --ca-certs, clients must present a certificate signed by that CA "
            "and a worker may change only its own record."
        ),
        epilog=_HOW_TO_GET_CERTIFICATES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument(
        "--port", type=_port, default=None, help="port (env CONTROLLER_HTTPS_PORT; 9000)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path("state/controller"),
        help="directory of the journal, registry.jsonl (state/controller)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how often workers are told to heartbeat (30)",
    )
    parser.add_argument(
        "--unhealthy-after",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="silence after which a worker gets no traffic (60)",
    )
    parser.add_argument(
        "--evict-after",
        type=_seconds,
        default=120.0,
        metavar="SECONDS",
        help="silence after which a worker is removed (120)",
    )
    parser.add_argument(
        "--certfile", type=Path, help="server certificate, PEM (env CONTROLLER_CERT_PATH)"
    )
    parser.add_argument(
        "--keyfile", type=Path, help="its private key, PEM (env CONTROLLER_KEY_PATH)"
    )
    parser.add_argument(
        "--ca-certs",
        type=Path,
        help="CA certificates, PEM: require client certificates signed by them (env CA_CERT_PATH)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve plain HTTP, without TLS and without caller identities",
    )
    parser.add_argument(
        "--trust-proxy-cert-header",
        metavar="NAME",
        help=(
            "take the client certificate (URL-encoded PEM) from this request header, set by "
            "a TLS-terminating proxy; only behind a proxy that strips it from client requests"
        ),
    )
    parser.add_argument(
        "--journal-compact-min-bytes",
        type=_at_least_zero,
        metavar="BYTES",
        help="do not compact the journal while it is smaller than this (1048576)",
    )
    parser.add_argument(
        "--tls-handshake-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="close a connection whose TLS handshake takes longer (5)",
    )
    parser.add_argument(
        "--max-connections",
        type=_at_least_one,
        metavar="N",
        help=(
            "open connections at most; at the cap the oldest one between requests is "
            "closed (the open-file limit, ulimit -n, less 128)"
        ),
    )
    parser.add_argument(
        "--request-read-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="answer 408 to a request whose body is not all in by then (10)",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="(info)")
    parser.add_argument(
        "--gateway",
        action="store_true",
        help="also serve POST /execute: route a call and forward it to the worker",
    )
    parser.add_argument(
        "--gateway-attempts",
        type=_at_least_one,
        metavar="N",
        help=(
            "with --gateway: workers to try when connections are refused "
            f"({GatewayConfig().max_attempts})"
        ),
    )
    parser.add_argument(
        "--gateway-timeout",
        type=_seconds,
        metavar="SECONDS",
        help=(
            "with --gateway: how long a worker may stay silent while answering "
            f"({GatewayConfig().timeout:g})"
        ),
    )
    parser.set_defaults(handler=run_serve)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    """``serve``: check the flags, build the app, serve it until SIGTERM or SIGINT."""
    import attrs

    from crank_registry import HealthPolicy, ValidationError

    from .config import ServiceConfig

    certfile = _path_from(args.certfile, "CONTROLLER_CERT_PATH")
    keyfile = _path_from(args.keyfile, "CONTROLLER_KEY_PATH")
    ca_certs = _path_from(args.ca_certs, "CA_CERT_PATH")
    port = args.port if args.port is not None else _port_from_environment()
    _check_tls_flags(args.insecure, certfile, keyfile, ca_certs, args.trust_proxy_cert_header)
    if args.insecure and args.tls_handshake_timeout is not None:
        raise UsageError("--tls-handshake-timeout needs TLS: drop it, or drop --insecure")
    if not args.gateway and _gateway_settings(args):
        raise UsageError("--gateway-attempts and --gateway-timeout need --gateway")
    try:
        # The core's policy decides which timings go together; this only names the flags.
        policy = HealthPolicy(
            heartbeat_interval=args.heartbeat_interval,
            unhealthy_after=args.unhealthy_after,
            evict_after=args.evict_after,
        )
    except ValidationError:
        raise UsageError(
            "expected --heartbeat-interval <= --unhealthy-after <= --evict-after, got "
            f"{args.heartbeat_interval:g}, {args.unhealthy_after:g}, {args.evict_after:g}"
        ) from None
    _configure_logging(args.log_level)

    from hypercorn.utils import LifespanFailureError

    from .app import create_app
    from .server import ServerSettings, ServerSetupError, run

    settings = ServerSettings(
        host=args.host, port=port, certfile=certfile, keyfile=keyfile, ca_certs=ca_certs
    )
    if args.tls_handshake_timeout is not None:
        settings = attrs.evolve(settings, tls_handshake_timeout=args.tls_handshake_timeout)
    if args.max_connections is not None:
        settings = attrs.evolve(settings, max_connections=args.max_connections)
    for warning in _security_warnings(settings, proxy_cert_header=args.trust_proxy_cert_header):
        logging.getLogger(__name__).warning("%s", warning)
    config = ServiceConfig(
        policy=policy,
        state_dir=args.state_dir,
        # Identities come from the TLS handshake, or from the proxy that was
        # named as the one doing it: either way, a change without one is refused.
        require_identity=settings.mutual_tls or args.trust_proxy_cert_header is not None,
        proxy_cert_header=args.trust_proxy_cert_header,
        # This process is the controller's own: recovery may pause its collector.
        pause_gc_during_recovery=True,
    )
    if args.request_read_timeout is not None:
        config = attrs.evolve(config, request_read_timeout=args.request_read_timeout)
    if args.journal_compact_min_bytes is not None:
        config = attrs.evolve(config, journal_compact_min_bytes=args.journal_compact_min_bytes)
    app = create_app(config=config)
    if args.gateway:
        from .gateway import serve_with_gateway

        app = serve_with_gateway(
            app,
            GatewayConfig(**_gateway_settings(args)),
            certfile=None if certfile is None else str(certfile),
            keyfile=None if keyfile is None else str(keyfile),
            ca_certs=None if ca_certs is None else str(ca_certs),
        )
    try:
        run(app, settings)
    except ServerSetupError as error:
        print(f"crank-registry serve: error: {error}", file=sys.stderr)
        return 1
    except LifespanFailureError as error:
        # The message carries the app's traceback; the last line says what failed.
        logging.getLogger(__name__).debug("startup failed: %s", error)
        reason = str(error).strip().strip("'").strip().splitlines()[-1]
        print(
            f"crank-registry serve: error: the controller failed to start: {reason}",
            file=sys.stderr,
        )
        return 1
    return 0


def _gateway_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`GatewayConfig` fields set by the ``--gateway-*`` flags that were given.

    What a flag does not give, GatewayConfig's default says.
    """
    given = {"max_attempts": args.gateway_attempts, "timeout": args.gateway_timeout}
    return {name: value for name, value in given.items() if value is not None}


def _security_warnings(settings: ServerSettings, *, proxy_cert_header: str | None) -> list[str]:
    """What ``serve`` warns about at start: plain HTTP, and worker identity checks off.

    Identities come from client certificates (``--ca-certs``) or from a
    trusted proxy's header; without either, the controller cannot tell one
    caller from another.
    """
    warnings: list[str] = []
    if not settings.uses_tls:
        where = (
            "" if settings.is_loopback else f" on {settings.host}, reachable from other machines"
        )
        warnings.append(f"serving plain HTTP (--insecure){where}: nothing is encrypted")
    if not settings.mutual_tls and proxy_cert_header is None:
        how = "--insecure" if not settings.uses_tls else "HTTPS without --ca-certs"
        warnings.append(
            f"worker identity checks off ({how}): any caller may register any worker, "
            "and heartbeat or deregister it"
        )
    return warnings


def _check_tls_flags(
    insecure: bool,
    certfile: Path | None,
    keyfile: Path | None,
    ca_certs: Path | None,
    proxy_header: str | None,
) -> None:
    if insecure and (certfile or keyfile or ca_certs):
        given = [
            name
            for name, value in (
                ("--certfile", certfile),
                ("--keyfile", keyfile),
                ("--ca-certs", ca_certs),
            )
            if value
        ]
        raise UsageError(
            f"--insecure serves plain HTTP and cannot be combined with {', '.join(given)} "
            "(given as flags or through CONTROLLER_CERT_PATH, CONTROLLER_KEY_PATH, CA_CERT_PATH)"
        )
    if (certfile is None) != (keyfile is None):
        missing = "--keyfile" if keyfile is None else "--certfile"
        raise UsageError(f"{missing} is required too: the certificate and its key go together")
    if ca_certs is not None and certfile is None:
        raise UsageError("--ca-certs (mutual TLS) needs the server's --certfile and --keyfile")
    if certfile is None and not insecure:
        raise UsageError("no certificate given.\n\n" + _HOW_TO_GET_CERTIFICATES)
    if proxy_header is not None:
        from .config import is_header_name

        if not is_header_name(proxy_header):
            raise UsageError(
                f"--trust-proxy-cert-header: not an HTTP header name: {proxy_header!r}"
            )
        if ca_certs is not None:
            raise UsageError(
                "--trust-proxy-cert-header is for a controller behind a TLS-terminating proxy; "
                "with --ca-certs the controller checks client certificates itself"
            )


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def _path_from(flag: Path | None, variable: str) -> Path | None:
    if flag is not None:
        return flag
    value = os.environ.get(variable)
    return Path(value) if value else None


def _port_from_environment() -> int:
    value = os.environ.get("CONTROLLER_HTTPS_PORT")
    if not value:
        return 9000
    try:
        return _port(value)
    except argparse.ArgumentTypeError as error:
        raise UsageError(f"CONTROLLER_HTTPS_PORT: {error}") from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0 to 65535, got {port}")
    return port


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not is_whole_number(value, minimum):
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def _at_least_one(text: str) -> int:
    """A whole number >= 1 (``--gateway-attempts``, ``--days``)."""
    return _whole_number(text, 1)


def _at_least_zero(text: str) -> int:
    """A whole number >= 0 (``--journal-compact-min-bytes``)."""
    return _whole_number(text, 0)


def _seconds(text: str) -> float:
    """A finite number of seconds > 0 (``--heartbeat-interval``, ``--gateway-timeout``, ...)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not is_positive_number(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


# ------------------------------------------------------------------ certs


def add_certs_command(subcommands: Subcommands) -> argparse.ArgumentParser:
    """Declare ``certs`` and its flags."""
    parser = subcommands.add_parser(
        "certs",
        help="write development certificates (a CA, the controller, workers)",
        description=(
            "Write a development CA (ca.pem, ca.key), a controller certificate for "
            "localhost, 127.0.0.1 and ::1 (controller.pem, controller.key) and, per worker, "
            "a certificate whose URI SAN is spiffe://crank.local/worker/NAME "
            "(worker-NAME.pem, worker-NAME.key), valid as client and as localhost server. "
            "Keys are unencrypted PEM, mode 0600. An existing ca.pem and ca.key in DIR are "
            "reused, so workers can be added later."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="NAME",
        help="a worker to make a certificate for (repeatable)",
    )
    parser.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help=(
            "a caller that is not a worker (URI SAN spiffe://crank.local/client/NAME, "
            "client-NAME.pem; repeatable)"
        ),
    )
    parser.add_argument(
        "--days", type=_at_least_one, default=365, help="validity of new certificates in days (365)"
    )
    parser.set_defaults(handler=run_certs)
    return parser


def run_certs(args: argparse.Namespace) -> int:
    """``certs``: write the files and list them."""
    import datetime

    from . import certs

    for name in [*args.worker, *args.client]:
        try:
            certs.check_name(name)
        except ValueError as error:
            raise UsageError(str(error)) from None
    try:
        written = certs.write_development_certificates(
            args.out,
            workers=args.worker,
            clients=args.client,
            validity=datetime.timedelta(days=args.days),
        )
    except (OSError, ValueError) as error:
        print(f"crank-registry certs: error: {error}", file=sys.stderr)
        return 1
    if args.out / "ca.pem" not in written:
        print(f"reused the CA in {args.out}")
    for path in written:
        print(path)
    return 0
