"""GET /watch as Server-Sent Events, on a live app read as it streams.

The stream is read through the bare ASGI interface (httpx's in-process
transport would wait for the end of a body that has none): each event
reaches the test as the app sends it, and the test hangs up when it wants.
Health runs on a fake clock; bookmarks and ``timeout`` are real time, with
short periods and generous bounds, except for the bookmark period itself,
which is checked in virtual time (the loop's clock jumps to the next timer).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import anyio
import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crank_registry import CapabilityRegistry, HealthPolicy
from crank_registry_asgi import ServiceConfig
from crank_registry_asgi.feed import Broadcast, render_change, wants_stream
from tests.builders import capability
from tests.client.helpers import VirtualClockEventLoop
from tests.service.helpers import DOCUMENT, Controller, running

pytestmark = pytest.mark.anyio

# Far more than a wake-up or a bookmark takes, even on a loaded machine.
DEADLINE = 10.0
SSE = {"accept": "text/event-stream"}


@attrs.frozen
class Event:
    """One Server-Sent Event as a client reads it."""

    event: str
    data: Any
    id: str | None


def parse_events(text: str) -> list[Event]:
    """The events of a whole block of the stream (events end with a blank line)."""
    events: list[Event] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields.setdefault(name, []).append(value.removeprefix(" "))
        if "data" in fields:
            events.append(
                Event(
                    fields.get("event", ["message"])[0],
                    json.loads("\n".join(fields["data"])),
                    fields.get("id", [None])[0],
                )
            )
    return events


class Stream:
    """One open ``GET /watch`` stream: its status, headers, and events as they come."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.ended = False
        self._sent, self._received = anyio.create_memory_object_stream[bytes | None]()
        self._pending = ""
        self.hang_up = anyio.Event()

    async def next(self) -> Event | None:
        """The next event, or ``None`` when the stream has ended."""
        while "\n\n" not in self._pending.replace("\r\n", "\n"):
            chunk = await self._received.receive()
            if chunk is None:
                self.ended = True
                return None
            self._pending += chunk.decode()
        text = self._pending.replace("\r\n", "\n")
        block, _, self._pending = text.partition("\n\n")
        events = parse_events(block + "\n\n")
        return events[0] if events else await self.next()

    async def events(self, count: int) -> list[Event]:
        """The next ``count`` events (fails if the stream ends first)."""
        events: list[Event] = []
        for _ in range(count):
            event = await self.next()
            assert event is not None, f"the stream ended after {events}"
            events.append(event)
        return events


@contextlib.asynccontextmanager
async def streaming(
    api: Controller, query: str, headers: dict[str, str] | None = None
) -> AsyncIterator[Stream]:
    """Open ``GET /watch?QUERY`` with ``Accept: text/event-stream``; hang up at the end."""
    stream = Stream()
    asked = {**SSE, **(headers or {})}
    raw_headers = [(b"host", b"test")] + [
        (name.lower().encode(), value.encode()) for name, value in asked.items()
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/watch",
        "raw_path": b"/watch",
        "query_string": query.encode(),
        "root_path": "",
        "headers": raw_headers,
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await stream.hang_up.wait()
        return {"type": "http.disconnect"}

    started = anyio.Event()

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            stream.status = message["status"]
            stream.headers = {k.decode(): v.decode() for k, v in message["headers"]}
            started.set()
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if stream.status == 200:
                if body:
                    with contextlib.suppress(anyio.BrokenResourceError):  # hung up
                        await stream._sent.send(body)
            else:
                stream.body += body
            if not message.get("more_body", False):
                with contextlib.suppress(anyio.BrokenResourceError):
                    await stream._sent.send(None)

    async def run() -> None:
        await api.app(scope, receive, send)
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            stream._sent.send_nowait(None)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run)
        await started.wait()
        try:
            yield stream
        finally:
            stream.hang_up.set()
            stream._received.close()


async def long_poll_events(api: Controller, since: int) -> list[dict[str, Any]]:
    response = await api.get(f"/watch?since={since}&timeout=1")
    assert response.status_code == 200
    return response.json()["events"]  # type: ignore[no-any-return]


async def test_each_change_is_an_event_with_its_id_type_and_the_long_polls_json() -> None:
    async with running() as api:
        start = api.service.registry.revision  # the access policy put in effect at start
        await api.register("w1")
        await api.register("w2")
        await api.post("/deregister", {"worker_id": "w1"})
        epoch = api.service.epoch
        with anyio.fail_after(DEADLINE):
            async with streaming(api, f"epoch={epoch}&since={start}") as stream:
                assert stream.status == 200
                assert stream.headers["content-type"].startswith("text/event-stream")
                events = await stream.events(3)
                await api.register("w3")  # one more, while the stream is open
                events += await stream.events(1)
        expected = await long_poll_events(api, start)
        assert [event.data for event in events] == expected
        assert [event.event for event in events] == [
            "registered",
            "registered",
            "deregistered",
            "registered",
        ]
        assert [event.id for event in events] == [f"{epoch}:{start + n}" for n in (1, 2, 3, 4)]


