"""``crank-registry demo``: the whole system at work, in one command.

The demo makes development certificates in a temporary directory, starts
the controller (with the gateway) and the nine example workers from
``examples/workers`` as separate processes talking mutual TLS, and then:

1. waits until all nine have registered;
2. invokes every capability through ``POST /execute`` and checks each answer;
3. kills the controller with SIGKILL and restarts it on the same state
   directory: the journal restores every worker as ``unverified``, routing
   goes on from that warm cache, and the workers re-register within one
   heartbeat interval (plus jitter);
4. stops one worker (SIGTERM) and shows it leave the registry, after which
   its capability has no worker (503);
5. prints a summary table and exits 0 (1 when a check fails).

With ``--keep-running`` everything stays up (the stopped worker is started
again) and the URLs are printed until Ctrl-C. Every child runs in its own
process group and is killed on the way out, whatever the way out is: a
failed step, Ctrl-C, SIGTERM or SIGHUP; on Linux the children also die with
the demo if it is killed outright.

The heartbeat interval is short (1 s) so that the whole demo takes a few
seconds; a worker stops being routable after 10 s of silence and is evicted
after 20 s.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

import attrs

from .cli import UsageError

if TYPE_CHECKING:
    # Imported where used: the command line builds every subcommand's parser,
    # and `serve` should not pay for the demo's imports.
    import httpx

    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["CAPABILITIES", "WORKERS", "DemoFailure", "add_demo_command", "run_demo"]

#: The example workers the demo starts (``python -m examples.workers.NAME``).
WORKERS = (
    "hello_world",
    "streaming",
    "document_conversion",
    "email_classifier",
    "semantic_search",
    "zettel_create",
    "zettel_search",
    "zettel_link",
    "image_classifier",
)
HEARTBEAT_INTERVAL = 1.0
# Long enough for the warm cache to outlast a restart: the journal may hold a
# heartbeat up to half of this old (it coalesces them), and the new process
# needs a second or two to start.
UNHEALTHY_AFTER = 10.0
EVICT_AFTER = 20.0
#: The agents' heartbeat jitter is at most this fraction of the interval.
JITTER = 0.1
#: Allowance for the requests themselves (re-registration, our polling) on a busy machine.
REQUEST_SLACK = 0.5
#: What the workers serve, ``(verb, name)``, in the order the demo calls them.
CAPABILITIES = (
    ("greet", "hello"),
    ("stream", "text"),
    ("convert", "markdown_to_html"),
    ("classify", "email.spam"),
    ("search", "documents"),
    ("create", "zettel.note"),
    ("search", "zettel.notes"),
    ("link", "zettel.links"),
    ("classify", "image.color"),
)
#: The worker stopped in step 4.
LEAVING = "hello_world"
_POLL = 0.02


class DemoFailure(Exception):
    """A step of the demo did not do what it should; the message says what."""


class _Interrupted(BaseException):
    """SIGTERM or SIGHUP: leave like Ctrl-C does."""


def add_demo_command(subcommands: Subcommands) -> argparse.ArgumentParser:
    """Declare ``demo`` and its flags."""
    parser = subcommands.add_parser(
        "demo",
        help="run a controller and nine example workers over mTLS and show them at work",
        description=(
            "Make development certificates in a temporary directory, start the controller "
            "(with its gateway) and the nine example workers as separate processes over "
            "mutual TLS, invoke every capability through POST /execute and check the answers, "
            "kill the controller with SIGKILL and restart it (the warm cache keeps routing, the "
            "workers re-register within a heartbeat interval), stop one worker and watch it "
            "leave, then print a summary. Exit status 0 when every check passed, 1 otherwise. "
            "Every process it starts is stopped on the way out, also on Ctrl-C."
        ),
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave everything running and print the URLs, until Ctrl-C",
    )
    parser.add_argument(
        "--examples",
        type=Path,
        default=None,
        metavar="DIR",
        help="the folder that holds examples/ (default: the source checkout of this package)",
    )
    parser.set_defaults(handler=run_demo)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """``demo``: run it; 0 when every check passed."""
    root = _source_root(args.examples)
    if root is None:
        raise UsageError(
            "the demo runs the workers in examples/workers, which ship with the source "
            "checkout; run it from a clone (or pass --examples DIR)"
        )
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    workdir = Path(tempfile.mkdtemp(prefix="crank-demo-"))
    demo = Demo(root, workdir, sys.stdout)
    try:
        demo.run(keep_running=args.keep_running)
    except DemoFailure as failure:
        demo.say(f"FAILED: {failure}")
        demo.show_logs()
        return 1
    except (KeyboardInterrupt, _Interrupted):
        demo.say("interrupted")
        return 0 if demo.keeping else 130
    finally:
        demo.stop_everything()
        shutil.rmtree(workdir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def _source_root(given: Path | None) -> Path | None:
    candidates = [given] if given is not None else [Path(__file__).resolve().parents[1]]
    for candidate in candidates:
        if (candidate / "examples" / "workers" / "__init__.py").is_file():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _die_with_parent() -> None:
    # Linux only: the child gets SIGKILL when the demo dies, even by SIGKILL.
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@attrs.define
class Row:
    """One line of the summary table."""

    capability: str
    worker: str
    answer: str
    latency_ms: float


@attrs.define
class Demo:
    """The processes, the client and the steps of the demo."""

    root: Path
    workdir: Path
    out: IO[str]
    started: float = attrs.field(factory=time.monotonic)
    processes: dict[str, subprocess.Popen[bytes]] = attrs.field(factory=dict)
    logs: dict[str, Path] = attrs.field(factory=dict)
    rows: list[Row] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)
    keeping: bool = False
    port: int = 0
    _client: httpx.Client | None = None

    # ------------------------------------------------------------ output

    def say(self, message: str) -> None:
        """Print a progress line with the time since the start."""
        print(f"[{time.monotonic() - self.started:5.1f}s] {message}", file=self.out, flush=True)

    def show_logs(self, lines: int = 15) -> None:
        """The last lines of every child's log, to see why a step failed."""
        for name, path in self.logs.items():
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                if tail:
                    print(f"--- {name} ({path.name}) ---", file=self.out)
                    print("\n".join(tail), file=self.out, flush=True)

    # --------------------------------------------------------- processes

    @property
    def certs(self) -> Path:
        """Where the development certificates are."""
        return self.workdir / "certs"

    @property
    def url(self) -> str:
        """The controller's (and gateway's) base URL."""
        return f"https://127.0.0.1:{self.port}"

    def _spawn(self, name: str, command: list[str]) -> None:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        self.logs[name] = log
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.root), *filter(None, [env.get("PYTHONPATH")])]
        )
        env["PYTHONUNBUFFERED"] = "1"
        with log.open("ab") as output:
            self.processes[name] = subprocess.Popen(
                command,
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as one
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )

    def start_controller(self) -> None:
        """The controller with its gateway, over mutual TLS, on ``self.port``."""
        self._spawn(
            "controller",
            [
                sys.executable,
                "-m",
                "crank_registry_asgi",
                "serve",
                "--port",
                str(self.port),
                "--state-dir",
                str(self.workdir / "state"),
                "--heartbeat-interval",
                str(HEARTBEAT_INTERVAL),
                "--unhealthy-after",
                str(UNHEALTHY_AFTER),
                "--evict-after",
                str(EVICT_AFTER),
                "--certfile",
                str(self.certs / "controller.pem"),
                "--keyfile",
                str(self.certs / "controller.key"),
                "--ca-certs",
                str(self.certs / "ca.pem"),
                "--gateway",
                "--gateway-attempts",
                "3",
                "--gateway-timeout",
                "10",
            ],
        )

    def start_worker(self, name: str) -> None:
        """``python -m examples.workers.NAME`` with its own certificate, on a free port."""
        command = [
            sys.executable,
            "-m",
            f"examples.workers.{name}",
            "--controller",
            self.url,
            "--port",
            "0",
            "--certfile",
            str(self.certs / f"worker-{name}.pem"),
            "--keyfile",
            str(self.certs / f"worker-{name}.key"),
            "--ca-certs",
            str(self.certs / "ca.pem"),
        ]
        if name.startswith("zettel_"):
            command += ["--db", str(self.workdir / "zettel.sqlite3")]
        self._spawn(name, command)

    def signal_process(self, name: str, signum: signal.Signals) -> None:
        """Send ``signum`` to the process group of ``name``."""
        process = self.processes[name]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)

    def wait_exit(self, name: str, timeout: float) -> int | None:
        """Wait for ``name`` to exit; its status, or ``None`` if it is still running."""
        try:
            return self.processes[name].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop_everything(self) -> None:
        """SIGTERM every child group, then SIGKILL what is left; close the client."""
        if self._client is not None:
            self._client.close()
            self._client = None
        running = [name for name, p in self.processes.items() if p.poll() is None]
        for name in running:
            self.signal_process(name, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for name in running:
            if self.wait_exit(name, max(0.0, deadline - time.monotonic())) is None:
                self.signal_process(name, signal.SIGKILL)
                self.wait_exit(name, 5.0)
        # A group may outlive its leader (a grandchild); make sure it is gone.
        for name in self.processes:
            self.signal_process(name, signal.SIGKILL)

    def _check_alive(self, *names: str) -> None:
        for name in names:
            status = self.processes[name].poll()
            if status is not None:
                raise DemoFailure(f"{name} exited with status {status}")

    # ------------------------------------------------------------ client

    @property
    def client(self) -> httpx.Client:
        """An HTTPS client with the demo's own client certificate."""
        if self._client is None:
            import httpx

            context = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
            context.load_cert_chain(
                str(self.certs / "client-demo.pem"), str(self.certs / "client-demo.key")
            )
            self._client = httpx.Client(base_url=self.url, verify=context, timeout=15.0)
        return self._client

    def wait_until(self, what: str, timeout: float, check: Callable[[], Any], *alive: str) -> Any:
        """Poll ``check`` until it returns something true; fail after ``timeout``."""
        import httpx

        deadline = time.monotonic() + timeout
        last_error = ""
        while True:
            self._check_alive(*alive)
            try:
                result = check()
            except httpx.TransportError as error:
                result, last_error = None, f" ({type(error).__name__})"
            if result:
                return result
            if time.monotonic() > deadline:
                raise DemoFailure(f"timed out after {timeout:g} s waiting for {what}{last_error}")
            time.sleep(_POLL)

    def workers(self) -> dict[str, dict[str, Any]]:
        """``GET /workers`` by worker id."""
        response = self.client.get("/workers")
        response.raise_for_status()
        return {w["worker_id"]: w for w in response.json()["workers"]}

    def all_healthy(self) -> dict[str, dict[str, Any]] | None:
        """``/workers`` once all nine are registered and healthy, else ``None``."""
        workers = self.workers()
        if len(workers) == len(WORKERS) and all(
            info["state"] == "healthy" for info in workers.values()
        ):
            return workers
        return None

    def ready(self) -> bool:
        """Whether the controller answers ``/health``."""
        return self.client.get("/health").status_code == 200

    def execute(self, verb: str, capability: str, payload: Any) -> tuple[httpx.Response, float]:
        """``POST /execute``; the response and its latency in milliseconds."""
        started = time.perf_counter()
        response = self.client.post(
            "/execute", json={"verb": verb, "capability": capability, "payload": payload}
        )
        return response, (time.perf_counter() - started) * 1000

    # ------------------------------------------------------------- steps

    def run(self, *, keep_running: bool) -> None:
        """Every step in order; raises :class:`DemoFailure` at the first that fails."""
        from .certs import write_development_certificates

        self.say(f"working in {self.workdir}")
        write_development_certificates(self.certs, workers=WORKERS, clients=["demo"])
        self.say(f"made a CA and certificates for the controller and {len(WORKERS)} workers")
        self.port = _free_port()
        self.start_controller()
        self.wait_until("the controller to start", 20, self.ready, "controller")
        self.say(f"controller (with gateway) up at {self.url}, mutual TLS")

        for name in WORKERS:
            self.start_worker(name)
        registered = self.wait_until(
            "all nine workers to register",
            40,
            lambda: len(self.workers()) == len(WORKERS) and self.workers(),
            "controller",
            *WORKERS,
        )
        self.say(f"all {len(registered)} workers registered:")
        for worker in registered.values():
            self.say(
                f"    {worker['worker_id']:<20} {worker['worker_url']:<26} "
                f"{', '.join(worker['capabilities'])}"
            )

        self.invoke_everything()
        self.restart_controller()
        self.stop_one_worker()
        self.print_summary()
        if keep_running:
            self.keep_running()

    def invoke_everything(self) -> None:
        """Step 2: every capability through the gateway, each answer checked."""
        self.say("invoking every capability through POST /execute:")
        for verb, capability, payload, check in _calls(self):
            response, latency = self.execute(verb, capability, payload)
            label = f"{verb}:{capability}"
            if response.status_code != 200:
                raise DemoFailure(f"{label}: {response.status_code} {response.text[:300]}")
            try:
                answer = check(response)
            except (KeyError, IndexError, TypeError, ValueError) as error:
                raise DemoFailure(
                    f"{label}: unexpected answer {response.text[:300]!r} ({error})"
                ) from None
            worker = response.headers.get("x-crank-worker-id", "?")
            self.rows.append(Row(label, worker, answer, latency))
            self.say(f"    {label:<26} -> {worker:<20} {answer}  ({latency:.0f} ms)")

    def restart_controller(self) -> None:
        """Step 3: SIGKILL, restart on the same state directory, warm cache, re-registration."""
        self.say("killing the controller with SIGKILL")
        self.signal_process("controller", signal.SIGKILL)
        if self.wait_exit("controller", 10) is None:
            raise DemoFailure("the controller survived SIGKILL")
        if self._client is not None:
            self._client.close()  # its connections died with the controller
            self._client = None
        self.start_controller()
        self.wait_until("the controller to restart", 20, self.ready, "controller")
        ready_at = time.monotonic()
        first_look = self.workers()
        routes = {}
        for verb, capability in CAPABILITIES:
            response = self.client.post("/route", json={"verb": verb, "capability": capability})
            if response.status_code != 200:
                raise DemoFailure(
                    f"after the restart, /route {verb}:{capability} answered "
                    f"{response.status_code}: the warm cache should route it"
                )
            routes[f"{verb}:{capability}"] = response.json()["worker_id"]
        states = [w["state"] for w in first_look.values()]
        if len(first_look) != len(WORKERS):
            raise DemoFailure(
                f"after the restart the controller knows {len(first_look)} workers, "
                f"expected {len(WORKERS)} from its journal"
            )
        unverified = [w for w, info in first_look.items() if info["state"] == "unverified"]
        self.say(
            f"restarted: the journal restored all {len(first_look)} workers; at first look "
            f"{states.count('unverified')} unverified, {states.count('healthy')} already back"
        )
        self.say(
            f"routing kept working from the warm cache: all {len(routes)} capabilities routed, "
            f"{sum(1 for w in routes.values() if w in unverified)} of them to unverified workers"
        )
        response, latency = self.execute("greet", "hello", {"name": "again"})
        if response.status_code != 200:
            raise DemoFailure(f"/execute after the restart answered {response.status_code}")
        self.rows.append(
            Row(
                "greet:hello (after restart)",
                response.headers.get("x-crank-worker-id", "?"),
                response.json()["result"]["greeting"],
                latency,
            )
        )

        all_back = self.wait_until(
            "every worker to re-register", 10, self.all_healthy, "controller"
        )
        took = time.monotonic() - ready_at
        bound = HEARTBEAT_INTERVAL * (1 + JITTER)
        self.say(
            f"all {len(all_back)} workers re-registered {took:.2f} s after the restart "
            f"(heartbeat interval {HEARTBEAT_INTERVAL:g} s + {JITTER:.0%} jitter = {bound:.2f} s)"
        )
        if took > bound + REQUEST_SLACK:
            raise DemoFailure(
                f"re-registration took {took:.2f} s, more than one heartbeat interval plus "
                f"jitter ({bound:.2f} s) and {REQUEST_SLACK:g} s for the requests"
            )
        self.notes.append(f"re-registration after a controller restart: {took:.2f} s")

    def stop_one_worker(self) -> None:
        """Step 4: SIGTERM one worker; it deregisters and its capability has no worker."""
        self.say(f"stopping {LEAVING} (SIGTERM): it deregisters on the way out")
        stopped_at = time.monotonic()
        self.signal_process(LEAVING, signal.SIGTERM)
        self.wait_until(
            f"{LEAVING} to leave the registry",
            10,
            lambda: LEAVING not in self.workers(),
            "controller",
        )
        left_after = time.monotonic() - stopped_at
        if self.wait_exit(LEAVING, 10) is None:
            raise DemoFailure(f"{LEAVING} did not exit after SIGTERM")
        response, latency = self.execute("greet", "hello", {"name": "nobody"})
        if response.status_code != 503 or response.json().get("error") != "no_worker_available":
            raise DemoFailure(
                f"greet:hello without its worker answered {response.status_code} "
                f"{response.text[:200]}, expected 503 no_worker_available"
            )
        self.say(
            f"{LEAVING} left the registry {left_after:.2f} s after SIGTERM; "
            "greet:hello now answers 503 no_worker_available"
        )
        self.rows.append(Row("greet:hello (worker gone)", "-", "503 no_worker_available", latency))
        self.notes.append(f"{LEAVING} left the registry {left_after:.2f} s after SIGTERM")

    def print_summary(self) -> None:
        """Step 5: the table."""
        headers = ("capability", "worker", "answer", "latency")
        cells = [(r.capability, r.worker, r.answer, f"{r.latency_ms:.0f} ms") for r in self.rows]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        line = "  ".join("-" * w for w in widths)
        print("\nSummary", file=self.out)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), file=self.out)
        print(line, file=self.out)
        for row in cells:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)), file=self.out)
        for note in self.notes:
            print(f"* {note}", file=self.out)
        print(
            f"\nDemo passed: {len(WORKERS)} workers, every capability answered and checked "
            f"({time.monotonic() - self.started:.1f} s).",
            file=self.out,
            flush=True,
        )

    def keep_running(self) -> None:
        """``--keep-running``: bring the stopped worker back, print the URLs, wait for Ctrl-C."""
        self.keeping = True
        self.start_worker(LEAVING)
        self.wait_until(
            f"{LEAVING} to register again",
            30,
            lambda: LEAVING in self.workers(),
            "controller",
            LEAVING,
        )
        certs = self.certs
        print(f"\nEverything is running. Controller and gateway: {self.url}", file=self.out)
        for worker in self.workers().values():
            print(f"  {worker['worker_id']:<20} {worker['worker_url']}", file=self.out)
        print(
            "Try:\n"
            f"  curl --cacert {certs}/ca.pem --cert {certs}/client-demo.pem "
            f"--key {certs}/client-demo.key \\\n"
            "    -H 'content-type: application/json' "
            '-d \'{"verb": "greet", "capability": "hello", "payload": {"name": "you"}}\' \\\n'
            f"    {self.url}/execute\n"
            "Press Ctrl-C to stop everything.",
            file=self.out,
            flush=True,
        )
        while True:
            self._check_alive("controller", *WORKERS)
            time.sleep(0.5)


