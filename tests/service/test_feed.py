"""The change feed over HTTP: /snapshot and the long poll /watch, on a live app.

Every answer is checked against the OpenAPI document (the helpers'
client). Health runs on a fake clock; the long polls' timeouts are real
but short, and a test that expects a wake-up bounds it generously.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from crank_registry import (
    CapabilityRegistry,
    Change,
    HealthPolicy,
    SnapshotAnswer,
    WorkerRecord,
    encode_epoch,
    structure,
    structure_event,
)
from crank_registry_asgi import ServiceConfig
from crank_registry_asgi.feed import RENDER_STEP
from tests.service.helpers import Controller, running

pytestmark = pytest.mark.anyio

# Far more than a wake-up takes, even on a loaded machine.
DEADLINE = 10.0


async def snapshot(api: Controller) -> dict[str, Any]:
    response = await api.get("/snapshot")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def watch(api: Controller, query: str) -> tuple[int, dict[str, Any]]:
    response = await api.get(f"/watch?{query}")
    return response.status_code, response.json()


async def test_snapshot_holds_the_registry_at_its_revision() -> None:
    async with running() as api:
        await api.register("w1")
        await api.register("w2")
        await api.post("/deregister", {"worker_id": "w1"})
        body = await snapshot(api)
        assert body["epoch"] == api.service.epoch
        assert body["revision"] == api.registry.revision == 3
        assert structure(body["health_policy"], HealthPolicy) == api.registry.policy
        records = tuple(structure(worker, WorkerRecord) for worker in body["workers"])
        assert records == api.registry.snapshot().workers
        assert [record.worker_id for record in records] == ["w2"]


async def test_snapshot_is_sent_in_slices_of_the_revision_it_was_taken_at() -> None:
    async with running() as api:
        count = 2 * RENDER_STEP + 1
        for index in range(count):
            await api.register(f"w{index}")
        revision = api.registry.revision
        chunks: list[bytes] = []
        requested = False
        done = anyio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()  # the client stays until the answer is whole
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] != "http.response.body":
                return
            if message.get("body"):
                chunks.append(message["body"])
                if len(chunks) == 2:  # mid-stream: the registry moves on
                    await api.register("late")
            if not message.get("more_body", False):
                done.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/snapshot",
            "raw_path": b"/snapshot",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"test")],
            "client": ("127.0.0.1", 1),
            "server": ("test", 80),
        }
        await api.app(scope, receive, send)
        assert len(chunks) >= 4  # the head, three slices of workers, the end
        body = json.loads(b"".join(chunks))
        assert body["revision"] == revision < api.registry.revision
        assert [worker["worker_id"] for worker in body["workers"]] == [
            f"w{index}" for index in range(count)
        ]


async def test_watch_answers_at_once_with_the_changes_after_since() -> None:
    async with running() as api:
        await api.register("w1")
        await api.register("w2")
        epoch = api.service.epoch
        status, body = await watch(api, f"epoch={epoch}&since=1&timeout=30")
        assert status == 200
        assert (body["epoch"], body["revision"]) == (epoch, 2)
        assert [(event["type"], event["revision"]) for event in body["events"]] == [
            ("registered", 2)
        ]


async def test_a_follower_built_from_snapshot_and_watch_equals_the_controller() -> None:
    async with running() as api:
        await api.register("w1")
        body = await snapshot(api)
        follower = CapabilityRegistry()
        follower.apply_snapshot(structure(body, SnapshotAnswer).snapshot())
        assert follower.access_rules == api.registry.access_rules
        await api.register("w2")
        await api.post("/deregister", {"worker_id": "w1"})
        api.advance(61)
        await api.service.sweep()  # w2 goes unhealthy
        status, page = await watch(api, f"since={follower.revision}&timeout=1")
        assert status == 200
        for event in page["events"]:
            change = structure_event(event)
            assert isinstance(change, Change)
            follower.apply(change)
        assert follower.revision == api.registry.revision == 4
        assert [(r.worker_id, r.silent) for r in follower.records()] == [("w2", True)]


async def test_a_long_poll_wakes_on_a_registration() -> None:
    async with running() as api:
        answers: list[tuple[int, dict[str, Any]]] = []

        async def poll() -> None:
            answers.append(await watch(api, "since=0&timeout=60"))

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(poll)
                await anyio.wait_all_tasks_blocked()
                assert answers == []  # waiting: nothing after revision 0 yet
                await api.register("w1")
        [(status, body)] = answers
        assert status == 200
        assert body["revision"] == 1
        assert [event["worker_id"] for event in body["events"]] == ["w1"]


async def test_a_long_poll_times_out_with_the_bookmark() -> None:
    async with running() as api:
        await api.register("w1")
        api.advance(5)
        await api.post("/heartbeat", {"worker_id": "w1"})  # not a change
        with anyio.fail_after(DEADLINE):
            status, body = await watch(api, "since=1&timeout=0.05")
        assert status == 200
        assert body == {"epoch": api.service.epoch, "revision": 1, "events": []}


async def test_a_page_holds_at_most_1000_events() -> None:
    async with running() as api:
        for index in range(1001):
            await api.register(f"w{index}")
        status, body = await watch(api, "since=0")
        assert (status, body["revision"], len(body["events"])) == (200, 1001, 1000)
        status, body = await watch(api, "since=1000")
        assert [event["revision"] for event in body["events"]] == [1001]


async def test_410_when_since_left_the_window() -> None:
    async with running(ServiceConfig(feed_window=2)) as api:
        for worker_id in ("w1", "w2", "w3"):
            await api.register(worker_id)
        status, body = await watch(api, "since=0")
        assert (status, body["error"], body["oldest"]) == (410, "revision_compacted", 1)
        assert "/snapshot" in body["message"]
        status, body = await watch(api, "since=1")
        assert (status, len(body["events"])) == (200, 2)


async def test_410_reset_for_another_epoch_or_a_revision_beyond_the_latest() -> None:
    async with running() as api:
        await api.register("w1")
        status, body = await watch(api, "epoch=another&since=1")
        assert (status, body["error"], body["revision"]) == (410, "revision_reset", 1)
        assert "epoch=another" in body["message"]
        status, body = await watch(api, f"epoch={api.service.epoch}&since=7")
        assert (status, body["error"], body["revision"]) == (410, "revision_reset", 1)


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("", "since"),
        ("since=-1", "since"),
        ("since=x", "since"),
        ("since=0&timeout=0", "timeout"),
        ("since=0&timeout=61", "timeout"),
        ("since=0&timeout=nan", "timeout"),
        ("since=0&epoch=a%20b", "epoch"),
        ("since=0&since=1", "since"),
        ("since=0&limit=3", "limit"),
    ],
)
async def test_bad_watch_parameters_are_422_naming_them(query: str, named: str) -> None:
    async with running() as api:
        status, body = await watch(api, query)
        assert (status, body["error"]) == (422, "invalid_request")
        assert named in [problem["path"] for problem in body["detail"]]


async def test_snapshot_takes_no_parameters() -> None:
    async with running() as api:
        response = await api.get("/snapshot?since=3")
        assert response.status_code == 422
        assert response.json()["detail"][0]["path"] == "since"


async def test_one_change_wakes_a_thousand_long_polls_through_one_broadcast() -> None:
    async with running() as api:
        answers: list[tuple[int, dict[str, Any]]] = []

        async def poll() -> None:
            answers.append(await watch(api, "since=0&timeout=60"))

        broadcast = api.service.broadcast
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tasks:
                for _ in range(1000):
                    tasks.start_soon(poll)
                await anyio.wait_all_tasks_blocked()
                assert answers == []
                # Every poll is parked on the one event (no loop of its own):
                # none runs until it is set.
                assert broadcast.waiting() == 1000
                assert broadcast.wakeups == 0
                await api.register("w1")
        assert len(answers) == 1000
        assert all(status == 200 and body["revision"] == 1 for status, body in answers)
        assert broadcast.wakeups == 1


async def test_the_epoch_survives_a_restart_on_the_same_state_dir(tmp_path: Any) -> None:
    config = ServiceConfig(state_dir=tmp_path)
    async with running(config) as api:
        await api.register("w1")
        epoch = api.service.epoch
    async with running(config) as api:
        assert api.service.epoch == epoch
        assert (await snapshot(api))["epoch"] == epoch
        status, body = await watch(api, f"epoch={epoch}&since=0&timeout=1")
        assert (status, [event["worker_id"] for event in body["events"]]) == (200, ["w1"])
        # A compacted journal keeps it too (its first line).
        journal = api.service.effects.journal
        await journal.compact()
        assert journal.path.read_bytes().startswith(encode_epoch(epoch))
    async with running(config) as api:
        assert api.service.epoch == epoch
    # Another state directory is another history.
    async with running(ServiceConfig(state_dir=tmp_path / "other")) as api:
        assert api.service.epoch != epoch
