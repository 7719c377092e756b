"""Self-preservation: many workers silent at once mean the registry itself is cut off.

A controller that loses its network sees every worker fall silent; were it
to mark them unhealthy and evict them, it would empty the registry for a
fault of its own (Eureka's self-preservation). So the sweep watches
windows of ``unhealthy_after`` seconds (DESIGN, "Admission"):

* a window starts at a sweep; ``watched`` is the number of workers
  routable then (the previous window's live workers: never a stored
  count, so it cannot stick after a scale-down, and a restart starts
  without a window: the workers it finds already silent are not counted);
* a worker the sweep finds silent (its ``unhealthy_after`` passed) falls
  silent within the window; a deregistration is not silence;
* when more than ``threshold`` of the ``watched`` workers fell silent
  within the window, and at least ``min_workers`` were watched, the sweep
  decides :class:`~crank_registry.SelfPreservationChanged` (``active``)
  instead of the silences of that pass.

Heartbeats are spread over the interval, so a partition silences a fleet
one worker at a time: by the pass that starts it, about ``threshold`` of
the workers were made ``unhealthy`` by earlier passes. The change that
starts it *reinstates* them (its ``reinstated``): each worker the sweep
made unhealthy for a silence in the ``unhealthy_after`` before it (this
window's, and the end of the previous one's: a partition may begin
across a window's start), and that is still in that silence, goes back to
the routable state it had (``healthy``, or ``unverified`` after a
restart), its last heartbeat unchanged. They count among the silent and
the watched, are held like the workers found due, and are judged as they
are once it ends. The :class:`Watch` remembers those silences
(:meth:`Watch.made_unhealthy`); :func:`still_silenced` and :func:`returns_to`
are the one rule the sweep (deciding) and the fold (applying) share.

While it lasts, the sweep decides no ``unhealthy`` and no ``evicted``:
the workers it finds due are *held* (out of the deadline heap), a
heartbeat treats a worker as in the state it holds (no silence is
applied to it), and routing continues to the last known workers: every
worker held in a routable state, however long it has been silent. It ends, with another
:class:`~crank_registry.SelfPreservationChanged`, when heartbeats come back
(no more than ``threshold`` of the watched workers still silent), or
``max_duration`` seconds after it began. The workers still silent then
get a *grace* of ``unhealthy_after``: a heartbeat in it is answered as
before (no re-registration, even past ``evict_after``), and the sweep
judges them only at its end; they are not counted in the window that
starts when it ends (so they cannot start it again).

Sans-IO like the rest of the core: :class:`Watch` is the sweep's
bookkeeping, driven by :meth:`~crank_registry.CapabilityRegistry.decide_sweep`;
the change itself is applied by the one fold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import attrs

from ._errors import ValidationError
from ._events import ENTERED, EXIT_REASONS, Reinstatement
from ._health import Health, HealthInput, Transition, transition

if TYPE_CHECKING:
    from ._records import Worker

__all__ = [
    "DEFAULT_MIN_WORKERS",
    "DEFAULT_THRESHOLD",
    "ENTERED",
    "EXIT_REASONS",
    "SelfPreservationSettings",
    "Watch",
    "returns_to",
    "still_silenced",
]

#: The share of watched workers whose silence starts self-preservation (0: never).
DEFAULT_THRESHOLD = 0.5
#: Fewer workers routable at a window's start: self-preservation never starts.
DEFAULT_MIN_WORKERS = 10


def _threshold(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0 <= value < 1
    ):
        raise ValidationError.single(
            attribute.name, f"must be a fraction from 0 (off) to below 1, got {value!r}"
        )


def _max_duration(_: object, attribute: attrs.Attribute[float | None], value: float | None) -> None:
    if value is None:
        return
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValidationError.single(attribute.name, f"must be seconds > 0, got {value!r}")


def _min_workers(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValidationError.single(attribute.name, f"must be an integer >= 1, got {value!r}")


@attrs.frozen(kw_only=True)
class SelfPreservationSettings:
    """When self-preservation starts and how long it may last.

    ``threshold``: the share of the workers routable at a window's start
    that must fall silent within it (more than it: it starts); 0 turns it
    off. ``max_duration``: seconds it lasts at most (``None``: twice
    ``evict_after``). ``min_workers``: it never starts when fewer workers
    were routable at the window's start (a small fleet losing a few is
    not a partition).
    """

    threshold: float = attrs.field(default=DEFAULT_THRESHOLD, validator=_threshold)
    max_duration: float | None = attrs.field(default=None, validator=_max_duration)
    min_workers: int = attrs.field(default=DEFAULT_MIN_WORKERS, validator=_min_workers)

    @property
    def enabled(self) -> bool:
        """Whether it can start at all (``threshold`` above 0)."""
        return self.threshold > 0

    def lasts(self, evict_after: float) -> float:
        """Seconds it lasts at most, under a registry's ``evict_after``."""
        return 2 * evict_after if self.max_duration is None else self.max_duration


def returns_to(reinstatement: Reinstatement) -> Health:
    """The routable state ``reinstatement`` puts its worker back in."""
    return Health(reinstatement.state.value)


def still_silenced(
    reinstatement: Reinstatement, state: Health | None, last_heartbeat: float
) -> bool:
    """Whether a worker in ``state``, last heard at ``last_heartbeat``, is in the silence undone.

    That is: the state the silence took it to, since the same heartbeat. A
    worker heard from (``healthy`` again), gone (``None``), registered or
    imported again since is not: its reinstatement is skipped.
    """
    step = transition(returns_to(reinstatement), HealthInput.SILENCE)
    assert isinstance(step, Transition)  # time is never refused
    return state is step.to and last_heartbeat == reinstatement.last_heartbeat