# ------------------------------------------------------------- the calls


def _blue_png() -> str:
    """An 8 x 8 PNG, three quarters blue, as base64 (standard library only)."""
    width = height = 8
    rows = b"".join(
        b"\x00" + (bytes((20, 40, 200)) if y < 6 else bytes((250, 250, 250))) * width
        for y in range(height)
    )

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return base64.b64encode(png).decode()


def _expect(condition: bool, seen: object) -> None:
    """A check of an answer (not an assert: it must hold under ``python -O`` too)."""
    if not condition:
        raise ValueError(f"got {seen!r}")


def _result(response: httpx.Response) -> Any:
    return response.json()["result"]


def _check_stream(response: httpx.Response) -> str:
    lines = [json.loads(line) for line in response.text.splitlines() if line]
    tokens = [line["token"] for line in lines[:-1]]
    expected = ["Workers", "register", ",", "heartbeat", "and", "serve", "."]
    _expect(tokens == expected, tokens)
    _expect(lines[-1] == {"done": True, "count": len(expected)}, lines[-1])
    return f"{len(lines)} NDJSON lines: {_as_text(tokens)}"


def _as_text(tokens: list[str]) -> str:
    """The streamed tokens read as text: a space before a word, none before punctuation.

    The streaming worker sends words and punctuation marks as separate
    tokens and no whitespace; joined with spaces they would read
    ``serve .``.
    """
    return "".join(
        f" {token}" if index and (token[0].isalnum() or token[0] == "_") else token
        for index, token in enumerate(tokens)
    )