async def test_last_event_id_resumes_across_a_disconnect_losing_and_repeating_nothing() -> None:
    async with running() as api:
        received: list[Event] = []
        total = 120

        async def keep_changing() -> None:
            for index in range(total):
                await api.register(f"w{index}")
                await anyio.sleep(0)

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(keep_changing)
                # Three connections, each cut mid-flow, each resumed from the last id read.
                last_id: str | None = None
                for count in (15, 30, None):
                    headers = {} if last_id is None else {"last-event-id": last_id}
                    async with streaming(api, "since=0", headers) as stream:
                        left = count
                        while left is None or left > 0:
                            event = await stream.next()
                            assert event is not None
                            if event.event == "bookmark":
                                continue
                            received.append(event)
                            last_id = event.id
                            if left is not None:
                                left -= 1
                            elif event.data["revision"] == total:
                                break
                    await anyio.sleep(0)  # changes come while nobody listens
        revisions = [event.data["revision"] for event in received]
        assert revisions == list(range(1, total + 1))
        assert [event.data for event in received] == (await long_poll_events(api, 0))[:total]


async def test_bookmarks_arrive_with_the_current_revision() -> None:
    # Bookmarks every min(15 s, heartbeat_interval / 2) = 0.05 s.
    config = ServiceConfig(policy=HealthPolicy(0.1, 60.0, 120.0))
    async with running(config) as api:
        await api.register("w1")
        epoch = api.service.epoch
        with anyio.fail_after(DEADLINE):
            async with streaming(api, "since=0") as stream:
                first, second, third = await stream.events(3)
        assert (first.event, first.id) == ("registered", f"{epoch}:1")
        for bookmark in (second, third):
            assert bookmark.event == "bookmark"
            assert bookmark.data == {"epoch": epoch, "revision": 1}
            assert bookmark.id == f"{epoch}:1"


@pytest.mark.parametrize(
    "anyio_backend", [("asyncio", {"loop_factory": VirtualClockEventLoop})], ids=["virtual time"]
)
@pytest.mark.parametrize(("interval", "period"), [(60.0, 15.0), (30.0, 15.0), (10.0, 5.0)])
async def test_a_bookmark_every_15_s_or_half_a_heartbeat_interval_if_shorter(
    interval: float, period: float
) -> None:
    config = ServiceConfig(policy=HealthPolicy(interval, 2 * interval, 4 * interval))
    async with running(config) as api:
        started = anyio.current_time()
        await api.register("w1")
        arrivals: list[float] = []
        async with streaming(api, "since=0") as stream:
            [registered] = await stream.events(1)
            assert registered.event == "registered"
            for _ in range(3):
                [bookmark] = await stream.events(1)
                assert bookmark.event == "bookmark"
                arrivals.append(anyio.current_time() - started)
    assert arrivals == pytest.approx([period, 2 * period, 3 * period])


async def test_timeout_ends_the_stream() -> None:
    async with running() as api:
        await api.register("w1")
        with anyio.fail_after(DEADLINE):
            async with streaming(api, "since=0&timeout=0.05") as stream:
                assert [event.event for event in await stream.events(1)] == ["registered"]
                assert await stream.next() is None


async def test_a_reader_that_falls_behind_the_window_gets_an_error_event_and_the_end() -> None:
    async with running(ServiceConfig(feed_window=2)) as api:
        await api.register("w0")
        with anyio.fail_after(DEADLINE):
            async with streaming(api, "since=1") as stream:
                await api.register("w1")  # revision 2: the stream is sending it
                await anyio.wait_all_tasks_blocked()
                for index in range(2, 5):  # revisions 3 to 5: 2 leaves the window
                    await api.register(f"w{index}")
                sent, error = await stream.events(2)
                assert await stream.next() is None
        assert (sent.event, sent.data["revision"]) == ("registered", 2)
        assert error.event == "error"
        assert error.data["error"] == "revision_compacted"
        assert error.data["oldest"] == 3
        assert "/snapshot" in error.data["message"]
        # The client reconnects from its last event and gets the 410.
        response = await api.request(
            "GET", "/watch?since=0", headers={**SSE, "last-event-id": sent.id or ""}
        )
        assert (response.status_code, response.json()["error"]) == (410, "revision_compacted")


