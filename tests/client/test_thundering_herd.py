"""The thundering-herd check: 500 agents re-register spread out, not in one burst.

Run with ``-s`` to see the histogram; ``benchmarks/thundering_herd.py``
prints the same report.
"""

from __future__ import annotations

import pytest

from benchmarks.thundering_herd import PEAK_BIN_TARGET, SPREAD_TARGET, report, run_herd

pytestmark = pytest.mark.anyio

INTERVAL = 10.0


async def test_500_agents_spread_their_re_registrations_after_a_restart() -> None:
    result = await run_herd(500, INTERVAL, seed=1)
    print()
    print(report(result))
    assert len(result.delays) == 500
    assert all(0 <= delay <= INTERVAL for delay in result.delays)
    assert result.peak_share <= PEAK_BIN_TARGET
    assert result.spread >= SPREAD_TARGET


async def test_without_jitter_the_same_herd_is_one_burst() -> None:
    # The control: what the check above would see if the schedule had no jitter.
    result = await run_herd(50, INTERVAL, jitter=False)
    assert len(result.delays) == 50
    assert result.peak_share == 1.0
    assert result.spread == 0.0
