"""The service's Prometheus metrics: ``GET /metrics``.

Each app has its own :class:`prometheus_client.CollectorRegistry` (two apps
in one process do not share figures), held by its :class:`Metrics`
(``app.state.metrics_registry``). Another collector joins the exposition in
one line::

    app.state.metrics_registry.register(MyCollector())

What is counted, and where:

* events (:mod:`~crank_registry_asgi.effects` feeds the counters):
  ``crank_registrations_total{replaced}``, ``crank_deregistrations_total``,
  ``crank_heartbeats_total``, ``crank_evictions_total``,
  ``crank_unhealthy_transitions_total``, ``crank_routes_total{outcome}``,
  ``crank_self_preservation_changes_total{active}``,
  ``crank_self_preservation_reinstated_total`` (workers an entry put back in routing),
  ``crank_drain_changes_total{draining}``,
  ``crank_ejections_total`` (workers ejected for failing calls, by this controller or another);
* admission: ``crank_rate_limited_total{path}``, requests refused 429
  ``rate_limited`` (``--rate-limit``) on ``/route`` and ``/execute``;
* the registry's state, read at scrape time by :class:`RegistryCollector`:
  ``crank_workers{state}`` (the listed state: ``ejected`` before the health
  state), ``crank_ejected_workers`` (ejected now), ``crank_capabilities``,
  ``crank_self_preservation`` (1 while the controller is in self-preservation);
* requests (:class:`RequestDurationMiddleware`):
  ``crank_http_request_duration_seconds{method, path, status}``, ``path``
  being the route's template, never the raw path;
* the change feed: ``crank_feed_watchers{form}``, the ``GET /watch``
  requests open now, ``long_poll`` (waiting for a change) and ``stream``
  (Server-Sent Events);
* the journal (:class:`~crank_registry_asgi.journal.Journal` reports to
  :class:`Metrics`): ``crank_journal_append_duration_seconds``,
  ``crank_journal_fsync_duration_seconds``;
* the shared registry on Redis only
  (:class:`~crank_registry_asgi.redis_store.RedisStore` reports to
  :class:`Metrics`): ``crank_replication_lag_seconds``, from a stream
  entry's time in Redis to its application on this controller;
* ``crank_build_info{version}`` and the ``process_*`` and ``python_*``
  figures of ``prometheus_client``'s own collectors.

Beside them, :attr:`Metrics.recent_heartbeats` (a :class:`SlidingCount`)
counts the heartbeats of the last minute for ``GET /health`` and the
dashboard: a rate people read without a Prometheus server.

With ``serve --processes N`` each process counts what it handles, and
``GET /metrics`` on any of them must give the figures of all
(:class:`Metrics` with ``multiprocess_directory``, prometheus_client's
multiprocess mode). Every process writes its counters and histograms to its
own file in that directory, and the exposition adds up the files
(:class:`~prometheus_client.multiprocess.MultiProcessCollector`): a route
counted by one process is in the total whichever process is scraped, and a
process that died still counts. Each rule, by kind of figure:

* counters and histograms (what a process did): summed over the processes;
* the registry's gauges (``crank_workers``, ``crank_capabilities``,
  ``crank_self_preservation``): every process holds the same replica, so
  the scraped process reads its own, as with one process (summed, they
  would be N times the fleet);
* a gauge of what each process holds for itself (its own connections,
  say) is to be a :class:`~prometheus_client.Gauge` with
  ``multiprocess_mode="livesum"``: summed over the living processes (a
  scrape-time collector would give the scraped process's alone);
* ``crank_build_info`` and ``python_info``: the same in every process, said once;
* the ``process_*`` figures of one process (CPU, memory, descriptors) are
  left out: no process can say them for the others; a node exporter can.

OpenTelemetry stays the service's tracing API; its metrics API is not used
(one metric system: this one).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crank_registry import CapabilityRegistry, WorkerState

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS",
    "KNOWN_METHODS",
    "LAG_BUCKETS",
    "RATE_LIMITED_PATHS",
    "ROUTE_OUTCOMES",
    "UNMATCHED_PATH",
    "Metrics",
    "RegistryCollector",
    "RequestDurationMiddleware",
    "SlidingCount",
    "metrics_response",
]

#: The media type of the Prometheus text exposition format (version 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Histogram buckets in seconds: a route takes tens of microseconds, an
#: fsync a millisecond or more on a disk, a slow one seconds.
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

#: Replication lag buckets in seconds: milliseconds on one host, up to the
#: minutes a controller may take to catch up after an outage of Redis.
LAG_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)

#: The ``outcome`` label values of ``crank_routes_total``.
ROUTE_OUTCOMES = ("routed", "no_worker", "unknown_capability")

#: The ``path`` label values of ``crank_rate_limited_total``: the rate-limited paths.
RATE_LIMITED_PATHS = ("/route", "/execute")

#: The ``method`` label values; any other method is counted as ``OTHER``.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

#: The ``path`` label of a request that matched no route (the raw path would
#: let any client add series).
UNMATCHED_PATH = "unmatched"


def _version() -> str:
    try:
        return importlib.metadata.version("crank-registry-asgi")
    except importlib.metadata.PackageNotFoundError:
        # Run from a source tree that was not installed.
        return "unknown"


class Metrics:
    """The service's metrics on a registry of their own.

    :attr:`registry` is what ``GET /metrics`` shows: ``registry`` if given,
    else a new :class:`~prometheus_client.CollectorRegistry` with the
    process and platform collectors; ``crank_build_info`` joins it.

    ``multiprocess_directory``: this process is one of several whose figures
    add up there (see the module's docstring; prometheus_client must be in
    multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` names the directory, set
    before the process started, else :class:`ValueError`). The counters and
    histograms then write to their files, and :attr:`registry` reads the
    files of every process in their place.

    ``replication``: the registry is shared on Redis, and
    :attr:`replication_lag` is exposed (else it is ``None``).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        multiprocess_directory: Path | None = None,
        replication: bool = False,
    ) -> None:
        if multiprocess_directory is None:
            if registry is None:
                registry = CollectorRegistry()
                ProcessCollector(registry=registry)
                PlatformCollector(registry=registry)
            # The counters are exposed from where they count.
            counted = registry
        else:
            _check_multiprocess_mode(multiprocess_directory)
            if registry is None:
                registry = CollectorRegistry()
                PlatformCollector(registry=registry)
            MultiProcessCollector(registry, path=str(multiprocess_directory))  # type: ignore[no-untyped-call]
            # The counters' values are in their files (the collector above
            # reads them all); this registry only keeps their names unique.
            counted = CollectorRegistry()
        self.registry = registry
        registry.register(_BuildInfo())
        self.registrations = Counter(
            "crank_registrations",
            "Worker registrations accepted (replaced: the worker id was registered already)",
            ["replaced"],
            registry=counted,
        )
        self.deregistrations = Counter(
            "crank_deregistrations", "Workers that deregistered", registry=counted
        )
        self.drain_changes = Counter(
            "crank_drain_changes",
            "Workers drained (draining=true) and undrained (draining=false)",
            ["draining"],
            registry=counted,
        )
        self.heartbeats = Counter("crank_heartbeats", "Heartbeats accepted", registry=counted)
        #: The heartbeats accepted in the last minute (``GET /health``).
        self.recent_heartbeats = SlidingCount(window_s=60.0)
        self.evictions = Counter("crank_evictions", "Workers evicted for silence", registry=counted)
        self.unhealthy_transitions = Counter(
            "crank_unhealthy_transitions",
            "Workers that fell silent and stopped being routable",
            registry=counted,
        )
        self.ejections = Counter(
            "crank_ejections",
            "Workers ejected for failing calls (outlier ejection), by any controller",
            registry=registry,
        )
        self.routes = Counter(
            "crank_routes", "Route requests by outcome", ["outcome"], registry=counted
        )
        self.rate_limits = Counter(
            "crank_rate_limited",
            "Requests refused 429 rate_limited: the caller was over --rate-limit",
            ["path"],
            registry=counted,
        )
        changes = Counter(
            "crank_self_preservation_changes",
            "Self-preservation entered (active=true) and ended (active=false)",
            ["active"],
            registry=counted,
        )
        #: ``crank_feed_watchers{form}``: what this process holds, so summed over
        #: the living processes (module docstring).
        self.feed_watchers = Gauge(
            "crank_feed_watchers",
            "GET /watch requests open now: long polls waiting for a change, event streams",
            ["form"],
            multiprocess_mode="livesum",
            registry=counted,
        )
        self.reinstated = Counter(
            "crank_self_preservation_reinstated",
            "Workers put back in routing as self-preservation began: its sweep had made them "
            "unhealthy for silences just before",
            registry=counted,
        )
        self.request_duration = Histogram(
            "crank_http_request_duration_seconds",
            "HTTP request duration, from the request to the end of the answer",
            ["method", "path", "status"],
            buckets=DURATION_BUCKETS,
            registry=counted,
        )
        self.journal_append = Histogram(
            "crank_journal_append_duration_seconds",
            "Journal appends: from the call until the lines are written (and fsynced if durable)",
            buckets=DURATION_BUCKETS,
            registry=counted,
        )
        self.journal_fsync = Histogram(
            "crank_journal_fsync_duration_seconds",
            "fsync of a batch of journal lines",
            buckets=DURATION_BUCKETS,
            registry=counted,
        )
        #: ``crank_replication_lag_seconds`` (a shared registry only).
        self.replication_lag = (
            Histogram(
                "crank_replication_lag_seconds",
                "Stream entries (changes and heartbeat batches) of the shared registry: from "
                "the entry's time in Redis to its application on this controller, on Redis' "
                "clock",
                buckets=LAG_BUCKETS,
                registry=counted,
            )
            if replication
            else None
        )
        # Every series exists from the start (a rate over a series that
        # appears only with its first event misses that event), and the
        # hot paths skip the label lookup.
        self.registered = {
            replaced: self.registrations.labels(replaced=str(replaced).lower())
            for replaced in (False, True)
        }
        self.rate_limited = {
            path: self.rate_limits.labels(path=path) for path in RATE_LIMITED_PATHS
        }
        self.routed, self.no_worker, self.unknown_capability = (
            self.routes.labels(outcome=outcome) for outcome in ROUTE_OUTCOMES
        )
        self.long_polls, self.streams = (
            self.feed_watchers.labels(form=form) for form in ("long_poll", "stream")
        )
        self.self_preservation_changes = {
            active: changes.labels(active=str(active).lower()) for active in (False, True)
        }

    def watch(self, registry: CapabilityRegistry, clock: Callable[[], float]) -> None:
        """Expose the state of ``registry`` at ``clock()`` (see :class:`RegistryCollector`)."""
        self.registry.register(RegistryCollector(registry, clock))

    def appended(self, seconds: float) -> None:
        """A journal append took ``seconds`` (the journal's timings protocol)."""
        self.journal_append.observe(seconds)

    def fsynced(self, seconds: float) -> None:
        """A journal fsync took ``seconds`` (the journal's timings protocol)."""
        self.journal_fsync.observe(seconds)


def _check_multiprocess_mode(directory: Path) -> None:
    # prometheus_client picks where values go when it is imported, from the
    # environment: set later, the counters would stay in this process's memory.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") != str(directory) or not getattr(
        values.ValueClass, "_multiprocess", False
    ):
        raise ValueError(
            f"metrics in {directory} need PROMETHEUS_MULTIPROC_DIR={directory} in the "
            "environment before the process starts (prometheus_client's multiprocess mode)"
        )
    if not directory.is_dir():
        raise ValueError(f"the metrics directory {directory} is not a directory")


class _BuildInfo(Collector):
    """``crank_build_info{version}``, the same in every process.

    A collector rather than an ``Info``, which has no multiprocess mode.
    """

    def collect(self) -> Iterable[Metric]:
        """The one sample."""
        yield InfoMetricFamily(
            "crank_build", "The controller's version", value={"version": _version()}
        )


class SlidingCount:
    """How many things happened in the last ``window_s`` seconds, to the second.

    One counter per whole second of the window, in a ring: :meth:`add` and
    :meth:`count` take the time as an argument (the service's clock), cost
    O(1) and O(window) respectively, and forget a second once it is
    ``window_s`` old. A count covers the current second and the
    ``window_s - 1`` before it.
    """

    __slots__ = ("_counts", "_seconds")

    def __init__(self, *, window_s: float) -> None:
        if not window_s >= 1 or window_s != int(window_s):
            raise ValueError(f"window_s must be a whole number of seconds >= 1, got {window_s!r}")
        size = int(window_s)
        # For each slot of the ring: the second it counts, and its count.
        self._seconds = [-1] * size
        self._counts = [0] * size

    def add(self, now: float) -> None:
        """Count one thing at ``now`` (seconds)."""
        second = math.floor(now)
        slot = second % len(self._seconds)
        if self._seconds[slot] != second:
            self._seconds[slot] = second
            self._counts[slot] = 0
        self._counts[slot] += 1

    def count(self, now: float) -> int:
        """The things counted in the window that ends at ``now``."""
        second = math.floor(now)
        oldest = second - len(self._seconds)
        return sum(
            count
            for counted, count in zip(self._seconds, self._counts, strict=True)
            if oldest < counted <= second
        )


class RegistryCollector(Collector):
    """``crank_workers{state}`` and ``crank_capabilities``, computed at each scrape.

    One pass over the workers without building views
    (:meth:`~crank_registry.CapabilityRegistry.state_counts`): about 12 ms
    at 100 000 workers (``benchmarks/metrics.py``).
    """

    def __init__(self, registry: CapabilityRegistry, clock: Callable[[], float]) -> None:
        self._registry = registry
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        """The gauges at this moment."""
        workers = GaugeMetricFamily(
            "crank_workers", "Registered workers by state", labels=["state"]
        )
        for state, number in self._registry.state_counts(now=self._clock()).items():
            workers.add_metric([state.value], number)
        yield workers
        yield GaugeMetricFamily(
            "crank_ejected_workers",
            "Workers ejected now for failing calls (outlier ejection): they take no routes",
            value=self._registry.ejected_count,
        )
        yield GaugeMetricFamily(
            "crank_capabilities",
            "Distinct (verb, capability) pairs offered by registered workers",
            value=self._registry.capability_count(),
        )
        yield GaugeMetricFamily(
            "crank_self_preservation",
            "1 while the controller is in self-preservation (no worker made unhealthy or evicted)",
            value=int(self._registry.self_preservation is not None),
        )

    def describe(self) -> Iterable[Metric]:
        """The gauges' names, without reading the registry (checked for clashes on register)."""
        yield GaugeMetricFamily("crank_workers", "", labels=["state"])
        yield GaugeMetricFamily("crank_ejected_workers", "")
        yield GaugeMetricFamily("crank_capabilities", "")
        yield GaugeMetricFamily("crank_self_preservation", "")


assert {state.value for state in WorkerState} == {
    "healthy",
    "unhealthy",
    "unverified",
    "draining",
    "ejected",
}


def metrics_response(registry: CollectorRegistry) -> Response:
    """The Prometheus text exposition of ``registry``."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE)


class RequestDurationMiddleware:
    """Observes ``crank_http_request_duration_seconds`` for every HTTP request.

    ``path`` is the template of the route that took the request (Starlette's
    router puts it in the scope), prefixed with the mount's root path, or
    :data:`UNMATCHED_PATH`; ``status`` is the answer's status (500 when the
    app raised before answering).
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.histogram = metrics.request_duration

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request and observe its duration."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            # Labels from bounded sets only: a client's path or method must
            # not become a series.
            route = scope.get("route")
            path = (
                scope.get("root_path", "").rstrip("/") + route.path
                if isinstance(route, Route)
                else UNMATCHED_PATH
            )
            method = str(scope.get("method", "")).upper()
            if method not in KNOWN_METHODS:
                method = "OTHER"
            self.histogram.labels(method=method, path=path, status=str(status)).observe(
                time.perf_counter() - started
            )