async def test_errors_known_before_the_stream_are_answers() -> None:
    async with running(ServiceConfig(feed_window=2)) as api:
        for worker_id in ("w1", "w2", "w3"):
            await api.register(worker_id)
        epoch = api.service.epoch
        cases = [
            ("since=0", {}, 410, "revision_compacted"),
            ("since=9", {}, 410, "revision_reset"),
            (f"since=1&epoch={epoch}x", {}, 410, "revision_reset"),
            ("since=1", {"last-event-id": "another:2"}, 410, "revision_reset"),
            ("since=1", {"last-event-id": f"{epoch}:0"}, 410, "revision_compacted"),
            ("since=1", {"last-event-id": "2"}, 422, "invalid_request"),
            ("since=1&timeout=0", {}, 422, "invalid_request"),
        ]
        for query, headers, status, code in cases:
            response = await api.request("GET", f"/watch?{query}", headers={**SSE, **headers})
            assert (response.status_code, response.json()["error"]) == (status, code), query
        response = await api.request("GET", "/watch?since=1", headers={**SSE, "last-event-id": "2"})
        assert response.json()["detail"][0]["path"] == "Last-Event-ID"


async def test_last_event_id_is_the_start_of_a_long_poll_too() -> None:
    async with running() as api:
        await api.register("w1")
        await api.register("w2")
        epoch = api.service.epoch
        response = await api.request(
            "GET", "/watch?since=0", headers={"last-event-id": f"{epoch}:1"}
        )
        assert [event["revision"] for event in response.json()["events"]] == [2]


async def test_end_streams_ends_the_streams_and_answers_the_long_polls() -> None:
    async with running() as api:
        polls: list[dict[str, Any]] = []

        async def poll() -> None:
            polls.append((await api.get("/watch?since=0&timeout=60")).json())

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(poll)
                async with streaming(api, "since=0") as stream:
                    await anyio.wait_all_tasks_blocked()
                    api.service.end_streams()
                    assert await stream.next() is None
        assert polls == [{"epoch": api.service.epoch, "revision": 0, "events": []}]


async def open_watchers(api: Controller) -> dict[str, float]:
    """``crank_feed_watchers`` of ``GET /metrics``, by form."""
    response = await api.get("/metrics")
    return {
        sample.labels["form"]: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "crank_feed_watchers"
    }


async def test_the_metrics_count_the_open_long_polls_and_streams() -> None:
    async with running() as api:
        assert await open_watchers(api) == {"long_poll": 0, "stream": 0}
        polled = anyio.Event()

        async def poll() -> None:
            await api.get("/watch?since=0&timeout=60")
            polled.set()

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(poll)
                async with streaming(api, "since=0") as stream:
                    await anyio.wait_all_tasks_blocked()
                    assert await open_watchers(api) == {"long_poll": 1, "stream": 1}
                    await api.register("w1")  # answers the long poll; the stream goes on
                    await polled.wait()
                    assert [event.event for event in await stream.events(1)] == ["registered"]
                    assert await open_watchers(api) == {"long_poll": 0, "stream": 1}
            # The stream's client hung up.
            assert await open_watchers(api) == {"long_poll": 0, "stream": 0}
            async with streaming(api, "since=1&timeout=0.05") as stream:
                assert await stream.next() is None  # ended by its timeout
            assert await open_watchers(api) == {"long_poll": 0, "stream": 0}


def test_the_document_lists_both_forms_of_the_answer() -> None:
    content = DOCUMENT["paths"]["/watch"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"application/json", "text/event-stream"}
    names = [p["name"] for p in DOCUMENT["paths"]["/watch"]["get"]["parameters"]]
    assert "Last-Event-ID" in names


@pytest.mark.parametrize(
    ("accept", "stream"),
    [
        (None, False),
        ("*/*", False),
        ("application/json", False),
        ("text/event-stream", True),
        ("Text/Event-Stream; charset=utf-8", True),
        ("application/json, text/event-stream", True),
        ("application/json, text/event-stream;q=0.5", False),
        ("text/event-stream;q=0", False),
        ("text/event-stream;q=x", False),
    ],
)
def test_accept_chooses_the_form(accept: str | None, stream: bool) -> None:
    assert wants_stream(accept) is stream


def test_a_change_is_rendered_once_and_as_the_plain_rendering() -> None:
    registry = CapabilityRegistry()
    for index in range(3):
        registry.register(f"w{index}", f"http://w{index}.test", [capability()], now=0.0)
    changes, _ = registry.changes_since(0)
    broadcast = Broadcast(registry)
    for change in changes:
        rendered = broadcast.rendered_change("e1", change)
        assert rendered == render_change("e1", change)
        assert broadcast.rendered_change("e1", change) is rendered
        assert broadcast.rendered_change("e2", change) == render_change("e2", change)
