"""A snapshot's workers are held by a fast path: it must build what installing them one by one does.

``CapabilityRegistry.apply_snapshot`` holds a snapshot's workers with
``_restore``, which works out each capability tuple once. The plain path is
``_install`` for each worker, as a registration is held. For any snapshot
(shared and unshared tuples, values equal in text and not in identity,
more values of one capability than are stored, worker ids met twice, every
health) both must leave the same registry: the same workers, rings,
indexes, stored values and their holders, deadlines and routes.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from crank_registry import (
    CapabilityRegistry,
    CapabilitySchema,
    JournalReader,
    Snapshot,
    WorkerRecord,
    encode_snapshot,
    structure,
)
from crank_registry._health import Health
from crank_registry._records import MAX_VARIANTS
from tests.builders import capability_payload
from tests.core.helpers import T0

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None)


def _values() -> list[CapabilitySchema]:
    """Values of three capabilities; ``a`` has more distinct values than are stored.

    Each payload is built twice: equal in text, distinct objects (two
    registrations' values).
    """
    payloads = [capability_payload("a", version=f"1.0.{n}") for n in range(MAX_VARIANTS + 2)]
    payloads += [capability_payload("b", version=v) for v in ("1.0.0", "2.0.0")]
    payloads += [capability_payload("c", verb="other", input_schema={"maxLength": 1})]
    return [structure(payload, CapabilitySchema) for payload in payloads for _ in range(2)]


VALUES = _values()


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    """Records whose capability tuples are shared (as a snapshot read back) or their own."""

    def capability_tuple() -> tuple[CapabilitySchema, ...]:
        chosen = draw(st.lists(st.sampled_from(VALUES), min_size=1, max_size=3))
        by_key = {value.key: value for value in chosen}  # no (verb, name) twice
        return tuple(by_key.values())

    shared = [capability_tuple() for _ in range(draw(st.integers(1, 4)))]
    records = []
    for _ in range(draw(st.integers(0, 25))):
        shares = draw(st.booleans())
        capabilities = draw(st.sampled_from(shared)) if shares else capability_tuple()
        records.append(
            WorkerRecord(
                f"w{draw(st.integers(0, 7))}",
                f"https://w{draw(st.integers(0, 3))}:8443",
                capabilities,
                T0 + draw(st.integers(-200, 10)),
                verified=draw(st.booleans()),
                silent=draw(st.booleans()),
                draining=draw(st.booleans()),
                ejected_until=draw(st.none() | st.just(T0 + 30.0)),
                ejections=draw(st.none() | st.integers(1, 3)),
                ejection_ended=draw(st.none() | st.just(T0 - 60.0)),
            )
        )
    return Snapshot(draw(st.integers(0, 100)), tuple(records))


def installed_one_by_one(snapshot: Snapshot) -> CapabilityRegistry:
    """The plain path: an empty snapshot applied, then ``_install`` for each worker."""
    registry = CapabilityRegistry()
    registry.apply_snapshot(Snapshot(snapshot.revision, ()))
    for record in snapshot.workers:
        state = Health.of(verified=record.verified, silent=record.silent)
        registry._install(
            record.worker_id,
            record.worker_url,
            record.capabilities,
            state,
            record.last_heartbeat,
            draining=record.draining,
        )
        registry._restore_ejection(registry._workers[record.worker_id], record)
    return registry


def _first_seen(items: list[Any]) -> list[int]:
    """Each item as the index of the first item identical to it (what is shared with what)."""
    seen: list[Any] = []
    numbers = []
    for item in items:
        found = next((n for n, other in enumerate(seen) if other is item), None)
        if found is None:
            found = len(seen)
            seen.append(item)
        numbers.append(found)
    return numbers


def state(registry: CapabilityRegistry) -> dict[str, Any]:
    """Everything the registry holds, with identities (sharing) as indexes."""
    workers = []
    for worker in registry._workers.values():
        stored = [
            [variant.value for variant in registry._values[c.key].variants].index(c)
            if any(v.value is c for v in registry._values[c.key].variants)
            else -1
            for c in worker.capabilities
        ]
        workers.append(
            (
                worker.worker_id,
                worker.worker_url,
                worker.capabilities,
                stored,
                worker.health,
                worker.last_heartbeat,
                worker.order,
                worker.routable_until,
                worker.deadline,
                worker.parked,
                worker.load,
                worker.draining,
                (worker.ejected_until, worker.ejections, worker.ejection_ended),
                [
                    (m.key, m.key is registry._values[m.key].key, m.slot, m.endpoint, m.capability)
                    for m in worker.members
                ],
                _first_seen([m.endpoint for m in worker.members]),
                all(m.worker is worker for m in worker.members),
            )
        )
    return {
        "workers": workers,
        "values": {
            key: [(v.value, v.users) for v in values.variants]
            for key, values in registry._values.items()
        },
        "rings": {
            key: (
                [None if m is None else m.worker.worker_id for m in rotation.ring],
                rotation.cursor,
                rotation.live,
                rotation.size,
                None if rotation.outside is None else list(rotation.outside),
            )
            for key, rotation in registry._rotations.items()
        },
        "indexes": {
            key: (index.orders, index.ids, index.holes)
            for key, index in registry._by_capability.items()
        },
        "everyone": (registry._everyone.orders, registry._everyone.ids),
        "keys": registry._keys,
        "deadlines": [(d, n, w.worker_id) for d, n, w in registry._deadlines],
        "routable": registry._routable_count,
        "ejected": (registry._ejected_count, sorted(registry._ejections)),
        "revision": registry.revision,
    }


def routes(registry: CapabilityRegistry) -> list[str | None]:
    """Three rounds of routes to every capability, then again after the deadlines passed."""
    answers = []
    for now in (T0, T0 + 90):
        for verb, name in list(registry._keys) * 3:
            endpoint = registry.route(verb, name, now=now)
            answers.append(None if endpoint is None else endpoint.worker_id)
    return answers


@SETTINGS
@given(snapshots())
def test_a_snapshot_applied_equals_its_workers_installed_one_by_one(snapshot: Snapshot) -> None:
    fast = CapabilityRegistry()
    fast.apply_snapshot(snapshot)
    plain = installed_one_by_one(snapshot)
    assert state(fast) == state(plain)
    assert routes(fast) == routes(plain)
    assert state(fast) == state(plain)  # routes moved the cursors alike


@SETTINGS
@given(snapshots())
def test_a_snapshot_read_back_from_its_lines_equals_one_by_one(snapshot: Snapshot) -> None:
    """As recovery meets it: decoded lines, one tuple per capability set, parts of two workers."""
    reader = JournalReader()
    records = [
        record
        for line in encode_snapshot(snapshot, part_size=2)
        for part in reader.decode(line)
        for record in part.records  # type: ignore[union-attr]
    ]
    read_back = Snapshot(snapshot.revision, tuple(records))
    fast = CapabilityRegistry()
    fast.apply_snapshot(read_back)
    assert state(fast) == state(installed_one_by_one(read_back))
