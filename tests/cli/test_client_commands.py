"""``crank-registry workers | capabilities | route | health`` against a real controller.

The controller is a real ``crank-registry serve`` process requiring client
certificates (mTLS), with certificates from ``crank-registry certs``; the
commands present the ``ops`` client certificate. Workers ``a`` and ``b``
register with their own certificates and never heartbeat: unhealthy only
after 600 s, they stay healthy for the whole module. The
503 case uses a second controller, plain HTTP (``--insecure``), whose
worker goes unhealthy after 0.5 s.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from crank_registry import HealthState, WorkerLoad
from crank_registry_asgi import cli
from crank_registry_asgi.client_cli import format_age, table, workers_table
from crank_worker_client import WorkerInfo
from tests.builders import capability_payload, registration_payload
from tests.cli.helpers import (
    ServerProcess,
    clean_environment,
    client_context,
    command,
    free_port,
    serving,
)
from tests.cli.test_serve import pki, worker_tls

__all__ = ["pki"]  # a fixture, shared with the serve tests

pytestmark = pytest.mark.slow

CLIENT_VARIABLES = ("CONTROLLER_URL", "CRANK_CLIENT_CERT", "CRANK_CLIENT_KEY", "CA_CERT_PATH")
A_CAPABILITIES = [capability_payload(), capability_payload("text.summarize", "summarize")]


@pytest.fixture(autouse=True)
def no_client_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in CLIENT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture(scope="module")
def controller(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A controller requiring client certificates, with workers a and b registered."""
    work = tmp_path_factory.mktemp("controller")
    port = free_port()
    args = ["--port", str(port), "--state-dir", str(work / "state")]
    args += ["--certfile", str(pki / "controller.pem"), "--keyfile", str(pki / "controller.key")]
    args += ["--ca-certs", str(pki / "ca.pem")]
    # ops may drain any worker.
    args += ["--operator", "spiffe://crank.local/client/ops"]
    # Healthy for ten minutes without a heartbeat: the module takes less.
    args += ["--unhealthy-after", "600", "--evict-after", "1200"]
    with serving(
        args, work / "server.log", port=port, scheme="https", verify=worker_tls(pki, "a")
    ) as server:
        for name, capabilities in (("a", A_CAPABILITIES), ("b", None)):
            payload = registration_payload(
                name, worker_url=f"https://{name}.example:8443", capabilities=capabilities
            )
            answer = httpx.post(
                f"{server.url}/register", json=payload, verify=worker_tls(pki, name)
            )
            assert answer.status_code == 200, answer.text
        # a reports its load; b reports none.
        load = {"in_flight": 3, "latency_p95_ms": 41.5, "error_rate": 0.02}
        beat = httpx.post(
            f"{server.url}/heartbeat",
            json={"worker_id": "a", "load": load},
            verify=worker_tls(pki, "a"),
        )
        assert beat.status_code == 200, beat.text
        yield server
        assert server.stop() == 0, server.log()


def tls_flags(pki: Path) -> list[str]:
    """The flags that present the ``ops`` client certificate and trust the development CA."""
    return [
        "--cert",
        str(pki / "client-ops.pem"),
        "--key",
        str(pki / "client-ops.key"),
        "--ca-certs",
        str(pki / "ca.pem"),
    ]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``crank-registry ARGS`` in this process: exit status, stdout, stderr."""
    try:
        status = cli.main(args)
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


def ask(
    server: ServerProcess, pki: Path, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    return run([*args, "--controller", server.url, *tls_flags(pki)], capsys)


def controller_answer(server: ServerProcess, pki: Path, method: str, path: str, **body: Any) -> Any:
    """The controller's own JSON answer, asked directly."""
    context = client_context(pki / "ca.pem", pki / "client-ops.pem", pki / "client-ops.key")
    answer = httpx.request(method, f"{server.url}{path}", json=body or None, verify=context)
    return answer.json()


def columns(text: str) -> list[list[str]]:
    """The cells of a table printed by the command (cells are two or more spaces apart)."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]


def assert_aligned(text: str) -> None:
    """Every cell of every line starts where its column's header starts."""
    header, *rows = text.splitlines()
    starts = [match.start() for match in re.finditer(r"(?:^|(?<=\s\s))\S", header)]
    for row in rows:
        for start in starts[1:]:
            assert row[start - 2 : start] == "  " and row[start] != " ", (header, row)


# ------------------------------------------------------------------- the commands


