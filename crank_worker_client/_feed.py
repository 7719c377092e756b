"""The controller's change feed as a follower reads it: the one place its answers are decoded.

``GET /snapshot`` (:class:`~crank_registry.SnapshotAnswer`) becomes a
replica (:func:`replica_of`): a core :class:`~crank_registry.CapabilityRegistry`
with the controller's health timings that routes by state alone
(``routes_by_state``: a follower hears no heartbeats, so only events change
its states), loaded with :meth:`~crank_registry.CapabilityRegistry.apply_snapshot`.
``GET /watch`` (:class:`~crank_registry.WatchAnswer`) gives the changes to
apply with the core's one fold (:func:`changes_of`). What a snapshot or an
event carries beyond the workers is read here too, so that a new field has
one place to go.
"""

from __future__ import annotations

import random

from crank_registry import (
    CapabilityRegistry,
    Change,
    Snapshot,
    SnapshotAnswer,
    ValidationError,
    WatchAnswer,
    structure_event,
)

__all__ = ["changes_of", "replica_of"]


def replica_of(answer: SnapshotAnswer, *, rng: random.Random) -> CapabilityRegistry:
    """A new replica holding the registry of ``answer``, at its revision.

    ``rng`` draws ``least_loaded``'s candidates. The replica keeps no feed
    window of its own beyond one page (nobody follows a follower).
    """
    replica = CapabilityRegistry(answer.health_policy, rng=rng, feed_window=1, routes_by_state=True)
    replica.apply_snapshot(Snapshot(answer.revision, answer.workers))
    return replica


def changes_of(answer: WatchAnswer) -> tuple[Change, ...]:
    """The changes of a ``/watch`` answer, oldest first, read with the core's event codec.

    Raises :class:`~crank_registry.ValidationError` naming the event for
    one that is not a change this client knows.
    """
    changes: list[Change] = []
    for index, data in enumerate(answer.events):
        try:
            event = structure_event(data)
        except ValidationError as error:
            raise error.prefixed(f"events[{index}]") from None
        if not isinstance(event, Change):
            raise ValidationError.single(f"events[{index}]", "a heartbeat is not a change")
        changes.append(event)
    return tuple(changes)
