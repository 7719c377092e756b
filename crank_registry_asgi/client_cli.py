"""The operator's commands: workers, worker, capabilities, route, health, drain, undrain, watch.

Each asks a running controller through
:class:`crank_worker_client.ControllerClient` (no HTTP of its own) and prints
a table for people or, with ``--json``, the controller's answer for
scripts: ``route`` and ``health`` print the answer as the controller sent
it; the listings print one document with every entry of every page
(``{"workers": [...]}``, ``{"capabilities": [...]}``), each entry in the
controller's own shape.

Where the controller is and how to trust it, flag first, then environment:

==================  ======================  ==========================
flag                environment             default
==================  ======================  ==========================
``--controller``    ``CONTROLLER_URL``      ``https://localhost:9000``
``--cert``          ``CRANK_CLIENT_CERT``   none (no client certificate)
``--key``           ``CRANK_CLIENT_KEY``    none (the key is in ``--cert``)
``--ca-certs``      ``CA_CERT_PATH``        the system's trust store
``--insecure``                              off: ``http://`` URLs refused
==================  ======================  ==========================

Exit status: 0 on an answer; 1 when the controller cannot be asked (down,
a certificate file that cannot be read, a TLS failure) or answers with an
error (4xx, 5xx), with one line on stderr naming the URL or the file; 2 for
a usage error.

``watch`` runs until interrupted: it prints each change of the registry as
it comes (the long poll ``GET /watch``), from the current revision or
``--since``. It rides out what a follower meets: a controller that is down
or answers 5xx is asked again with backoff (a line on stderr each time),
and changes that left the controller's window (410) are reported on stderr
as missed before it goes on from the revision of a fresh ``/snapshot``.
Ctrl-C ends it with status 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeAlias

import anyio
import httpx

from crank_registry import (
    ROUTE_STRATEGIES,
    DrainAnswer,
    HealthAnswer,
    RouteExplanation,
    WorkerEntry,
    capability_label,
    iso_utc,
    unstructure,
)
from crank_worker_client import (
    DEFAULT_CONTROLLER_URL,
    ClientError,
    ConfigurationError,
    ControllerClient,
    ControllerError,
    ControllerUnavailable,
    NoWorkerAvailable,
    PolicyDenied,
    TLSConfig,
    WorkerInfo,
    registration_backoff,
)

from .cli import Subcommands, UsageError
from .config import is_positive_number

__all__ = [
    "COMMANDS",
    "WATCH_POLL_SECONDS",
    "CannotAsk",
    "add_client_commands",
    "change_line",
    "explain_table",
    "follow",
    "format_age",
    "table",
]

#: What a command prints: the JSON document (``--json``) and the table.
Output: TypeAlias = tuple[Any, str]
Ask: TypeAlias = Callable[[ControllerClient, argparse.Namespace], Awaitable[Output]]


# ----------------------------------------------------------------- the commands


async def ask_workers(client: ControllerClient, args: argparse.Namespace) -> Output:
    """``workers``: every registered worker, its state, the age of its last heartbeat, its load."""
    workers = await client.workers()
    document = {"workers": [unstructure(_entry(worker)) for worker in workers]}
    return document, workers_table(workers, now=time.time())


async def ask_worker(client: ControllerClient, args: argparse.Namespace) -> Output:
    """``worker WORKER_ID``: one worker, as ``workers`` shows it (``--json``: its entry)."""
    worker = await client.get_worker(args.worker_id)
    return unstructure(_entry(worker)), workers_table([worker], now=time.time())


def workers_table(workers: Sequence[WorkerInfo], *, now: float) -> str:
    """The ``workers`` table at ``now``; a load value the worker did not report is ``-``."""
    rows = []
    for worker in workers:
        load = worker.load
        rows.append(
            (
                worker.worker_id,
                worker.worker_url,
                _state(worker, now),
                format_age(now - worker.last_heartbeat.timestamp()),
                _shown(None if load is None else load.in_flight, "{}"),
                _shown(None if load is None else load.latency_p95_ms, "{:g} ms"),
                _shown(None if load is None else load.error_rate, "{:.1%}"),
                ", ".join(capability_label(key) for key in worker.capabilities),
            )
        )
    headers = (
        "WORKER ID",
        "URL",
        "STATE",
        "LAST HEARTBEAT",
        "IN FLIGHT",
        "P95",
        "ERRORS",
        "CAPABILITIES",
    )
    return table(headers, rows)


def _state(worker: WorkerInfo, now: float) -> str:
    """The ``STATE`` cell: an ejected worker's says for how long still (``ejected 25s``)."""
    until = worker.ejected_until
    if until is None:
        return worker.state.value
    return f"{worker.state.value} {format_age(until.timestamp() - now)}"


