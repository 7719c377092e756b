"""The registry core alone, in-process, driven with explicit time.

No server, no clock, no sleeping: every call takes ``now`` and every change
returns the events that happened, which a service would turn into journal
lines, logs and spans. Run: ``python -m examples.in_process``.
"""

from __future__ import annotations

from crank_registry import (
    CapabilityRegistry,
    CapabilitySchema,
    Event,
    HealthPolicy,
    WorkerNotRegistered,
    unstructure_event,
)

START = 1_700_000_000.0  # wall-clock seconds; the caller owns time


def colour_capability() -> CapabilitySchema:
    """The one capability both example workers offer: the dominant colour of an image."""
    return CapabilitySchema(
        name="image.color",
        verb="classify",
        version="1.0.0",
        input_schema={"type": "object", "properties": {"png_base64": {"type": "string"}}},
        output_schema={"type": "object", "properties": {"color": {"type": "string"}}},
        requires_gpu=False,
        max_concurrency=4,
    )


def say(t: float, message: str) -> None:
    """Print ``message`` at ``t`` seconds after the start."""
    print(f"t={t:>4.0f}s  {message}")


def events(t: float, what: str, happened: tuple[Event, ...]) -> None:
    """Print a call and the types of the events it returned."""
    kinds = [unstructure_event(event)["type"] for event in happened]
    say(t, f"{what} -> {', '.join(kinds) or 'nothing'}")


def main() -> None:
    """Register, route, heartbeat, let one worker go silent, sweep, restart."""
    policy = HealthPolicy(heartbeat_interval=30, unhealthy_after=60, evict_after=120)
    registry = CapabilityRegistry(policy)
    colour = colour_capability()

    t = 0.0
    events(
        t, "register a", registry.register("a", "https://10.0.0.1:8443", [colour], now=START + t)
    )
    events(
        t, "register b", registry.register("b", "https://10.0.0.2:8443", [colour], now=START + t)
    )
    picks = [registry.route("classify", "image.color", now=START + t) for _ in range(4)]
    say(t, f"four routes, round robin: {[p.worker_id for p in picks if p]}")
    deadline = registry.next_deadline()
    if deadline is not None:
        # A service sleeps until just after this instead of polling.
        say(t, f"next deadline: t={deadline - START:.0f}s (nothing changes before then)")

    t = 45.0
    events(t, "heartbeat a", registry.heartbeat("a", now=START + t))
    t = 75.0  # b has been silent for 75 s, more than unhealthy_after (60 s)
    picks = [registry.route("classify", "image.color", now=START + t) for _ in range(3)]
    say(t, f"b is silent; three routes go to {[p.worker_id for p in picks if p]}")
    states = {view.worker_id: view.state.value for view in registry.workers(now=START + t)}
    say(t, f"states {states}")
    # A service's sweeper runs just after each deadline; the sweep says which
    # workers stopped being routable, so that whoever follows the events
    # knows without a clock of its own.
    events(t, "cleanup_stale", registry.cleanup_stale(now=START + t))

    t = 100.0
    events(t, "heartbeat a", registry.heartbeat("a", now=START + t))
    t = 110.0
    # next_deadline() may answer early, never late: a heartbeat moves a
    # worker's deadline without touching the core's queue, which still says
    # t=105s for a. A sweep re-files every passed entry at its true time, so
    # a service's sweeper calls cleanup_stale before it asks again.
    events(t, "cleanup_stale", registry.cleanup_stale(now=START + t))
    deadline = registry.next_deadline()
    if deadline is not None:
        say(
            t,
            f"next deadline: t={deadline - START:.0f}s, when b becomes evictable "
            "(a service's sweeper sleeps until then)",
        )
    t = 125.0  # b silent for 125 s, more than evict_after (120 s)
    events(t, "cleanup_stale", registry.cleanup_stale(now=START + t))
    say(t, f"workers left: {[view.worker_id for view in registry.workers(now=START + t)]}")

    # A controller restart: the records come back unverified and stay routable
    # (the warm cache) until they register again.
    snapshot = registry.export_state()
    restarted = CapabilityRegistry(policy)
    kept = restarted.restore(registry.records(), now=START + t)
    endpoint = restarted.route("classify", "image.color", now=START + t)
    view = restarted.get_worker("a", now=START + t)
    say(
        t,
        f"restart: {kept} of {len(snapshot['workers'])} restored; a is "
        f"{view.state.value if view else '?'} and still routable: "
        f"route -> {endpoint.worker_id if endpoint else None}",
    )
    try:
        restarted.heartbeat("a", now=START + t)
    except WorkerNotRegistered as error:
        say(t, f"heartbeat from a -> {error.code}: the worker re-registers")
    events(
        t, "register a", restarted.register("a", "https://10.0.0.1:8443", [colour], now=START + t)
    )
    view = restarted.get_worker("a", now=START + t)
    say(t, f"a is {view.state.value if view else '?'}")


if __name__ == "__main__":
    main()
