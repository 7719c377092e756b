"""``LoadMeter``: a worker's load as its heartbeats report it.

The serving helper (:mod:`crank_worker_client.serving`) meters every
invocation with one; a :class:`~crank_worker_client.WorkerAgent` sends its
:meth:`~LoadMeter.report` in each heartbeat to a controller that lists the
``load_reports`` feature (DESIGN, "Load reports"). A worker that serves
calls some other way can meter them with :meth:`LoadMeter.call` too.

``in_flight`` is the calls started and not finished (waiting for a
concurrency slot included: they are load the controller should see).
``latency_p95_ms`` and ``error_rate`` are over the calls finished within
the last ``window`` seconds, at most ``max_samples`` of them (the newest):
bounded memory, and a report reflects what callers see now.
"""

from __future__ import annotations

import collections
import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator

from crank_registry import LoadReport

__all__ = ["Call", "LoadMeter"]


class Call:
    """One metered call; :meth:`fail` marks it as failed before it ends."""

    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed = False

    def fail(self) -> None:
        """Count this call as an error (it raised nothing, but it failed)."""
        self.failed = True


class LoadMeter:
    """Counts calls in flight, and keeps the latency and outcome of recent ones.

    ``window``: seconds a finished call counts toward ``latency_p95_ms`` and
    ``error_rate`` (60 by default); ``max_samples``: the most finished calls
    kept (1024). ``clock`` is a monotonic clock in seconds (tests pass a
    fake one).
    """

    def __init__(
        self,
        *,
        window: float = 60.0,
        max_samples: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, (int, float)):
            raise ValueError(f"window must be a number of seconds > 0, got {window!r}")
        if not 0 < window < math.inf:
            raise ValueError(f"window must be a number of seconds > 0, got {window!r}")
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples must be an integer >= 1, got {max_samples!r}")
        self._window = float(window)
        self._clock = clock
        self._in_flight = 0
        # (finished at, seconds taken, failed), oldest first.
        self._samples: collections.deque[tuple[float, float, bool]] = collections.deque(
            maxlen=max_samples
        )

    @property
    def in_flight(self) -> int:
        """Calls started and not yet finished."""
        return self._in_flight

    @contextlib.contextmanager
    def call(self) -> Iterator[Call]:
        """Meter one call: in flight while the block runs; an exception counts as an error.

        A cancelled call (the caller went away) is neither an error of the
        worker nor a latency: it leaves no sample.
        """
        call = Call()
        started = self._clock()
        self._in_flight += 1
        finished_or_failed = False
        try:
            yield call
            finished_or_failed = True
        except Exception:
            call.failed = finished_or_failed = True
            raise
        finally:
            self._in_flight -= 1
            if finished_or_failed:
                finished = self._clock()
                self._samples.append((finished, finished - started, call.failed))

    def report(self) -> LoadReport:
        """The load now: ``in_flight``, and the window's p95 latency and error rate.

        Without a finished call in the window, only ``in_flight`` is
        reported (no latency is better than a made-up one).
        """
        self._expire(self._clock())
        samples = self._samples
        if not samples:
            return LoadReport(in_flight=self._in_flight)
        durations = [duration for _, duration, _ in samples]
        failures = sum(1 for _, _, failed in samples if failed)
        return LoadReport(
            in_flight=self._in_flight,
            latency_p95_ms=_p95(durations) * 1000.0,
            error_rate=failures / len(samples),
        )

    def _expire(self, now: float) -> None:
        samples = self._samples
        while samples and now - samples[0][0] > self._window:
            samples.popleft()


def _p95(durations: list[float]) -> float:
    """The 95th percentile (linear interpolation between the closest ranks)."""
    if len(durations) == 1:
        return max(durations[0], 0.0)
    return max(statistics.quantiles(durations, n=100, method="inclusive")[94], 0.0)
