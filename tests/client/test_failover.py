"""Several controllers on one registry: the worker client moves to the next when one fails.

Fake controllers share one core registry (as controllers on one Redis share
its state), reached through one transport that sends each request to its
URL's host; the last test runs the real controller app twice on one
registry. Everything runs in virtual time.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
import ssl
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from crank_registry import CapabilityRegistry, HealthPolicy, WorkerEndpoint
from crank_registry_asgi import ServiceConfig, create_app
from crank_worker_client import (
    AgentState,
    ConfigurationError,
    ControllerClient,
    ControllerUnavailable,
    RegistrationFailed,
    UnknownCapability,
    WorkerAgent,
)
from tests.builders import capability
from tests.client.helpers import FakeController, InProcessController, TransportByHost

pytestmark = pytest.mark.anyio

A, B, C = "https://a.test", "https://b.test", "https://c.test"
INTERVAL = 1.0
EPOCH = 1_800_000_000.0

#: Faults after which the next controller is asked: refused connection, 500,
#: a 503 that is not a store outage, no answer.
FAILOVER_FAULTS = ["down", "error", "incompatible_peer", "hang"]


def shared(count: int = 2) -> tuple[list[FakeController], TransportByHost]:
    """``count`` fake controllers on one registry, at a.test, b.test..., and the network."""
    first = FakeController(INTERVAL)
    controllers = [first] + [
        FakeController(INTERVAL, registry=first.registry) for _ in range(count - 1)
    ]
    hosts = {f"{'abc'[i]}.test": c.transport for i, c in enumerate(controllers)}
    return controllers, TransportByHost(hosts)


def make_agent(transport: Any, urls: Any = (A, B), **options: Any) -> WorkerAgent:
    options.setdefault("rng", random.Random(7))
    return WorkerAgent(
        urls, "w1", "https://w1.test:8443", [capability()], transport=transport, **options
    )


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def heartbeat_times(controller: FakeController, *, since: float = 0.0) -> list[float]:
    """When the controller was sent a heartbeat (answered or not), from ``since`` on."""
    return [call.at for call in controller.calls_to("/heartbeat") if call.at >= since]


# -- the agent ---------------------------------------------------------------


@pytest.mark.parametrize("fault", FAILOVER_FAULTS)
async def test_the_heartbeat_goes_to_the_next_controller_within_one_interval_without_registering(
    fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    (a, b), transport = shared()
    agent = make_agent(transport)
    async with agent:
        await anyio.sleep(3.5 * INTERVAL)
        a.fault = fault
        failed_at = anyio.current_time()
        await anyio.sleep(8 * INTERVAL)
        status = agent.status
        # Never unreachable: the exchange that failed on A was answered by B.
        assert status.state is AgentState.REGISTERED and status.consecutive_failures == 0
        assert status.controller_url == B == agent.controller_url
        # B shares the registry: it knows the worker, so no registration.
        assert status.registrations == 1
        assert "/register" not in b.paths()
        view = b.registry.get_worker("w1", now=anyio.current_time())
        assert view is not None and view.is_healthy
    (failed_try,) = [call.at for call in a.calls if call.at >= failed_at]  # A asked once
    on_b = [call.at for call in b.calls_to("/heartbeat")]
    # The heartbeat due on A went to B at once (after A's share of the
    # exchange's time when A did not answer: half the interval for two).
    assert on_b[0] - failed_try == (INTERVAL / 2 if fault == "hang" else 0.0)
    acknowledged = [at for at in heartbeat_times(a) if at < failed_at] + on_b
    assert max(gaps(acknowledged)) <= INTERVAL + (INTERVAL / 2 if fault == "hang" else 0.0)
    # The jitter is kept: B hears from the worker on its usual, jittered schedule.
    assert all(0.9 * INTERVAL <= gap <= INTERVAL for gap in gaps(on_b))
    assert len({round(gap, 9) for gap in gaps(on_b)}) > 3
    assert b.paths()[-1] == "/deregister" and "w1" not in b.registry
    moves = [r.getMessage() for r in caplog.records if "asked first" in r.getMessage()]
    assert len(moves) == 1 and f"controller {A} failed" in moves[0]


@pytest.mark.parametrize("code", ["store_unavailable", "journal_unavailable"])
async def test_a_store_outage_is_waited_out_on_the_same_controller(code: str) -> None:
    (a, b), transport = shared()
    # Registrations answer 503 while the shared store is down: every
    # controller would, so the agent retries A with backoff.
    a.faults["/register"] = code

    async def store_comes_back() -> None:
        await anyio.sleep(3 * INTERVAL)
        del a.faults["/register"]

    agent = make_agent(transport, registration_backoff_base=0.1, registration_backoff_cap=0.5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(store_comes_back)
        async with agent:
            assert 3 * INTERVAL <= anyio.current_time() <= 3.5 * INTERVAL
            assert len(a.calls_to("/register")) > 3
            assert b.calls == []
            # A controller answering heartbeats with it is waited out the same way.
            a.fault = code
            outage = anyio.current_time()
            await anyio.sleep(3 * INTERVAL)  # shorter than eviction (4 intervals)
            status = agent.status
            assert status.state is AgentState.UNREACHABLE and status.consecutive_failures > 3
            assert code in (status.last_error or "")
            assert agent.controller_url == A and b.calls == []
            assert len(heartbeat_times(a)) > 3
            a.fault = None
            await anyio.sleep(1.1 * INTERVAL)
            assert agent.status.registered and agent.status.registrations == 1
    retries = heartbeat_times(a, since=outage)
    assert max(gaps(retries)) <= INTERVAL  # backoff capped at one interval
    assert b.calls == []


async def test_a_fleet_moves_to_the_next_controller_each_worker_at_its_own_time() -> None:
    (a, b), transport = shared()
    fleet = 50
    failed_at = 5 * INTERVAL

    async def worker(number: int) -> None:
        # Workers start at random moments within one interval, as a fleet does.
        rng = random.Random(number)
        await anyio.sleep(rng.uniform(0, INTERVAL))
        async with WorkerAgent(
            [A, B],
            f"w{number}",
            f"https://w{number}.test:8443",
            [capability()],
            transport=transport,
            rng=rng,
        ):
            await anyio.sleep(failed_at + 4 * INTERVAL - anyio.current_time())

    async def controller_a_dies() -> None:
        await anyio.sleep(failed_at)
        a.fault = "down"

    async with anyio.create_task_group() as tg:
        tg.start_soon(controller_a_dies)
        for number in range(fleet):
            tg.start_soon(worker, number)
    moved: dict[str, float] = {}
    for call in b.calls_to("/heartbeat"):
        moved.setdefault(call.body["worker_id"], call.at)
    assert len(moved) == fleet
    for worker_id, on_b in moved.items():
        # Each worker's heartbeat went to B at the moment it failed on A:
        # the spread of the fleet's schedule is kept, no burst at the failure.
        (failed_try,) = [
            c.at for c in a.calls if c.at >= failed_at and c.body["worker_id"] == worker_id
        ]
        assert on_b == failed_try and on_b - failed_at <= INTERVAL
    assert len({round(at, 6) for at in moved.values()}) == fleet  # no two at once
    assert "/register" not in b.paths()  # no registration storm


async def test_the_agent_goes_back_to_the_first_controller_when_the_second_fails() -> None:
    (a, b), transport = shared()
    agent = make_agent(transport)
    async with agent:
        await anyio.sleep(2.5 * INTERVAL)
        a.fault = "down"
        await anyio.sleep(3 * INTERVAL)
        assert agent.controller_url == B
        a.fault, b.fault = None, "down"
        back_at = anyio.current_time()
        await anyio.sleep(3 * INTERVAL)
        assert agent.controller_url == A
        assert agent.status.registered and agent.status.registrations == 1
        (failed_on_b,) = [call.at for call in b.calls if call.at >= back_at]
        first_on_a = min(heartbeat_times(a, since=back_at))
        assert first_on_a == failed_on_b and first_on_a - back_at <= INTERVAL
    assert a.paths().count("/register") == 1 and "/register" not in b.paths()
    assert a.paths()[-1] == "/deregister" and "w1" not in a.registry


async def test_a_controller_that_does_not_know_the_worker_gets_a_registration() -> None:
    a = FakeController(INTERVAL)
    b = FakeController(INTERVAL)  # another registry: it never heard of the worker
    transport = TransportByHost({"a.test": a.transport, "b.test": b.transport})
    agent = make_agent(transport)
    async with agent:
        await anyio.sleep(2.5 * INTERVAL)
        a.fault = "down"
        failed_at = anyio.current_time()
        await anyio.sleep(2 * INTERVAL)
        assert agent.controller_url == B
        assert agent.status.registered and agent.status.registrations == 2
    heartbeat, registration = b.calls[:2]
    assert (heartbeat.path, registration.path) == ("/heartbeat", "/register")
    assert registration.at == heartbeat.at and heartbeat.at - failed_at <= INTERVAL
    assert b.paths().count("/register") == 1


async def test_when_every_controller_fails_each_is_tried_once_per_exchange() -> None:
    (a, b, c), transport = shared(3)
    agent = make_agent(transport, urls=f"{A}, {B}, {C}")
    async with agent:
        await anyio.sleep(2.5 * INTERVAL)
        a.fault = b.fault = c.fault = "down"
        outage = anyio.current_time()
        await anyio.sleep(3 * INTERVAL)  # shorter than eviction (4 intervals)
        status = agent.status
        assert status.state is AgentState.UNREACHABLE
        assert status.last_error is not None and "none of the 3 controllers answered" in (
            status.last_error
        )
        tries = {
            host: [call.at for call in controller.calls if call.at >= outage]
            for host, controller in zip("abc", (a, b, c), strict=True)
        }
        # Each exchange asked A, B and C once, at the same moment; then backed off.
        assert tries["a"] == tries["b"] == tries["c"] and len(tries["a"]) >= 5
        assert max(gaps(tries["a"])) <= INTERVAL
        c.fault = None
        back_at = anyio.current_time()
        await anyio.sleep(1.1 * INTERVAL)
        assert agent.status.registered and agent.controller_url == C
        assert min(heartbeat_times(c, since=back_at)) - back_at <= INTERVAL
        assert agent.status.registrations == 1 and "/register" not in c.paths()


async def test_registration_gives_up_naming_every_controller() -> None:
    (a, b), transport = shared()
    a.fault, b.fault = "down", "error"
    with pytest.raises(RegistrationFailed) as caught:
        async with make_agent(transport, registration_deadline=10.0):
            pytest.fail("the block must not run without a registration")
    message = str(caught.value)
    assert message.startswith(
        f"could not register worker 'w1' with any of the controllers at {A}, {B} within 10 s"
    )
    assert "none of the 2 controllers answered" in message
    # Every attempt asked both, at the same moment.
    assert [call.at for call in a.calls] == [call.at for call in b.calls]
    assert len(a.calls) > 3


async def test_deregistration_tries_each_controller_once() -> None:
    (a, b), transport = shared()
    async with make_agent(transport):
        await anyio.sleep(1.5 * INTERVAL)
        a.fault = "down"
        leaving = anyio.current_time()
    assert [call.path for call in a.calls if call.at >= leaving] == ["/deregister"]
    assert b.paths() == ["/deregister"]
    assert "w1" not in b.registry


async def test_deregistration_from_hanging_controllers_is_bounded_in_all(
    caplog: pytest.LogCaptureFixture,
) -> None:
    (a, b), transport = shared()
    agent = make_agent(transport, deregister_timeout=2.0)
    async with agent:
        await anyio.sleep(INTERVAL / 2)
        a.faults["/deregister"] = b.faults["/deregister"] = "hang"
        leaving = anyio.current_time()
    assert anyio.current_time() - leaving == pytest.approx(2.0)
    assert [call.at - leaving for call in a.calls_to("/deregister")] == [0.0]
    assert [call.at - leaving for call in b.calls_to("/deregister")] == [pytest.approx(1.0)]
    assert "none of the 2 controllers answered" in caplog.text
    assert agent.status.state is AgentState.STOPPED


# -- ControllerClient --------------------------------------------------------


async def test_route_goes_on_to_the_next_controller_and_remembers_the_one_that_answered() -> None:
    (a, b), transport = shared()
    a.registry.register("w1", "https://w1.test:8443", [capability()], now=0.0)
    async with ControllerClient([A, B], transport=transport) as client:
        assert client.controller_urls == (A, B) and client.controller_url == A
        a.fault = "down"
        endpoint = await client.route("classify", "image.classify")
        assert endpoint == WorkerEndpoint("w1", "https://w1.test:8443", "1.0.0")
        assert client.controller_url == B
        await client.route("classify", "image.classify")
        assert a.paths() == ["/route"]  # asked once, then B first
        assert b.paths() == ["/route", "/route"]
        # B fails with a 500: back to A, which answers again.
        a.fault, b.fault = None, "error"
        await client.route("classify", "image.classify")
        assert client.controller_url == A


def worker_entry(worker_id: str) -> dict[str, Any]:
    return {
        "worker_id": worker_id,
        "worker_url": f"https://{worker_id}.test:8443",
        "last_heartbeat": "2026-11-26T20:00:00Z",
        "is_healthy": True,
        "state": "healthy",
        "capabilities": ["classify:image.classify"],
    }


class PagingController:
    """A controller that lists w1, w2, w3 one per page; ``fault`` as the fake controller's."""

    def __init__(self) -> None:
        self.fault: str | None = None
        self.queries: list[dict[str, str]] = []
        self.transport = httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        await anyio.lowlevel.checkpoint()
        self.queries.append(dict(request.url.params))
        if self.fault == "down":
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if self.fault == "hang":
            await anyio.sleep_forever()
        if self.fault is not None:
            status, code = (500, "internal_error") if self.fault == "error" else (503, self.fault)
            return httpx.Response(status, json={"error": code})
        page = {"c2": 1, "c3": 2}.get(request.url.params.get("cursor", ""), 0)
        body: dict[str, Any] = {
            "workers": [worker_entry(f"w{page + 1}")],
            "total_workers": 3,
            "healthy_workers": 3,
        }
        if page < 2:
            body["next_cursor"] = f"c{page + 2}"
        return httpx.Response(200, json=body)


