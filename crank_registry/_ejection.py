"""Outlier ejection (passive health): a worker whose calls keep failing takes no routes a while.

Envoy's outlier detection, held for the whole registry (DESIGN, "Outlier
ejection"): each gateway tells its registry how its calls to a worker
ended (:meth:`~crank_registry.CapabilityRegistry.report_outcome`) and
counts the failures in a row per worker itself (:class:`Outcomes`, not
registry state: a success resets it). At ``after_failures`` failures in a
row the registry decides a :class:`~crank_registry.WorkerEjected`:

* the worker (all its capabilities) is out of routing for
  :func:`ejection_seconds` of the times it was ejected in its streak
  (30 s, 60 s, ... at most 300 s); the streak starts again once
  :data:`STREAK_RESET` seconds passed since its last ejection ended;
* the ejected share of the failing call's ``(verb, capability)`` stays
  within ``max_ejected_percent`` (:func:`within_cap`; at least one worker
  may be ejected): a registry that has lost most of a capability to
  failures keeps routing to the rest rather than to none.

The sweep decides :class:`~crank_registry.WorkerRestored` at the deadline.
Both are changes with revisions, applied by the one fold, which checks the
cap itself, in revision order: two controllers ejecting at once on a
shared registry cannot take the share over the cap, since every replica
drops the same over-cap event. Neither a heartbeat nor a registration
again ends an ejection; a worker that leaves (deregistered, evicted) takes
its ejection with it.

Sans-IO like the rest of the core; this module holds the rules and the
gateway's count, the registry (:mod:`._registry`) the state.
"""

from __future__ import annotations

import math
from typing import Final

import attrs

from ._errors import ValidationError

__all__ = [
    "BASE_SECONDS",
    "DEFAULT_AFTER_FAILURES",
    "DEFAULT_MAX_EJECTED_PERCENT",
    "MAX_SECONDS",
    "STREAK_RESET",
    "EjectionSettings",
    "Outcomes",
    "ejection_seconds",
    "streak_before",
    "within_cap",
]

#: Failures in a row that eject a worker.
DEFAULT_AFTER_FAILURES: Final = 5
#: The most of a ``(verb, capability)``'s workers ejected at once, in percent.
DEFAULT_MAX_EJECTED_PERCENT: Final = 10.0
#: Seconds of the first ejection of a streak; the n-th lasts n times as long...
BASE_SECONDS: Final = 30.0
#: ... and at most this long.
MAX_SECONDS: Final = 300.0
#: Seconds without an ejection after which a worker's streak starts again.
STREAK_RESET: Final = 300.0


def _after_failures(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError.single(
            attribute.name, f"must be an integer >= 0 (0: never eject), got {value!r}"
        )


def _percent(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= 100
    ):
        raise ValidationError.single(
            attribute.name, f"must be a percentage from 0 to 100, got {value!r}"
        )


@attrs.frozen(kw_only=True)
class EjectionSettings:
    """When a gateway's registry ejects a worker.

    ``after_failures``: failures in a row that eject it (0: never);
    ``max_ejected_percent``: the most of a ``(verb, capability)``'s workers
    ejected at once (at least one worker, whatever the percentage).
    """

    after_failures: int = attrs.field(default=DEFAULT_AFTER_FAILURES, validator=_after_failures)
    max_ejected_percent: float = attrs.field(
        default=DEFAULT_MAX_EJECTED_PERCENT, validator=_percent
    )

    @property
    def enabled(self) -> bool:
        """Whether failures eject at all (``after_failures`` above 0)."""
        return self.after_failures > 0


def ejection_seconds(ejections: int) -> float:
    """How long the ``ejections``-th ejection of a streak lasts: 30 s times it, at most 300 s."""
    return min(BASE_SECONDS * ejections, MAX_SECONDS)


def streak_before(ejections: int, ended: float, now: float) -> int:
    """The ejections of a worker's streak at ``now``: 0 once :data:`STREAK_RESET` passed.

    ``ejections`` were counted in its streak, the last ending at ``ended``.
    """
    return 0 if now - ended >= STREAK_RESET else ejections


def within_cap(ejected: int, workers: int, max_ejected_percent: float) -> bool:
    """Whether one more ejection keeps ``ejected`` of ``workers`` within the cap.

    The cap is ``max_ejected_percent`` of the workers, rounded down, and at
    least one worker: with 20 workers and 10 %, 2 may be ejected at once.
    """
    allowed = max(1, math.floor(workers * max_ejected_percent / 100))
    return ejected + 1 <= allowed


class Outcomes:
    """A gateway's count of each worker's failed calls in a row (its own, not registry state).

    Only workers whose last call failed are kept: a success, or the worker
    leaving, forgets it.
    """

    __slots__ = ("_failures",)

    def __init__(self) -> None:
        self._failures: dict[str, int] = {}

    def failed(self, worker_id: str) -> int:
        """A call to ``worker_id`` failed; returns its failures in a row."""
        count = self._failures.get(worker_id, 0) + 1
        self._failures[worker_id] = count
        return count

    def forget(self, worker_id: str) -> None:
        """A success (or an ejection, or the worker leaving) starts its count again."""
        self._failures.pop(worker_id, None)
