"""The rotation's round-robin among candidates, against its definition."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from crank_registry import WorkerEndpoint
from crank_registry._health import Health
from crank_registry._records import Member, Worker
from crank_registry._rotation import Rotation
from tests.builders import capability


def member(worker_id: str) -> Member:
    worker = Worker(worker_id, f"https://{worker_id}:8443", (), Health.HEALTHY, 0.0, 0)
    endpoint = WorkerEndpoint(worker_id=worker_id, worker_url=worker.worker_url, version="1.0.0")
    return Member(worker, ("classify", "image.classify"), endpoint, capability())


def nearest(rotation: Rotation, candidates: list[Member]) -> Member:
    """The definition: the candidate at the least distance from the cursor, the first of equals.

    A slot's distance is how far the cursor moves to reach it, wrapping
    around the ring; a candidate out of the ring is farther than any in it.
    """
    length = len(rotation.ring)
    distances = [
        (member.slot - rotation.cursor) % length if member.slot >= 0 else length
        for member in candidates
    ]
    return candidates[distances.index(min(distances))]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(size=st.integers(1, 12), data=st.data())
def test_everyone_lists_each_member_once_and_next_of_gives_the_candidate_nearest_the_cursor(
    size: int, data: st.DataObject
) -> None:
    rotation = Rotation()
    members = [member(f"w{index}") for index in range(size)]
    for each in members:
        rotation.add(each)
    # Members leave the ring (holes, compaction) and some come back at its end.
    for each in data.draw(st.lists(st.sampled_from(members), max_size=2 * size)):
        rotation.leave(each)
    for each in data.draw(st.lists(st.sampled_from(members), max_size=size)):
        if each.slot < 0:
            rotation.join(each)
    rotation.cursor = data.draw(st.integers(0, len(rotation.ring)))
    # Every member once, in the ring's order, then those out of it.
    everyone = list(rotation.everyone())
    assert sorted(everyone, key=lambda each: each.worker.worker_id) == sorted(
        members, key=lambda each: each.worker.worker_id
    )
    inside = [each for each in everyone if each.slot >= 0]
    assert everyone[: len(inside)] == inside
    assert [each.slot for each in inside] == sorted(each.slot for each in inside)
    # Candidates as the filters leave them: a subsequence of everyone().
    candidates = [each for each in rotation.everyone() if data.draw(st.booleans())]
    if not candidates:
        assert rotation.next_of(candidates) is None
        return
    expected = nearest(rotation, candidates)
    cursor = rotation.cursor if expected.slot < 0 else expected.slot + 1
    assert rotation.next_of(candidates) is expected
    assert rotation.cursor == cursor