@pytest.mark.parametrize("fault", FAILOVER_FAULTS)
async def test_each_page_of_a_listing_goes_on_to_the_next_controller(fault: str) -> None:
    a, b = PagingController(), PagingController()
    transport = TransportByHost({"a.test": a.transport, "b.test": b.transport})
    async with ControllerClient(f"{A},{B}", transport=transport, timeout=3.0) as client:
        a.fault = fault
        started = anyio.current_time()
        assert [worker.worker_id for worker in await client.workers()] == ["w1", "w2", "w3"]
        assert anyio.current_time() - started == (3.0 if fault == "hang" else 0.0)
        assert client.controller_url == B
        assert (len(a.queries), len(b.queries)) == (1, 3)
        # A listing that loses its controller after a page reads the rest from the next.
        a.fault, b.fault = None, fault
        b_asked = len(b.queries)
        original = b.handle

        async def fail_after_the_first_page(request: httpx.Request) -> httpx.Response:
            if len(b.queries) > b_asked:
                return await original(request)
            b.fault = None
            try:
                return await original(request)
            finally:
                b.fault = fault

        b.transport.handler = fail_after_the_first_page
        assert [worker.worker_id for worker in await client.workers()] == ["w1", "w2", "w3"]
        assert [query.get("cursor") for query in a.queries[1:]] == ["c2", "c3"]
        assert client.controller_url == A