def test_workers_table(
    controller: ServerProcess, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = ask(controller, pki, capsys, "workers")
    assert (status, err) == (0, "")
    header, *rows = columns(out)
    assert header == [
        "WORKER ID",
        "URL",
        "STATE",
        "LAST HEARTBEAT",
        "IN FLIGHT",
        "P95",
        "ERRORS",
        "CAPABILITIES",
    ]
    assert [row[:3] for row in rows] == [
        ["a", "https://a.example:8443", "healthy"],
        ["b", "https://b.example:8443", "healthy"],
    ]
    # Registered moments ago (the age of the registration, the last heartbeat).
    assert all(re.fullmatch(r"\d+(\.\d)?s|\d+m\d\ds", row[3]) for row in rows), rows
    # a's load as it reported it; b reported none.
    assert rows[0][4:7] == ["3", "41.5 ms", "2.0%"]
    assert rows[1][4:7] == ["-", "-", "-"]
    assert rows[0][7] == "classify:image.classify, summarize:text.summarize"
    assert rows[1][7] == "classify:image.classify"
    assert_aligned(out)


def test_workers_json_is_the_controllers_answer(
    controller: ServerProcess, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = ask(controller, pki, capsys, "workers", "--json")
    assert status == 0
    listing = controller_answer(controller, pki, "GET", "/workers")
    # Every entry of every page; the counts are `crank-registry health`'s.
    assert json.loads(out) == {"workers": listing["workers"]}


def test_worker_shows_one_worker_as_workers_does(
    controller: ServerProcess, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = ask(controller, pki, capsys, "worker", "a")
    assert (status, err) == (0, "")
    header, row = columns(out)
    assert header[:3] == ["WORKER ID", "URL", "STATE"] and len(header) == 8
    assert row[:3] == ["a", "https://a.example:8443", "healthy"]
    assert row[4:] == ["3", "41.5 ms", "2.0%", "classify:image.classify, summarize:text.summarize"]
    status, out, _ = ask(controller, pki, capsys, "worker", "b", "--json")
    assert status == 0
    assert json.loads(out) == controller_answer(controller, pki, "GET", "/workers/b")
    status, out, err = ask(controller, pki, capsys, "worker", "nobody")
    assert (status, out) == (1, "")
    assert "404 worker_not_registered" in err and len(err.splitlines()) == 1


def test_capabilities_table_and_json(
    controller: ServerProcess, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = ask(controller, pki, capsys, "capabilities")
    assert status == 0
    assert columns(out) == [
        ["VERB", "CAPABILITY", "VERSION", "HEALTHY/TOTAL"],
        ["classify", "image.classify", "1.0.0", "2/2"],
        ["summarize", "text.summarize", "1.0.0", "1/1"],
    ]
    assert_aligned(out)
    status, out, _ = ask(controller, pki, capsys, "capabilities", "--json")
    assert status == 0
    listing = controller_answer(controller, pki, "GET", "/capabilities")
    assert json.loads(out) == {"capabilities": listing["capabilities"]}


def test_route_table_and_json(
    controller: ServerProcess, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = ask(controller, pki, capsys, "route", "summarize", "text.summarize")
    assert status == 0
    assert columns(out) == [
        ["WORKER ID", "URL", "VERSION"],
        ["a", "https://a.example:8443", "1.0.0"],
    ]
    status, out, _ = ask(controller, pki, capsys, "route", "summarize", "text.summarize", "--json")
    assert status == 0
    assert json.loads(out) == controller_answer(
        controller, pki, "POST", "/route", verb="summarize", capability="text.summarize"
    )


def test_route_with_options_and_the_explain_table(
    controller: ServerProcess, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    route = ["route", "classify", "image.classify"]
    status, out, _ = ask(controller, pki, capsys, *route, "--exclude", "a", "--explain")
    assert status == 0
    table_part, explain_part = out.strip().split("\n\n")
    assert columns(table_part) == [
        ["WORKER ID", "URL", "VERSION"],
        ["b", "https://b.example:8443", "1.0.0"],
    ]
    assert columns(explain_part) == [
        ["strategy: round_robin"],
        ["WORKER ID", "OUTCOME"],
        ["b", "chosen"],
        ["a", "removed: excluded"],
    ]
    status, out, _ = ask(
        controller, pki, capsys, *route, "--version", "~=1.0", "--budget", "5", "--json"
    )
    assert status == 0 and json.loads(out)["worker_id"] in ("a", "b")
    assert "explain" not in json.loads(out)
    affinity = ["--strategy", "affinity", "--affinity-key", "user-7", "--json"]
    picks = {json.loads(ask(controller, pki, capsys, *route, *affinity)[1])["worker_id"]}
    picks |= {json.loads(ask(controller, pki, capsys, *route, *affinity)[1])["worker_id"]}
    assert len(picks) == 1
    status, out, err = ask(
        controller, pki, capsys, *route, "--exclude", "a", "--exclude", "b", "--explain"
    )
    assert status == 1
    assert columns(out) == [
        ["strategy: round_robin"],
        ["WORKER ID", "OUTCOME"],
        ["a", "removed: excluded"],
        ["b", "removed: excluded"],
    ]
    assert "no worker available for classify:image.classify" in err and err.count("\n") == 1
    status, _, err = ask(controller, pki, capsys, *route, "--version", "latest")
    assert status == 1 and "422 invalid_request" in err and "version" in err


def test_health_table_and_json(
    controller: ServerProcess, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = ask(controller, pki, capsys, "health")
    assert status == 0
    assert columns(out) == [
        ["STATUS", "WORKERS", "HEALTHY", "SELF-PRESERVATION"],
        ["ok", "2", "2", "off"],
    ]
    status, out, _ = ask(controller, pki, capsys, "health", "--json")
    assert status == 0
    # The counts and self-preservation of the controller's answer (its other fields
    # are for the dashboard).
    counts = ("status", "total_workers", "healthy_workers", "self_preservation")
    answer = controller_answer(controller, pki, "GET", "/health")
    assert json.loads(out) == {name: answer[name] for name in counts}


def test_the_environment_stands_for_the_flags(
    controller: ServerProcess,
    pki: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONTROLLER_URL", controller.url)
    monkeypatch.setenv("CRANK_CLIENT_CERT", str(pki / "client-ops.pem"))
    monkeypatch.setenv("CRANK_CLIENT_KEY", str(pki / "client-ops.key"))
    monkeypatch.setenv("CA_CERT_PATH", str(pki / "ca.pem"))
    status, out, err = run(["health", "--json"], capsys)
    assert (status, err) == (0, "")
    assert json.loads(out)["total_workers"] == 2


def test_several_controllers_are_asked_in_turn(
    controller: ServerProcess, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nobody = f"https://{httpx.URL(controller.url).host}:{free_port()}"
    urls = f"{nobody},{controller.url}"
    status, out, err = run(["health", "--json", "--controller", urls, *tls_flags(pki)], capsys)
    assert (status, err) == (0, "")
    assert json.loads(out)["total_workers"] == 2


def test_a_real_process_prints_the_json_and_exits_0(controller: ServerProcess, pki: Path) -> None:
    result = subprocess.run(
        command("workers", "--json", "--controller", controller.url, *tls_flags(pki)),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_environment(),
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert [w["worker_id"] for w in json.loads(result.stdout)["workers"]] == ["a", "b"]


def test_drain_and_undrain_a_worker(
    controller: ServerProcess, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = ask(controller, pki, capsys, "drain", "b")
    assert (status, err) == (0, "")
    assert columns(out) == [["WORKER ID", "DRAIN"], ["b", "draining"]]
    status, out, _ = ask(controller, pki, capsys, "drain", "b", "--json")
    assert json.loads(out) == {"worker_id": "b", "draining": True, "changed": False}
    try:
        _, out, _ = ask(controller, pki, capsys, "workers")
        assert [row[:3] for row in columns(out)[1:]][1] == [
            "b",
            "https://b.example:8443",
            "draining",
        ]
        routed = {
            controller_answer(
                controller, pki, "POST", "/route", verb="classify", capability="image.classify"
            )["worker_id"]
            for _ in range(4)
        }
        assert routed == {"a"}
        # Worker a's own certificate may not drain b.
        as_a = ["--cert", str(pki / "worker-a.pem"), "--key", str(pki / "worker-a.key")]
        as_a += ["--ca-certs", str(pki / "ca.pem")]
        status, out, err = run(["undrain", "b", "--controller", controller.url, *as_a], capsys)
        assert status == 1 and "403 forbidden" in err and "--operator" in err
        status, _, err = ask(controller, pki, capsys, "drain", "nobody")
        assert status == 1 and "worker_not_registered" in err
    finally:
        status, out, _ = ask(controller, pki, capsys, "undrain", "b")
    assert status == 0
    assert columns(out) == [["WORKER ID", "DRAIN"], ["b", "not draining"]]


# ------------------------------------------------------------ 404 and 503 apart


@pytest.mark.parametrize(
    ("verb", "name"), [("classify", "image.clasify"), ("clasify", "image.classify")]
)
def test_route_to_an_unknown_capability_says_so_and_exits_1(
    controller: ServerProcess, pki: Path, capsys: pytest.CaptureFixture[str], verb: str, name: str
) -> None:
    status, out, err = ask(controller, pki, capsys, "route", verb, name)
    assert (status, out) == (1, "")
    assert err.count("\n") == 1
    assert err.startswith("crank-registry route: error: ")
    assert f"no registered worker offers {verb}:{name} (unknown capability" in err
    assert controller.url in err


@pytest.fixture(scope="module")
def quick_controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A plain-HTTP controller whose workers are unhealthy 0.5 s after their last heartbeat."""
    work = tmp_path_factory.mktemp("quick")
    port = free_port()
    args = ["--insecure", "--port", str(port), "--state-dir", str(work / "state")]
    args += ["--heartbeat-interval", "0.25", "--unhealthy-after", "0.5", "--evict-after", "3600"]
    with serving(args, work / "server.log", port=port, scheme="http") as server:
        yield server
        assert server.stop() == 0, server.log()


def test_a_known_capability_without_a_healthy_worker_is_no_worker_available(
    quick_controller: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    url = quick_controller.url
    registered = httpx.post(f"{url}/register", json=registration_payload("w1"))
    assert registered.status_code == 200, registered.text
    # w1 never heartbeats: it stops being routable 0.5 s after registering.
    deadline = time.monotonic() + 30
    while True:
        status, out, err = run(
            ["route", "classify", "image.classify", "--controller", url, "--insecure"], capsys
        )
        if status == 1 or time.monotonic() > deadline:
            break
        assert status == 0, err
        time.sleep(0.1)
    assert (status, out) == (1, "")
    assert "no worker available for classify:image.classify; retry after 1 s" in err
    assert url in err and err.count("\n") == 1
    status, out, _ = run(["workers", "--controller", url, "--insecure"], capsys)
    assert status == 0
    assert columns(out)[1][:3] == ["w1", "https://10.0.0.1:8443", "unhealthy"]
    status, out, _ = run(["capabilities", "--controller", url, "--insecure"], capsys)
    assert columns(out)[1] == ["classify", "image.classify", "1.0.0", "0/1"]
    # Another capability, offered by no one: unknown, not unavailable.
    status, _, err = run(
        ["route", "classify", "nothing", "--controller", url, "--insecure"], capsys
    )
    assert status == 1 and "unknown capability" in err


# ------------------------------------------------------------------------ errors


def test_a_controller_that_is_down_is_one_line_naming_the_url(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"https://127.0.0.1:{free_port()}"
    status, out, err = run(["workers", "--controller", url], capsys)
    assert (status, out) == (1, "")
    assert err.startswith(f"crank-registry workers: error: cannot reach the controller at {url}")
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--cert", "--key", "--ca-certs"])
def test_a_missing_certificate_file_is_named(
    controller: ServerProcess, pki: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    flags = tls_flags(pki)
    flags[flags.index(flag) + 1] = str(pki / "missing.pem")
    status, out, err = run(["health", "--controller", controller.url, *flags], capsys)
    assert (status, out) == (1, "")
    assert f"file {pki / 'missing.pem'} ({flag}) does not exist" in err
    assert err.count("\n") == 1


def test_a_missing_certificate_from_the_environment_names_the_variable(
    pki: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CA_CERT_PATH", str(pki / "missing.pem"))
    status, _, err = run(["health"], capsys)
    assert status == 1
    assert f"{pki / 'missing.pem'} (env CA_CERT_PATH) does not exist" in err


def test_a_file_that_is_not_a_certificate_is_named(
    controller: ServerProcess, pki: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    status, _, err = run(
        ["health", "--controller", controller.url, "--ca-certs", str(junk)], capsys
    )
    assert status == 1
    assert f"cannot use {junk} (--ca-certs)" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        ([], "CERTIFICATE_VERIFY_FAILED"),  # the system store does not trust the development CA
        # No client certificate: the server ends the connection, and the client is told why.
        (["--ca-certs", "ca.pem"], "pass --cert and --key"),
    ],
)
def test_a_tls_failure_is_one_line_naming_the_url(
    controller: ServerProcess,
    pki: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    reason: str,
) -> None:
    flags = [str(pki / flag) if flag.endswith(".pem") else flag for flag in flags]
    status, out, err = run(["workers", "--controller", controller.url, *flags], capsys)
    assert (status, out) == (1, "")
    assert err.startswith("crank-registry workers: error: ") and controller.url in err
    assert reason in err and err.count("\n") == 1 and "Traceback" not in err


# ------------------------------------------------------------------------- usage


def test_version_prints_the_installed_versions() -> None:
    for flag in ("--version", "-V"):
        result = subprocess.run(
            command(flag), capture_output=True, text=True, timeout=60, check=True
        )
        assert re.fullmatch(
            r"crank-registry-asgi \S+ \(crank-registry \S+, crank-worker-client \S+\)\n",
            result.stdout,
        ), result.stdout


@pytest.mark.parametrize(
    ("args", "usage", "message"),
    [
        (["workers", "--jsn"], "usage: crank-registry workers", "unrecognized arguments: --jsn"),
        (["route", "classify"], "usage: crank-registry route", "required: CAPABILITY"),
        (["route", "a", "b", "c"], "usage: crank-registry route", "unrecognized arguments: c"),
        (["health", "--timeout", "0"], "usage: crank-registry health", "seconds > 0"),
        (["route", "a", "b", "--budget", "-1"], "usage: crank-registry route", "tokens >= 0"),
        (["route", "a", "b", "--strategy", "fast"], "usage: crank-registry route", "choose from"),
    ],
)
def test_a_typo_in_a_subcommand_prints_that_subcommands_usage(
    args: list[str], usage: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(args, capsys)
    assert (status, out) == (2, "")
    assert err.startswith(usage) and message in err


@pytest.mark.parametrize(
    "flags", [["--strategy", "affinity"], ["--affinity-key", "k"]], ids=["no key", "no strategy"]
)
def test_affinity_flags_go_together(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    status, out, err = run(["route", "a", "b", *flags, "--controller", url, "--insecure"], capsys)
    assert (status, out) == (2, "")
    assert "--strategy affinity and --affinity-key go together" in err


def test_an_unknown_subcommand_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(["wokers"], capsys)
    assert status == 2
    assert "invalid choice: 'wokers'" in err
    for name in ("serve", "certs", "workers", "capabilities", "route", "health"):
        assert f"'{name}'" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--controller", "http://127.0.0.1:9"], "is plain HTTP: pass --insecure"),
        (["--controller", "https://127.0.0.1:9", "--insecure"], "--insecure is for a plain-HTTP"),
        (["--controller", "http://127.0.0.1:9", "--insecure", "--cert", "c.pem"], "--cert given"),
        (["--controller", "https://127.0.0.1:9", "--key", __file__], "--key (or"),
        (["--controller", "https://:9"], "--controller (or CONTROLLER_URL)"),
    ],
)
def test_flags_that_do_not_go_together_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(["health", *args], capsys)
    assert status == 2
    assert message in err and err.count("\n") == 1


# ------------------------------------------------------------------ the helpers


def test_table_pads_every_column_but_the_last() -> None:
    assert table(("A", "LONG HEADER", "C"), [("xxx", "y", "z z")]) == (
        "A    LONG HEADER  C\nxxx  y            z z"
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-3, "0.0s"),
        (0.44, "0.4s"),
        (12.9, "12s"),
        (185, "3m05s"),
        (2 * 3600 + 7 * 60, "2h07m"),
        (3 * 86400 + 4 * 3600, "3d04h"),
    ],
)
def test_format_age(seconds: float, text: str) -> None:
    assert format_age(seconds) == text


def test_the_workers_table_shows_each_reported_load_value() -> None:
    moment = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.UTC)
    at = "2026-12-06T12:00:00.000Z"

    def info(worker_id: str, load: WorkerLoad | None) -> WorkerInfo:
        return WorkerInfo(
            worker_id=worker_id,
            worker_url=f"https://{worker_id}:8443",
            last_heartbeat=moment,
            is_healthy=True,
            state=HealthState.HEALTHY,
            capabilities=(("run", "x"),),
            load=load,
        )

    workers = [
        info(
            "full",
            WorkerLoad(in_flight=4, latency_p95_ms=120, error_rate=0.125, reported_at=at),
        ),
        info("partial", WorkerLoad(in_flight=0, reported_at=at)),
        info("silent", None),
    ]
    _, *rows = columns(workers_table(workers, now=moment.timestamp() + 12))
    assert [row[3:7] for row in rows] == [
        ["12s", "4", "120 ms", "12.5%"],
        ["12s", "0", "-", "-"],
        ["12s", "-", "-", "-"],
    ]
