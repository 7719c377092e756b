"""The heartbeat and registration schedule: pure functions of the last outcome."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crank_worker_client import (
    MAX_JITTER_FRACTION,
    RETRY_BASE_FRACTION,
    Outcome,
    next_heartbeat_delay,
    registration_backoff,
)


class ExtremeRandom(random.Random):
    """A Random whose draws are always the lowest (0.0) or the highest (1.0) value."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_acknowledged_heartbeat_waits_the_interval_minus_at_most_ten_percent() -> None:
    assert next_heartbeat_delay(30.0, Outcome.ACKNOWLEDGED, 0, ExtremeRandom(0.0)) == 30.0
    assert next_heartbeat_delay(30.0, Outcome.ACKNOWLEDGED, 0, ExtremeRandom(1.0)) == pytest.approx(
        27.0
    )
    rng = random.Random(7)
    delays = [next_heartbeat_delay(30.0, Outcome.ACKNOWLEDGED, 0, rng) for _ in range(2000)]
    assert all(27.0 <= d <= 30.0 for d in delays)
    # The jitter really spreads over its window, not a few values.
    assert min(delays) < 27.3 and max(delays) > 29.7


def test_not_registered_re_registers_at_once() -> None:
    assert next_heartbeat_delay(30.0, Outcome.NOT_REGISTERED, 0, random.Random(1)) == 0.0


def test_failures_back_off_exponentially_up_to_one_interval() -> None:
    interval = 32.0
    lowest = [
        next_heartbeat_delay(interval, Outcome.FAILED, n, ExtremeRandom(0.0)) for n in range(1, 10)
    ]
    base = interval * RETRY_BASE_FRACTION
    assert lowest[:5] == [base, 2 * base, 4 * base, 8 * base, 16 * base]
    assert lowest[5:] == [interval] * 4
    highest = [
        next_heartbeat_delay(interval, Outcome.FAILED, n, ExtremeRandom(1.0)) for n in range(1, 10)
    ]
    assert highest == pytest.approx([b * (1 - MAX_JITTER_FRACTION) for b in lowest])


def test_failure_backoff_uses_the_given_base_and_survives_huge_attempt_counts() -> None:
    rng = ExtremeRandom(0.0)
    assert next_heartbeat_delay(10.0, Outcome.FAILED, 1, rng, retry_base=0.5) == 0.5
    assert next_heartbeat_delay(10.0, Outcome.FAILED, 3, rng, retry_base=0.5) == 2.0
    assert next_heartbeat_delay(10.0, Outcome.FAILED, 10**6, rng, retry_base=0.5) == 10.0


@given(
    interval=st.floats(min_value=0.01, max_value=3600),
    attempt=st.integers(min_value=1, max_value=10_000),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_no_delay_exceeds_one_interval_and_jitter_stays_within_ten_percent(
    interval: float, attempt: int, seed: int
) -> None:
    rng = random.Random(seed)
    beat = next_heartbeat_delay(interval, Outcome.ACKNOWLEDGED, 0, rng)
    assert interval * (1 - MAX_JITTER_FRACTION) <= beat <= interval
    retry = next_heartbeat_delay(interval, Outcome.FAILED, attempt, rng)
    backoff = min(interval, interval * RETRY_BASE_FRACTION * 2 ** min(attempt - 1, 1000))
    assert 0 < backoff * (1 - MAX_JITTER_FRACTION) <= retry <= backoff <= interval


def test_registration_backoff_is_full_jitter_capped() -> None:
    assert registration_backoff(1, ExtremeRandom(1.0), base=0.5, cap=4.0) == 0.5
    assert registration_backoff(3, ExtremeRandom(1.0), base=0.5, cap=4.0) == 2.0
    assert registration_backoff(4, ExtremeRandom(1.0), base=0.5, cap=4.0) == 4.0
    assert registration_backoff(50, ExtremeRandom(1.0), base=0.5, cap=4.0) == 4.0
    assert registration_backoff(50, ExtremeRandom(0.0), base=0.5, cap=4.0) == 0.0
    rng = random.Random(3)
    draws = [registration_backoff(10, rng, base=0.5, cap=4.0) for _ in range(2000)]
    # Full jitter: the whole range [0, cap] is used, not a band near the cap.
    assert all(0.0 <= d <= 4.0 for d in draws)
    assert min(draws) < 0.05 and max(draws) > 3.95
    assert 1.8 < sum(draws) / len(draws) < 2.2


def test_the_schedule_comes_from_the_injected_random_only() -> None:
    first = [
        next_heartbeat_delay(5.0, Outcome.ACKNOWLEDGED, 0, random.Random(42)) for _ in range(3)
    ]
    second = [
        next_heartbeat_delay(5.0, Outcome.ACKNOWLEDGED, 0, random.Random(42)) for _ in range(3)
    ]
    assert first == second
    assert registration_backoff(2, random.Random(9)) == registration_backoff(2, random.Random(9))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: next_heartbeat_delay(0.0, Outcome.ACKNOWLEDGED, 0, random.Random()), "interval"),
        (
            lambda: next_heartbeat_delay(float("nan"), Outcome.FAILED, 1, random.Random()),
            "interval",
        ),
        (lambda: next_heartbeat_delay(1.0, Outcome.FAILED, 0, random.Random()), "attempt"),
        (
            lambda: next_heartbeat_delay(1.0, Outcome.FAILED, 1, random.Random(), retry_base=-1),
            "retry_base",
        ),
        (lambda: registration_backoff(0, random.Random()), "attempt"),
        (lambda: registration_backoff(1, random.Random(), base=0), "base"),
        (lambda: registration_backoff(1, random.Random(), cap=float("inf")), "cap"),
    ],
)
def test_invalid_arguments_are_refused(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]
