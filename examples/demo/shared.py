"""``python3 dev.py demo --shared``: two controllers on one Redis, and one of them killed.

:class:`SharedSystem` starts a ``redis-server`` of its own (on a free port,
its files in the demo's temporary directory), or uses the one given with
``--redis URL`` under a key prefix of the demo's own (its keys are deleted
at the end), then two controllers with their gateways on it
(``serve --redis``) and the nine example workers, each given both
controllers, controller-a first. :func:`run` takes the steps:

1. :func:`start`: Redis, both controllers, the workers; the workers
   registered through controller-a are known to controller-b as well.
2. :func:`~examples.demo.steps.invoke_everything` through controller-a's
   gateway.
3. :func:`kill_one_controller`: SIGKILL controller-a. controller-b routes
   every capability at once and calls go through its gateway; the agents
   fail over to it within one heartbeat interval, as heartbeats (no worker
   registers again); controller-b takes the sweeper lease over; then
   controller-a starts again and loads the registry from Redis.
4. :func:`~examples.demo.steps.stop_one_worker`: the worker deregisters
   through controller-b, and controller-a sees it leave.
5. The summary table.
"""

from __future__ import annotations

import contextlib
import datetime
import secrets
import shutil
import signal
import time
from typing import Any

import attrs
from prometheus_client.parser import text_string_to_metric_families

from crank_worker_client import MAX_JITTER_FRACTION
from examples.workers import WORKER_NAMES

from .processes import DemoFailure, free_port
from .report import Report, Row
from .steps import REQUEST_SLACK, Capability, invoke_everything, stop_one_worker
from .system import HEARTBEAT_INTERVAL, System

__all__ = ["CONTROLLERS", "LEASE_PERIOD", "SharedSystem", "kill_one_controller", "run", "start"]

#: The two controllers' names (process names, ``--controller-id``).
CONTROLLERS = ("controller-a", "controller-b")
#: ``--redis-lease-period``: controller-b takes the sweep over within this long.
LEASE_PERIOD = 2.0


def _redis_module() -> Any:
    """``redis`` (the service's ``[redis]`` extra; the development environment has it)."""
    try:
        import redis
    except ImportError:
        raise DemoFailure(
            "the shared demo needs the redis package: pip install 'crank-registry-asgi[redis]'"
        ) from None
    return redis


