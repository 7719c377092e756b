"""The ``crank-registry`` command (also ``python -m crank_registry_asgi``).

Subcommands:

- ``serve``: run the controller over HTTPS (mutual TLS with ``--ca-certs``),
  or over plain HTTP when ``--insecure`` asks for it by name;
- ``certs``: write a development CA, a controller certificate and one client
  certificate per worker (``--san`` for real host names), or renew one
  worker's (``--renew``).
- ``workers``, ``worker``, ``capabilities``, ``route``, ``health``,
  ``drain``, ``undrain``, ``watch``: ask a running controller
  (:mod:`crank_registry_asgi.client_cli`).

``--version`` (``-V``) prints the versions of the installed distributions.

Each subcommand is one ``add_*_command`` function that declares its flags and
sets its handler; :func:`build_parser` calls them in turn. Exit status: 0 on
success (``serve``: after a clean shutdown on SIGTERM or SIGINT); 2 for a
usage or configuration error (bad flags, certificate files that are missing
or do not match, a port in use, a state directory held by another
controller or unusable); 1 for any other failure. A failed start is one line
on stderr.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from cryptography import x509

from crank_registry import (
    DEFAULT_EJECT_AFTER_FAILURES,
    DEFAULT_FEED_WINDOW,
    DEFAULT_MAX_EJECTED_PERCENT,
    DEFAULT_TRUST_DOMAIN,
    MAX_IDEMPOTENCY_TTL,
    EjectionSettings,
    RateLimit,
    SelfPreservationSettings,
    identity_problem,
    is_trust_domain,
    operator_glob_problem,
)
from crank_worker_client.certificates import DEFAULT_EXPIRY_WARNING, DEFAULT_WATCH_INTERVAL

from .config import GatewayConfig, is_positive_number, is_whole_number
from .logs import LOG_FORMATS, configure_logging
from .slos import DEFAULT_POLL_INTERVAL

if TYPE_CHECKING:
    from .processes import ProcessRole
    from .server import ServerSettings

__all__ = ["UsageError", "add_certs_command", "add_serve_command", "build_parser", "main"]

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

LOG_LEVELS = ("debug", "info", "warning", "error")
# The defaults of the --self-preservation-* flags are the core's.
DEFAULT_THRESHOLD = SelfPreservationSettings().threshold
DEFAULT_MIN_WORKERS = SelfPreservationSettings().min_workers

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
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Said by the subcommand's parser, so the usage shown is the subcommand's.
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
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
    parser.add_argument(
        "-V", "--version", action=_VersionAction, help="print the installed versions and exit"
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_command(subcommands)
    add_certs_command(subcommands)
    from .client_cli import add_client_commands

    add_client_commands(subcommands)
    for command_parser in subcommands.choices.values():
        command_parser.set_defaults(command_parser=command_parser)
    return parser


#: The distributions whose versions ``--version`` prints, the command's own first.
DISTRIBUTIONS = ("crank-registry-asgi", "crank-registry", "crank-worker-client")


def version_text() -> str:
    """``crank-registry-asgi 0.1.0 (crank-registry 0.1.0, crank-worker-client 0.1.0)``.

    The versions of the installed distributions (importlib.metadata).
    """
    import importlib.metadata

    versions = []
    for name in DISTRIBUTIONS:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return f"{versions[0]} ({', '.join(versions[1:])})"


class _VersionAction(argparse.Action):
    """``--version``: print :func:`version_text` on stdout and exit 0 (read only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(
            option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(version_text())
        parser.exit(0)


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
        "--self-preservation-threshold",
        type=_threshold,
        default=DEFAULT_THRESHOLD,
        metavar="FRACTION",
        help=(
            "more than this share of the workers healthy at the start of an --unhealthy-after "
            "window falling silent within it means this controller is cut off: it then makes "
            f"none unhealthy nor evicts any (0 turns it off; {DEFAULT_THRESHOLD:g})"
        ),
    )
    parser.add_argument(
        "--self-preservation-max",
        type=_seconds,
        metavar="SECONDS",
        help="self-preservation ends after this long at the latest (2 x --evict-after)",
    )
    parser.add_argument(
        "--self-preservation-min-workers",
        type=_at_least_one,
        metavar="N",
        help=(
            "self-preservation never starts when fewer workers were healthy at the window's "
            f"start ({DEFAULT_MIN_WORKERS})"
        ),
    )
    parser.add_argument(
        "--idempotency-ttl",
        type=_ttl,
        default=3600.0,
        metavar="SECONDS",
        help=(
            "how long a route's idempotency_key keeps its worker, and (with --gateway) "
            "an /execute Idempotency-Key its answer (3600)"
        ),
    )
    parser.add_argument(
        "--slo-poll-interval",
        type=_seconds,
        default=DEFAULT_POLL_INTERVAL,
        metavar="SECONDS",
        help=(
            "how often STATE_DIR/slos/*.yaml is checked; changed files are read again "
            f"without a restart ({DEFAULT_POLL_INTERVAL:g})"
        ),
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
        help=(
            "CA certificates, PEM: require client certificates signed by them, and verify "
            "the --trust-proxy-cert-header certificate against them (env CA_CERT_PATH); with "
            "--insecure, only the latter"
        ),
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve plain HTTP, without TLS and without caller identities",
    )
    parser.add_argument(
        "--cert-watch-interval",
        type=_seconds,
        default=DEFAULT_WATCH_INTERVAL,
        metavar="SECONDS",
        help=(
            "how often the certificate, key and CA files are checked; renewed ones are used "
            f"for new connections without a restart ({DEFAULT_WATCH_INTERVAL:g})"
        ),
    )
    parser.add_argument(
        "--cert-expiry-warning-days",
        type=_days,
        default=DEFAULT_EXPIRY_WARNING / 86400,
        metavar="DAYS",
        help=(
            "log a warning when the certificate expires within this many days "
            f"({DEFAULT_EXPIRY_WARNING / 86400:g})"
        ),
    )
    parser.add_argument(
        "--trust-proxy-cert-header",
        metavar="NAME",
        help=(
            "take the client certificate (URL-encoded PEM) from this request header, set by "
            "a TLS-terminating proxy, verified against --ca-certs (required with it); only "
            "behind a proxy that strips it from client requests"
        ),
    )
    parser.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        type=_network,
        metavar="CIDR",
        help=(
            "with --trust-proxy-cert-header: only peers in this network may send the header; "
            "others are refused (repeatable; default: any peer)"
        ),
    )
    parser.add_argument(
        "--trust-domain",
        type=_trust_domain,
        default=DEFAULT_TRUST_DOMAIN,
        metavar="DOMAIN",
        help=(
            "identities are spiffe://DOMAIN/worker/NAME or spiffe://DOMAIN/client/NAME; "
            f"any other is refused ({DEFAULT_TRUST_DOMAIN})"
        ),
    )
    parser.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help=(
            "the access policy: a TOML file of [[rule]] tables (identity, allow, deny) and a "
            "default; re-read when it changes; with --redis, the sweeper lease holder's is "
            "the registry's (default: everyone may route anywhere, workers' "
            "required_capabilities aside)"
        ),
    )
    parser.add_argument(
        "--policy-watch-interval",
        type=_seconds,
        default=DEFAULT_WATCH_INTERVAL,
        metavar="SECONDS",
        help=f"with --policy: how often the file is checked ({DEFAULT_WATCH_INTERVAL:g})",
    )
    parser.add_argument(
        "--trusted-gateway",
        action="append",
        default=[],
        type=_spiffe_id,
        metavar="ID",
        help=(
            "a SPIFFE ID that may route for its users with a body requester_identity "
            "(repeatable; default: none may)"
        ),
    )
    parser.add_argument(
        "--operator",
        action="append",
        default=[],
        type=_operator_glob,
        metavar="GLOB",
        help=(
            "identities matching this glob over SPIFFE IDs (fnmatch: * ? [...]) may drain "
            "and undrain any worker, e.g. 'spiffe://crank.local/client/ops-*' (repeatable; "
            "default: only the worker itself, or anyone under --insecure without identities)"
        ),
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        help=(
            "share the registry with every controller on this Redis (redis://HOST:PORT/DB; "
            "env CRANK_REDIS_URL): changes go to a Redis stream instead of the journal, and "
            "with --gateway the calls in flight per worker and the Idempotency-Key answers "
            "hold for all those controllers; needs pip install 'crank-registry-asgi[redis]'"
        ),
    )
    parser.add_argument(
        "--redis-prefix",
        metavar="NAME",
        help="the registry's keys in Redis are {NAME}:... (several registries, one Redis) (crank)",
    )
    parser.add_argument(
        "--controller-id",
        metavar="ID",
        help="names this controller in logs, spans and the sweeper lease (HOSTNAME:PORT)",
    )
    parser.add_argument(
        "--processes",
        type=_at_least_one,
        default=1,
        metavar="N",
        help=(
            "run N server processes on the port (SO_REUSEPORT), each a full replica; N > 1 "
            "needs --redis. Controller ids get #0..#N-1 appended; a process that dies is "
            "replaced (1)"
        ),
    )
    parser.add_argument(
        "--redis-lease-period",
        type=_seconds,
        metavar="SECONDS",
        help=(
            "with --redis: another controller takes over the sweep within this long after "
            "its holder died (10)"
        ),
    )
    parser.add_argument(
        "--redis-snapshot-every",
        type=_at_least_one,
        metavar="N",
        help=(
            "with --redis: stream entries after which the registry is snapshotted and the "
            "stream trimmed (10000)"
        ),
    )
    parser.add_argument(
        "--feed-window",
        type=_at_least_one,
        default=DEFAULT_FEED_WINDOW,
        metavar="N",
        help=(
            "how many recent changes GET /watch keeps; a follower further behind reads "
            f"GET /snapshot again ({DEFAULT_FEED_WINDOW})"
        ),
    )
    parser.add_argument(
        "--rate-limit",
        type=_rate_limit,
        metavar="RATE:BURST",
        help=(
            "limit POST /route and /execute to RATE requests per second per caller (its "
            "identity, else its address), in bursts of up to BURST; over it 429 rate_limited "
            "with Retry-After. With --redis the limit holds for all controllers together "
            "(each process keeps RATE/n, BURST/n while Redis is unreachable). Worker "
            "registrations and heartbeats are never limited (default: no limit)"
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
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text: one line for people; json: one JSON object a line (text)",
    )
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
    parser.add_argument(
        "--gateway-queue",
        type=_at_least_zero,
        metavar="N",
        help=(
            "with --gateway: calls that may wait per capability when every worker has "
            "max_concurrency calls in flight; more are 503 overloaded "
            f"({GatewayConfig().queue_limit})"
        ),
    )
    parser.add_argument(
        "--eject-after-failures",
        type=_at_least_zero,
        metavar="N",
        help=(
            "with --gateway: a worker whose calls fail N times in a row (connection refused "
            "or reset, timeout, 5xx) takes no routes for 30 s times the ejections of its "
            f"streak, at most 300 s (0 turns it off; {DEFAULT_EJECT_AFTER_FAILURES})"
        ),
    )
    parser.add_argument(
        "--max-ejected-percent",
        type=_percent,
        metavar="PERCENT",
        help=(
            "with --gateway: the most of a capability's workers ejected at once, at least "
            f"one ({DEFAULT_MAX_EJECTED_PERCENT:g})"
        ),
    )
    parser.set_defaults(handler=run_serve)
    return parser


def run_serve(args: argparse.Namespace, process: ProcessRole | None = None) -> int:
    """``serve``: check the flags, build the app, serve it until SIGTERM or SIGINT.

    With ``--processes N`` (N > 1), this process supervises N others
    (:mod:`crank_registry_asgi.processes`), each of which calls this again
    with its ``process`` role: it then serves as one of them.
    """
    import attrs

    from crank_registry import HealthPolicy, PolicyFileError, RoutingSettings, ValidationError

    from .config import ServiceConfig

    certfile = _path_from(args.certfile, "CONTROLLER_CERT_PATH")
    keyfile = _path_from(args.keyfile, "CONTROLLER_KEY_PATH")
    ca_certs = _path_from(args.ca_certs, "CA_CERT_PATH")
    port = args.port if args.port is not None else _port_from_environment()
    _check_tls_flags(
        insecure=args.insecure,
        certfile=certfile,
        keyfile=keyfile,
        ca_certs=ca_certs,
        proxy_header=args.trust_proxy_cert_header,
        trusted_proxies=args.trusted_proxy,
    )
    # Under --insecure the CA certificates verify only the proxy header's certificate.
    header_authorities = (
        _read_ca_certificates(ca_certs)
        if args.trust_proxy_cert_header is not None and ca_certs is not None
        else ()
    )
    if args.insecure and args.tls_handshake_timeout is not None:
        raise UsageError("--tls-handshake-timeout needs TLS: drop it, or drop --insecure")
    if args.policy is None and args.policy_watch_interval != DEFAULT_WATCH_INTERVAL:
        raise UsageError("--policy-watch-interval needs --policy")
    if not args.gateway and _gateway_settings(args):
        raise UsageError("--gateway-attempts, --gateway-timeout and --gateway-queue need --gateway")
    preservation = _self_preservation(args)
    ejection = _ejection(args)
    redis_url = args.redis if args.redis is not None else os.environ.get("CRANK_REDIS_URL") or None
    shared = _redis_settings(args, redis_url)
    if shared and args.journal_compact_min_bytes is not None:
        raise UsageError("--journal-compact-min-bytes has no journal to compact with --redis")
    if args.processes > 1 and not shared:
        raise UsageError(
            f"--processes {args.processes} needs --redis (or CRANK_REDIS_URL): every process "
            "holds a replica of a registry kept in Redis; without Redis, serve one process "
            "(drop --processes)"
        )
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
    configure_logging(args.log_level, args.log_format)

    from hypercorn.utils import LifespanFailureError

    from .app import create_app
    from .rotation import (
        CertificateExpiryCollector,
        CertificateFileError,
        RotationSettings,
        load_server_certificates,
    )
    from .server import ServerSettings, ServerSetupError, hypercorn_config, run

    settings = ServerSettings(
        host=args.host,
        port=port,
        certfile=certfile,
        keyfile=keyfile,
        ca_certs=None if args.insecure else ca_certs,
        processes=args.processes,
    )
    if args.tls_handshake_timeout is not None:
        settings = attrs.evolve(settings, tls_handshake_timeout=args.tls_handshake_timeout)
    if args.max_connections is not None:
        settings = attrs.evolve(settings, max_connections=args.max_connections)
    rotation = RotationSettings(
        watch_interval=args.cert_watch_interval,
        expiry_warning=args.cert_expiry_warning_days * 86400,
    )
    certificates = None
    if settings.uses_tls:
        try:
            certificates = load_server_certificates(hypercorn_config(settings), rotation)
        except CertificateFileError as error:
            raise UsageError(f"{error} ({_source_of_file(str(error), args)})") from None
    if process is None:
        # Said once, by the supervisor when there are several processes.
        for warning in _security_warnings(settings):
            logging.getLogger(__name__).warning("%s", warning)
    for gateway in args.trusted_gateway:
        problem = identity_problem(gateway, args.trust_domain)
        if problem is not None:
            raise UsageError(f"--trusted-gateway {gateway!r} {problem}")
    controller_id = args.controller_id or f"{socket.gethostname()}:{port}"
    if process is not None:
        from .processes import process_controller_id

        controller_id = process_controller_id(controller_id, process.index)
    config = ServiceConfig(
        policy=policy,
        state_dir=args.state_dir,
        routing=RoutingSettings(idempotency_ttl=args.idempotency_ttl),
        slo_poll_interval=args.slo_poll_interval,
        feed_window=args.feed_window,
        # Identities come from the TLS handshake, or from the proxy that was
        # named as the one doing it: either way, a change without one is refused.
        require_identity=settings.mutual_tls or args.trust_proxy_cert_header is not None,
        proxy_cert_header=args.trust_proxy_cert_header,
        proxy_cert_authorities=header_authorities,
        trusted_proxies=args.trusted_proxy,
        trust_domain=args.trust_domain,
        policy_file=args.policy,
        policy_watch_interval=args.policy_watch_interval,
        trusted_gateways=args.trusted_gateway,
        operators=args.operator,
        rate_limit=args.rate_limit,
        self_preservation=preservation,
        ejection=ejection,
        # This process is the controller's own: recovery may pause its
        # collector, and freeze what it recovered.
        pause_gc_during_recovery=True,
        freeze_gc_after_recovery=True,
        controller_id=controller_id,
        metrics_directory=None if process is None else process.metrics_directory,
        **shared,
    )
    if args.request_read_timeout is not None:
        config = attrs.evolve(config, request_read_timeout=args.request_read_timeout)
    if args.journal_compact_min_bytes is not None:
        config = attrs.evolve(config, journal_compact_min_bytes=args.journal_compact_min_bytes)
    if process is None and settings.processes > 1:
        from .processes import supervise

        try:
            return supervise(args, settings)
        except ServerSetupError as error:
            return _start_failed(str(error), status=2)
    try:
        app = create_app(config=config)
    except PolicyFileError as error:
        raise UsageError(f"{error} (given by --policy)") from None
    if certificates is not None:
        app.state.metrics_registry.register(CertificateExpiryCollector(certificates))
    service = app.state.service
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
        run(
            app,
            settings,
            certificates=certificates,
            rotation=rotation,
            on_started=None if process is None else process.started,
            on_shutdown=service.end_streams,
            stop_when_readable=None if process is None else process.channel.fileno(),
        )
    except ServerSetupError as error:
        return _start_failed(str(error), status=2)
    except LifespanFailureError as error:
        return _lifespan_failed(error)
    return 0


def _source_of_file(message: str, args: argparse.Namespace) -> str:
    """Which flag (or environment variable) gave the file a TLS error message names first."""
    sources = []
    for flag, variable, value in (
        ("--certfile", "CONTROLLER_CERT_PATH", args.certfile),
        ("--keyfile", "CONTROLLER_KEY_PATH", args.keyfile),
        ("--ca-certs", "CA_CERT_PATH", args.ca_certs),
    ):
        path = _path_from(value, variable)
        if path is not None and str(path) in message:
            sources.append((message.index(str(path)), flag if value is not None else variable))
    return f"given by {min(sources)[1]}" if sources else "see --certfile, --keyfile, --ca-certs"


def _start_failed(message: str, *, status: int) -> int:
    """Report a failed start in one line on stderr; return the exit status."""
    print(f"crank-registry serve: error: {message}", file=sys.stderr)
    return status


def _lifespan_failed(error: Exception) -> int:
    """Report why the app's start failed, in one line; exit 2 for what the operator can fix.

    hypercorn raises ``LifespanFailureError`` carrying the app's traceback as
    text; the app's own exception is the one being handled when it was raised
    (Starlette reports a failed start from its ``except`` block), so it is
    the error's ``__context__``. A journal error (the state directory is
    held by another controller, unreadable, written by a newer release) and
    an invalid SLO file are configuration: the message names the file (and
    the field) and the fix. Anything else is
    unexpected: its class is named, and ``--log-level debug`` shows the
    traceback.
    """
    from .journal import JournalError
    from .redis_store import RedisStoreError
    from .slos import SloFileError

    logging.getLogger(__name__).debug("start failed: %s", error)
    cause = error.__context__
    while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
        cause = cause.exceptions[0]
    prefix = "the controller failed to start: "
    if isinstance(cause, (JournalError, SloFileError, RedisStoreError)):
        return _start_failed(prefix + str(cause), status=2)
    # Without an exception (an app that only reports the failure), the debug log has its text.
    reason = (
        "its lifespan reported a failure" if cause is None else f"{type(cause).__name__}: {cause}"
    )
    return _start_failed(f"{prefix}{reason} (--log-level debug shows more)", status=1)


def _redis_settings(args: argparse.Namespace, url: str | None) -> dict[str, Any]:
    """The shared registry's :class:`ServiceConfig` fields, from ``--redis`` and its flags."""
    from .config import is_redis_prefix, is_redis_url

    if url is None:
        given = [
            flag
            for flag, value in (
                ("--redis-prefix", args.redis_prefix),
                ("--redis-lease-period", args.redis_lease_period),
                ("--redis-snapshot-every", args.redis_snapshot_every),
            )
            if value is not None
        ]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise UsageError(f"{', '.join(given)} {verb} --redis (or CRANK_REDIS_URL)")
        return {}
    source = "--redis" if args.redis is not None else "CRANK_REDIS_URL"
    if not is_redis_url(url):
        raise UsageError(
            f"{source}: expected a redis://HOST:PORT/DB, rediss:// or unix:// URL, got {url!r}"
        )
    prefix = "crank" if args.redis_prefix is None else args.redis_prefix
    if not is_redis_prefix(prefix):
        raise UsageError(
            f"--redis-prefix: 1 to 64 letters, digits, '_', '.', ':' or '-', got {prefix!r}"
        )
    try:
        import redis  # noqa: F401 (only to say what to install)
    except ImportError:
        raise UsageError(
            f"{source} needs the redis package: pip install 'crank-registry-asgi[redis]'"
        ) from None
    settings: dict[str, Any] = {"redis_url": url, "redis_prefix": prefix}
    if args.redis_lease_period is not None:
        settings["redis_lease_period"] = args.redis_lease_period
    if args.redis_snapshot_every is not None:
        settings["redis_snapshot_every"] = args.redis_snapshot_every
    return settings


def _gateway_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`GatewayConfig` fields set by the ``--gateway-*`` flags that were given.

    What a flag does not give, GatewayConfig's default says.
    """
    given = {
        "max_attempts": args.gateway_attempts,
        "timeout": args.gateway_timeout,
        "queue_limit": args.gateway_queue,
    }
    return {name: value for name, value in given.items() if value is not None}


def _security_warnings(settings: ServerSettings) -> list[str]:
    """What ``serve`` warns about before it starts: plain HTTP.

    Worker identity checks being off is warned by the app's lifespan
    (:func:`crank_registry_asgi.app.identity_checks_off_warning`), so that an
    application embedding the service says the same.
    """
    warnings: list[str] = []
    if not settings.uses_tls:
        where = (
            "" if settings.is_loopback else f" on {settings.host}, reachable from other machines"
        )
        warnings.append(f"serving plain HTTP (--insecure){where}: nothing is encrypted")
    return warnings


def _check_tls_flags(
    *,
    insecure: bool,
    certfile: Path | None,
    keyfile: Path | None,
    ca_certs: Path | None,
    proxy_header: str | None,
    trusted_proxies: Sequence[object],
) -> None:
    if insecure and (certfile or keyfile):
        given = [
            name for name, value in (("--certfile", certfile), ("--keyfile", keyfile)) if value
        ]
        raise UsageError(
            f"--insecure serves plain HTTP and cannot be combined with {', '.join(given)} "
            "(given as flags or through CONTROLLER_CERT_PATH, CONTROLLER_KEY_PATH)"
        )
    if (certfile is None) != (keyfile is None):
        missing = "--keyfile" if keyfile is None else "--certfile"
        raise UsageError(f"{missing} is required too: the certificate and its key go together")
    if certfile is None and not insecure:
        if ca_certs is not None:
            raise UsageError(
                "--ca-certs (mutual TLS) needs the server's --certfile and --keyfile; behind a "
                "TLS-terminating proxy, pass --insecure and --trust-proxy-cert-header instead"
            )
        raise UsageError("no certificate given.\n\n" + _HOW_TO_GET_CERTIFICATES)
    if insecure and ca_certs is not None and proxy_header is None:
        raise UsageError(
            "--ca-certs with --insecure verifies only the certificate of "
            "--trust-proxy-cert-header NAME (plain HTTP has no handshake): add that flag, or "
            "drop --ca-certs (also given through CA_CERT_PATH)"
        )
    if proxy_header is not None:
        from .config import is_header_name

        if not is_header_name(proxy_header):
            raise UsageError(
                f"--trust-proxy-cert-header: not an HTTP header name: {proxy_header!r}"
            )
        if ca_certs is None:
            raise UsageError(
                "--trust-proxy-cert-header needs --ca-certs (or CA_CERT_PATH): the CA "
                "certificates that the header's certificate is verified against, as a TLS "
                "handshake would"
            )
    elif trusted_proxies:
        raise UsageError(
            "--trusted-proxy limits which peers may send --trust-proxy-cert-header: "
            "give that flag too"
        )


def _read_ca_certificates(path: Path) -> tuple[x509.Certificate, ...]:
    """The certificates of a PEM file (``--ca-certs``), or a :class:`UsageError` naming it."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UsageError(f"--ca-certs {path}: cannot read it: {error.strerror}") from None
    try:
        return tuple(x509.load_pem_x509_certificates(data))
    except ValueError:
        raise UsageError(
            f"--ca-certs {path}: no PEM certificates in it (expected -----BEGIN CERTIFICATE-----)"
        ) from None


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


def _days(text: str) -> float:
    """A finite number of days >= 0 (``--cert-expiry-warning-days``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not (value == 0 or is_positive_number(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number of days >= 0, got {text!r}")
    return value


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IP network in CIDR notation (``--trusted-proxy``); a bare address is a /32 or /128."""
    try:
        return ipaddress.ip_network(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"not an IP network such as 10.0.0.0/8 or 192.0.2.7: {text!r} ({error})"
        ) from None


def _trust_domain(text: str) -> str:
    """A SPIFFE trust domain (``--trust-domain``)."""
    if not is_trust_domain(text):
        raise argparse.ArgumentTypeError(
            f"not a SPIFFE trust domain (lowercase letters, digits, '.', '_' and '-'): {text!r}"
        )
    return text


def _spiffe_id(text: str) -> str:
    if not text.startswith("spiffe://") or len(text) <= len("spiffe://"):
        raise argparse.ArgumentTypeError(
            f"expected a SPIFFE ID (spiffe://DOMAIN/PATH), got {text!r}"
        )
    return text


def _operator_glob(text: str) -> str:
    """A glob over SPIFFE IDs (``--operator``)."""
    problem = operator_glob_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(
            f"{text!r} {problem} (e.g. 'spiffe://crank.local/client/ops-*')"
        )
    return text


def _rate_limit(text: str) -> RateLimit:
    """``RATE:BURST`` (``--rate-limit``)."""
    try:
        return RateLimit.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _threshold(text: str) -> float:
    """A share from 0 (off) to below 1 (``--self-preservation-threshold``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(
            f"must be a share from 0 (off) to below 1, e.g. 0.5, got {text!r}"
        )
    return value


def _self_preservation(args: argparse.Namespace) -> SelfPreservationSettings:
    """The ``--self-preservation-*`` flags as settings; the two others need a threshold."""
    if args.self_preservation_threshold == 0 and (
        args.self_preservation_max is not None or args.self_preservation_min_workers is not None
    ):
        raise UsageError(
            "--self-preservation-max and --self-preservation-min-workers need "
            "--self-preservation-threshold above 0 (0 turns self-preservation off)"
        )
    return SelfPreservationSettings(
        threshold=args.self_preservation_threshold,
        max_duration=args.self_preservation_max,
        min_workers=(
            DEFAULT_MIN_WORKERS
            if args.self_preservation_min_workers is None
            else args.self_preservation_min_workers
        ),
    )


def _percent(text: str) -> float:
    """A percentage from 0 to 100 (``--max-ejected-percent``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a percentage from 0 to 100, got {text!r}")
    return value


def _ejection(args: argparse.Namespace) -> EjectionSettings:
    """The ejection flags as settings: they need --gateway (its calls are what fail)."""
    after, percent = args.eject_after_failures, args.max_ejected_percent
    if not args.gateway and (after is not None or percent is not None):
        raise UsageError(
            "--eject-after-failures and --max-ejected-percent need --gateway: only the "
            "gateway's calls to workers can fail"
        )
    if after == 0 and percent is not None:
        raise UsageError(
            "--max-ejected-percent needs --eject-after-failures above 0 (0 turns ejection off)"
        )
    return EjectionSettings(
        after_failures=DEFAULT_EJECT_AFTER_FAILURES if after is None else after,
        max_ejected_percent=DEFAULT_MAX_EJECTED_PERCENT if percent is None else percent,
    )


def _seconds(text: str) -> float:
    """A finite number of seconds > 0 (``--heartbeat-interval``, ``--gateway-timeout``, ...)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not is_positive_number(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


def _ttl(text: str) -> float:
    """:func:`_seconds`, less than the core's bound (``--idempotency-ttl``)."""
    value = _seconds(text)
    if value >= MAX_IDEMPOTENCY_TTL:
        raise argparse.ArgumentTypeError(
            f"must be less than {MAX_IDEMPOTENCY_TTL:g} seconds, got {text!r}"
        )
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
            "reused, so workers can be added later. --san adds the hosts' real names; "
            "files are replaced atomically, and serve and the worker client reload them "
            "without a restart."
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
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help=(
            "a DNS name or IP address to add to the controller's and the workers' "
            "certificates, besides localhost, 127.0.0.1 and ::1 (repeatable)"
        ),
    )
    parser.add_argument(
        "--renew",
        action="store_true",
        help=(
            "renew the certificate of the one --worker NAME in DIR in place: same CA, new key "
            "and validity, same names plus any --san; running processes pick it up"
        ),
    )
    parser.add_argument(
        "--trust-domain",
        type=_trust_domain,
        default=DEFAULT_TRUST_DOMAIN,
        metavar="DOMAIN",
        help=(
            "SPIFFE trust domain of the worker and client identities, the controller's "
            f"--trust-domain ({DEFAULT_TRUST_DOMAIN}); --renew keeps the renewed one's"
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
    for host in args.san:
        try:
            certs.check_host(host)
        except ValueError as error:
            raise UsageError(str(error)) from None
    validity = datetime.timedelta(days=args.days)
    if args.renew:
        if len(args.worker) != 1 or args.client:
            raise UsageError(
                "--renew renews one worker's certificate: give exactly one --worker NAME "
                "(and no --client)"
            )
        try:
            written = certs.renew_worker_certificate(
                args.out, args.worker[0], sans=args.san, validity=validity
            )
        except ValueError as error:
            raise UsageError(str(error)) from None
        except OSError as error:
            print(f"crank-registry certs: error: {error}", file=sys.stderr)
            return 1
        for path in written:
            print(path)
        return 0
    try:
        written = certs.write_development_certificates(
            args.out,
            workers=args.worker,
            clients=args.client,
            sans=args.san,
            validity=validity,
            trust_domain=args.trust_domain,
        )
    except (OSError, ValueError) as error:
        print(f"crank-registry certs: error: {error}", file=sys.stderr)
        return 1
    if args.out / "ca.pem" not in written:
        print(f"reused the CA in {args.out}")
    for path in written:
        print(path)
    return 0