class Watch:
    """The sweep's bookkeeping: the current window, and while preserving, the held workers.

    ``since`` is when self-preservation began as decided (``None``: not
    preserving); the registry's applied state is the fold's.
    """

    def __init__(self, settings: SelfPreservationSettings, evict_after: float) -> None:
        self.settings = settings
        self.max_duration = settings.lasts(evict_after)
        #: When the current window ends (``None``: none started yet).
        self.window_end: float | None = None
        #: How many workers were routable when the window started.
        self.watched = 0
        #: The workers that fell silent within the window (and, while
        #: preserving, are still silent).
        self.silenced: set[str] = set()
        #: The workers the sweep made unhealthy for a silence, lately (this
        #: window and the previous one): when, and what reinstates each.
        self.unrouted: dict[str, tuple[float, Reinstatement]] = {}
        #: While preserving: the workers the sweep found due, kept out of the heap.
        self.held: dict[str, Worker] = {}
        #: Once it ended: the workers still silent then, judged only after a
        #: grace and not counted in the window that started then.
        self.grace: set[str] = set()
        #: When the grace ends (the sweep has judged them all after it).
        self.grace_until = -math.inf
        self.since: float | None = None

    @property
    def preserving(self) -> bool:
        """Whether self-preservation is on, as decided."""
        return self.since is not None

    def forget(self) -> list[Worker]:
        """Start over without a window (a restart, a snapshot); returns the held workers."""
        self.window_end = None
        self.watched = 0
        self.silenced = set()
        self.unrouted = {}
        self.grace = set()
        return self.release()

    def start_window(self, now: float, watched: int, length: float) -> None:
        """A window starts at ``now`` with ``watched`` workers routable (the grace's aside)."""
        self.window_end = now + length
        self.watched = watched
        self.silenced = set()
        # An entry in this window reinstates the silences of the length before it:
        # older ones can never be reinstated.
        self.unrouted = {
            worker_id: made for worker_id, made in self.unrouted.items() if made[0] >= now - length
        }

    def judged(self, worker_id: str) -> bool:
        """Whether time applies to ``worker_id`` now (not preserving, and not in the grace)."""
        return self.since is None and worker_id not in self.grace

    def window_over(self, now: float) -> bool:
        """Whether a new window is due at ``now`` (none yet, or the current one ended)."""
        return self.window_end is None or now >= self.window_end

    def enters(self, silent: Iterable[str]) -> bool:
        """Whether the workers ``silent`` now, with those silent before in the window, start it."""
        settings = self.settings
        if not settings.enabled or self.window_end is None:
            return False
        if self.watched < settings.min_workers:
            return False
        falling = self.silenced.union(s for s in silent if s not in self.grace)
        return len(falling) > settings.threshold * self.watched

    def fell_silent(self, worker_id: str) -> bool:
        """The sweep found ``worker_id`` silent (decided, or held while preserving).

        Whether it counts as falling silent in the window: a worker judged at
        the end of its grace does not.
        """
        if worker_id in self.grace:
            self.grace.discard(worker_id)  # judged now: its grace is over
            return False
        self.silenced.add(worker_id)
        return True

    def made_unhealthy(
        self, worker_id: str, before: Health, last_heartbeat: float, now: float
    ) -> None:
        """The sweep decided ``worker_id`` unhealthy at ``now``, silent since ``last_heartbeat``.

        Remembered (when self-preservation can start at all) so that it is
        reinstated, in ``before``, should self-preservation begin within
        ``unhealthy_after``. Not before a window started: a worker found
        silent then (after a restart) was silent already, not falling silent.
        """
        if self.settings.enabled and self.window_end is not None:
            undo = Reinstatement(worker_id, before.reported, last_heartbeat)
            self.unrouted[worker_id] = (now, undo)

    def reinstate(
        self, now: float, length: float, silenced: Callable[[Reinstatement], bool]
    ) -> tuple[Reinstatement, ...]:
        """Self-preservation begins at ``now``: the workers its change reinstates.

        Those the sweep made unhealthy for a silence in the ``length``
        (``unhealthy_after``) before ``now`` that are ``silenced`` still (as
        decided), in the order they fell silent. They count among the
        silent and the watched (those of the previous window were not).
        """
        reinstated = tuple(
            undo for at, undo in self.unrouted.values() if at >= now - length and silenced(undo)
        )
        for undo in reinstated:
            if undo.worker_id not in self.silenced:
                self.silenced.add(undo.worker_id)
                self.watched += 1
        return reinstated

    def hold(self, worker: Worker, *, silent: bool) -> None:
        """Keep ``worker``, found due while preserving, out of the heap until it ends."""
        self.held[worker.worker_id] = worker
        if silent:
            self.silenced.add(worker.worker_id)

    def heard(self, worker_id: str) -> Worker | None:
        """``worker_id`` was heard from (or left) while preserving; its held record, if held."""
        self.silenced.discard(worker_id)
        return self.held.pop(worker_id, None)

    def ends(self, now: float) -> str | None:
        """Why self-preservation ends at ``now`` (one of :data:`EXIT_REASONS`), or ``None``."""
        if self.since is None:
            return None
        if not self.settings.enabled:
            return "turned_off"
        if now >= self.since + self.max_duration:
            return "max_duration"
        if len(self.silenced) <= self.settings.threshold * self.watched:
            return "heartbeats_returned"
        return None

    def release(self) -> list[Worker]:
        """The held workers, given back to the sweep (none is held afterwards)."""
        held = list(self.held.values())
        self.held = {}
        return held

    def deadline(self) -> float | None:
        """When self-preservation ends at the latest (``None``: not preserving)."""
        return None if self.since is None else self.since + self.max_duration