@attrs.define
class SharedSystem(System):
    """Redis, two controllers on it and the workers; the client talks to one controller.

    ``redis_given``: a Redis to use instead of starting one (``--redis``).
    """

    redis_given: str | None = None
    #: The registry's key prefix (``--redis-prefix``): the demo's own.
    prefix: str = attrs.field(factory=lambda: f"crank-demo-{secrets.token_hex(4)}")
    ports: dict[str, int] = attrs.field(factory=lambda: {name: free_port() for name in CONTROLLERS})
    redis_port: int = attrs.field(factory=free_port)
    #: The controllers started and not killed since.
    up: set[str] = attrs.field(factory=set)

    def __attrs_post_init__(self) -> None:
        self.port = self.ports[CONTROLLERS[0]]

    @property
    def redis_url(self) -> str:
        """The Redis both controllers share."""
        return self.redis_given or f"redis://127.0.0.1:{self.redis_port}/0"

    def url_of(self, name: str) -> str:
        """The base URL of controller ``name``."""
        return f"https://127.0.0.1:{self.ports[name]}"

    def talk_to(self, name: str) -> None:
        """Send the demo's requests to controller ``name`` from now on."""
        self.close_client()
        self.port = self.ports[name]

    # --------------------------------------------------------- processes

    def start_redis(self) -> None:
        """Start ``redis-server`` on a free port (or reach the given Redis), and wait for it."""
        redis = _redis_module()
        if self.redis_given is None:
            binary = shutil.which("redis-server")
            if binary is None:
                raise DemoFailure(
                    "redis-server not found: apt-get install redis-server, or give a Redis "
                    "with --redis URL"
                )
            directory = self.workdir / "redis"
            directory.mkdir()
            self.processes.spawn(
                "redis",
                [
                    *(binary, "--port", str(self.redis_port), "--bind", "127.0.0.1"),
                    *("--dir", str(directory), "--save", "", "--appendonly", "no"),
                ],
            )
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)

        def answers() -> bool:
            with contextlib.suppress(redis.RedisError):
                return bool(client.ping())
            return False

        try:
            alive = () if self.redis_given is not None else ("redis",)
            self.wait_until(f"Redis at {self.redis_url}", 10, answers, *alive)
        finally:
            client.close()

    def start_controller(self, name: str = CONTROLLERS[0]) -> None:
        """Controller ``name`` with its gateway, on the shared Redis."""
        self.processes.spawn(
            name,
            self.serve_command(
                self.ports[name],
                f"state-{name}",
                *("--redis", self.redis_url, "--redis-prefix", self.prefix),
                *("--controller-id", name, "--redis-lease-period", str(LEASE_PERIOD)),
            ),
        )
        self.up.add(name)

    def kill_controller(self, name: str = CONTROLLERS[0]) -> None:
        """SIGKILL controller ``name``, as a crash would."""
        self.processes.send(name, signal.SIGKILL)
        if self.processes.wait_exit(name, 10) is None:
            raise DemoFailure(f"{name} survived SIGKILL")
        self.up.discard(name)
        self.close_client()

    def serving(self) -> tuple[str, ...]:
        """Redis (when the demo started it) and the controllers started and not killed."""
        own = () if self.redis_given is not None else ("redis",)
        return (*own, *(name for name in CONTROLLERS if name in self.up))

    @property
    def worker_controllers(self) -> str:
        """Both controllers, controller-a first: an agent moves on when one fails."""
        return ",".join(self.url_of(name) for name in CONTROLLERS)

    def describe(self) -> str:
        """Both controllers and the Redis they share."""
        urls = ", ".join(f"{name} {self.url_of(name)}" for name in CONTROLLERS)
        return f"Controllers and gateways: {urls}; Redis {self.redis_url} (prefix {self.prefix})"

    def stop_everything(self) -> None:
        """Stop every process; on a given Redis, delete the demo's keys."""
        super().stop_everything()
        if self.redis_given is None:
            return  # the demo's own Redis kept nothing on disk, and is gone
        from crank_registry_asgi.redis_store import StoreKeys

        redis = _redis_module()
        client = redis.Redis.from_url(self.redis_given, socket_timeout=2)
        with contextlib.suppress(redis.RedisError):
            client.delete(*StoreKeys(self.prefix).all())
        client.close()

    # ------------------------------------------------------------ client

    def registrations(self) -> float:
        """``crank_registrations_total`` of the controller talked to (the writes it made)."""
        response = self.client.get("/metrics")
        response.raise_for_status()
        for family in text_string_to_metric_families(response.text):
            if family.name == "crank_registrations":
                return sum(s.value for s in family.samples if s.name.endswith("_total"))
        raise DemoFailure("no crank_registrations_total in /metrics")

    def heard_since(self, wall_time: float) -> dict[str, dict[str, Any]] | None:
        """``/workers`` once every worker's last heartbeat is later than ``wall_time``."""
        workers = self.all_registered()
        if not workers:
            return None
        for info in workers.values():
            heard = datetime.datetime.fromisoformat(info["last_heartbeat"]).timestamp()
            if heard <= wall_time:
                return None
        return workers

    def log_says(self, name: str, text: str) -> bool:
        """Whether process ``name``'s log holds ``text``."""
        with contextlib.suppress(OSError):
            return text in self.processes.logs[name].read_text(errors="replace")
        return False


def run(system: SharedSystem, report: Report) -> None:
    """Steps 1 to 5; raises :class:`DemoFailure` at the first that fails."""
    capabilities = start(system, report)
    invoke_everything(system, report, capabilities)
    kill_one_controller(system, report, capabilities)
    stop_one_worker(system, report)
    report.print_summary(len(WORKER_NAMES))


def start(system: SharedSystem, report: Report) -> list[Capability]:
    """Step 1: Redis, both controllers, every worker; the capabilities they registered."""
    first, second = CONTROLLERS
    report.say(f"working in {system.workdir}")
    system.make_certificates()
    report.say(f"made a CA and certificates for the controllers and {len(WORKER_NAMES)} workers")
    system.start_redis()
    if system.redis_given is None:
        report.say(f"redis-server of the demo's own on 127.0.0.1:{system.redis_port}")
    else:
        report.say(f"using the Redis at {system.redis_given}")
    for name in CONTROLLERS:
        system.start_controller(name)
    for name in CONTROLLERS:
        system.talk_to(name)
        system.wait_until(f"{name} to start", 20, system.ready, *system.serving())
    report.say(
        f"{first} at {system.url_of(first)} and {second} at {system.url_of(second)} (each with "
        f"its gateway) share one registry on Redis, key prefix {system.prefix}"
    )

    for name in WORKER_NAMES:
        system.start_worker(name)
    system.talk_to(first)
    registered = system.wait_until(
        f"all {len(WORKER_NAMES)} workers to register",
        40,
        system.all_registered,
        *system.serving(),
        *WORKER_NAMES,
    )
    report.say(f"all {len(registered)} workers registered through {first} (given both, it first)")
    system.talk_to(second)
    replicated = system.wait_until(
        f"{second} to know every worker", 10, system.all_registered, *system.serving()
    )
    report.say(f"{second} knows all {len(replicated)} too: every change reaches it through Redis")
    system.talk_to(first)
    return system.capabilities()


