"""Benchmark of the sans-IO core: route, heartbeat, register, cleanup, memory, route options.

Run: ``.venv/bin/python benchmarks/core.py`` (about 3 minutes; ``--quick``
for a smoke run, ``--sizes N ...`` for chosen sizes, ``--only
sizes|options`` for one part, ``--strict`` to exit 1 when a target is
missed).

For 100, 10 000 and 100 000 registered workers spread over 10 000
capabilities (each worker registers 3), it prints each figure and its ratio
to the target where there is one:

* time per call, the median of repeated ``timeit`` runs, counted in CPU time
  of this thread (the time other processes hold a shared CPU is not the
  registry's): ``route`` over the same 64 hot capabilities at every size
  (target <= 1 µs at 100 000, and within 1.3x of the figure at 100), and,
  without a target, over every capability in turn (cache-cold at 100 000);
  ``heartbeat`` of distinct workers in turn, each a little later than the one
  before (target <= 1.5 µs); ``register``,
  the re-registration of an existing worker with 3 capability objects
  freshly structured from JSON before the timing;
* ``cleanup_stale`` per evicted worker: a sweep that evicts a tenth of the
  registry and nothing else (median of 5 rounds);
* memory per worker: the tracemalloc delta of building the registry divided
  by N, capability objects included, each worker's built the way the wire
  builds them (its JSON body decoded, then ``structure()``). The registry
  stores equal capability values once, so the figure depends on how many
  workers share a capability: 1 at 100 workers, 3 at 10 000, 30 at 100 000.
  The 1.5 KB target is checked at 100 000 workers; the smaller sizes are
  printed for information.

Route options (:func:`bench_options`): 10 000 workers, 10 per capability
(1 000 capabilities, one each), with versions, costs and declared SLOs
spread over them, every one with a load report (``in_flight`` 0 to 4 of
its ``max_concurrency`` 4, so a fifth of each capability's workers are
``at_capacity``). For the plain route and each option: the time per call,
its ratio to the target (the plain route <= 1 µs: it must not pay for the
options; each option <= 10 µs, O(k) in the 10 workers of its capability)
and to the plain route of the same run (the baseline). ``slo_constraints``
again with an SLO file per capability (a ``version`` set in each); the
plain route again (the policy cases' baseline: the options' round-robin
has moved the rotations' cursors, and the first plain routes had taken
members in the order they were made, in memory too); the
access policy (:data:`POLICY_CASES`) with the built-in policy set: the
plain route without a policy file against the plain target, a requester
under 20 rules, anonymous, and a worker with ``required_capabilities``
against the option target. At 100 workers per capability,
``least_loaded`` alone against the option target (it draws from the ring
in O(1)); ``affinity``, ``idempotency_key``, ``least_loaded`` with a
filter and all options at once without a target: the cost grows with k,
never with the registry.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import timeit
import tracemalloc
from collections.abc import Callable
from typing import Any, NamedTuple

from crank_registry import (
    BuiltinPolicy,
    CapabilityRegistry,
    CapabilitySchema,
    LoadReport,
    PolicyRule,
    PolicyRules,
    RouteOptions,
    ServiceLevel,
    SloFile,
    structure,
)

SIZES = (100, 10_000, 100_000)
CAPABILITIES = 10_000
PER_WORKER = 3
ROUTE_SAMPLE = 64
START = 1_700_000_000.0

ROUTE_TARGET_US = 1.0
ROUTE_FLATNESS_TARGET = 1.3
HEARTBEAT_TARGET_US = 1.5
#: Seconds between two heartbeats of the benchmark (2**-20: exact at START).
HEARTBEAT_STEP = 2.0**-20
#: When the re-registrations happen: after every heartbeat, before the cleanup rounds.
REGISTER_AT = START + 0.5
MEMORY_TARGET_BYTES = 1.5 * 1024
MEMORY_TARGET_AT = 100_000  # workers; see the module docstring


def capability_payload(index: int) -> dict[str, Any]:
    """The JSON a worker sends for capability ``index``."""
    return {
        "name": f"model.task{index}",
        "verb": "infer",
        "version": "1.2.0",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
        "output_schema": {"type": "object"},
        "requires_gpu": index % 2 == 0,
        "max_concurrency": 4,
    }


def capability_indexes(worker: int) -> list[int]:
    """The 3 capabilities of worker ``worker``: spread evenly over all of them."""
    return [(worker * PER_WORKER + k) % CAPABILITIES for k in range(PER_WORKER)]


def worker_capabilities(worker: int) -> list[CapabilitySchema]:
    """Capability objects built the way the wire builds them.

    Each worker's body is encoded and decoded, then structured: every worker
    gets its own strings, dicts and capability objects, as in the service.
    """
    body = json.loads(json.dumps([capability_payload(i) for i in capability_indexes(worker)]))
    return [structure(payload, CapabilitySchema) for payload in body]


def worker_url(worker: int) -> str:
    return f"https://10.{worker // 62500}.{worker // 250 % 250}.{worker % 250}:8443"


def populate(registry: CapabilityRegistry, count: int, now: float) -> None:
    for worker in range(count):
        registry.register(
            f"worker-{worker}", worker_url(worker), worker_capabilities(worker), now=now
        )


class Timing(NamedTuple):
    """Seconds per call: the median run's, and the fastest run's.

    On a shared machine the spread between them shows what the neighbours
    cost; the targets are checked against the median.
    """

    median: float
    fastest: float


def per_call(run: Callable[[], object], calls: int, repeat: int) -> Timing:
    """Median over ``repeat`` runs of ``run`` (which makes ``calls`` calls), per call.

    Timed in CPU time of this thread: on a shared machine, the time other
    processes hold the CPU is not the registry's.
    """
    run()  # warm up
    runs = timeit.repeat(run, number=1, repeat=repeat, timer=time.thread_time)
    return Timing(statistics.median(runs) / calls, min(runs) / calls)


def report(label: str, timing: Timing, target_us: float | None = None) -> bool:
    micros = timing.median * 1e6
    fastest = f"[fastest run {timing.fastest * 1e6:.2f} µs]"
    if target_us is None:
        print(f"{label}: {micros:.2f} µs {fastest}")
        return True
    ratio = micros / target_us
    verdict = "PASS" if ratio <= 1 else "FAIL"
    print(f"{label}: {micros:.2f} µs (target {target_us:.1f} µs: {ratio:.2f}x) {verdict} {fastest}")
    return ratio <= 1


def build(count: int) -> tuple[CapabilityRegistry, float]:
    """A registry of ``count`` workers, and the bytes it holds per worker.

    The capability objects each worker sent are part of the figure: those
    equal to one already stored are shared by the registry, the others kept.
    """
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    registry = CapabilityRegistry()
    populate(registry, count, START)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(registry) == count
    return registry, (after - before) / count


def bench_calls(
    registry: CapabilityRegistry, count: int, calls: int, repeat: int
) -> dict[str, Timing]:
    """Median time per call of route, heartbeat and register."""
    now = START
    results: dict[str, Timing] = {}
    route = registry.route

    # route over the same ROUTE_SAMPLE hot capabilities at every size, so that
    # the figure follows the registry's size and not the share of it that
    # fits in the CPU cache; each of them has workers at every size.
    sample = [("infer", f"model.task{i}") for i in range(ROUTE_SAMPLE)]
    keys = (sample * (calls // len(sample) + 1))[:calls]

    def run_routes() -> None:
        for verb, name in keys:
            route(verb, name, now=now)

    results["route"] = per_call(run_routes, len(keys), repeat)

    # route over every capability that has workers, in turn (cache-cold at
    # large sizes; no target).
    spread = [("infer", f"model.task{i}") for i in range(min(CAPABILITIES, count * PER_WORKER))]
    spread = (spread * (calls // len(spread) + 1))[:calls]

    def run_spread_routes() -> None:
        for verb, name in spread:
            route(verb, name, now=now)

    results["route_spread"] = per_call(run_spread_routes, len(spread), repeat)

    ids = [f"worker-{w}" for w in range(count)]
    beats = (ids * (calls // count + 1))[:calls]
    heartbeat = registry.heartbeat
    # Each heartbeat a little later than the one before, as a service's are:
    # one at its worker's last heartbeat (the registration's) moves nothing,
    # which skipped the deadline's update the real heartbeat makes. Every run
    # (the warm-up too) gets its own times, all before REGISTER_AT.
    times = iter(
        [
            [START + (run * calls + index) * HEARTBEAT_STEP for index in range(calls)]
            for run in range(repeat + 1)
        ]
    )

    def run_heartbeats() -> None:
        for worker_id, at in zip(beats, next(times), strict=True):
            heartbeat(worker_id, now=at)

    results["heartbeat"] = per_call(run_heartbeats, len(beats), repeat)
    assert (repeat + 1) * calls * HEARTBEAT_STEP < REGISTER_AT - START

    # register: re-registration of an existing worker with 3 freshly
    # structured capabilities (built before the timing, as the wire builds
    # them before calling the core).
    register_calls = max(calls // 20, 100)
    batches = iter(
        [
            [
                (ids[w % count], worker_url(w % count), worker_capabilities(w % count))
                for w in range(r * register_calls, (r + 1) * register_calls)
            ]
            for r in range(repeat + 1)  # one more for the warm-up run
        ]
    )
    register = registry.register

    def run_registers() -> None:
        for worker_id, url, capabilities in next(batches):
            register(worker_id, url, capabilities, now=REGISTER_AT)

    results["register"] = per_call(run_registers, register_calls, repeat)
    return results


def bench_cleanup(registry: CapabilityRegistry, count: int, repeat: int) -> Timing:
    """Median seconds per evicted worker, evicting a tenth of the registry at once.

    Each round the silent tenth registers, everyone else heartbeats, one
    sweep reschedules the deadlines (untimed), and the timed sweep evicts
    exactly the silent tenth and nothing else.
    """
    silent = max(count // 10, 1)
    silent_ids = [f"worker-{w}" for w in range(silent)]
    talking = [f"worker-{w}" for w in range(silent, count)]
    capabilities = {w: worker_capabilities(w) for w in range(silent)}
    base = START + 1.0
    per_evicted: list[float] = []
    for _ in range(repeat):
        for w, worker_id in enumerate(silent_ids):
            registry.register(worker_id, worker_url(w), capabilities[w], now=base)
        for worker_id in talking:
            registry.heartbeat(worker_id, now=base)
        for worker_id in talking:
            registry.heartbeat(worker_id, now=base + 100.0)
        registry.cleanup_stale(now=base + 101.0)
        began = time.thread_time()
        evicted = registry.cleanup_stale(now=base + 121.0)
        elapsed = time.thread_time() - began
        assert len(evicted) == silent, (len(evicted), silent)
        per_evicted.append(elapsed / silent)
        base += 121.0
    return Timing(statistics.median(per_evicted), min(per_evicted))


# ------------------------------------------------------------ route options

OPTION_WORKERS = 10_000
OPTION_TARGET_US = 10.0

OPTIONS: dict[str, RouteOptions | None] = {
    "plain (no options)": None,
    "version >=1.2,<2": RouteOptions(version=">=1.2,<2"),
    "exclude 2 workers": RouteOptions(exclude=("w0", "w1")),
    "slo_constraints p95 <= 100 ms": RouteOptions(slo_constraints={"latency_p95_ms": 100}),
    "budget_tokens 5": RouteOptions(budget_tokens=5),
    "strategy affinity": RouteOptions(strategy="affinity", affinity_key="user-42"),
    "strategy least_loaded": RouteOptions(strategy="least_loaded"),
    "least_loaded and version": RouteOptions(strategy="least_loaded", version=">=1.2,<2"),
    "idempotency_key": RouteOptions(idempotency_key="order-7"),
    "all of them": RouteOptions(
        version=">=1.2,<2",
        exclude=("w0",),
        slo_constraints={"latency_p95_ms": 100},
        budget_tokens=5,
        strategy="affinity",
        affinity_key="user-42",
    ),
}

#: 20 rules; the requesters below are decided by the last ones (every rule looked at).
RULES = PolicyRules(
    rules=(
        *(
            PolicyRule(identity=f"spiffe://crank.local/client/team-{n}-*", allow=("run:*",))
            for n in range(18)
        ),
        PolicyRule(identity="spiffe://crank.local/*", deny=("run:secret-*",), allow=("run:cap-*",)),
        PolicyRule(identity="*", allow=("run:cap-*",)),
    ),
    default="deny",
)
REQUIRED = range(0, 50, 10)
CALLER = RouteOptions(requester_identity="spiffe://crank.local/client/web")

#: (label, rules, options, target).
POLICY_CASES: tuple[tuple[str, PolicyRules, RouteOptions | None, float], ...] = (
    ("plain, built-in policy without a file", PolicyRules(), None, ROUTE_TARGET_US),
    ("requester, 20 rules", RULES, CALLER, OPTION_TARGET_US),
    ("anonymous, 20 rules", RULES, None, OPTION_TARGET_US),
    (
        "worker with required_capabilities",
        PolicyRules(),
        RouteOptions(requester_identity="spiffe://crank.local/worker/w0"),
        OPTION_TARGET_US,
    ),
)


def option_capability(name: str, worker: int) -> CapabilitySchema:
    """Capability ``name`` as worker ``worker`` offers it: versions, costs and SLOs vary."""
    payload: dict[str, Any] = {
        "name": name,
        "verb": "run",
        "version": ("1.1.0", "1.4.0", "1.9.2", "2.0.0")[worker % 4],
        "input_schema": {"type": "object"},
        "output_schema": {"type": "object"},
        "requires_gpu": False,
        "max_concurrency": 4,
        "cost_tokens_per_invocation": float(worker % 3 * 2),
        "slo": {"latency_p95_ms": (50, 90, 250)[worker % 3], "availability": 0.999},
        # Worker 0 calls five capabilities (least privilege, rule 1).
        "required_capabilities": [f"run:cap-{n}" for n in REQUIRED] if worker == 0 else None,
    }
    return structure(payload, CapabilitySchema)


def option_fleet(per_capability: int) -> tuple[CapabilityRegistry, list[str]]:
    """10 000 workers, ``per_capability`` to each capability; the capability names."""
    registry = CapabilityRegistry()
    names = [f"cap-{index}" for index in range(OPTION_WORKERS // per_capability)]
    for worker in range(OPTION_WORKERS):
        name = names[worker % len(names)]
        registry.register(
            f"w{worker}", f"https://w{worker}:8443", [option_capability(name, worker)], now=START
        )
        # Loads vary within each capability (its workers are w, w + len(names)...).
        in_flight = worker // len(names) % 5
        registry.heartbeat(f"w{worker}", now=START, load=LoadReport(in_flight=in_flight))
    return registry, names


def slo_files(names: list[str]) -> list[SloFile]:
    """One SLO file a capability, for the versions from 1.4: 1 000 files."""
    return [
        SloFile(
            file=f"{name}.yaml",
            slo=ServiceLevel(verb="run", capability=name, version=">=1.4", latency_p95_ms=80),
        )
        for name in names
    ]


def option_routes(
    registry: CapabilityRegistry, names: list[str], options: RouteOptions | None, calls: int
) -> Callable[[], None]:
    """``calls`` routes with ``options``, over the capabilities ``names`` in turn."""
    route = registry.route
    sample = [names[index % len(names)] for index in range(calls)]

    def run() -> None:
        for name in sample:
            route("run", name, now=START, options=options)

    return run


def report_option(label: str, timing: Timing, target_us: float | None, plain: Timing) -> bool:
    """:func:`report`, and the ratio to the plain route of the same fleet (the baseline)."""
    ok = report(label, timing, target_us)
    print(f"    {timing.median / plain.median:.1f}x the plain route")
    return ok


def bench_options(calls: int, repeat: int) -> bool:
    """Each route option's time per call against its target; whether all were met."""
    print(f"-- route options: {OPTION_WORKERS} workers, 10 per capability")
    ok = True
    registry, names = option_fleet(10)
    plain = per_call(option_routes(registry, names, None, calls), calls, repeat)
    ok &= report("route, plain (no options)", plain, ROUTE_TARGET_US)
    for label, options in OPTIONS.items():
        if options is None:
            continue
        timing = per_call(option_routes(registry, names, options, calls), calls, repeat)
        ok &= report_option(f"route, {label}", timing, OPTION_TARGET_US, plain)
    registry.set_slos(slo_files(names), now=START)
    label = "slo_constraints p95 <= 100 ms"
    timing = per_call(option_routes(registry, names, OPTIONS[label], calls), calls, repeat)
    ok &= report_option(
        f"route, {label}, an SLO file per capability", timing, OPTION_TARGET_US, plain
    )
    registry.set_slos((), now=START)
    print("-- access policy, 10 workers per capability")
    # The baseline again, on the rotations as the options' routes left them:
    # the first plain routes took each capability's members in the order
    # they were made (in memory too), which the options' round-robin undid.
    plain = per_call(option_routes(registry, names, None, calls), calls, repeat)
    ok &= report("route, plain (no options), after the options' routes", plain, ROUTE_TARGET_US)
    for label, rules, options, target in POLICY_CASES:
        registry.set_access_policy(BuiltinPolicy(rules, registry.required_targets))
        # Worker 0 routes where it may (a denial is an exception, another cost).
        asked = [names[n] for n in REQUIRED] if "required" in label else names
        timing = per_call(option_routes(registry, asked, options, calls), calls, repeat)
        ok &= report_option(f"route, {label}", timing, target, plain)
    registry.set_access_policy(None)
    del registry
    print("-- route options: 100 workers per capability")
    registry, names = option_fleet(100)
    plain = per_call(option_routes(registry, names, None, calls), calls, repeat)
    report("route@100 per capability, plain (no options)", plain)
    for label in (
        "strategy affinity",
        "idempotency_key",
        "least_loaded and version",
        "all of them",
    ):
        timing = per_call(option_routes(registry, names, OPTIONS[label], calls), calls, repeat)
        report_option(f"route@100 per capability, {label}", timing, None, plain)
    label = "strategy least_loaded"
    timing = per_call(option_routes(registry, names, OPTIONS[label], calls), calls, repeat)
    ok &= report_option(f"route@100 per capability, {label}", timing, OPTION_TARGET_US, plain)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"worker counts (default {SIZES})")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--only", choices=("sizes", "options"), help="only the sizes' figures, or the options'"
    )
    args = parser.parse_args(argv)
    sizes = tuple(args.sizes or ((100, 1_000) if args.quick else SIZES))
    calls, repeat = (2_000, 3) if args.quick else (20_000, 7)
    option_calls, option_repeat = (1_000, 3) if args.quick else (5_000, 7)

    print(f"crank_registry core benchmark, Python {sys.version.split()[0]}")
    ok = True
    if args.only != "options":
        ok &= bench_sizes(sizes, calls, repeat)
    if args.only != "sizes":
        ok &= bench_options(option_calls, option_repeat)
    print("all targets met" if ok else "some targets missed")
    return 1 if args.strict and not ok else 0


