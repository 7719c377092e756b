"""Rotation: round-robin over the workers of one ``(verb, capability)``, in O(1).

A :class:`Rotation` is a ring (a list and a cursor) of the members still
believed routable, in the order they joined. :meth:`Rotation.next` serves
the member under the cursor and moves the cursor on. A member it finds
unroutable for that ``now`` leaves the ring at once (its slot becomes a
hole) and its worker is marked ``parked``: the registry puts it back at
the end when the worker is routable again. So an unroutable worker is
skipped at most once, and no sweep needs to have run for a route to be
right. The ring is compacted when holes outnumber members, which keeps
skipping holes O(1) amortised.

Round-robin is the default strategy. The routing options
(:mod:`._routing`) filter :meth:`Rotation.everyone` (the members in the
ring, then those out of it) and choose among the candidates left; their
round-robin is :meth:`Rotation.next_of`, on the same cursor. The rotation
knows nothing of the registry around it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._records import Member

__all__ = ["Rotation"]


class Rotation:
    """The routable members of one ``(verb, capability)``, served round-robin."""

    __slots__ = ("cursor", "live", "outside", "ring", "size")

    def __init__(self) -> None:
        self.ring: list[Member | None] = []
        self.cursor = 0
        self.live = 0  # members in the ring (the rest of it is holes)
        self.size = 0  # members in all, in the ring or out of it
        # The members out of the ring, by worker id; made when the first
        # leaves it (most rotations never have one: no memory for them).
        self.outside: dict[str, Member] | None = None

    def add(self, member: Member) -> None:
        """A new member: seated at the end of the ring (the last to be served)."""
        self.size += 1
        member.slot = len(self.ring)
        self.ring.append(member)
        self.live += 1

    def remove(self, member: Member) -> None:
        """A member leaves for good."""
        self.leave(member)
        self.size -= 1
        if self.outside is not None:
            self.outside.pop(member.worker.worker_id, None)

    def join(self, member: Member) -> None:
        """Seat ``member`` (out of the ring) at the end of the ring."""
        if self.outside is not None:
            self.outside.pop(member.worker.worker_id, None)
            if not self.outside:
                self.outside = None
        member.slot = len(self.ring)
        self.ring.append(member)
        self.live += 1

    def leave(self, member: Member) -> None:
        """Take ``member`` out of the ring (it stays a member), if it is in it."""
        if member.slot < 0:
            return
        self.ring[member.slot] = None
        member.slot = -1
        self.live -= 1
        if self.outside is None:
            self.outside = {}
        self.outside[member.worker.worker_id] = member
        if len(self.ring) > 2 * self.live + 4:
            self._compact()

    def take_seat(self, old: Member, new: Member) -> None:
        """``new`` replaces member ``old``, in its seat (a re-registration keeps its turn)."""
        if old.slot < 0:
            self.join(new)
            return
        new.slot = old.slot
        self.ring[new.slot] = new
        old.slot = -1

    def next(self, now: float) -> Member | None:
        """The next member routable at ``now``, moving the cursor past it; ``None`` if none is.

        ``now`` must be a finite number (the registry checks it): members
        found unroutable leave the ring.
        """
        while self.live:
            ring = self.ring
            index = self.cursor
            if index >= len(ring):
                index = 0
            member = ring[index]
            self.cursor = index + 1
            if member is None:
                continue  # a hole left by a member that went out
            if now <= member.worker.routable_until:
                return member
            self.leave(member)
            member.worker.parked = True
        return None

    def next_of(self, candidates: Sequence[Member]) -> Member | None:
        """The first of ``candidates`` the cursor reaches, moving the cursor past it.

        Round-robin among a subset of the members, in O(len(candidates)).
        ``candidates`` are in the order of :meth:`everyone` (the filters
        keep it): those in the ring by slot, then those out of it. So the
        first the cursor reaches is the first at or after the cursor, else
        (the cursor wraps around) the first of all; a candidate out of the
        ring comes after those in it. The loop stops at the first.
        """
        if not candidates:
            return None
        cursor = self.cursor
        chosen = candidates[0]
        for member in candidates:
            if member.slot >= cursor:
                chosen = member
                break
        if chosen.slot >= 0:
            self.cursor = chosen.slot + 1
        return chosen

    def everyone(self) -> Sequence[Member]:
        """Every member: those in the ring in ring order, then those out of it. O(members).

        Read it before the rotation changes, and do not change it: with no
        hole and no member out (most rotations), it is the ring itself, not
        a copy (a copy was a tenth of a route with options).
        """
        if not self.outside and self.live == len(self.ring):
            return self.ring  # type: ignore[return-value]  # no hole: every slot a member
        # filter(None, ...) drops the holes (a member is always true) in C,
        # cheaper than a comprehension.
        inside = list(filter(None, self.ring))
        return inside if not self.outside else inside + list(self.outside.values())

    def __len__(self) -> int:
        return self.size

    def _compact(self) -> None:
        ring: list[Member | None] = []
        cursor = 0
        for index, member in enumerate(self.ring):
            if index == self.cursor:
                cursor = len(ring)
            if member is not None:
                member.slot = len(ring)
                ring.append(member)
        self.ring = ring
        self.cursor = cursor