def kill_one_controller(
    system: SharedSystem, report: Report, capabilities: list[Capability]
) -> None:
    """Step 3: SIGKILL controller-a; controller-b routes, the agents fail over, it sweeps."""
    killed, survivor = CONTROLLERS
    system.talk_to(survivor)
    registrations_before = system.registrations()
    # The first to start took the lease; say so only if the log agrees.
    lease_moves = not system.log_says(survivor, "sweeper lease taken")
    report.say(
        f"killing {killed} with SIGKILL: the workers' first controller"
        + (", and the sweeper lease holder" if lease_moves else "")
    )
    killed_at, killed_wall = time.monotonic(), time.time()
    system.kill_controller(killed)
    system.talk_to(survivor)

    for verb, capability in capabilities:
        response = system.route(verb, capability)
        if response.status_code != 200:
            raise DemoFailure(
                f"right after the kill, /route {verb}:{capability} on {survivor} answered "
                f"{response.status_code}: its replica should route it"
            )
    report.say(
        f"routing goes on through {survivor}: all {len(capabilities)} capabilities routed "
        "right after the kill"
    )
    response, latency = system.execute("greet", "hello", {"name": "again"})
    if response.status_code != 200:
        raise DemoFailure(f"/execute on {survivor} answered {response.status_code}")
    report.rows.append(
        Row(
            f"greet:hello (via {survivor})",
            response.headers.get("x-crank-worker-id", "?"),
            response.json()["result"]["greeting"],
            latency,
        )
    )

    system.wait_until(
        f"every agent to heartbeat {survivor}",
        10,
        lambda: system.heard_since(killed_wall),
        *system.serving(),
    )
    took = time.monotonic() - killed_at
    bound = HEARTBEAT_INTERVAL * (1 + MAX_JITTER_FRACTION)
    again = system.registrations() - registrations_before
    report.say(
        f"all {len(WORKER_NAMES)} agents failed over to {survivor} {took:.2f} s after the kill "
        f"(heartbeat interval {HEARTBEAT_INTERVAL:g} s + {MAX_JITTER_FRACTION:.0%} jitter = "
        f"{bound:.2f} s), as heartbeats: {again:g} registered again"
    )
    if took > bound + REQUEST_SLACK:
        raise DemoFailure(
            f"the failover took {took:.2f} s, more than one heartbeat interval plus jitter "
            f"({bound:.2f} s) and {REQUEST_SLACK:g} s for the requests"
        )
    if again:
        raise DemoFailure(
            f"{again:g} workers registered again on {survivor}: it knew them all, a failover "
            "is a heartbeat"
        )
    report.notes.append(f"agents failed over to {survivor}: {took:.2f} s after the kill")

    system.wait_until(
        f"{survivor} to take the sweeper lease",
        LEASE_PERIOD + 5,
        lambda: system.log_says(survivor, "sweeper lease taken"),
        *system.serving(),
    )
    if lease_moves:
        taken = time.monotonic() - killed_at
        report.say(
            f"{survivor} took the sweeper lease over {taken:.2f} s after the kill (lease period "
            f"{LEASE_PERIOD:g} s): it marks silent workers now"
        )
        report.notes.append(f"{survivor} took the sweeper lease over {taken:.2f} s after the kill")

    system.start_controller(killed)
    system.talk_to(killed)
    system.wait_until(f"{killed} to restart", 20, system.ready, *system.serving())
    known = system.workers()
    if len(known) != len(WORKER_NAMES):
        raise DemoFailure(
            f"{killed} restarted knowing {len(known)} workers, expected all "
            f"{len(WORKER_NAMES)} from Redis"
        )
    routed = system.route("greet", "hello")
    if routed.status_code != 200:
        raise DemoFailure(f"{killed} restarted: /route answered {routed.status_code}")
    report.say(
        f"{killed} restarted: it loaded all {len(known)} workers from Redis and routes at once"
    )
