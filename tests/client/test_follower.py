"""RegistryFollower against the real controller app, in-process over HTTP, in virtual time.

The app is served through ``httpx.ASGITransport`` with its lifespan
running (:class:`tests.client.helpers.InProcessController`), on asyncio
and trio; the follower, the agents and the controller read one virtual
clock, so that lag limits and sweeps are exact and nothing sleeps for real.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from crank_registry import HealthPolicy, Registration, ValidationError, WorkerEndpoint
from crank_registry_asgi import ServiceConfig, create_app
from crank_worker_client import (
    ConfigurationError,
    ControllerClient,
    ControllerError,
    ControllerUnavailable,
    ForbiddenError,
    InvalidRequest,
    NoWorkerAvailable,
    PolicyDenied,
    RegistryFollower,
    RevisionGone,
    UnknownCapability,
    WorkerAgent,
    lag_limit,
)
from crank_worker_client._feed import replica_of
from tests.builders import capability
from tests.client.helpers import InProcessController
from tests.service.helpers import CertificateAuthority, WithClientCertificate

pytestmark = pytest.mark.anyio

URL = "https://controller.test"
INTERVAL = 0.2
POLICY = HealthPolicy(INTERVAL, 2 * INTERVAL, 4 * INTERVAL)
EPOCH = 1_800_000_000.0
CLASSIFY = ("classify", "image.classify")


class FeedSwitch(httpx.AsyncBaseTransport):
    """The controller's transport; while ``cut``, ``/watch`` and ``/snapshot`` are refused.

    ``paths`` lists the path of every request, answered or not.
    """

    def __init__(self, controller: InProcessController) -> None:
        self.controller = controller
        self.cut = False
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        if self.cut and request.url.path in ("/watch", "/snapshot"):
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return await self.controller.transport.handle_async_request(request)


def start_controller(
    task_group: anyio.abc.TaskGroup, *, feed_window: int = 100_000, **fields: Any
) -> InProcessController:
    config = ServiceConfig(policy=POLICY, feed_window=feed_window, **fields)
    return InProcessController(
        task_group, lambda: create_app(config=config, clock=lambda: EPOCH + anyio.current_time())
    )


@pytest.fixture
async def controller() -> AsyncIterator[InProcessController]:
    async with anyio.create_task_group() as tg:
        running = start_controller(tg)
        await running.start()
        yield running
        await running.stop()


def agent(controller: InProcessController, worker_id: str, **fields: Any) -> WorkerAgent:
    return WorkerAgent(
        URL,
        worker_id,
        f"https://{worker_id}.test:8443",
        [capability(**fields)],
        transport=controller.transport,
        rng=random.Random(worker_id),
    )


def follower_of(transport: httpx.AsyncBaseTransport, **options: Any) -> RegistryFollower:
    return RegistryFollower(URL, transport=transport, rng=random.Random(0), **options)


async def routed(follower: RegistryFollower, count: int = 6, **options: Any) -> set[str]:
    return {(await follower.route(*CLASSIFY, **options)).worker_id for _ in range(count)}


async def test_the_lag_limit_is_twice_the_heartbeat_interval_and_the_poll_half_of_it() -> None:
    assert lag_limit(30.0) == 60.0
    assert lag_limit(0.2) == pytest.approx(0.4)
    assert lag_limit(100.0) == 200.0


async def test_a_follower_routes_in_process_and_follows_every_change(
    controller: InProcessController,
) -> None:
    switch = FeedSwitch(controller)
    async with agent(controller, "w1"), agent(controller, "w2"), follower_of(switch) as follower:
        assert follower.lag_limit == pytest.approx(2 * INTERVAL)
        assert await routed(follower) == {"w1", "w2"}
        assert "/route" not in switch.paths  # answered in-process
        async with agent(controller, "w3"):
            await anyio.sleep(INTERVAL / 10)
            assert await routed(follower) == {"w1", "w2", "w3"}
        await anyio.sleep(INTERVAL / 10)
        assert await routed(follower) == {"w1", "w2"}  # w3 left
        # Long after the lag limit, still local: every long poll is heard from.
        await anyio.sleep(10 * INTERVAL)
        assert follower.lag <= follower.lag_limit
        assert await routed(follower) == {"w1", "w2"}
        assert "/route" not in switch.paths
        assert follower.revision == controller.app.state.service.registry.revision
        # A worker gone silent: the controller's sweep, an event, takes it out.
        async with ControllerClient(URL, transport=controller.transport) as client:
            await client.register(Registration("w4", "https://w4.test:8443", (capability(),)))
            await anyio.sleep(INTERVAL / 10)
            assert "w4" in await routed(follower, 9)
            await anyio.sleep(3 * INTERVAL)
            assert await routed(follower, 9) == {"w1", "w2"}
        assert "/route" not in switch.paths


async def test_a_follower_stops_routing_to_a_drained_worker_and_back_when_undrained(
    controller: InProcessController,
) -> None:
    switch = FeedSwitch(controller)
    async with (
        agent(controller, "w1"),
        agent(controller, "w2"),
        follower_of(switch) as follower,
        ControllerClient(URL, transport=controller.transport) as client,
    ):
        assert await routed(follower) == {"w1", "w2"}
        await client.drain("w1")
        await anyio.sleep(INTERVAL / 10)
        # The draining change came through the feed, applied by the one fold.
        assert await routed(follower) == {"w2"}
        explained = await follower.route(*CLASSIFY, explain=True)
        assert explained.explain is not None
        assert [(r.worker_id, r.reason) for r in explained.explain.removed] == [("w1", "draining")]
        # Still draining long after: a follower keeps no health clock, and w1 heartbeats on.
        await anyio.sleep(5 * INTERVAL)
        assert await routed(follower) == {"w2"}
        # A follower that starts now reads the drain in /snapshot.
        async with follower_of(controller.transport) as late:
            assert await routed(late) == {"w2"}
        await client.undrain("w1")
        await anyio.sleep(INTERVAL / 10)
        assert await routed(follower) == {"w1", "w2"}
        assert "/route" not in switch.paths


async def test_a_follower_stops_routing_to_an_ejected_worker_until_it_is_restored(
    controller: InProcessController,
) -> None:
    switch = FeedSwitch(controller)
    service = controller.app.state.service
    async with agent(controller, "w1"), agent(controller, "w2"), follower_of(switch) as follower:
        assert await routed(follower) == {"w1", "w2"}
        # A gateway's calls to w1 fail five times in a row: the controller ejects it.
        for _ in range(5):
            events = service.registry.decide_outcome("w1", *CLASSIFY, ok=False, now=service.clock())
            if events:
                await service.effects.commit(events)
        until = service.registry.ejected_until("w1")
        assert until is not None
        await anyio.sleep(INTERVAL / 10)
        # The ejected change came through the feed, applied by the one fold.
        assert await routed(follower) == {"w2"}
        explained = await follower.route(*CLASSIFY, explain=True)
        assert explained.explain is not None
        assert [(r.worker_id, r.reason) for r in explained.explain.removed] == [("w1", "ejected")]
        # Heartbeats do not end it; the controller's sweep restores it at the deadline.
        await anyio.sleep(until - service.clock() + INTERVAL)
        assert service.registry.ejected_until("w1") is None
        assert await routed(follower) == {"w1", "w2"}
        assert "/route" not in switch.paths


async def test_a_follower_answers_as_the_controller_client_does(
    controller: InProcessController,
) -> None:
    async with (
        ControllerClient(URL, transport=controller.transport) as client,
        follower_of(controller.transport) as follower,
    ):
        await client.register(Registration("w1", "https://w1.test:8443", (capability(),)))
        await anyio.sleep(INTERVAL / 10)
        assert await follower.route(*CLASSIFY) == WorkerEndpoint(
            "w1", "https://w1.test:8443", "1.0.0"
        )
        explained = await follower.route(*CLASSIFY, version=">=1", explain=True)
        assert explained == await client.route(*CLASSIFY, version=">=1", explain=True)
        questions: list[tuple[type[ControllerError], tuple[str, str], dict[str, Any]]] = [
            (UnknownCapability, ("classify", "image.clasify"), {}),
            (UnknownCapability, ("classify", "image.clasify"), {"strategy": "least_loaded"}),
            (NoWorkerAvailable, CLASSIFY, {"version": ">=2"}),
            (NoWorkerAvailable, CLASSIFY, {"version": ">=2", "explain": True}),
            (InvalidRequest, CLASSIFY, {"version": "nonsense"}),
            (InvalidRequest, CLASSIFY, {"strategy": "affinity"}),
            (InvalidRequest, ("", "image.classify"), {}),
        ]
        for kind, (verb, name), options in questions:
            with pytest.raises(kind) as here:
                await follower.route(verb, name, **options)
            with pytest.raises(kind) as there:
                await client.route(verb, name, **options)
            assert (here.value.code, here.value.status) == (there.value.code, there.value.status)
            assert here.value.body == there.value.body
            if isinstance(here.value, NoWorkerAvailable):
                assert isinstance(there.value, NoWorkerAvailable)
                assert here.value.retry_after == there.value.retry_after
                assert here.value.explain == there.value.explain
        # Silent past unhealthy_after and swept: known, and no worker available.
        await anyio.sleep(3 * INTERVAL)
        with pytest.raises(NoWorkerAvailable) as silent:
            await follower.route(*CLASSIFY)
        with pytest.raises(NoWorkerAvailable) as told:
            await client.route(*CLASSIFY)
        assert silent.value.body == told.value.body
        for options in ({"explain": True}, {"strategy": "least_loaded"}):
            with pytest.raises(NoWorkerAvailable) as silent:
                await follower.route(*CLASSIFY, **options)
            with pytest.raises(NoWorkerAvailable) as told:
                await client.route(*CLASSIFY, **options)
            assert silent.value.body == told.value.body
        with pytest.raises(InvalidRequest) as here:
            await follower.route(["classify"], "image.classify")  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest) as there:
            await client.route(["classify"], "image.classify")  # type: ignore[arg-type]
        assert here.value.body == there.value.body
        assert str(silent.value).startswith("RegistryFollower.route: no worker available")


async def test_a_follower_applies_least_privilege_for_its_identity(
    controller: InProcessController,
) -> None:
    caller = capability(verb="call", name="caller", required_capabilities=["classify:other"])
    async with ControllerClient(URL, transport=controller.transport) as client:
        await client.register(Registration("caller", "https://caller.test:8443", (caller,)))
        await client.register(Registration("w1", "https://w1.test:8443", (capability(),)))
        async with (
            follower_of(
                controller.transport, identity="spiffe://crank.local/worker/caller"
            ) as follower,
            follower_of(controller.transport) as anonymous,
        ):
            with pytest.raises(PolicyDenied) as denied:
                await follower.route(*CLASSIFY)
            assert denied.value.reason is not None and "classify:other" in denied.value.reason
            with pytest.raises(PolicyDenied):
                await follower.route(*CLASSIFY, strategy="least_loaded")
            assert (await anonymous.route(*CLASSIFY)).worker_id == "w1"


GATEWAY = "spiffe://crank.local/client/platform"
CALLER = "spiffe://crank.local/worker/caller"


class AsGateway(FeedSwitch):
    """:class:`FeedSwitch` whose requests carry the client certificate of :data:`GATEWAY`."""

    def __init__(self, controller: InProcessController) -> None:
        super().__init__(controller)
        self.pem = CertificateAuthority().issue(GATEWAY)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        if self.cut and request.url.path in ("/watch", "/snapshot"):
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        app = WithClientCertificate(self.controller.app)
        app.pem = self.pem
        return await httpx.ASGITransport(app=app).handle_async_request(request)


async def test_a_requester_identity_is_refused_fresh_or_stale_unless_a_trusted_gateway() -> None:
    async with anyio.create_task_group() as tg:
        controller = start_controller(tg, trusted_gateways=(GATEWAY,))
        await controller.start()
        caller = capability(verb="call", name="caller", required_capabilities=["classify:other"])
        switch = AsGateway(controller)
        async with (
            ControllerClient(URL, transport=controller.transport) as client,
            agent(controller, "w1"),
        ):
            await client.register(Registration("caller", "https://caller.test:8443", (caller,)))
            async with (
                follower_of(switch, identity=GATEWAY, trusted_gateway=True) as gateway,
                follower_of(switch, identity=GATEWAY) as untrusted,
                follower_of(switch) as anonymous,
            ):
                for stale in (False, True):
                    if stale:
                        switch.cut = True
                        await anyio.sleep(2 * gateway.lag_limit)
                        assert gateway.lag > gateway.lag_limit
                    asked = switch.paths.count("/route")
                    # The gateway routes for its callers, under their policy.
                    with pytest.raises(PolicyDenied) as denied:
                        await gateway.route(*CLASSIFY, requester_identity=CALLER)
                    assert "classify:other" in str(denied.value.reason)
                    for_web = await gateway.route(
                        *CLASSIFY, requester_identity="spiffe://crank.local/client/web"
                    )
                    assert for_web.worker_id == "w1"
                    assert switch.paths.count("/route") == asked + (2 if stale else 0)
                    # Any other follower is refused as the controller refuses it: 403 forbidden.
                    for follower in (untrusted, anonymous):
                        with pytest.raises(ForbiddenError) as refused:
                            await follower.route(*CLASSIFY, requester_identity=CALLER)
                        assert (refused.value.status, refused.value.code) == (403, "forbidden")
                        assert "trusted_gateway=True" in str(refused.value)
                        # An invalid request is refused for that first, as the controller does.
                        with pytest.raises(InvalidRequest):
                            await follower.route(
                                *CLASSIFY, requester_identity=CALLER, budget_tokens=-1
                            )
                    assert switch.paths.count("/route") == asked + (2 if stale else 0)
            # The controller itself refuses an anonymous caller the same way.
            with pytest.raises(ForbiddenError):
                await client.route(*CLASSIFY, requester_identity=CALLER)
        await controller.stop()


def test_a_trusted_gateway_follower_needs_its_identity() -> None:
    with pytest.raises(ConfigurationError, match="trusted_gateway=True needs identity"):
        RegistryFollower(URL, trusted_gateway=True)


async def test_past_its_lag_limit_a_follower_asks_the_controller_until_it_catches_up(
    controller: InProcessController,
) -> None:
    switch = FeedSwitch(controller)
    async with agent(controller, "w1"), follower_of(switch) as follower:
        assert await routed(follower) == {"w1"}
        switch.cut = True
        cut_at = anyio.current_time()
        # Within the lag limit: local, no /route.
        await anyio.sleep(follower.lag_limit * 0.9)
        assert await routed(follower) == {"w1"}
        assert "/route" not in switch.paths
        # Past it: every route is the controller's answer.
        await anyio.sleep(follower.lag_limit)
        assert follower.lag > follower.lag_limit
        async with agent(controller, "w2"):
            await anyio.sleep(INTERVAL / 10)
            answers = await routed(follower, 6)
            assert answers == {"w1", "w2"}  # the replica has not heard of w2: the controller has
            assert switch.paths.count("/route") == 6
            assert follower.revision < controller.app.state.service.registry.revision
            switch.cut = False
            # The follow loop retries within one heartbeat interval (its backoff is capped).
            await anyio.sleep(INTERVAL)
            assert follower.lag <= follower.lag_limit
            before = switch.paths.count("/route")
            assert await routed(follower) == {"w1", "w2"}
            assert switch.paths.count("/route") == before  # local again
            assert follower.revision == controller.app.state.service.registry.revision
        assert anyio.current_time() - cut_at > follower.lag_limit


async def test_a_follower_whose_controller_is_gone_answers_from_its_replica(
    controller: InProcessController,
) -> None:
    async with agent(controller, "w1"), follower_of(controller.transport) as follower:
        assert await routed(follower) == {"w1"}
        # The controller stops (connections refused): past the lag limit a
        # route asks it, gets no answer and is answered from the replica;
        # the next routes do not ask again until the backoff has passed.
        controller.transport.app = None
        await anyio.sleep(3 * follower.lag_limit)
        asked = len(controller.transport.times_of("/route"))
        assert await routed(follower, 5) == {"w1"}
        assert len(controller.transport.times_of("/route")) == asked + 1


async def test_a_follower_reloads_the_snapshot_after_a_410() -> None:
    async with anyio.create_task_group() as tg:
        controller = start_controller(tg, feed_window=2)
        await controller.start()
        switch = FeedSwitch(controller)
        async with agent(controller, "w1"), follower_of(switch) as follower:
            assert await routed(follower) == {"w1"}
            switch.cut = True
            async with agent(controller, "w2"), agent(controller, "w3"), agent(controller, "w4"):
                await anyio.sleep(INTERVAL / 10)
                switch.cut = False  # the changes it missed are out of the window: 410
                await anyio.sleep(INTERVAL)
                assert switch.paths.count("/snapshot") >= 2
                assert await routed(follower, 8) == {"w1", "w2", "w3", "w4"}
        # A controller restarted without a journal: another epoch, a new snapshot.
        async with agent(controller, "w5"), follower_of(switch) as follower:
            await controller.restart()
            await anyio.sleep(2 * INTERVAL)  # w5 registers again with the new controller
            assert follower.epoch == controller.app.state.service.epoch
            assert await routed(follower) == {"w5"}
        await controller.stop()


async def test_a_snapshot_the_core_refuses_leaves_the_follower_following(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refusals = 0

    def refused_once(answer: Any, *, rng: random.Random) -> Any:
        nonlocal refusals
        if answer.revision > 1 and refusals == 0:
            refusals += 1
            raise ValidationError.single("workers", "a snapshot the core refuses")
        return replica_of(answer, rng=rng)

    monkeypatch.setattr("crank_worker_client._follower.replica_of", refused_once)
    async with anyio.create_task_group() as tg:
        controller = start_controller(tg, feed_window=2)
        await controller.start()
        switch = FeedSwitch(controller)
        async with agent(controller, "w1"), follower_of(switch) as follower:
            switch.cut = True
            async with agent(controller, "w2"), agent(controller, "w3"), agent(controller, "w4"):
                await anyio.sleep(INTERVAL / 10)
                switch.cut = False  # 410: the reloaded snapshot is refused once, then held
                await anyio.sleep(3 * INTERVAL)
                assert refusals == 1
                assert await routed(follower, 8) == {"w1", "w2", "w3", "w4"}
        await controller.stop()


async def test_the_client_reads_the_feed_and_says_when_to_load_the_snapshot_again(
    controller: InProcessController,
) -> None:
    async with (
        agent(controller, "w1"),
        ControllerClient(URL, transport=controller.transport) as client,
    ):
        snapshot = await client.snapshot()
        assert [record.worker_id for record in snapshot.workers] == ["w1"]
        bookmark = await client.watch(since=snapshot.revision, epoch=snapshot.epoch, timeout=0.1)
        assert (bookmark.revision, bookmark.events) == (snapshot.revision, ())
        with pytest.raises(RevisionGone) as beyond:
            await client.watch(since=snapshot.revision + 5, timeout=0.1)
        assert (beyond.value.code, beyond.value.status) == ("revision_reset", 410)
        with pytest.raises(RevisionGone) as other:
            await client.watch(since=snapshot.revision, epoch="another", timeout=0.1)
        assert other.value.code == "revision_reset"


async def test_a_reserved_call_counts_for_least_loaded_until_it_ends(
    controller: InProcessController,
) -> None:
    async with (
        agent(controller, "w1"),
        agent(controller, "w2"),
        follower_of(controller.transport) as follower,
    ):
        await anyio.sleep(INTERVAL / 10)
        async with follower.reserve(*CLASSIFY, strategy="least_loaded") as busy:
            # Hand-outs fade after one interval; the reserved call does not.
            await anyio.sleep(3 * INTERVAL)
            for _ in range(4):
                async with follower.reserve(*CLASSIFY, strategy="least_loaded") as other:
                    assert other.worker_id != busy.worker_id
        await anyio.sleep(3 * INTERVAL)
        # Both idle: least_loaded's tie goes to the smaller worker id.
        assert (await follower.route(*CLASSIFY, strategy="least_loaded")).worker_id == "w1"


class Refusing(httpx.AsyncBaseTransport):
    """A controller that refuses every connection; ``closed`` counts the client's closes."""

    def __init__(self) -> None:
        self.closed = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    async def aclose(self) -> None:
        self.closed += 1


async def test_a_follower_that_cannot_load_the_snapshot_closes_its_client() -> None:
    # `async with` never reaches __aexit__ when entering fails: the follower
    # closes its connections itself, or each try of a caller's retry loop leaks them.
    refusing = Refusing()
    with pytest.raises(ControllerUnavailable):
        async with follower_of(refusing, timeout=1.0):
            pass  # pragma: no cover (entering fails)
    assert refusing.closed == 1