def _check_html(response: httpx.Response) -> str:
    html: str = _result(response)["html"]
    _expect(html == "<h1>Demo</h1>\n<p>Safe <strong>HTML</strong> &lt;script&gt;</p>", html)
    return html.replace("\n", " ")


def _check_spam(response: httpx.Response) -> str:
    result = _result(response)
    _expect(result["label"] == "spam", result)
    return f"spam (p={result['spam_probability']:.3f})"


def _check_search(response: httpx.Response) -> str:
    results = _result(response)["results"]
    _expect(results[0]["id"] == "heartbeats", results)
    return f"1. {results[0]['title']} ({results[0]['score']:.2f})"


def _calls(
    demo: Demo,
) -> Iterator[tuple[str, str, Any, Callable[[httpx.Response], str]]]:
    """The nine calls and their checks, in an order that the zettel steps need."""
    notes: dict[str, int] = {}

    def check_greeting(response: httpx.Response) -> str:
        greeting: str = _result(response)["greeting"]
        _expect(greeting == "Hello, Ada!", greeting)
        return greeting

    def check_created(response: httpx.Response) -> str:
        note = _result(response)
        _expect(note["title"] == "Warm cache" and note["tags"] == ["registry"], note)
        notes["first"] = note["id"]
        return f"note {note['id']} created"

    def check_found(response: httpx.Response) -> str:
        found = [note["id"] for note in _result(response)["notes"]]
        _expect(found == [notes["first"]], found)
        return f"found note {found[0]}"

    def check_linked(response: httpx.Response) -> str:
        result = _result(response)
        expected = [{"source": notes["second"], "target": notes["first"], "relation": "supports"}]
        _expect(result["backlinks"] == expected, result)
        return f"note {notes['second']} -> note {notes['first']} (supports)"

    def check_colour(response: httpx.Response) -> str:
        result = _result(response)
        _expect(result["color"] == "blue" and result["share"] == 0.75, result)
        return f"blue {result['hex']} ({result['share']:.0%} of 8x8)"

    yield "greet", "hello", {"name": "Ada"}, check_greeting
    yield (
        "stream",
        "text",
        {"text": "Workers register, heartbeat and serve.", "delay_ms": 10},
        _check_stream,
    )
    yield (
        "convert",
        "markdown_to_html",
        {"markdown": "# Demo\n\nSafe **HTML** <script>"},
        _check_html,
    )
    yield (
        "classify",
        "email.spam",
        {"subject": "You won!", "body": "Claim your free prize now, click here"},
        _check_spam,
    )
    yield "search", "documents", {"query": "heartbeat health eviction"}, _check_search
    yield (
        "create",
        "zettel.note",
        {
            "title": "Warm cache",
            "body": "Restored workers stay routable until they re-register.",
            "tags": ["registry"],
        },
        check_created,
    )
    # A second note to link from, made outside the table.
    response, _ = demo.execute(
        "create", "zettel.note", {"title": "Heartbeats", "body": "Proof of life."}
    )
    if response.status_code != 200:
        raise DemoFailure(f"create:zettel.note answered {response.status_code}")
    notes["second"] = response.json()["result"]["id"]
    yield "search", "zettel.notes", {"query": "routable"}, check_found
    yield (
        "link",
        "zettel.links",
        {"source": notes["second"], "target": notes["first"], "relation": "supports"},
        check_linked,
    )
    yield "classify", "image.color", {"png_base64": _blue_png()}, check_colour
