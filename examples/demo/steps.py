"""The steps of the demo, in the order :func:`run` takes them.

1. :func:`start`: certificates, the controller with its gateway, the nine
   workers; wait until all have registered.
2. :func:`invoke_everything`: every registered capability through
   ``POST /execute``, each answer checked.
3. :func:`restart_controller`: SIGKILL the controller and start it again on
   the same state directory: the journal restores every worker as
   ``unverified``, routing goes on from that warm cache, and the workers
   re-register within one heartbeat interval (plus jitter).
4. :func:`stop_one_worker`: SIGTERM one worker; it leaves the registry and
   no worker offers its capability any more (404 unknown_capability).
5. The summary table.

:func:`keep_running` (``--keep-running``) then brings the stopped worker
back and waits. Each step raises :class:`~examples.demo.processes.DemoFailure`
when something is not as it should be.
"""

from __future__ import annotations

import signal
import time

from crank_worker_client import MAX_JITTER_FRACTION
from examples.workers import WORKER_NAMES

from .calls import calls
from .processes import DemoFailure
from .report import Report, Row
from .system import HEARTBEAT_INTERVAL, System

__all__ = [
    "LEAVING",
    "invoke_everything",
    "keep_running",
    "restart_controller",
    "run",
    "start",
    "stop_one_worker",
]

#: The worker stopped in step 4.
LEAVING = "hello_world"
#: Allowance for the requests themselves (re-registration, our polling) on a busy machine.
REQUEST_SLACK = 0.5

Capability = tuple[str, str]


def run(system: System, report: Report) -> None:
    """Steps 1 to 5; raises :class:`DemoFailure` at the first that fails."""
    capabilities = start(system, report)
    invoke_everything(system, report, capabilities)
    restart_controller(system, report, capabilities)
    stop_one_worker(system, report)
    report.print_summary(len(WORKER_NAMES))


def start(system: System, report: Report) -> list[Capability]:
    """Step 1: the controller and every worker up; the capabilities they registered."""
    report.say(f"working in {system.workdir}")
    system.make_certificates()
    report.say(f"made a CA and certificates for the controller and {len(WORKER_NAMES)} workers")
    system.start_controller()
    system.wait_until("the controller to start", 20, system.ready, "controller")
    report.say(f"controller (with gateway) up at {system.url}, mutual TLS")

    for name in WORKER_NAMES:
        system.start_worker(name)
    registered = system.wait_until(
        f"all {len(WORKER_NAMES)} workers to register",
        40,
        system.all_registered,
        "controller",
        *WORKER_NAMES,
    )
    report.say(f"all {len(registered)} workers registered:")
    for worker in registered.values():
        report.say(
            f"    {worker['worker_id']:<20} {worker['worker_url']:<26} "
            f"{', '.join(worker['capabilities'])}"
        )
    return system.capabilities()


def invoke_everything(system: System, report: Report, capabilities: list[Capability]) -> None:
    """Step 2: every capability through the gateway, each answer checked."""
    report.say("invoking every capability through POST /execute:")
    invoked = []
    for call in calls(system):
        response, latency = system.execute(call.verb, call.capability, call.payload)
        if response.status_code != 200:
            raise DemoFailure(f"{call.label}: {response.status_code} {response.text[:300]}")
        try:
            answer = call.check(response)
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise DemoFailure(
                f"{call.label}: unexpected answer {response.text[:300]!r} ({error})"
            ) from None
        worker = response.headers.get("x-crank-worker-id", "?")
        report.rows.append(Row(call.label, worker, answer, latency))
        report.say(f"    {call.label:<26} -> {worker:<20} {answer}  ({latency:.0f} ms)")
        invoked.append((call.verb, call.capability))
    missed = [f"{verb}:{name}" for verb, name in capabilities if (verb, name) not in invoked]
    if missed:
        raise DemoFailure(f"the demo has no call for {', '.join(missed)} (see calls.py)")


