"""A follower's replica against the controller's registry, in-process, driven by hypothesis.

The controller is a core registry in fake time; the follower is fed its
snapshot and its changes as they travel: rendered to JSON by the wire
models (``SnapshotAnswer``, ``WatchAnswer``), read back, decoded by the
follower (``crank_worker_client._feed``) and applied with the core's fold.
After every feed the replica must hold the controller's workers, URLs,
capabilities and states, and route only to workers the controller holds
routable by state.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from crank_registry import (
    CapabilityRegistry,
    HealthPolicy,
    SelfPreservationSettings,
    SnapshotAnswer,
    WatchAnswer,
    WorkerNotRegistered,
    structure,
    unstructure,
    unstructure_event,
)
from crank_worker_client import NoWorkerAvailable, RegistryFollower, UnknownCapability
from tests.builders import capability

T0 = 1_700_000_000.0
POLICY = HealthPolicy(heartbeat_interval=10.0, unhealthy_after=20.0, evict_after=40.0)
EPOCH = "e1"
WORKER_IDS = ("w0", "w1", "w2")
KEYS = (("run", "a"), ("run", "b"), ("stop", "a"))
# Time steps around the health boundaries (20 s, 40 s).
STEPS = (0.5, 5.0, 10.0, 19.5, 20.5, 39.5, 40.5, 100.0)


def travelled(model: Any, kind: type[Any]) -> Any:
    """``model`` as the controller sends it (JSON text) and the follower reads it."""
    return structure(json.loads(json.dumps(unstructure(model))), kind)


def snapshot_of(controller: CapabilityRegistry) -> SnapshotAnswer:
    snapshot = controller.snapshot()
    answer = SnapshotAnswer(
        epoch=EPOCH,
        revision=snapshot.revision,
        health_policy=controller.policy,
        workers=snapshot.workers,
    )
    return travelled(answer, SnapshotAnswer)  # type: ignore[no-any-return]


def feed(follower: RegistryFollower, controller: CapabilityRegistry, page: int) -> None:
    """Every change the follower lacks, in pages of ``page``, as /watch answers them."""
    while True:
        changes, latest = controller.changes_since(follower.revision, page)
        answer = WatchAnswer(
            epoch=EPOCH, revision=latest, events=tuple(map(unstructure_event, changes))
        )
        assert follower._apply(travelled(answer, WatchAnswer))
        if not changes:
            return


operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("register"),
            st.sampled_from(WORKER_IDS),
            st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True),
            st.sampled_from(("1.0.0", "2.0.0")),
            st.integers(0, 1),
        ),
        st.tuples(st.just("heartbeat"), st.sampled_from(WORKER_IDS)),
        st.tuples(st.just("deregister"), st.sampled_from(WORKER_IDS)),
        st.tuples(st.just("advance"), st.sampled_from(STEPS)),
        st.tuples(st.just("sweep")),
        st.tuples(st.just("advance and sweep"), st.sampled_from(STEPS)),
        st.tuples(st.just("feed"), st.integers(1, 4)),
        st.tuples(st.just("snapshot")),
    ),
    max_size=60,
)

#: Unhealthy, then healthy again, then evicted, each change fed as it happens.
RECOVERY = [
    ("register", "w0", [("run", "a")], "1.0.0", 0),
    ("register", "w1", [("run", "a"), ("run", "b")], "2.0.0", 1),
    ("feed", 1),
    ("advance and sweep", 20.5),
    ("feed", 1),
    ("heartbeat", "w0"),
    ("feed", 2),
    ("advance and sweep", 100.0),
    ("feed", 4),
]


#: Self-preservation (from one worker of three): w0 made unhealthy as the first of
#: the silences, then reinstated by the change that starts it, then heard from.
REINSTATED = [
    ("register", "w0", [("run", "a")], "1.0.0", 0),
    ("register", "w1", [("run", "a")], "1.0.0", 0),
    ("register", "w2", [("run", "a"), ("run", "b")], "1.0.0", 0),
    ("feed", 1),
    ("sweep",),
    ("advance", 5.0),
    ("heartbeat", "w1"),
    ("heartbeat", "w2"),
    ("advance and sweep", 19.5),
    ("feed", 1),
    ("advance and sweep", 0.5),
    ("advance and sweep", 0.5),
    ("feed", 2),
    ("heartbeat", "w0"),
    ("advance and sweep", 100.0),
    ("feed", 4),
]
PRESERVING = SelfPreservationSettings(min_workers=1, threshold=0.5)


@settings(max_examples=300, deadline=None)
@given(operations, st.sampled_from((None, PRESERVING)))
@example(RECOVERY, None)
@example(REINSTATED, PRESERVING)
def test_a_follower_holds_what_the_controller_holds_and_routes_by_its_states(
    steps: list[tuple[Any, ...]], preservation: SelfPreservationSettings | None
) -> None:
    controller = CapabilityRegistry(POLICY, self_preservation=preservation)
    follower = RegistryFollower("http://controller", insecure=True, clock=lambda: 0.0)
    follower._use_snapshot(snapshot_of(controller))
    now = T0
    for step in steps:
        match step:
            case ("register", worker_id, keys, version, url):
                capabilities = [capability(name, verb, version=version) for verb, name in keys]
                controller.register(
                    worker_id, f"https://{worker_id}-{url}:8443", capabilities, now=now
                )
            case ("heartbeat", worker_id):
                with contextlib.suppress(WorkerNotRegistered):
                    controller.heartbeat(worker_id, now=now)
            case ("deregister", worker_id):
                with contextlib.suppress(WorkerNotRegistered):
                    controller.deregister(worker_id, now=now)
            case ("advance", seconds):
                now += seconds
            case ("sweep",):
                controller.cleanup_stale(now=now)
            case ("advance and sweep", seconds):
                now += seconds
                controller.cleanup_stale(now=now)
            case ("feed", page):
                feed(follower, controller, page)
                agrees(follower, controller)
            case ("snapshot",):
                follower._use_snapshot(snapshot_of(controller))
                agrees(follower, controller)
    feed(follower, controller, 1000)
    agrees(follower, controller)


def agrees(follower: RegistryFollower, controller: CapabilityRegistry) -> None:
    """The replica holds the controller's registry; its routes go where the states allow."""
    replica = follower.registry
    assert replica.revision == controller.revision
    theirs = {record.worker_id: record for record in controller.records()}
    mine = {record.worker_id: record for record in replica.records()}
    assert list(mine) == list(theirs)
    for worker_id, record in mine.items():
        original = theirs[worker_id]
        assert record.worker_url == original.worker_url
        assert unstructure(record.capabilities) == unstructure(original.capabilities)
        assert (record.verified, record.silent) == (original.verified, original.silent)
        # Heartbeats are not events: the replica knows the last one an event carried.
        assert record.last_heartbeat <= original.last_heartbeat
        if original.silent:
            assert record.last_heartbeat == original.last_heartbeat
    routable_by_state = {worker_id for worker_id, record in theirs.items() if not record.silent}
    for verb, name in KEYS:
        offered = {
            endpoint.worker_id
            for endpoint in controller.get_workers_for_capability(f"{verb}:{name}")
        }
        expected = offered & routable_by_state
        routed = set()
        for _ in range(len(WORKER_IDS) + 1):
            try:
                routed.add(anyio_run(follower, verb, name))
            except UnknownCapability:
                assert not offered
                break
            except NoWorkerAvailable:
                assert not expected
                break
        else:
            assert routed == expected


def anyio_run(follower: RegistryFollower, verb: str, name: str) -> str:
    """``await follower.route(verb, name)`` outside an event loop (it does no I/O when fresh)."""
    coroutine = follower.route(verb, name)
    try:
        coroutine.send(None)
    except StopIteration as done:
        endpoint = done.value
        return str(endpoint.worker_id)
    raise AssertionError("a fresh follower's route waited for something")
