"""The registry against a plain-dict model, driven by hypothesis.

The model is the rules of DESIGN.md written the obvious way (a dict of
workers, scanned on every question); the registry must agree with it after
every step: listings, counts, routes, heartbeat refusals, evictions,
imports and restores.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
from packaging.specifiers import SpecifierSet

from crank_registry import (
    CapabilityRegistry,
    CapabilityView,
    HealthPolicy,
    HealthState,
    RouteOptions,
    UnknownCapability,
    WorkerEndpoint,
    WorkerEvicted,
    WorkerImported,
    WorkerNotRegistered,
    WorkerState,
    WorkerUnhealthy,
)
from tests.builders import capability
from tests.core.helpers import T0

POLICY = HealthPolicy(heartbeat_interval=30.0, unhealthy_after=60.0, evict_after=120.0)
WORKER_IDS = ("w0", "w1", "w2", "w3", "w4")
KEYS = (("run", "a"), ("run", "b"), ("stop", "a"))
VERSIONS = ("1.0.0", "2.0.0")
# Steps of time, with the health boundaries (60, 120) and just past them.
STEPS = (0.0, 0.5, 1.0, 10.0, 29.5, 59.5, 60.0, 60.5, 61.0, 119.5, 120.0, 121.0, 250.0)


@attrs.define
class ModelWorker:
    url: str
    capabilities: dict[tuple[str, str], str]  # key -> version, in registration order
    last_heartbeat: float
    verified: bool


def routable(worker: ModelWorker, now: float) -> bool:
    return now - worker.last_heartbeat <= POLICY.unhealthy_after


def evictable(worker: ModelWorker, now: float) -> bool:
    return now - worker.last_heartbeat > POLICY.evict_after


def model_state(worker: ModelWorker, now: float) -> HealthState:
    if not worker.verified:
        return HealthState.UNVERIFIED
    return HealthState.HEALTHY if routable(worker, now) else HealthState.UNHEALTHY


capability_sets = st.lists(
    st.tuples(st.sampled_from(KEYS), st.sampled_from(VERSIONS)),
    min_size=1,
    max_size=3,
    unique_by=lambda pair: pair[0],
)


class RegistryMachine(RuleBasedStateMachine):
    """One registry (A), a model of it, and a peer (B) that only imports A's state."""

    @initialize()
    def start(self) -> None:
        self.now = T0
        self.registry = CapabilityRegistry(POLICY)
        self.model: dict[str, ModelWorker] = {}
        self.deregistered_at: dict[str, float] = {}
        self.peer = CapabilityRegistry(POLICY)
        self.peer_model: dict[str, ModelWorker] = {}

    # ------------------------------------------------------------------ rules

    @rule(
        worker_id=st.sampled_from(WORKER_IDS),
        capabilities=capability_sets,
        port=st.integers(1, 3),
    )
    def register(
        self, worker_id: str, capabilities: list[tuple[tuple[str, str], str]], port: int
    ) -> None:
        url = f"https://{worker_id}:{port}"
        schemas = [
            capability(name, verb, version=version) for (verb, name), version in capabilities
        ]
        [event] = self.registry.register(worker_id, url, schemas, now=self.now)
        assert event.replaced == (worker_id in self.model)
        # Assigning to an existing key keeps its place: registration order.
        self.model[worker_id] = ModelWorker(url, dict(capabilities), self.now, True)
        self.deregistered_at.pop(worker_id, None)

    @rule(worker_id=st.sampled_from(WORKER_IDS))
    def heartbeat(self, worker_id: str) -> None:
        worker = self.model.get(worker_id)
        if worker is None or not worker.verified or evictable(worker, self.now):
            try:
                self.registry.heartbeat(worker_id, now=self.now)
            except WorkerNotRegistered as error:
                assert error.worker_id == worker_id
            else:
                raise AssertionError(f"heartbeat of {worker_id} should have been refused")
            return
        self.registry.heartbeat(worker_id, now=self.now)
        worker.last_heartbeat = self.now

    @rule(worker_id=st.sampled_from(WORKER_IDS))
    def deregister(self, worker_id: str) -> None:
        worker = self.model.get(worker_id)
        if worker is None or evictable(worker, self.now):
            # Unknown, or past evict_after (evicted at the next sweep): refused.
            try:
                self.registry.deregister(worker_id, now=self.now)
            except WorkerNotRegistered:
                return
            raise AssertionError(f"deregister of unknown {worker_id} should have been refused")
        self.registry.deregister(worker_id, now=self.now)
        del self.model[worker_id]
        self.deregistered_at[worker_id] = self.now

    @rule(step=st.sampled_from(STEPS))
    def advance_time(self, step: float) -> None:
        self.now += step

    @rule(
        worker_id=st.sampled_from(WORKER_IDS),
        limit=st.sampled_from([POLICY.unhealthy_after, POLICY.evict_after]),
        past=st.sampled_from([0.0, 0.25]),
    )
    def advance_to_a_boundary(self, worker_id: str, limit: float, past: float) -> None:
        """Jump to exactly a worker's health boundary, or just past it."""
        worker = self.model.get(worker_id)
        if worker is not None:
            self.now = max(self.now, worker.last_heartbeat + limit + past)

    @rule()
    def advance_to_next_deadline(self) -> None:
        """Up to and including next_deadline() nothing changes; a sweep there does nothing."""
        deadline = self.registry.next_deadline()
        if deadline is None or deadline <= self.now:
            return
        before = {w: routable(worker, self.now) for w, worker in self.model.items()}
        self.now = deadline
        assert {w: routable(worker, self.now) for w, worker in self.model.items()} == before
        assert self.registry.cleanup_stale(now=self.now) == ()

    @rule()
    def cleanup(self) -> None:
        events = self.registry.cleanup_stale(now=self.now)
        stale = {w for w, worker in self.model.items() if evictable(worker, self.now)}
        assert all(isinstance(e, WorkerUnhealthy | WorkerEvicted) for e in events)
        assert all(e.at == self.now for e in events)
        evicted = [e.worker_id for e in events if isinstance(e, WorkerEvicted)]
        assert sorted(evicted) == sorted(stale)
        # Unhealthy: only workers not routable now, each once, before any eviction of it.
        unhealthy = [e.worker_id for e in events if isinstance(e, WorkerUnhealthy)]
        assert len(set(unhealthy)) == len(unhealthy)
        assert not any(routable(self.model[w], self.now) for w in unhealthy)
        for event in events:
            assert event.last_heartbeat == self.model[event.worker_id].last_heartbeat
        for worker_id in stale:
            del self.model[worker_id]

    @rule(key=st.sampled_from(KEYS))
    def route(self, key: tuple[str, str]) -> None:
        endpoint = self.route_once(key)
        candidates = self.routable_for(key)
        if not candidates:
            assert endpoint is None
            return
        assert endpoint is not None, f"{key} has routable workers {candidates}"
        assert endpoint.worker_id in candidates
        worker = self.model[endpoint.worker_id]
        assert endpoint.worker_url == worker.url
        assert endpoint.version == worker.capabilities[key]

    @rule(
        key=st.sampled_from(KEYS),
        rounds=st.integers(1, 3),
        extra=st.integers(0, 4),
        mixed=st.booleans(),
    )
    def route_round_robin(self, key: tuple[str, str], rounds: int, extra: int, mixed: bool) -> None:
        """Over k routes to n routable workers each gets floor(k/n) or ceil(k/n).

        ``mixed``: every other route goes through the options path with no
        option set, which must be the same round-robin.
        """
        candidates = self.routable_for(key)
        if not candidates:
            assert self.route_once(key) is None
            return
        count = rounds * len(candidates) + extra
        answers = []
        for index in range(count):
            endpoint = self.route_once(key, RouteOptions() if mixed and index % 2 else None)
            assert endpoint is not None
            answers.append(endpoint.worker_id)
        assert set(answers) <= set(candidates)
        tally = [answers.count(worker_id) for worker_id in candidates]
        floor, ceil = count // len(candidates), -(-count // len(candidates))
        assert all(floor <= n <= ceil for n in tally), (candidates, answers)

    @rule(
        key=st.sampled_from(KEYS),
        version=st.sampled_from([None, ">=1.5", "<2", "==2.*"]),
        exclude=st.lists(st.sampled_from(WORKER_IDS), max_size=2),
    )
    def route_with_options(
        self, key: tuple[str, str], version: str | None, exclude: list[str]
    ) -> None:
        """The answer meets every filter; explain gives each worker the model's first rule."""
        options = RouteOptions(version=version, exclude=exclude or None)
        known = any(key in worker.capabilities for worker in self.model.values())
        try:
            endpoint, explanation = self.registry.explain_route(*key, now=self.now, options=options)
        except UnknownCapability:
            assert not known
            return
        reasons: dict[str, str | None] = {}
        for worker_id, worker in self.model.items():
            if key not in worker.capabilities:
                continue
            if not routable(worker, self.now):
                reasons[worker_id] = "unhealthy"
            elif version is not None and not SpecifierSet(version).contains(
                worker.capabilities[key], prereleases=True
            ):
                reasons[worker_id] = "version"
            elif worker_id in exclude:
                reasons[worker_id] = "excluded"
            else:
                reasons[worker_id] = None
        assert {entry.worker_id: entry.reason for entry in explanation.removed} == {
            worker_id: reason for worker_id, reason in reasons.items() if reason is not None
        }
        assert sorted(explanation.candidates) == sorted(w for w, r in reasons.items() if r is None)
        if endpoint is None:
            assert explanation.candidates == ()
        else:
            assert endpoint.worker_id in explanation.candidates
            assert endpoint.version == self.model[endpoint.worker_id].capabilities[key]

    @rule()
    def import_own_export(self) -> None:
        before = self.registry.records()
        state = json.loads(json.dumps(self.registry.export_state()))
        assert self.registry.import_remote_state("self", state, now=self.now) == ()
        assert self.registry.records() == before

    @rule()
    def peer_imports(self) -> None:
        """B merges A's snapshot: newest heartbeat wins, imported records are unverified."""
        state = json.loads(json.dumps(self.registry.export_state()))
        events = self.peer.import_remote_state("a", state, now=self.now)
        expected = self.merge(self.peer_model, self.model, {})
        assert [e.worker_id for e in events] == expected
        assert all(isinstance(e, WorkerImported) and e.source == "a" for e in events)
        self.check_listing(self.peer, self.peer_model)

    @rule()
    def import_from_peer(self) -> None:
        """A merges B's snapshot; nothing deregistered here later comes back."""
        state = json.loads(json.dumps(self.peer.export_state()))
        events = self.registry.import_remote_state("b", state, now=self.now)
        expected = self.merge(self.model, self.peer_model, self.deregistered_at)
        assert [e.worker_id for e in events] == expected

    @rule()
    def peer_cleanup(self) -> None:
        events = self.peer.cleanup_stale(now=self.now)
        stale = {w for w, worker in self.peer_model.items() if evictable(worker, self.now)}
        assert {e.worker_id for e in events if isinstance(e, WorkerEvicted)} == stale
        for worker_id in stale:
            del self.peer_model[worker_id]

    @rule()
    def restart_from_records(self) -> None:
        """A restarts: its records are restored into a new registry, unverified."""
        records = self.registry.records()
        self.registry = CapabilityRegistry(POLICY)
        kept = self.registry.restore(records, now=self.now)
        for worker_id in list(self.model):
            if evictable(self.model[worker_id], self.now):
                del self.model[worker_id]
            else:
                self.model[worker_id].verified = False
        assert kept == len(self.model)
        self.deregistered_at.clear()  # a new registry remembers no deregistration

    # ------------------------------------------------------------- invariants

    @invariant()
    def listings_equal_the_model(self) -> None:
        self.check_listing(self.registry, self.model)

    @invariant()
    def next_deadline_is_never_late(self) -> None:
        deadline = self.registry.next_deadline()
        if not self.model:
            return
        assert deadline is not None
        changes = [
            worker.last_heartbeat
            + (POLICY.unhealthy_after if routable(worker, self.now) else POLICY.evict_after)
            for worker in self.model.values()
        ]
        assert deadline <= min(changes)

    @invariant()
    def routes_never_pick_an_unroutable_worker(self) -> None:
        for key in KEYS:
            # Looking does not change the answer set, only the rotation.
            endpoint = self.route_once(key)
            candidates = self.routable_for(key)
            assert (endpoint is None) == (not candidates)
            assert endpoint is None or endpoint.worker_id in candidates

    # ---------------------------------------------------------------- helpers

    def route_once(
        self, key: tuple[str, str], options: RouteOptions | None = None
    ) -> WorkerEndpoint | None:
        """One route; unknown exactly when no worker of the model offers ``key``, in any state."""
        known = any(key in worker.capabilities for worker in self.model.values())
        try:
            endpoint = self.registry.route(*key, now=self.now, options=options)
        except UnknownCapability:
            assert not known, f"{key} is offered by a registered worker"
            return None
        assert known, f"{key} is offered by no registered worker"
        return endpoint

    def routable_for(self, key: tuple[str, str]) -> list[str]:
        return [
            worker_id
            for worker_id, worker in self.model.items()
            if key in worker.capabilities and routable(worker, self.now)
        ]

    def merge(
        self,
        into: dict[str, ModelWorker],
        source: dict[str, ModelWorker],
        deregistered_at: dict[str, float],
    ) -> list[str]:
        imported = []
        for worker_id, remote in source.items():
            if evictable(remote, self.now):
                continue
            if deregistered_at.get(worker_id, -1.0) >= remote.last_heartbeat:
                continue
            local = into.get(worker_id)
            if local is not None and local.last_heartbeat >= remote.last_heartbeat:
                continue
            into[worker_id] = attrs.evolve(
                remote, capabilities=dict(remote.capabilities), verified=False
            )
            imported.append(worker_id)
        return imported

    def check_listing(self, registry: CapabilityRegistry, model: dict[str, ModelWorker]) -> None:
        now = self.now
        listed = [
            (
                view.worker_id,
                view.worker_url,
                view.last_heartbeat,
                view.state,
                view.is_healthy,
                [(c.key, c.version) for c in view.capabilities],
            )
            for view in registry.workers(now=now)
        ]
        expected: list[Any] = [
            (
                worker_id,
                worker.url,
                worker.last_heartbeat,
                model_state(worker, now),
                routable(worker, now),
                list(worker.capabilities.items()),
            )
            for worker_id, worker in model.items()
        ]
        assert listed == expected
        assert registry.counts(now=now) == (
            len(model),
            sum(routable(worker, now) for worker in model.values()),
        )
        shown = [model_state(worker, now) for worker in model.values()]
        assert registry.state_counts(now=now) == {
            **{WorkerState(state.value): shown.count(state) for state in HealthState},
            WorkerState.DRAINING: 0,  # this model drains none (tests/core/test_drain.py)
            WorkerState.EJECTED: 0,  # nor ejects any (tests/core/test_ejection.py)
        }
        offered = {key for worker in model.values() for key in worker.capabilities}
        assert registry.capability_count() == len(offered)
        groups: dict[tuple[str, str, str], tuple[list[str], list[str]]] = {}
        for worker_id, worker in model.items():
            for (verb, name), version in worker.capabilities.items():
                members, healthy = groups.setdefault((verb, name, version), ([], []))
                members.append(worker_id)
                if routable(worker, now):
                    healthy.append(worker_id)
        assert registry.get_all_capabilities(now=now) == [
            CapabilityView(verb, name, version, tuple(members), tuple(healthy))
            for (verb, name, version), (members, healthy) in sorted(groups.items())
        ]
        for verb, name in KEYS:
            assert [e.worker_id for e in registry.get_workers_for_capability(f"{verb}:{name}")] == [
                worker_id
                for worker_id, worker in model.items()
                if (verb, name) in worker.capabilities
            ]


RegistryMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
)
TestRegistryMachine = RegistryMachine.TestCase