def _shown(value: float | None, form: str) -> str:
    """A load value in ``form``, or ``-`` when it was not reported."""
    return "-" if value is None else form.format(value)


async def ask_capabilities(client: ControllerClient, args: argparse.Namespace) -> Output:
    """``capabilities``: one line per ``(verb, capability, version)``, healthy/total workers."""
    views = await client.capabilities()
    rows = [
        (
            view.verb,
            view.capability,
            view.version,
            f"{len(view.healthy_workers)}/{len(view.workers)}",
        )
        for view in views
    ]
    headers = ("VERB", "CAPABILITY", "VERSION", "HEALTHY/TOTAL")
    return {"capabilities": unstructure(views)}, table(headers, rows)


async def ask_route(client: ControllerClient, args: argparse.Namespace) -> Output:
    """``route VERB CAPABILITY``: the worker the controller hands the next call to.

    The routing options come from the flags; with ``--explain`` the table is
    followed by the explanation (also printed, before the error line, when no
    worker is left).
    """
    if (args.strategy == "affinity") != (args.affinity_key is not None):
        raise UsageError("--strategy affinity and --affinity-key go together: give both or neither")
    try:
        endpoint = await client.route(
            args.verb,
            args.capability,
            version=args.version,
            exclude=args.exclude,
            budget_tokens=args.budget,
            strategy=args.strategy,
            affinity_key=args.affinity_key,
            idempotency_key=args.idempotency_key,
            requester_identity=args.requester_identity,
            explain=args.explain,
        )
    except (NoWorkerAvailable, PolicyDenied) as error:
        if error.explain is not None:
            explained = {"explain": unstructure(error.explain)}
            shown = explain_table(error.explain, chosen=None)
            print(json.dumps(explained, indent=2) if args.json else shown)
        raise
    rows = [(endpoint.worker_id, endpoint.worker_url, endpoint.version)]
    text = table(("WORKER ID", "URL", "VERSION"), rows)
    if endpoint.explain is not None:
        text += "\n\n" + explain_table(endpoint.explain, chosen=endpoint.worker_id)
    return unstructure(endpoint), text


def explain_table(explanation: RouteExplanation, *, chosen: str | None) -> str:
    """An explanation for people: the strategy, then each worker and what became of it."""
    rows = [
        (worker_id, "chosen" if worker_id == chosen else "candidate")
        for worker_id in explanation.candidates
    ]
    rows += [(entry.worker_id, f"removed: {entry.reason}") for entry in explanation.removed]
    return f"strategy: {explanation.strategy}\n" + table(("WORKER ID", "OUTCOME"), rows)


async def ask_health(client: ControllerClient, args: argparse.Namespace) -> Output:
    """``health``: the controller's status and worker counts."""
    health = await client.health()
    answer = HealthAnswer(
        total_workers=health.total_workers,
        healthy_workers=health.healthy_workers,
        self_preservation=health.self_preservation,
    )
    rows = [
        (
            health.status,
            str(health.total_workers),
            str(health.healthy_workers),
            "on" if health.self_preservation else "off",
        )
    ]
    return unstructure(answer), table(("STATUS", "WORKERS", "HEALTHY", "SELF-PRESERVATION"), rows)


async def ask_drain(client: ControllerClient, args: argparse.Namespace) -> Output:
    """``drain WORKER_ID``: the controller routes no new calls to the worker."""
    return _drained(await client.drain(args.worker_id))


async def ask_undrain(client: ControllerClient, args: argparse.Namespace) -> Output:
    """``undrain WORKER_ID``: the worker takes routes again as its health allows."""
    return _drained(await client.undrain(args.worker_id))


