"""Rate limits: a token bucket per caller, in bounded memory.

A :class:`RateLimit` is ``rate`` requests per second with bursts of up to
``burst``; :class:`TokenBuckets` keeps one bucket per key (the service's
key is the caller's identity, else its address) and answers
:meth:`~TokenBuckets.admit`: ``0.0`` (admitted, one token taken) or the
seconds until the key's next token (refused, nothing taken). Time is an
argument, as everywhere in the core.

Each bucket is one float, the time at which it would be full again (the
"theoretical arrival time" of GCRA, the virtual-scheduling form of a token
bucket). With ``interval = 1 / rate``, a bucket full at ``full_at`` holds
``burst - max(0, full_at - now) / interval`` tokens at ``now``; a request
takes one by moving ``full_at`` one interval later, and is refused while
that would leave fewer than zero. So a refusal's wait is exact:
``full_at - now - (burst - 1) * interval``.

Memory. A bucket that is full again holds nothing a new bucket would not,
so it is forgotten. The buckets stand in a queue: before a key without a
bucket gets one, the two at the front are looked at; a full one is
forgotten, any other goes to the back. Each new key adds one bucket and
looks at two, so every bucket is looked at again within as many new keys
as half the buckets kept: a constant cost per new key, never a pass over
all of them (the event loop never waits on one), and a request of a known
key does none of it. At most ``max_keys`` buckets are kept. Past that, a
key without a bucket of its own shares one overflow bucket, with the same
rate and burst, with every other such key, until room is made: a flood of
new callers (many addresses) can take neither memory nor more than the
rate of one caller, while the callers already known keep their own
buckets.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import attrs

__all__ = [
    "DEFAULT_MAX_KEYS",
    "MAX_BURST",
    "MAX_RATE",
    "MIN_RATE",
    "RateLimit",
    "TokenBuckets",
    "retry_after_seconds",
]

#: Buckets kept at most unless told otherwise (a few hundred bytes each).
DEFAULT_MAX_KEYS = 100_000

#: The highest rate per key: one request every 10 µs. Times are wall-clock
#: floats, whose step is 0.24 µs (about 1.7e9 s), so a shorter interval
#: would be lost to rounding, and the limit with it.
MAX_RATE = 100_000
#: The lowest rate per key: one request a day. A slower one is a typo (its
#: Retry-After would run to centuries), and refusing everybody is not a limit.
MIN_RATE = 1 / 86_400
#: The largest burst (beyond, a limit is no limit).
MAX_BURST = 1_000_000_000

# Buckets looked at for each new key: more than the one it adds, so that
# the queue goes round faster than it grows (module docstring).
_LOOKED_AT_PER_NEW_KEY = 2
# Wall-clock times are about 1.7e9 s, where a float's step is 2.4e-7 s: a
# wait shorter than this is rounding, not a missing token.
_ROUNDING = 1e-6


def _rate_problem(rate: float) -> str | None:
    """What is wrong with ``rate`` (requests per second), or ``None``."""
    if not (math.isfinite(rate) and rate > 0 and math.isfinite(1 / rate)):
        return "must be a finite number > 0"
    if rate < MIN_RATE:
        return f"must be at least {MIN_RATE:.3g} (one request a day)"
    if rate > MAX_RATE:
        return f"must be at most {MAX_RATE} (one request every 10 µs, the clock's resolution)"
    return None


def _rate(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be a number of requests per second, got {value!r}")
    problem = _rate_problem(value)
    if problem is not None:
        raise ValueError(f"{attribute.name} {problem}, got {value!r}")


def _burst(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_BURST:
        raise ValueError(
            f"{attribute.name} must be an integer from 1 to {MAX_BURST}, got {value!r}"
        )


def _at_least_one(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, got {value!r}")


@attrs.frozen
class RateLimit:
    """``rate`` requests per second per key, in bursts of up to ``burst``.

    ``max_keys``: the most keys with a bucket of their own (module docstring).
    """

    rate: float = attrs.field(validator=_rate)
    burst: int = attrs.field(validator=_burst)
    max_keys: int = attrs.field(default=DEFAULT_MAX_KEYS, validator=_at_least_one)

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """``RATE:BURST`` (e.g. ``100:20`` or ``0.5:1``) as a limit.

        Raises :class:`ValueError` saying what is wrong and what is expected.
        """
        expected = "expected RATE:BURST, requests per second and a burst size, such as 100:20"
        rate_text, colon, burst_text = text.partition(":")
        if not colon:
            raise ValueError(f"{expected}; got {text!r}")
        try:
            rate = float(rate_text)
        except ValueError:
            raise ValueError(f"RATE is not a number in {text!r}; {expected}") from None
        problem = _rate_problem(rate)
        if problem is not None:
            raise ValueError(f"RATE {problem} in {text!r}; {expected}")
        try:
            burst = int(burst_text)
        except ValueError:
            raise ValueError(f"BURST is not a whole number in {text!r}; {expected}") from None
        if not 1 <= burst <= MAX_BURST:
            raise ValueError(f"BURST must be from 1 to {MAX_BURST} in {text!r}; {expected}")
        return cls(rate, burst)

    def __str__(self) -> str:
        return f"{self.rate:g}:{self.burst}"


def retry_after_seconds(wait: float) -> int:
    """A refusal's wait as a ``Retry-After`` value: whole seconds, rounded up (at least 1)."""
    return max(1, math.ceil(wait))


