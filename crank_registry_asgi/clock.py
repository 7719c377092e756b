"""The service's clock: wall-clock seconds that advance with the monotonic clock.

Health deadlines are measured on it, so it must not jump when the system
clock is stepped (by an operator, a VM resume, an NTP correction): a backward
step would keep silent workers healthy for the size of the step, a forward
one would evict every worker at once. :class:`AnchoredClock` reads the wall
clock once, at start, and from then on adds the monotonic clock's progress
to it. Its readings stay wall-clock seconds since the epoch (what answers
show and the journal keeps), and a journal written before a restart is read
against the new anchor, the wall clock at that start.

It still reads the wall clock, at most every :data:`CHECK_EVERY_S` of
monotonic time (a call costs little more than reading the monotonic
clock), only to notice a step: a difference of more than
:data:`STEP_THRESHOLD_S` from the anchored time is logged once, with its
size, and then becomes the new reference, so a clock that stays stepped is
not logged again and a second step is.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from .effects import log_fields

__all__ = ["CHECK_EVERY_S", "STEP_THRESHOLD_S", "AnchoredClock"]

#: Larger differences between the wall clock and the anchored clock are logged.
STEP_THRESHOLD_S = 1.0
#: How often (monotonic seconds) a call compares the wall clock with the anchored one.
CHECK_EVERY_S = 0.1

logger = logging.getLogger("crank_registry_asgi.clock")


class AnchoredClock:
    """Seconds since the epoch: the wall clock at creation plus the monotonic time since.

    ``wall`` and ``monotonic`` are the two sources (tests pass fake ones).
    Calling the clock returns the current time; a wall-clock step over
    :data:`STEP_THRESHOLD_S` is logged (a warning) at the first call at
    least :data:`CHECK_EVERY_S` after the previous check, and changes
    nothing else.
    """

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._anchor = float(wall()) - float(monotonic())
        # What the wall clock minus this clock was when last logged: a
        # lasting step is logged once, not on every call.
        self._known_offset = 0.0
        self._next_check = -math.inf

    @property
    def offset(self) -> float:
        """The last logged difference, wall clock minus this clock (0.0 until a step)."""
        return self._known_offset

    def align(self, reference: float) -> float:
        """Make the time now ``reference`` (another clock's reading); returns the shift.

        The shared registry aligns its controllers on Redis' clock this way
        when they connect (DESIGN, "Clocks across hosts"), so that times
        written by one are compared with the same clock by the others.
        """
        shift = float(reference) - (self._anchor + self._monotonic())
        self._anchor += shift
        self._known_offset -= shift
        return shift

    def __call__(self) -> float:
        """The anchored time now; notices (and logs) a wall-clock step."""
        now = self._anchor + self._monotonic()
        if now >= self._next_check:
            self._next_check = now + CHECK_EVERY_S
            self._check(now)
        return now

    def _check(self, now: float) -> None:
        offset = self._wall() - now
        if abs(offset - self._known_offset) > STEP_THRESHOLD_S:
            step = offset - self._known_offset
            self._known_offset = offset
            logger.warning(
                "wall clock stepped %s; health deadlines follow the monotonic clock "
                "and are unchanged %s",
                "forward" if step > 0 else "backward",
                log_fields(step_s=f"{step:+.3f}", wall_minus_service_clock_s=f"{offset:+.3f}"),
            )