def _drained(answer: DrainAnswer) -> Output:
    state = "draining" if answer.draining else "not draining"
    change = "" if answer.changed else " (already)"
    rows = [(answer.worker_id, state + change)]
    return unstructure(answer), table(("WORKER ID", "DRAIN"), rows)


#: name -> (help, description, what it asks)
COMMANDS: dict[str, tuple[str, str, Ask]] = {
    "workers": (
        "list the registered workers",
        "List every registered worker: id, URL, state, age of its last heartbeat, "
        "capabilities. Follows the controller's pages to the end.",
        ask_workers,
    ),
    "worker": (
        "show one worker",
        "Show WORKER_ID as workers lists it (GET /workers/WORKER_ID); --json prints "
        "its entry. A worker the controller does not hold is 404 "
        "worker_not_registered: exit 1.",
        ask_worker,
    ),
    "capabilities": (
        "list the capabilities and their healthy/total workers",
        "List every (verb, capability, version) with its healthy and total workers. "
        "Follows the controller's pages to the end.",
        ask_capabilities,
    ),
    "route": (
        "ask which worker serves VERB on CAPABILITY",
        "Ask the controller which worker gets the next call of VERB on CAPABILITY "
        "(POST /route), under the routing options the flags give. A capability that "
        "no registered worker offers is an error (404 unknown_capability), and so is "
        "one whose workers are all unhealthy or none meets the options "
        "(503 no_worker_available), and one the access policy denies "
        "(403 policy_denied): all exit 1. --explain shows why each worker was "
        "or was not a candidate.",
        ask_route,
    ),
    "health": (
        "show the controller's status and worker counts",
        "Show the controller's status, its total and healthy worker counts, and whether it "
        "is in self-preservation (GET /health).",
        ask_health,
    ),
    "drain": (
        "drain a worker: no new calls are routed to it",
        "Drain WORKER_ID (POST /workers/WORKER_ID/drain): the controller routes no new "
        "calls to it, and it keeps its registration while its calls finish; undrain, or "
        "the worker registering again, ends it. Allowed to the worker's own certificate "
        "and to identities the controller names with --operator (403 forbidden "
        "otherwise); an unknown worker is 404 worker_not_registered. Both exit 1.",
        ask_drain,
    ),
    "undrain": (
        "undrain a worker: it takes routes again",
        "Undrain WORKER_ID (POST /workers/WORKER_ID/undrain): it takes routes again as "
        "its health allows. Allowed as drain is.",
        ask_undrain,
    ),
}


# ------------------------------------------------------------------ watch

#: How long each long poll of ``watch`` waits for a change (the controller allows 60 s).
WATCH_POLL_SECONDS = 30.0
# Backoff after a failed request: full jitter up to 0.5 s, doubling, at most 10 s.
_RETRY_BASE_SECONDS = 0.5
_RETRY_CAP_SECONDS = 10.0


async def follow(
    client: ControllerClient,
    *,
    since: int | None,
    as_json: bool,
    out: TextIO,
    err: TextIO,
    rng: random.Random | None = None,
) -> None:
    """Print every change from revision ``since`` (``None``: the current one) until cancelled.

    One line per change: :func:`change_line`, or with ``as_json`` the
    event's JSON. A network error or 5xx is retried with backoff; a 410
    (the changes after the revision held are gone) reloads the revision
    from ``/snapshot`` and says on ``err`` that changes were missed. Any
    other error answer is raised (:class:`~crank_worker_client.ControllerError`).
    """
    rng = rng or random.Random()
    epoch: str | None = None
    failures = 0

    def answered() -> None:
        # Said once an answer came, so the backoff grows while tries fail.
        nonlocal failures
        if failures:
            _say(err, f"{client.controller_url}: answering again")
            failures = 0

    while True:
        try:
            if since is None:
                snapshot = await client.snapshot()
                epoch, since = snapshot.epoch, snapshot.revision
                answered()
            answer = await client.watch(since=since, epoch=epoch, timeout=WATCH_POLL_SECONDS)
            answered()
        except ControllerUnavailable as error:
            failures += 1
            delay = registration_backoff(
                failures, rng, base=_RETRY_BASE_SECONDS, cap=_RETRY_CAP_SECONDS
            )
            _say(err, f"{_one_line(error, client.controller_url)}; retrying in {delay:.1f} s")
            await anyio.sleep(delay)
            continue
        except ControllerError as error:
            if error.status != 410:
                raise
            _say(
                err,
                f"changes after revision {since} were missed ({error.code}): "
                "following on from the revision of a fresh /snapshot",
            )
            since = None
            continue
        epoch = answer.epoch
        for event in answer.events:
            line = json.dumps(event, separators=(",", ":")) if as_json else change_line(event)
            print(line, file=out, flush=True)
        since = answer.events[-1]["revision"] if answer.events else answer.revision