class TokenBuckets:
    """A token bucket per key under one :class:`RateLimit` (module docstring)."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._interval = 1.0 / limit.rate
        # How far past now a bucket's full_at may be and still give a token.
        self._tolerance = (limit.burst - 1) * self._interval
        self._refused_beyond = self._tolerance + _ROUNDING
        # key -> the time its bucket is full again
        self._full_at: dict[str, float] = {}
        # The same keys, in the order they are looked at for forgetting.
        self._queue: collections.deque[str] = collections.deque()
        # The bucket shared by the keys that found no room (module docstring).
        self._overflow_full_at = -math.inf

    def __len__(self) -> int:
        """How many keys have a bucket of their own."""
        return len(self._full_at)

    def admit(self, key: str, *, now: float) -> float:
        """Take a token from ``key``'s bucket at ``now``: ``0.0``, or the wait when refused.

        The wait is the seconds until the bucket has a token again (nothing
        was taken); :func:`retry_after_seconds` makes it a ``Retry-After``.
        """
        # On every /route: written for the fewest operations (benchmarks/admission.py).
        full_at = self._full_at.get(key)
        if full_at is None:
            return self._admit_new(key, now)
        if full_at - now > self._refused_beyond:
            return full_at - now - self._tolerance
        self._full_at[key] = (full_at if full_at > now else now) + self._interval
        return 0.0

    def _admit_new(self, key: str, now: float) -> float:
        """The first request of a key without a bucket: a full one, or the overflow bucket's."""
        self._look_at_the_front(now)
        if len(self._full_at) < self.limit.max_keys:
            self._full_at[key] = now + self._interval
            self._queue.append(key)
            return 0.0
        full_at = self._overflow_full_at
        if full_at - now > self._refused_beyond:
            return full_at - now - self._tolerance
        self._overflow_full_at = max(full_at, now) + self._interval
        return 0.0

    def _look_at_the_front(self, now: float) -> None:
        """Forget each of the buckets at the front of the queue that is full; requeue the others."""
        queue = self._queue
        buckets = self._full_at
        for _ in range(min(_LOOKED_AT_PER_NEW_KEY, len(queue))):
            key = queue.popleft()
            if buckets[key] > now:
                queue.append(key)
            else:
                del buckets[key]

    def forget_idle(self, now: float) -> int:
        """Forget every bucket that is full at ``now`` at once; return how many were.

        :meth:`admit` needs no such pass (module docstring); it is here for
        a service that wants its memory back at a quiet moment, and for tests.
        """
        kept = {key: full_at for key, full_at in self._full_at.items() if full_at > now}
        forgotten = len(self._full_at) - len(kept)
        self._full_at = kept
        self._queue = collections.deque(kept)
        return forgotten