def restart_controller(system: System, report: Report, capabilities: list[Capability]) -> None:
    """Step 3: SIGKILL, restart on the same state directory, warm cache, re-registration."""
    report.say("killing the controller with SIGKILL")
    system.kill_controller()
    system.start_controller()
    system.wait_until("the controller to restart", 20, system.ready, "controller")
    ready_at = time.monotonic()

    first_look = system.workers()
    routes = {}
    for verb, capability in capabilities:
        response = system.route(verb, capability)
        if response.status_code != 200:
            raise DemoFailure(
                f"after the restart, /route {verb}:{capability} answered "
                f"{response.status_code}: the warm cache should route it"
            )
        routes[f"{verb}:{capability}"] = response.json()["worker_id"]
    if len(first_look) != len(WORKER_NAMES):
        raise DemoFailure(
            f"after the restart the controller knows {len(first_look)} workers, "
            f"expected {len(WORKER_NAMES)} from its journal"
        )
    states = [w["state"] for w in first_look.values()]
    unverified = [w for w, info in first_look.items() if info["state"] == "unverified"]
    report.say(
        f"restarted: the journal restored all {len(first_look)} workers; at first look "
        f"{states.count('unverified')} unverified, {states.count('healthy')} already back"
    )
    report.say(
        f"routing kept working from the warm cache: all {len(routes)} capabilities routed, "
        f"{sum(1 for w in routes.values() if w in unverified)} of them to unverified workers"
    )
    response, latency = system.execute("greet", "hello", {"name": "again"})
    if response.status_code != 200:
        raise DemoFailure(f"/execute after the restart answered {response.status_code}")
    report.rows.append(
        Row(
            "greet:hello (after restart)",
            response.headers.get("x-crank-worker-id", "?"),
            response.json()["result"]["greeting"],
            latency,
        )
    )

    all_back = system.wait_until(
        "every worker to re-register", 10, system.all_healthy, "controller"
    )
    took = time.monotonic() - ready_at
    bound = HEARTBEAT_INTERVAL * (1 + MAX_JITTER_FRACTION)
    report.say(
        f"all {len(all_back)} workers re-registered {took:.2f} s after the restart "
        f"(heartbeat interval {HEARTBEAT_INTERVAL:g} s + {MAX_JITTER_FRACTION:.0%} jitter "
        f"= {bound:.2f} s)"
    )
    if took > bound + REQUEST_SLACK:
        raise DemoFailure(
            f"re-registration took {took:.2f} s, more than one heartbeat interval plus "
            f"jitter ({bound:.2f} s) and {REQUEST_SLACK:g} s for the requests"
        )
    report.notes.append(f"re-registration after a controller restart: {took:.2f} s")


def stop_one_worker(system: System, report: Report) -> None:
    """Step 4: SIGTERM one worker; it deregisters and no worker offers its capability."""
    report.say(f"stopping {LEAVING} (SIGTERM): it deregisters on the way out")
    stopped_at = time.monotonic()
    system.processes.send(LEAVING, signal.SIGTERM)
    system.wait_until(
        f"{LEAVING} to leave the registry",
        10,
        lambda: LEAVING not in system.workers(),
        *system.serving(),
    )
    left_after = time.monotonic() - stopped_at
    if system.processes.wait_exit(LEAVING, 10) is None:
        raise DemoFailure(f"{LEAVING} did not exit after SIGTERM")
    response, latency = system.execute("greet", "hello", {"name": "nobody"})
    # Its only worker left: the pair is unknown now (a 503 would mean an outage).
    if response.status_code != 404 or response.json().get("error") != "unknown_capability":
        raise DemoFailure(
            f"greet:hello without its worker answered {response.status_code} "
            f"{response.text[:200]}, expected 404 unknown_capability"
        )
    report.say(
        f"{LEAVING} left the registry {left_after:.2f} s after SIGTERM; "
        "greet:hello now answers 404 unknown_capability"
    )
    report.rows.append(Row("greet:hello (worker gone)", "-", "404 unknown_capability", latency))
    report.notes.append(f"{LEAVING} left the registry {left_after:.2f} s after SIGTERM")


def keep_running(system: System, report: Report) -> None:
    """``--keep-running``: bring the stopped worker back, print the URLs, wait for Ctrl-C."""
    system.start_worker(LEAVING)
    system.wait_until(
        f"{LEAVING} to register again",
        30,
        lambda: LEAVING in system.workers(),
        *system.serving(),
        LEAVING,
    )
    certs = system.certs
    lines = [f"\nEverything is running. {system.describe()}"]
    lines += [f"  {w['worker_id']:<20} {w['worker_url']}" for w in system.workers().values()]
    lines += [
        "Try:",
        f"  curl --cacert {certs}/ca.pem --cert {certs}/client-demo.pem "
        f"--key {certs}/client-demo.key \\",
        "    -H 'content-type: application/json' "
        '-d \'{"verb": "greet", "capability": "hello", "payload": {"name": "you"}}\' \\',
        f"    {system.url}/execute",
        "Press Ctrl-C to stop everything.",
    ]
    report.print("\n".join(lines))
    while True:
        system.processes.check_alive(*system.serving(), *WORKER_NAMES)
        time.sleep(0.5)
