"""The shared registry's SLO files and access policy: the sweeper lease holder's, published.

A starts first and holds the lease: its ``--policy`` file and SLO files are
the registry's. B, with other files, routes under the registry's and says
so once per difference; when A stops, B takes the lease over and publishes
its own. A controller that does not hold the lease cannot publish: the
script drops what it writes, and so it drops a ``self_preservation`` change
(the lease holder's sweep decides it) from any other controller.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import anyio.abc
import pytest

from crank_registry import AccessRules, SelfPreservationChanged
from crank_registry.testing import FakeClock
from tests.redis.helpers import controller, machine_url, unique_prefix, wait_until
from tests.service.helpers import Controller

pytestmark = pytest.mark.anyio

LOGGER = "crank_registry_asgi.shared_settings"

DENY = """\
default = "deny"

[[rule]]
identity = "spiffe://crank.local/client/ops"
allow = ["*"]
"""

SLO = """\
verb: classify
capability: image.classify
latency_p95_ms: 120
"""


def state_dir(root: Path, name: str, slos: dict[str, str]) -> Path:
    """A state directory whose ``slos/`` holds ``slos`` (file name -> YAML)."""
    directory = root / name
    (directory / "slos").mkdir(parents=True)
    for file, text in slos.items():
        (directory / "slos" / file).write_text(text)
    return directory


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelname == "WARNING"]


def files(api: Controller) -> list[str]:
    return [slo.file for slo in api.registry.slos]


async def test_the_lease_holder_publishes_the_others_log_the_difference_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    url = machine_url()
    clock = FakeClock()
    policy = tmp_path / "policy.toml"
    policy.write_text(DENY)
    a_dir = state_dir(tmp_path, "a", {"classify.yaml": SLO})
    b_dir = state_dir(tmp_path, "b", {})
    with unique_prefix(url) as prefix:
        async with controller(url, prefix, "a", clock, state_dir=a_dir, policy_file=policy) as a:
            # A took the lease at start and published before it was ready.
            assert a.service.store.holds_lease()
            a_rules = a.registry.access_rules
            assert a_rules is not None and a_rules.default == "deny"
            assert files(a) == ["classify.yaml"]
            assert warnings(caplog) == []
            async with controller(url, prefix, "b", clock, state_dir=b_dir) as b:
                assert not b.service.store.holds_lease()
                # B routes under the registry's settings, not its own flags'.
                assert b.registry.access_rules == a_rules
                assert files(b) == ["classify.yaml"]
                slo_warning, policy_warning = warnings(caplog)
                assert f"the SLO files in {b_dir / 'slos'} differ" in slo_warning
                assert "only_here=none only_in_registry=classify.yaml" in slo_warning
                assert policy_warning.startswith(
                    "the access policy of no --policy differs from the shared registry's"
                )
                assert "default allow" in policy_warning and "default deny" in policy_warning
                # Once per difference: not at every entry applied, nor at every look.
                for number in range(3):
                    await a.register(f"w{number}")
                await wait_until(lambda: len(b.registry) == 3, what="the workers on B")
                assert not await b.service.slo_watcher.check()
                assert len(warnings(caplog)) == 2
                # A's files change: A publishes them; B has a new difference to tell.
                policy.write_text(DENY.replace('"deny"', '"allow"', 1))
                assert await a.service.policy_watcher.check()
                await wait_until(
                    lambda: (
                        b.registry.access_rules is not None
                        and b.registry.access_rules.default == "allow"
                    ),
                    what="A's new policy on B",
                )
                assert len(warnings(caplog)) == 3
                assert "1 rules, default allow" in warnings(caplog)[-1]
                # B's files change: B does not hold the lease, so it publishes nothing.
                (b_dir / "slos" / "classify.yaml").write_text(SLO.replace("120", "90"))
                assert await b.service.slo_watcher.check()
                assert files(a) == files(b) == ["classify.yaml"]
                assert a.registry.slos[0].slo.latency_p95_ms == 120
                assert (
                    "only_here=none only_in_registry=none not_the_same=classify.yaml"
                    in (warnings(caplog)[-1])
                )
                # Now they agree: B says so, once.
                (b_dir / "slos" / "classify.yaml").write_text(SLO)
                assert await b.service.slo_watcher.check()
                agreed = [r.getMessage() for r in caplog.records if "agree with" in r.getMessage()]
                assert agreed == [
                    f"the SLO files in {b_dir / 'slos'} agree with the shared registry's again"
                ]


async def test_the_controller_that_takes_the_lease_over_publishes_its_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    url = machine_url()
    clock = FakeClock()
    policy = tmp_path / "policy.toml"
    policy.write_text(DENY)
    a_dir = state_dir(tmp_path, "a", {"classify.yaml": SLO})
    b_dir = state_dir(tmp_path, "b", {})
    stop_a = anyio.Event()

    async def run_a(*, task_status: anyio.abc.TaskStatus[Controller]) -> None:
        async with controller(url, prefix, "a", clock, state_dir=a_dir, policy_file=policy) as a:
            task_status.started(a)
            await stop_a.wait()

    with unique_prefix(url) as prefix:
        async with anyio.create_task_group() as tasks:
            a = await tasks.start(run_a)
            async with controller(
                url, prefix, "b", clock, state_dir=b_dir, trust_domain="b.example"
            ) as b:
                await a.register("w1")
                await wait_until(lambda: "w1" in b.registry, what="w1 on B")
                assert b.registry.access_rules == a.registry.access_rules
                assert files(b) == ["classify.yaml"]
                # Both flags named: another trust domain, and no policy file.
                assert any(
                    message.startswith(
                        "the access policy of --trust-domain b.example and no --policy differs"
                    )
                    for message in warnings(caplog)
                )
                # A stops and gives the lease back: B takes it within a second
                # and publishes its own settings.
                stop_a.set()
                await wait_until(b.service.store.holds_lease, timeout=5, what="B takes the lease")
                await wait_until(
                    lambda: b.registry.access_rules == AccessRules(trust_domain="b.example"),
                    what="B's policy published",
                )
                await wait_until(lambda: files(b) == [], what="B's (no) SLO files published")
                assert "w1" in b.registry


async def test_a_controller_without_the_lease_cannot_publish(tmp_path: Path) -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            assert a.service.store.holds_lease() and not b.service.store.holds_lease()
            revision = b.registry.revision
            # As a paused holder would, after its lease expired: the script drops it.
            await b.service.publish_access_rules(AccessRules(default="deny"))
            assert b.registry.revision == a.registry.revision == revision
            assert b.registry.access_rules == a.registry.access_rules == AccessRules()


async def test_self_preservation_from_a_controller_without_the_lease_is_dropped() -> None:
    url = machine_url()
    clock = FakeClock()
    with unique_prefix(url) as prefix:
        async with (
            controller(url, prefix, "a", clock) as a,
            controller(url, prefix, "b", clock) as b,
        ):
            assert a.service.store.holds_lease() and not b.service.store.holds_lease()

            def begins(api: Controller) -> SelfPreservationChanged:
                return SelfPreservationChanged(
                    clock(),
                    True,
                    "workers_fell_silent",
                    6,
                    10,
                    revision=api.registry.revision + 1,
                )

            revision = b.registry.revision
            # As a paused holder's sweep would, after its lease expired: the script drops it.
            assert await b.service.effects.commit([begins(b)]) == ()
            assert b.registry.revision == a.registry.revision == revision
            assert b.registry.self_preservation is None
            # The holder's is written, and every replica applies it.
            (written,) = await a.service.effects.commit([begins(a)])
            assert written.revision == revision + 1
            await wait_until(lambda: b.registry.revision == revision + 1, what="B applies it")
            assert a.registry.self_preservation is not None
            assert b.registry.self_preservation is not None
