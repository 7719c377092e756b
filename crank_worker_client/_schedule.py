"""When to talk to the controller next: pure functions of the last outcome.

No clock, no sleeping, no I/O: each function takes what happened last (and
an injected :class:`random.Random`) and returns a delay in seconds. The
worker agent wires them to a clock; tests call them directly.

- After an acknowledged heartbeat or registration, the next heartbeat is due
  after the controller's interval minus a jitter of at most
  :data:`MAX_JITTER_FRACTION` of it, so that workers started together drift
  apart and a restarted controller is not hit by all of them at once, and no
  heartbeat is ever later than the interval the controller asked for.
- After a failure (network error, 5xx) the agent retries with exponential
  backoff capped at one interval: a controller that comes back hears from
  every worker within one interval.
- When the controller has forgotten the worker, it re-registers at once.
- At start-up, registration retries use capped exponential backoff with
  full jitter (a uniform draw between 0 and the capped backoff).
"""

from __future__ import annotations

import enum
import random

from ._config import is_positive_seconds

__all__ = [
    "MAX_JITTER_FRACTION",
    "RETRY_BASE_FRACTION",
    "Outcome",
    "next_heartbeat_delay",
    "registration_backoff",
]

#: Jitter never exceeds this fraction of the heartbeat interval.
MAX_JITTER_FRACTION = 0.1

#: The first heartbeat retry waits this fraction of the interval, then doubles.
RETRY_BASE_FRACTION = 1 / 16

# 2.0 ** 1000 still fits a float; past that the cap has long applied anyway.
_MAX_EXPONENT = 1000


class Outcome(enum.Enum):
    """What the last exchange with the controller came to."""

    #: The heartbeat (or registration) was acknowledged.
    ACKNOWLEDGED = "acknowledged"
    #: The controller answered ``worker_not_registered``: register again now.
    NOT_REGISTERED = "not_registered"
    #: A network error, a timeout or an error answer: retry with backoff.
    FAILED = "failed"


def _check_positive(name: str, value: float) -> None:
    if not is_positive_seconds(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _capped_exponential(base: float, cap: float, exponent: int) -> float:
    return min(cap, base * 2.0 ** min(exponent, _MAX_EXPONENT))


def next_heartbeat_delay(
    interval: float,
    outcome: Outcome,
    attempt: int,
    rng: random.Random,
    *,
    retry_base: float | None = None,
) -> float:
    """Seconds to wait before the next heartbeat, given the last ``outcome``.

    ``attempt`` counts the consecutive failures so far (``1`` after the first
    failure; it is ignored for the other outcomes). ``retry_base`` is the
    first retry delay, ``interval * RETRY_BASE_FRACTION`` by default.

    - ``ACKNOWLEDGED``: ``interval - j`` with ``0 <= j <= 0.1 * interval``.
    - ``NOT_REGISTERED``: ``0.0`` (re-register at once).
    - ``FAILED``: ``b - j`` where ``b = min(interval, retry_base * 2 **
      (attempt - 1))`` and ``0 <= j <= 0.1 * b``: never more than one
      interval, with jitter at most 10% of it.
    """
    _check_positive("interval", interval)
    if outcome is Outcome.NOT_REGISTERED:
        return 0.0
    if outcome is Outcome.ACKNOWLEDGED:
        return interval - rng.uniform(0.0, MAX_JITTER_FRACTION * interval)
    if attempt < 1:
        raise ValueError(f"attempt counts failures and starts at 1, got {attempt!r}")
    base = interval * RETRY_BASE_FRACTION if retry_base is None else retry_base
    _check_positive("retry_base", base)
    backoff = _capped_exponential(base, interval, attempt - 1)
    return backoff - rng.uniform(0.0, MAX_JITTER_FRACTION * backoff)


def registration_backoff(
    attempt: int, rng: random.Random, *, base: float = 0.2, cap: float = 5.0
) -> float:
    """Seconds to wait after the ``attempt``-th failed start-up registration.

    Full jitter: a uniform draw in ``[0, min(cap, base * 2 ** (attempt - 1))]``,
    so that workers started together (a fleet restart) do not retry in step.
    ``attempt`` starts at 1.
    """
    _check_positive("base", base)
    _check_positive("cap", cap)
    if attempt < 1:
        raise ValueError(f"attempt counts failures and starts at 1, got {attempt!r}")
    return rng.uniform(0.0, _capped_exponential(base, cap, attempt - 1))
