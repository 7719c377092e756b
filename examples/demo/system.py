"""The system the demo runs: certificates, a controller with its gateway, the workers.

:class:`System` makes development certificates, starts the controller
(``python -m crank_registry_asgi serve --gateway``) and the example workers
(``python -m examples.workers.NAME``) as child processes over mutual TLS,
and talks to the controller with the demo's own client certificate.

The heartbeat interval is short (1 s) so that the whole demo takes a few
seconds; a worker stops being routable after 10 s of silence and is
evicted after 20 s.
"""

from __future__ import annotations

import signal
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import httpx

from crank_registry_asgi.certs import write_development_certificates
from examples.workers import WORKER_NAMES

from .processes import DemoFailure, Processes, free_port

__all__ = ["EVICT_AFTER", "HEARTBEAT_INTERVAL", "UNHEALTHY_AFTER", "System"]

HEARTBEAT_INTERVAL = 1.0
# Long enough for the warm cache to outlast a restart: the journal may hold a
# heartbeat up to half of this old (it coalesces them), and the new process
# needs a second or two to start.
UNHEALTHY_AFTER = 10.0
EVICT_AFTER = 20.0
_POLL = 0.02

T = TypeVar("T")


@attrs.define
class System:
    """The controller and the workers as processes, and an HTTPS client for the controller."""

    workdir: Path
    processes: Processes
    port: int = attrs.field(factory=free_port)
    _client: httpx.Client | None = None

    @property
    def certs(self) -> Path:
        """Where the development certificates are."""
        return self.workdir / "certs"

    @property
    def url(self) -> str:
        """The controller's (and gateway's) base URL."""
        return f"https://127.0.0.1:{self.port}"

    # --------------------------------------------------------- processes

    def make_certificates(self) -> None:
        """A CA, the controller's certificate, one per worker and one for the demo itself."""
        write_development_certificates(self.certs, workers=WORKER_NAMES, clients=["demo"])

    def start_controller(self) -> None:
        """The controller with its gateway, over mutual TLS, on ``self.port``."""
        self.processes.spawn("controller", self.serve_command(self.port, "state"))

    def serve_command(self, port: int, state: str, *extra: str) -> list[str]:
        """``crank-registry serve`` with its gateway on ``port``, state in ``workdir/state``."""
        certs = self.certs
        return [
            *(sys.executable, "-m", "crank_registry_asgi", "serve"),
            *("--port", str(port), "--state-dir", str(self.workdir / state)),
            *("--heartbeat-interval", str(HEARTBEAT_INTERVAL)),
            *("--unhealthy-after", str(UNHEALTHY_AFTER), "--evict-after", str(EVICT_AFTER)),
            *("--certfile", str(certs / "controller.pem")),
            *("--keyfile", str(certs / "controller.key")),
            *("--ca-certs", str(certs / "ca.pem")),
            *("--gateway", "--gateway-attempts", "3", "--gateway-timeout", "10"),
            *extra,
        ]

    def serving(self) -> tuple[str, ...]:
        """The controller processes that must be running now (a step fails if one exits)."""
        return ("controller",)

    def describe(self) -> str:
        """Where the controllers are, for the ``--keep-running`` lines."""
        return f"Controller and gateway: {self.url}"

    @property
    def worker_controllers(self) -> str:
        """What the workers are given as ``--controller``."""
        return self.url

    def kill_controller(self) -> None:
        """SIGKILL the controller, as a crash would; its client connections die with it."""
        self.processes.send("controller", signal.SIGKILL)
        if self.processes.wait_exit("controller", 10) is None:
            raise DemoFailure("the controller survived SIGKILL")
        self.close_client()

    def start_worker(self, name: str) -> None:
        """``python -m examples.workers.NAME`` with its own certificate, on a free port."""
        certs = self.certs
        command = [
            *(sys.executable, "-m", f"examples.workers.{name}"),
            *("--controller", self.worker_controllers, "--port", "0"),
            *("--certfile", str(certs / f"worker-{name}.pem")),
            *("--keyfile", str(certs / f"worker-{name}.key")),
            *("--ca-certs", str(certs / "ca.pem")),
        ]
        if name.startswith("zettel_"):
            # The three zettel workers share one notes database.
            command += ["--db", str(self.workdir / "zettel.sqlite3")]
        self.processes.spawn(name, command)

    def stop_everything(self) -> None:
        """Close the client and stop every process."""
        self.close_client()
        self.processes.stop_all()

    # ------------------------------------------------------------ client

    @property
    def client(self) -> httpx.Client:
        """An HTTPS client with the demo's own client certificate."""
        if self._client is None:
            context = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
            context.load_cert_chain(
                str(self.certs / "client-demo.pem"), str(self.certs / "client-demo.key")
            )
            self._client = httpx.Client(base_url=self.url, verify=context, timeout=15.0)
        return self._client

    def close_client(self) -> None:
        """Close the client's connections; the next request opens new ones."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def wait_until(
        self, what: str, timeout: float, check: Callable[[], T | None], *alive: str
    ) -> T:
        """Poll ``check`` until it returns something true; fail after ``timeout``.

        Fails at once when one of the processes named in ``alive`` exits.
        """
        deadline = time.monotonic() + timeout
        last_error = ""
        while True:
            self.processes.check_alive(*alive)
            try:
                result = check()
            except httpx.TransportError as error:
                result, last_error = None, f" ({type(error).__name__})"
            if result:
                return result
            if time.monotonic() > deadline:
                raise DemoFailure(f"timed out after {timeout:g} s waiting for {what}{last_error}")
            time.sleep(_POLL)

    def ready(self) -> bool:
        """Whether the controller answers ``/health``."""
        return self.client.get("/health").status_code == 200

    def workers(self) -> dict[str, dict[str, Any]]:
        """``GET /workers`` by worker id."""
        response = self.client.get("/workers")
        response.raise_for_status()
        return {w["worker_id"]: w for w in response.json()["workers"]}

    def all_registered(self) -> dict[str, dict[str, Any]] | None:
        """``/workers`` once every example worker is registered, else ``None``."""
        workers = self.workers()
        return workers if len(workers) == len(WORKER_NAMES) else None

    def all_healthy(self) -> dict[str, dict[str, Any]] | None:
        """``/workers`` once every example worker is registered and healthy, else ``None``."""
        workers = self.all_registered()
        if workers and all(info["state"] == "healthy" for info in workers.values()):
            return workers
        return None

    def capabilities(self) -> list[tuple[str, str]]:
        """``GET /capabilities``: every ``(verb, capability)`` listed, once, in its order."""
        response = self.client.get("/capabilities")
        response.raise_for_status()
        entries = response.json()["capabilities"]  # one per version
        return list(dict.fromkeys((c["verb"], c["capability"]) for c in entries))

    def route(self, verb: str, capability: str) -> httpx.Response:
        """``POST /route``."""
        return self.client.post("/route", json={"verb": verb, "capability": capability})

    def execute(self, verb: str, capability: str, payload: Any) -> tuple[httpx.Response, float]:
        """``POST /execute``; the response and its latency in milliseconds."""
        started = time.perf_counter()
        response = self.client.post(
            "/execute", json={"verb": verb, "capability": capability, "payload": payload}
        )
        return response, (time.perf_counter() - started) * 1000
