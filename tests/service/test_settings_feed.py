"""The registry's settings in the change feed: the access policy and the SLO files.

They are changes (``policy_changed``, ``slos_changed``) decided by the
service at start and when a watched file changes, journalled, carried by
``/snapshot`` and by ``/watch``. Every answer is checked against the
OpenAPI document by the test client.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio
import pytest

from crank_registry import (
    AccessRules,
    CapabilityRegistry,
    Change,
    PolicyChanged,
    PolicyDenied,
    SlosChanged,
    SnapshotAnswer,
    parse_policy,
    structure,
    structure_event,
    unstructure,
)
from crank_registry_asgi import ServiceConfig
from crank_registry_asgi.slos import read_slos
from tests.builders import capability_payload
from tests.service.helpers import Controller, running
from tests.service.test_slos import CLASSIFY, write

pytestmark = pytest.mark.anyio

PING = capability_payload(verb="ping", name="x")
POLICY = 'default = "deny"\n\n[[rule]]\nidentity = "*"\nallow = ["classify:*"]\n'


def configured(tmp_path: Path, policy: str = POLICY) -> ServiceConfig:
    """A controller with a journal, one SLO file and a policy file."""
    state_dir = tmp_path / "state"
    write(state_dir, "classify.yaml", CLASSIFY + "latency_p95_ms: 120\n")
    path = tmp_path / "policy.toml"
    path.write_text(policy)
    return ServiceConfig(state_dir=state_dir, policy_file=path)


async def changes_after(api: Controller, since: int, timeout: float = 1) -> list[dict[str, Any]]:
    response = await api.get(f"/watch?epoch={api.service.epoch}&since={since}&timeout={timeout}")
    assert response.status_code == 200, response.text
    return response.json()["events"]  # type: ignore[no-any-return]


async def test_the_first_changes_are_the_policy_and_the_slo_files(tmp_path: Path) -> None:
    config = configured(tmp_path)
    async with running(config) as api:
        events = await changes_after(api, 0)
        assert [event["type"] for event in events] == ["policy_changed", "slos_changed"]
        policy, slos = map(structure_event, events)
        assert isinstance(policy, PolicyChanged) and isinstance(slos, SlosChanged)
        assert config.policy_file is not None
        rules = parse_policy(config.policy_file.read_text(), str(config.policy_file))
        assert policy.access_policy == AccessRules.of(rules, config.trust_domain)
        assert config.state_dir is not None
        assert slos.slos == read_slos(config.state_dir / "slos")


async def test_snapshot_holds_them_and_a_follower_routes_as_the_controller(
    tmp_path: Path,
) -> None:
    async with running(configured(tmp_path)) as api:
        await api.register("w1")
        await api.register("w2", capabilities=[PING])
        response = await api.get("/snapshot")
        body = response.json()
        assert body["access_policy"] == unstructure(api.registry.access_rules)
        assert body["access_policy"]["default"] == "deny"
        assert [entry["file"] for entry in body["slos"]] == ["classify.yaml"]
        follower = CapabilityRegistry()
        follower.apply_snapshot(structure(body, SnapshotAnswer).snapshot())
        assert follower.snapshot() == api.registry.snapshot()
        # Anonymous callers are denied "ping" on both (default deny), and not "classify".
        denied = await api.post("/route", {"verb": "ping", "capability": "x"})
        assert (denied.status_code, denied.json()["error"]) == (403, "policy_denied")
        with pytest.raises(PolicyDenied) as raised:
            follower.route("ping", "x", now=api.clock())
        assert raised.value.reason == denied.json()["reason"]
        assert follower.route("classify", "image.classify", now=api.clock()) is not None


async def test_a_changed_slo_file_is_a_change_in_watch(tmp_path: Path) -> None:
    config = configured(tmp_path)
    async with running(config) as api:
        revision = api.registry.revision
        watcher = api.service.slo_watcher
        assert watcher is not None
        assert config.state_dir is not None
        write(config.state_dir, "classify.yaml", CLASSIFY + "latency_p95_ms: 80\n")
        assert await watcher.check()
        (event,) = await changes_after(api, revision)
        change = structure_event(event)
        assert isinstance(change, SlosChanged) and change.revision == revision + 1
        assert change.slos[0].slo.latency_p95_ms == 80
        assert not await watcher.check()  # read, in effect: nothing more
        assert await changes_after(api, revision + 1, timeout=0.01) == []


async def test_a_policy_file_change_wakes_a_long_poll(tmp_path: Path) -> None:
    config = configured(tmp_path)
    async with running(config) as api:
        await api.register("w2", capabilities=[PING])
        revision = api.registry.revision
        watcher = api.service.policy_watcher
        assert watcher is not None and config.policy_file is not None
        answers: list[list[dict[str, Any]]] = []

        async def poll() -> None:
            answers.append(await changes_after(api, revision, timeout=60))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(poll)
                await anyio.wait_all_tasks_blocked()
                assert answers == []
                config.policy_file.write_text('default = "allow"\n')
                assert await watcher.check()
        [[event]] = answers
        change = structure_event(event)
        assert isinstance(change, PolicyChanged)
        assert change.access_policy == AccessRules(default="allow")
        allowed = await api.post("/route", {"verb": "ping", "capability": "x"})
        assert (allowed.status_code, allowed.json()["worker_id"]) == (200, "w2")


async def test_a_restart_replays_them_and_decides_only_what_changed(tmp_path: Path) -> None:
    config = configured(tmp_path)
    async with running(config) as api:
        await api.register("w1")
        revision = api.registry.revision
        rules, slos = api.registry.access_rules, api.registry.slos
    async with running(config) as api:
        # The same files: the journal's settings stand, no change is made.
        assert api.registry.revision == revision
        assert (api.registry.access_rules, api.registry.slos) == (rules, slos)
        await api.service.effects.journal.compact()  # the settings on the snapshot
    assert config.policy_file is not None
    config.policy_file.write_text('default = "allow"\n')
    async with running(config) as api:
        assert api.registry.revision == revision + 1
        (event,) = await changes_after(api, revision)
        assert structure_event(event) == PolicyChanged(
            event["at"], AccessRules(default="allow"), revision=revision + 1
        )
        assert api.registry.slos == slos  # from the compacted snapshot


async def test_a_change_the_journal_refuses_is_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = configured(tmp_path)
    async with running(config) as api:
        watcher = api.service.policy_watcher
        assert watcher is not None and config.policy_file is not None
        revision = api.registry.revision
        journal = api.service.effects.journal
        api.service.effects.journal = None  # as when the journal is not open
        config.policy_file.write_text('default = "allow"\n')
        with caplog.at_level(logging.ERROR), pytest.raises(Exception, match="journal"):
            await watcher.check()
        assert api.registry.revision == revision  # nothing changed
        assert api.registry.access_rules is not None
        assert api.registry.access_rules.default == "deny"
        api.service.effects.journal = journal
        assert await watcher.check()  # the same content, read again
        assert api.registry.access_rules.default == "allow"
        changes, _ = api.registry.changes_since(revision)
        assert [type(change) for change in changes] == [PolicyChanged]
        assert all(isinstance(change, Change) for change in changes)
