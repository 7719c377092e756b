"""Benchmark of routing options: the time of a route per option, in the core.

Run: ``.venv/bin/python benchmarks/route_options.py`` (under a minute;
``--quick`` for a smoke run).

10 000 workers, 10 per capability (1 000 capabilities, one each), with
versions, costs and declared SLOs spread over them. For the plain route and
for each option it prints the time per call (the median of repeated
``timeit`` runs, in CPU time of this thread, as ``core.py`` counts) and its
ratio to the target: the plain route <= 1 µs (it must not pay for the
options), each option <= 10 µs (O(k) in the 10 workers of its capability).
Every worker has reported its load (``in_flight`` 0 to 4 of its
``max_concurrency`` 4, so a fifth of each capability's workers are
``at_capacity``). The
``least_loaded`` route is also timed with 100 workers per capability, with
its ratio to the 10 µs target (alone, it draws from the ring in O(1));
``least_loaded`` with a filter, ``affinity`` and ``idempotency_key``
there without a target: the cost grows with k, never with the registry.

``slo_constraints`` is timed again with an SLO file for every capability
(a ``version`` set in each, so that every member's version is matched).
The ``affinity`` and ``idempotency_key`` routes are also timed with 100
workers per capability, without a target: the cost grows with k, never with
the registry.

The access policy is timed apart (:data:`POLICY_CASES`), with the built-in
policy set on the registry: the plain route with no policy file (what the
controller does without ``--policy``) against the plain target, and a
requester under 20 rules, anonymous, and a worker with
``required_capabilities``, against the option target.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

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

WORKERS = 10_000
START = 1_700_000_000.0
PLAIN_TARGET_US = 1.0
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
    ("plain, built-in policy without a file", PolicyRules(), None, PLAIN_TARGET_US),
    ("requester, 20 rules", RULES, CALLER, OPTION_TARGET_US),
    ("anonymous, 20 rules", RULES, None, OPTION_TARGET_US),
    (
        "worker with required_capabilities",
        PolicyRules(),
        RouteOptions(requester_identity="spiffe://crank.local/worker/w0"),
        OPTION_TARGET_US,
    ),
)


def capability(name: str, worker: int) -> CapabilitySchema:
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


def build(per_capability: int) -> tuple[CapabilityRegistry, list[str]]:
    """10 000 workers, ``per_capability`` to each capability; the capability names."""
    registry = CapabilityRegistry()
    names = [f"cap-{index}" for index in range(WORKERS // per_capability)]
    for worker in range(WORKERS):
        name = names[worker % len(names)]
        registry.register(
            f"w{worker}", f"https://w{worker}:8443", [capability(name, worker)], now=START
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


def per_call_us(run: Callable[[], object], calls: int, repeat: int) -> float:
    run()  # warm up
    runs = timeit.repeat(run, number=1, repeat=repeat, timer=time.thread_time)
    return statistics.median(runs) / calls * 1e6


def bench(
    registry: CapabilityRegistry, names: list[str], options: RouteOptions | None, calls: int
) -> Callable[[], None]:
    route = registry.route
    sample = [names[index % len(names)] for index in range(calls)]

    def run() -> None:
        for name in sample:
            route("run", name, now=START, options=options)

    return run


def report(label: str, micros: float, target: float | None) -> bool:
    if target is None:
        print(f"{label}: {micros:.2f} µs")
        return True
    ratio = micros / target
    verdict = "PASS" if ratio <= 1 else "FAIL"
    print(f"{label}: {micros:.2f} µs (target {target:.1f} µs: {ratio:.2f}x) {verdict}")
    return ratio <= 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    calls, repeat = (1_000, 3) if args.quick else (5_000, 7)
    print(f"crank_registry route options: {WORKERS} workers, Python {sys.version.split()[0]}")
    ok = True
    print("-- 10 workers per capability")
    registry, names = build(10)
    for label, options in OPTIONS.items():
        target = PLAIN_TARGET_US if options is None else OPTION_TARGET_US
        micros = per_call_us(bench(registry, names, options, calls), calls, repeat)
        ok &= report(f"route, {label}", micros, target)
    registry.set_slos(slo_files(names), now=START)
    label = "slo_constraints p95 <= 100 ms"
    micros = per_call_us(bench(registry, names, OPTIONS[label], calls), calls, repeat)
    ok &= report(f"route, {label}, an SLO file per capability", micros, OPTION_TARGET_US)
    registry.set_slos((), now=START)
    print("-- access policy, 10 workers per capability")
    for label, rules, options, target in POLICY_CASES:
        registry.set_access_policy(BuiltinPolicy(rules, registry.required_targets))
        # Worker 0 routes where it may (a denial is an exception, another cost).
        asked = [names[n] for n in REQUIRED] if "required" in label else names
        micros = per_call_us(bench(registry, asked, options, calls), calls, repeat)
        ok &= report(f"route, {label}", micros, target)
    registry.set_access_policy(None)
    del registry
    print("-- 100 workers per capability")
    registry, names = build(100)
    for label in (
        "plain (no options)",
        "strategy affinity",
        "idempotency_key",
        "least_loaded and version",
        "all of them",
    ):
        micros = per_call_us(bench(registry, names, OPTIONS[label], calls), calls, repeat)
        report(f"route@100 per capability, {label}", micros, None)
    label = "strategy least_loaded"
    micros = per_call_us(bench(registry, names, OPTIONS[label], calls), calls, repeat)
    ok &= report(f"route@100 per capability, {label}", micros, OPTION_TARGET_US)
    print("all targets met" if ok else "some targets missed")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
