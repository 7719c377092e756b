"""Rate limits in virtual time: refill, bursts, the true wait, bounded memory."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crank_registry import MAX_RATE, RateLimit, TokenBuckets, retry_after_seconds
from tests.core.helpers import T0


def about(seconds: float) -> object:
    """``seconds`` up to the rounding of wall-clock floats (a step is 2.4e-7 s at T0)."""
    return pytest.approx(seconds, abs=1e-6)


def test_a_burst_then_one_token_per_interval() -> None:
    buckets = TokenBuckets(RateLimit(rate=2, burst=3))
    now = T0
    assert [buckets.admit("a", now=now) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.admit("a", now=now) == about(0.5)  # the next token in 1 / rate
    now += 0.25
    assert buckets.admit("a", now=now) == about(0.25)
    now += 0.25
    assert buckets.admit("a", now=now) == 0.0
    assert buckets.admit("a", now=now) == about(0.5)


def test_a_refused_request_takes_nothing() -> None:
    buckets = TokenBuckets(RateLimit(rate=1, burst=1))
    assert buckets.admit("a", now=T0) == 0.0
    for _ in range(100):  # a caller hammering while refused does not push its wait out
        assert buckets.admit("a", now=T0 + 0.5) == about(0.5)
    assert buckets.admit("a", now=T0 + 1) == 0.0


def test_the_bucket_refills_up_to_burst_and_no_further() -> None:
    buckets = TokenBuckets(RateLimit(rate=10, burst=5))
    for _ in range(5):
        assert buckets.admit("a", now=T0) == 0.0
    now = T0 + 3600  # idle for an hour: 5 tokens, not 36 000
    assert [buckets.admit("a", now=now) for _ in range(6)][-2:] == [0.0, about(0.1)]


def test_keys_have_their_own_buckets() -> None:
    buckets = TokenBuckets(RateLimit(rate=1, burst=1))
    assert buckets.admit("a", now=T0) == 0.0
    assert buckets.admit("a", now=T0) > 0
    assert buckets.admit("b", now=T0) == 0.0


def test_a_steady_caller_at_the_rate_is_never_refused_at_wall_clock_times() -> None:
    # 1/3 s is not a binary fraction: rounding must not refuse a request on time.
    buckets = TokenBuckets(RateLimit(rate=3, burst=1))
    for step in range(3000):
        assert buckets.admit("a", now=T0 + step / 3) == 0.0, step


def test_the_highest_rate_is_still_a_limit_at_wall_clock_times() -> None:
    buckets = TokenBuckets(RateLimit(rate=MAX_RATE, burst=1))
    assert buckets.admit("a", now=T0) == 0.0
    assert buckets.admit("a", now=T0) == pytest.approx(1 / MAX_RATE, rel=0.05)
    admitted = sum(buckets.admit("a", now=T0 + step * 1e-6) == 0.0 for step in range(1, 1001))
    assert admitted == pytest.approx(MAX_RATE * 1e-3, rel=0.05)  # 100 in a millisecond


@pytest.mark.parametrize(("wait", "header"), [(0.001, 1), (0.5, 1), (1.0, 1), (1.2, 2), (59.9, 60)])
def test_retry_after_is_the_wait_rounded_up(wait: float, header: int) -> None:
    assert retry_after_seconds(wait) == header


def test_retry_after_of_a_long_wait() -> None:
    buckets = TokenBuckets(RateLimit(rate=0.1, burst=1))  # a token every 10 s
    buckets.admit("a", now=T0)
    assert retry_after_seconds(buckets.admit("a", now=T0 + 2.5)) == 8  # 7.5 s, rounded up


# ------------------------------------------------ the true wait, against a plain model


class PlainBucket:
    """The textbook token bucket, in exact arithmetic: tokens refill at ``rate`` up to ``burst``."""

    def __init__(self, rate: Fraction, burst: int, now: Fraction) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = Fraction(burst)
        self.at = now

    def admit(self, now: Fraction) -> Fraction:
        self.tokens = min(Fraction(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return Fraction(0)
        return (1 - self.tokens) / self.rate


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    rate=st.sampled_from([Fraction(1, 4), Fraction(1, 2), Fraction(1), Fraction(4), Fraction(64)]),
    burst=st.integers(1, 6),
    steps=st.lists(
        st.tuples(st.integers(0, 20).map(str), st.integers(0, 256)), min_size=1, max_size=120
    ),
)
def test_every_answer_is_the_plain_token_buckets(
    rate: Fraction, burst: int, steps: list[tuple[str, int]]
) -> None:
    # Times in 1/64 s and power-of-two rates: every float here is exact. The
    # plain buckets are never forgotten: forgetting a full bucket changes no answer.
    buckets = TokenBuckets(RateLimit(rate=float(rate), burst=burst))
    plain: dict[str, PlainBucket] = {}
    now = Fraction(int(T0))
    for key, sixty_fourths in steps:
        now += Fraction(sixty_fourths, 64)
        expected = plain.setdefault(key, PlainBucket(rate, burst, now)).admit(now)
        assert buckets.admit(key, now=float(now)) == float(expected)


# ------------------------------------------------------------------------ memory


def test_idle_buckets_are_forgotten() -> None:
    buckets = TokenBuckets(RateLimit(rate=1, burst=2))
    now = T0
    for caller in range(5000):
        buckets.admit(f"caller-{caller}", now=now)
        now += 0.001
    # Forgotten as new keys came: the last second's 1000 callers are left, and
    # fewer idle ones than that (each is looked at within half the buckets' new keys).
    assert 1000 <= len(buckets) < 2000
    now += 2
    remaining = len(buckets)
    assert buckets.forget_idle(now) == remaining
    assert len(buckets) == 0


def test_forget_idle_keeps_the_buckets_that_are_not_full() -> None:
    buckets = TokenBuckets(RateLimit(rate=1, burst=2))
    buckets.admit("idle", now=T0)
    buckets.admit("busy", now=T0)
    buckets.admit("busy", now=T0 + 0.9)  # a known key: nothing else is looked at
    assert buckets.forget_idle(T0 + 1.5) == 1
    assert len(buckets) == 1
    assert buckets.admit("busy", now=T0 + 1.5) == 0.0  # its state kept: 1.5 tokens
    assert buckets.admit("busy", now=T0 + 1.5) == about(0.5)


def test_each_new_key_forgets_the_full_buckets_at_the_front() -> None:
    buckets = TokenBuckets(RateLimit(rate=1, burst=2))
    buckets.admit("a", now=T0)  # full again at T0 + 1
    buckets.admit("b", now=T0 + 0.5)  # a is not full yet: it goes to the back
    assert len(buckets) == 2
    buckets.admit("c", now=T0 + 1.2)  # b is not full (back again), a is: forgotten
    assert len(buckets) == 2
    assert buckets.admit("b", now=T0 + 1.2) == 0.0  # b kept its state: 1.7 tokens
    assert buckets.admit("b", now=T0 + 1.2) == about(0.3)
    assert buckets.forget_idle(T0 + 1.2) == 0


def test_memory_is_bounded_and_overflowing_keys_share_one_bucket() -> None:
    buckets = TokenBuckets(RateLimit(rate=1, burst=2, max_keys=10))
    for caller in range(10):
        assert buckets.admit(f"known-{caller}", now=T0) == 0.0
    # A flood of new keys: no room, so they share one bucket of 2 tokens.
    answers = [buckets.admit(f"new-{caller}", now=T0) for caller in range(10_000)]
    assert len(buckets) == 10
    assert answers[:2] == [0.0, 0.0]
    assert all(wait == about(1.0) for wait in answers[2:])
    # The callers already known keep their own buckets.
    assert buckets.admit("known-3", now=T0) == 0.0
    # Once the known buckets are full again, new keys make room as they come:
    # the buckets kept are then all new ones.
    for caller in range(20):
        buckets.admit(f"later-{caller}", now=T0 + 10)
    assert len(buckets) == 10
    assert buckets.forget_idle(T0 + 10) == 0


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    max_keys=st.integers(1, 50),
    steps=st.lists(st.tuples(st.integers(0, 500), st.integers(0, 100)), max_size=400),
)
def test_never_more_buckets_than_max_keys(max_keys: int, steps: list[tuple[int, int]]) -> None:
    buckets = TokenBuckets(RateLimit(rate=5, burst=3, max_keys=max_keys))
    now = T0
    for caller, hundredths in steps:
        now += hundredths / 100
        buckets.admit(str(caller), now=now)
        assert len(buckets) <= max_keys


# ------------------------------------------------------------------ the setting


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("100:20", RateLimit(100, 20)),
        ("0.5:1", RateLimit(0.5, 1)),
        ("2000:200", RateLimit(2000, 200)),
    ],
)
def test_parse(text: str, limit: RateLimit) -> None:
    assert RateLimit.parse(text) == limit
    assert RateLimit.parse(str(limit)) == limit


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("100", "expected RATE:BURST"),
        ("", "expected RATE:BURST"),
        ("fast:20", "RATE is not a number"),
        ("0:20", "RATE must be a finite number > 0"),
        ("-1:20", "RATE must be a finite number > 0"),
        ("inf:20", "RATE must be a finite number > 0"),
        ("nan:20", "RATE must be a finite number > 0"),
        ("1e-320:1", "RATE must be a finite number > 0"),
        ("1e-300:1", "RATE must be at least 1.16e-05"),
        ("0.00001:1", "RATE must be at least 1.16e-05"),
        ("100:2.5", "BURST is not a whole number"),
        ("100:", "BURST is not a whole number"),
        ("100:0", "BURST must be from 1 to"),
        ("100:1000000001", "BURST must be from 1 to"),
        ("100001:5", "RATE must be at most 100000"),
        ("100:20:3", "BURST is not a whole number"),
    ],
)
def test_parse_refuses_with_the_fix(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as refused:
        RateLimit.parse(text)
    assert "such as 100:20" in str(refused.value)


@pytest.mark.parametrize(
    "fields",
    [
        {"rate": 0, "burst": 1},
        {"rate": True, "burst": 1},
        {"rate": "5", "burst": 1},
        {"rate": 5, "burst": 0},
        {"rate": 5, "burst": 1.0},
        {"rate": 200_000, "burst": 1},
        {"rate": 5, "burst": 10**10},
        {"rate": 5, "burst": 1, "max_keys": 0},
    ],
)
def test_invalid_limits_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must be"):
        RateLimit(**fields)  # type: ignore[arg-type]