async def test_the_registrys_own_answers_are_not_asked_again_elsewhere() -> None:
    (a, b), transport = shared()
    async with ControllerClient([A, B], transport=transport) as client:
        # No worker offers it: the registry's answer, the same on every controller.
        with pytest.raises(UnknownCapability):
            await client.route("classify", "image.classify")
        # The shared store is down: every controller would say so.
        a.faults["/route"] = "store_unavailable"
        with pytest.raises(ControllerUnavailable) as caught:
            await client.route("classify", "image.classify")
        assert (caught.value.status, caught.value.code) == (503, "store_unavailable")
        assert b.calls == [] and client.controller_url == A


async def test_route_asks_each_controller_at_most_once_per_call() -> None:
    (a, b, c), transport = shared(3)
    a.fault, b.fault, c.fault = "down", "error", "incompatible_peer"
    async with ControllerClient([A, B, C], transport=transport) as client:
        with pytest.raises(ControllerUnavailable) as caught:
            await client.route("classify", "image.classify")
        assert client.controller_url == A  # nobody answered: no move
    assert (a.paths(), b.paths(), c.paths()) == (["/route"], ["/route"], ["/route"])
    message = str(caught.value)
    assert message.startswith("POST /route: none of the 3 controllers answered: ")
    assert f"cannot reach the controller at {A}" in message
    assert f"POST /route at {B}: the controller answered 500 internal_error" in message
    assert f"POST /route at {C}: the controller answered 503 incompatible_peer" in message
    assert (caught.value.status, caught.value.code) == (503, "incompatible_peer")