def bench_sizes(sizes: tuple[int, ...], calls: int, repeat: int) -> bool:
    """Route, heartbeat, register, cleanup and memory at each size; whether all targets were met."""
    ok = True
    route_at: dict[int, Timing] = {}
    print(f"{CAPABILITIES} capabilities, {PER_WORKER} per worker")
    for count in sizes:
        print(f"-- {count} workers")
        registry, per_worker = build(count)
        results = bench_calls(registry, count, calls, repeat)
        route_at[count] = results["route"]
        ok &= report(f"route@{count}", results["route"], ROUTE_TARGET_US)
        report(f"route@{count} over all capabilities in turn", results["route_spread"])
        ok &= report(f"heartbeat@{count}", results["heartbeat"], HEARTBEAT_TARGET_US)
        report(f"register@{count} (re-registration, 3 capabilities)", results["register"])
        per_evicted = bench_cleanup(registry, count, repeat=5)
        report(f"cleanup_stale@{count} per evicted worker", per_evicted)
        ratio = per_worker / MEMORY_TARGET_BYTES
        if count >= MEMORY_TARGET_AT:
            verdict = "PASS" if ratio <= 1 else "FAIL"
            ok &= ratio <= 1
        else:
            sharing = count * PER_WORKER / min(CAPABILITIES, count * PER_WORKER)
            verdict = f"(informational: {sharing:g} workers per capability)"
        print(
            f"memory@{count}: {per_worker:.0f} B per worker "
            f"(target {MEMORY_TARGET_BYTES:.0f} B: {ratio:.2f}x) {verdict}"
        )
        del registry
    smallest, largest = min(route_at), max(route_at)
    flatness = route_at[largest].median / route_at[smallest].median
    verdict = "PASS" if flatness <= ROUTE_FLATNESS_TARGET else "FAIL"
    print(
        f"route@{largest} / route@{smallest}: {flatness:.2f}x "
        f"(target {ROUTE_FLATNESS_TARGET}x: {flatness / ROUTE_FLATNESS_TARGET:.2f}x) {verdict}"
    )
    ok &= flatness <= ROUTE_FLATNESS_TARGET
    return ok


if __name__ == "__main__":
    sys.exit(main())