def change_line(event: dict[str, Any]) -> str:
    """One change for people: revision, type, worker id, time (UTC), two spaces apart."""
    at = event.get("at")
    return "  ".join(
        (
            str(event.get("revision", "-")),
            str(event.get("type", "-")),
            str(event.get("worker_id", "-")),
            iso_utc(at) if isinstance(at, (int, float)) else "-",
        )
    )


def _say(err: TextIO, message: str) -> None:
    print(f"crank-registry watch: {message}", file=err, flush=True)


def _run_watch(args: argparse.Namespace) -> int:
    url = args.controller or os.environ.get("CONTROLLER_URL") or DEFAULT_CONTROLLER_URL
    try:
        client = _client(url, args)
        anyio.run(_watching, client, args)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader went away (watch | head): the end, not an error. Python
        # flushes stdout once more at exit; point it at nothing first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ClientError, CannotAsk) as error:
        message = _one_line(error, url)
        if _maybe_refused_for_no_certificate(error, args):
            message += (
                "; if the controller requires client certificates (mTLS), "
                "pass --cert and --key (or CRANK_CLIENT_CERT, CRANK_CLIENT_KEY)"
            )
        _say(sys.stderr, f"error: {message}")
        return 1
    return 0


async def _watching(client: ControllerClient, args: argparse.Namespace) -> None:
    async with client:
        await follow(client, since=args.since, as_json=args.json, out=sys.stdout, err=sys.stderr)


def _revision(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"must be a revision, an integer >= 0, got {text!r}")
    return int(text)


# ------------------------------------------------------------------- the parser


def add_client_commands(subcommands: Subcommands) -> None:
    """Declare the operator's commands (``workers`` ... ``watch``) and their flags."""
    for name, (summary, description, ask) in COMMANDS.items():
        parser = subcommands.add_parser(
            name, help=summary, description=description, parents=[_connection_flags()]
        )
        if name == "route":
            _route_flags(parser)
        elif name in ("worker", "drain", "undrain"):
            parser.add_argument("worker_id", metavar="WORKER_ID", help="the worker's id")
        parser.set_defaults(handler=_runner(name, ask))
    parser = subcommands.add_parser(
        "watch",
        help="print the registry's changes as they come",
        description="Print each change of the registry as it comes, one line each "
        "(revision, type, worker id, time), from the current revision or --since, "
        "until Ctrl-C. Follows the long poll GET /watch; a controller that is down "
        "is asked again with backoff; changes that left the controller's window are "
        "reported as missed on stderr, and watching goes on from a fresh /snapshot.",
        parents=[_connection_flags()],
    )
    parser.add_argument(
        "--since",
        type=_revision,
        metavar="REVISION",
        help="print the changes after REVISION first (default: only changes from now on)",
    )
    parser.set_defaults(handler=_run_watch)


