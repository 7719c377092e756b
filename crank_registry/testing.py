"""Test helpers: a clock you move by hand.

The core never reads a clock; tests hand it ``now`` from a :class:`FakeClock`
and advance time explicitly instead of sleeping.
"""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    """A wall clock that only moves when told to.

    Call it (or read :attr:`now`) for the current time; :meth:`advance`
    moves it forward. It refuses to go backwards, like the service's clock.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        """The current time."""
        return self.now

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds`` (>= 0) and return the new time."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self.now += seconds
        return self.now