# -- several URLs in the configuration -----------------------------------------


def test_several_urls_come_from_a_list_a_string_or_controller_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ControllerClient([A, f"{B}/"]).controller_urls == (A, B)
    assert ControllerClient((A,)).controller_urls == (A,)
    assert ControllerClient(f" {A} ,{B}/ ").controller_urls == (A, B)
    monkeypatch.setenv("CONTROLLER_URL", f"{A}, {B}, {C}")
    client = ControllerClient()
    assert client.controller_urls == (A, B, C) and client.controller_url == A
    agent = WorkerAgent(None, "w1", "https://w1.test:8443", [capability()])
    assert agent.controller_urls == (A, B, C) and agent.status.controller_url == A
    plain = ControllerClient(["http://a.test:9000", B], insecure=True)
    assert plain.controller_urls == ("http://a.test:9000", B)


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        (f"{A},,{B}", f"CONTROLLER_URL '{A},,{B}': entry 2 is empty"),
        (f"{A},", f"CONTROLLER_URL '{A},': entry 2 is empty"),
        (f"{A},ftp://b.test", "CONTROLLER_URL entry 2 ('ftp://b.test') must be an absolute"),
        (f"{A},https://b.test:99999", "CONTROLLER_URL entry 2 ('https://b.test:99999') is not"),
        (f"{A},http://b.test", "CONTROLLER_URL entry 2 ('http://b.test') is plain HTTP"),
        (f"{A}/?x=1,{B}", f"CONTROLLER_URL entry 1 ('{A}/?x=1') must not have a query"),
        (f"{A},{B},{A}/", f"CONTROLLER_URL lists {A} twice"),
        ("localhost:9000", "CONTROLLER_URL 'localhost:9000' must be an absolute https:// URL"),
    ],
)
def test_a_bad_controller_url_entry_is_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, message: str
) -> None:
    monkeypatch.setenv("CONTROLLER_URL", variable)
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        ControllerClient()
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        WorkerAgent(None, "w1", "https://w1.test:8443", [capability()])


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        ([], "no controller URL given: the list is empty"),
        ([f"{A},{B}"], "one URL per list entry"),
        ([A, 9000], "controller URL 2 of the list is int, not a str"),
        ([A, "ftp://b.test"], "controller URL entry 2 ('ftp://b.test') must be an absolute"),
        ([A, A], f"controller URL lists {A} twice"),
        (f"{A} {B}", f"controller URL '{A} {B}' has a space or ';' in its host"),
        (f"{A};{B}", f"controller URL '{A};{B}' has a space or ';' in its host"),
    ],
)
def test_a_bad_controller_url_argument_is_named(urls: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        ControllerClient(urls)


def test_tls_settings_with_a_plain_http_controller_in_the_list_are_refused() -> None:
    with pytest.raises(
        ConfigurationError,
        match=re.escape(
            "TLS settings were given but the controller URL entry 2 ('http://b.test') is plain HTTP"
        ),
    ):
        ControllerClient([A, "http://b.test"], insecure=True, tls=ssl.create_default_context())


# -- the real controller app, twice, on one registry ---------------------------


async def test_two_controller_apps_on_one_registry_keep_the_worker_when_one_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="crank_worker_client")
    policy = HealthPolicy(INTERVAL, 2 * INTERVAL, 4 * INTERVAL)
    registry = CapabilityRegistry(policy)

    def make_app() -> Any:
        return create_app(
            registry,
            config=ServiceConfig(policy=policy),
            clock=lambda: EPOCH + anyio.current_time(),
        )

    async with anyio.create_task_group() as tg:
        a, b = InProcessController(tg, make_app), InProcessController(tg, make_app)
        await a.start()
        await b.start()
        transport = TransportByHost({"a.test": a.transport, "b.test": b.transport})
        async with (
            ControllerClient([A, B], transport=transport) as client,
            make_agent(transport) as agent,
        ):
            worker = WorkerEndpoint("w1", "https://w1.test:8443", "1.0.0")
            assert await client.route("classify", "image.classify") == worker
            await anyio.sleep(2.5 * INTERVAL)
            await a.stop()
            stopped_at = anyio.current_time()
            for _ in range(10):
                await anyio.sleep(INTERVAL)
                assert await client.route("classify", "image.classify") == worker
                (listed,) = await client.workers()
                assert listed.is_healthy
            assert agent.controller_url == B and client.controller_url == B
            assert agent.status.registered and agent.status.registrations == 1
            assert b.transport.times_of("/register") == []
            first_on_b = min(b.transport.times_of("/heartbeat"))
            assert first_on_b - stopped_at <= INTERVAL
        assert b.transport.requests[-1][1] == "/deregister"
        assert "w1" not in registry
        await b.stop()