def _route_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("verb", metavar="VERB", help="the verb, e.g. classify")
    parser.add_argument(
        "capability", metavar="CAPABILITY", help="the capability, e.g. image.classify"
    )
    parser.add_argument(
        "--version",
        metavar="SPEC",
        help="only workers whose version is in this PEP 440 specifier set, e.g. '>=1.2,<2'",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        metavar="WORKER_ID",
        help="a worker not to return (repeat for more)",
    )
    parser.add_argument(
        "--budget",
        type=_tokens,
        metavar="TOKENS",
        help="only workers costing at most TOKENS per call; the cheapest wins",
    )
    parser.add_argument(
        "--strategy",
        choices=ROUTE_STRATEGIES,
        help="how to choose among the candidates (default round_robin; least_loaded: the "
        "less loaded of two; affinity needs --affinity-key)",
    )
    parser.add_argument(
        "--affinity-key",
        metavar="KEY",
        help="with --strategy affinity: the same KEY goes to the same worker",
    )
    parser.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="the same KEY gets the same worker while it stays a candidate",
    )
    parser.add_argument(
        "--requester-identity",
        metavar="SPIFFE_ID",
        help="route for this identity (the access policy decides for it); only a "
        "certificate the controller names with --trusted-gateway may",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="also show why each worker was or was not a candidate",
    )


def _tokens(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of tokens >= 0, got {text!r}")
    return value


def _connection_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument(
        "--controller",
        metavar="URL",
        help="the controller's URL, or several controllers' separated by commas "
        f"(env CONTROLLER_URL; {DEFAULT_CONTROLLER_URL})",
    )
    flags.add_argument(
        "--cert",
        type=Path,
        metavar="FILE",
        help="client certificate, PEM, for a controller that requires one (env CRANK_CLIENT_CERT)",
    )
    flags.add_argument(
        "--key",
        type=Path,
        metavar="FILE",
        help="its private key, PEM, unless it is in --cert (env CRANK_CLIENT_KEY)",
    )
    flags.add_argument(
        "--ca-certs",
        type=Path,
        metavar="FILE",
        help="CA certificates, PEM, that signed the controller's (env CA_CERT_PATH; "
        "default: the system's trust store)",
    )
    flags.add_argument(
        "--insecure",
        action="store_true",
        help="talk to a plain-HTTP controller (an http:// URL); nothing is encrypted",
    )
    flags.add_argument(
        "--json", action="store_true", help="print the controller's answer as JSON, for scripts"
    )
    flags.add_argument(
        "--timeout",
        type=_timeout,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for each answer (10)",
    )
    return flags


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not is_positive_number(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


# ------------------------------------------------------------------ running one


class CannotAsk(Exception):
    """The controller cannot be asked: a certificate file is missing or unusable (exit 1)."""


def _runner(name: str, ask: Ask) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        url = args.controller or os.environ.get("CONTROLLER_URL") or DEFAULT_CONTROLLER_URL
        try:
            client = _client(url, args)
            document, text = anyio.run(_asking, client, ask, args)
        except (ClientError, CannotAsk) as error:
            message = _one_line(error, url)
            if _maybe_refused_for_no_certificate(error, args):
                message += (
                    "; if the controller requires client certificates (mTLS), "
                    "pass --cert and --key (or CRANK_CLIENT_CERT, CRANK_CLIENT_KEY)"
                )
            print(f"crank-registry {name}: error: {message}", file=sys.stderr)
            return 1
        print(json.dumps(document, indent=2) if args.json else text)
        return 0

    return run


async def _asking(client: ControllerClient, ask: Ask, args: argparse.Namespace) -> Output:
    async with client:
        return await ask(client, args)


def _one_line(error: Exception, url: str) -> str:
    """The error in one line, naming the controller's URL unless it names a file."""
    message = " ".join(str(error).split())
    if isinstance(error, CannotAsk) or url.rstrip("/") in message:
        return message
    return f"{url}: {message}"


def _maybe_refused_for_no_certificate(error: Exception, args: argparse.Namespace) -> bool:
    """A connection closed without an answer while no client certificate was presented.

    Under TLS 1.3 a server that requires a client certificate ends the
    connection after the handshake, so the client sees only a closed
    connection: the likely cause is worth a hint.
    """
    cause = error.__cause__
    closed = isinstance(cause, (httpx.RemoteProtocolError, httpx.ReadError)) or (
        "certificate required" in str(error).lower().replace("_", " ")
    )
    presented = args.cert is not None or bool(os.environ.get("CRANK_CLIENT_CERT"))
    return isinstance(error, ControllerUnavailable) and closed and not presented


def _client(url: str, args: argparse.Namespace) -> ControllerClient:
    """The client that the flags and the environment describe.

    Raises :class:`UsageError` for flags that do not go together and
    :class:`CannotAsk` for certificate files that cannot be used.
    """
    given = {"--cert": args.cert, "--key": args.key, "--ca-certs": args.ca_certs}
    plain = url.lower().startswith("http://")
    if plain and not args.insecure:
        raise UsageError(
            f"the controller URL {url} is plain HTTP: pass --insecure to use it, or use https://"
        )
    if args.insecure and not plain:
        raise UsageError(f"--insecure is for a plain-HTTP (http://) controller, not {url}")
    tls: ssl.SSLContext | None = None
    if plain:
        # The environment's CRANK_CLIENT_CERT, CRANK_CLIENT_KEY and CA_CERT_PATH
        # are for HTTPS and are not used; flags given for it are a mistake.
        flags = [flag for flag, value in given.items() if value is not None]
        if flags:
            raise UsageError(
                f"{', '.join(flags)} given, but the controller URL {url} is plain HTTP"
            )
    else:
        tls = _tls_context(given)
    try:
        return ControllerClient(url, tls=tls, insecure=args.insecure, timeout=args.timeout)
    except ConfigurationError as error:  # the URL: certificates were loaded above
        raise UsageError(f"--controller (or CONTROLLER_URL): {error}") from None


_VARIABLES = {
    "--cert": "CRANK_CLIENT_CERT",
    "--key": "CRANK_CLIENT_KEY",
    "--ca-certs": "CA_CERT_PATH",
}
_KINDS = {"--cert": "client certificate", "--key": "client key", "--ca-certs": "CA certificates"}


def _tls_context(given: dict[str, Path | None]) -> ssl.SSLContext | None:
    """The TLS context from the flags, else the environment; ``None``: the system's defaults."""
    paths: dict[str, Path | None] = {}
    sources: list[str] = []
    for flag, value in given.items():
        variable = _VARIABLES[flag]
        from_environment = os.environ.get(variable)
        path = value if value is not None else Path(from_environment) if from_environment else None
        source = flag if value is not None else f"env {variable}"
        if path is not None:
            sources.append(f"{path} ({source})")
            if not path.is_file():
                raise CannotAsk(f"the {_KINDS[flag]} file {path} ({source}) does not exist")
        paths[flag] = path
    if paths["--key"] is not None and paths["--cert"] is None:
        raise UsageError("--key (or CRANK_CLIENT_KEY) needs --cert (or CRANK_CLIENT_CERT) too")
    if not sources:
        return None
    try:
        settings = TLSConfig(paths["--ca-certs"], paths["--cert"], paths["--key"])
        return settings.ssl_context()
    except ConfigurationError as error:
        cause = error.__cause__ or error
        raise CannotAsk(f"cannot use {', '.join(sources)}: {cause}") from None


# -------------------------------------------------------------------- rendering


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """``rows`` under ``headers`` in columns aligned by padding, two spaces apart."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    ]
    return "\n".join(lines)


def format_age(seconds: float) -> str:
    """A duration for people: ``0.4s``, ``12s``, ``3m05s``, ``2h07m``, ``3d04h``.

    A negative age (the controller's clock ahead of this one) shows as ``0.0s``.
    """
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, second = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{second:02d}s"
    hours, minute = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minute:02d}m"
    days, hour = divmod(hours, 24)
    return f"{days}d{hour:02d}h"


def _entry(worker: WorkerInfo) -> WorkerEntry:
    """A worker as the controller's ``/workers`` entry (the ``--json`` shape)."""
    moment = worker.last_heartbeat.astimezone(datetime.UTC)
    return WorkerEntry(
        worker_id=worker.worker_id,
        worker_url=worker.worker_url,
        # The controller's form, from the parsed time (no float round trip).
        last_heartbeat=moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        is_healthy=worker.is_healthy,
        state=worker.state,
        health=worker.health,
        draining=worker.draining,
        capabilities=tuple(capability_label(key) for key in worker.capabilities),
        load=worker.load,
        ejected_until=(
            None
            if worker.ejected_until is None
            else worker.ejected_until.astimezone(datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        ),
    )
