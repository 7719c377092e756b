"""``crank-registry serve`` as a real process: HTTPS, mutual TLS, identities, shutdown."""

from __future__ import annotations

import datetime
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from crank_registry_asgi import certs, cli
from tests.builders import WORKER_URL, registration_payload
from tests.cli.helpers import (
    COMMAND_VARIABLES,
    ServerProcess,
    clean_environment,
    client_context,
    command,
    free_port,
    serving,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates written by the real ``crank-registry certs`` command."""
    out = tmp_path_factory.mktemp("certs")
    script = Path(sys.executable).parent / "crank-registry"
    assert script.exists(), "the crank-registry console script is not installed"
    subprocess.run(
        [
            str(script),
            "certs",
            "--out",
            str(out),
            "--worker",
            "a",
            "--worker",
            "b",
            "--client",
            "ops",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out


def worker_tls(pki: Path, name: str) -> ssl.SSLContext:
    return client_context(pki / "ca.pem", pki / f"worker-{name}.pem", pki / f"worker-{name}.key")


@pytest.fixture(scope="module")
def mtls_server(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A controller requiring client certificates, configured through the environment."""
    work = tmp_path_factory.mktemp("mtls")
    port = free_port()
    environment = clean_environment(
        CONTROLLER_HTTPS_PORT=str(port),
        CONTROLLER_CERT_PATH=str(pki / "controller.pem"),
        CONTROLLER_KEY_PATH=str(pki / "controller.key"),
        CA_CERT_PATH=str(pki / "ca.pem"),
    )
    with serving(
        ["--state-dir", str(work / "state")],
        work / "server.log",
        port=port,
        scheme="https",
        verify=worker_tls(pki, "a"),
        environment=environment,
    ) as server:
        yield server
        assert server.stop() == 0, server.log()


def workers(server: ServerProcess, tls: ssl.SSLContext) -> list[str]:
    answer = httpx.get(f"{server.url}/workers", verify=tls)
    assert answer.status_code == 200
    return sorted(worker["worker_id"] for worker in answer.json()["workers"])


def test_a_valid_worker_certificate_registers_heartbeats_and_routes(
    pki: Path, mtls_server: ServerProcess
) -> None:
    with httpx.Client(base_url=mtls_server.url, verify=worker_tls(pki, "a")) as client:
        registered = client.post("/register", json=registration_payload("a"))
        assert registered.status_code == 200, registered.text
        assert registered.json()["status"] == "registered"
        beat = client.post("/heartbeat", json={"worker_id": "a"})
        assert beat.status_code == 200, beat.text
        assert beat.json()["status"] == "acknowledged"
        routed = client.post("/route", json={"verb": "classify", "capability": "image.classify"})
        assert routed.status_code == 200, routed.text
        assert routed.json()["worker_id"] == "a"
    assert "Traceback" not in mtls_server.log()
    # Mutual TLS: nothing to warn about at start.
    assert "plain HTTP" not in mtls_server.log()
    assert "identity checks off" not in mtls_server.log()


def test_a_client_certificate_may_route_and_list_but_not_act_on_a_worker(
    pki: Path, mtls_server: ServerProcess
) -> None:
    as_a = worker_tls(pki, "a")
    assert httpx.post(
        f"{mtls_server.url}/register", json=registration_payload("a"), verify=as_a
    ).is_success
    as_ops = client_context(pki / "ca.pem", pki / "client-ops.pem", pki / "client-ops.key")
    with httpx.Client(base_url=mtls_server.url, verify=as_ops) as client:
        routed = client.post("/route", json={"verb": "classify", "capability": "image.classify"})
        assert routed.status_code == 200, routed.text
        assert client.get("/capabilities").status_code == 200
        assert "a" in [worker["worker_id"] for worker in client.get("/workers").json()["workers"]]
        forbidden = client.post("/heartbeat", json={"worker_id": "a"})
        assert forbidden.status_code == 403
        assert forbidden.json()["error"] == "forbidden"


def refused_clients(pki: Path) -> dict[str, ssl.SSLContext]:
    now = datetime.datetime.now(datetime.UTC)
    authority = certs.read_authority(pki / "ca.pem", pki / "ca.key")
    stranger = certs.make_authority("another CA")
    made = {
        "expired": certs.make_worker_certificate(
            authority,
            "x",
            not_before=now - datetime.timedelta(days=2),
            not_after=now - datetime.timedelta(days=1),
        ),
        "other-ca": certs.make_worker_certificate(stranger, "x"),
    }
    contexts = {"no-certificate": client_context(pki / "ca.pem")}
    for label, certified in made.items():
        certified.write(pki / f"refused-{label}.pem", pki / f"refused-{label}.key")
        contexts[label] = client_context(
            pki / "ca.pem", pki / f"refused-{label}.pem", pki / f"refused-{label}.key"
        )
    return contexts


@pytest.mark.parametrize("case", ["no-certificate", "other-ca", "expired"])
def test_the_tls_handshake_refuses_a_bad_client_certificate(
    case: str, pki: Path, mtls_server: ServerProcess
) -> None:
    tls = refused_clients(pki)[case]
    # TLS 1.3 (the default): the client finishes its half of the handshake
    # before the server checks the certificate, so it sees the connection
    # closed (reset or at its end), with no HTTP answer.
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.post(f"{mtls_server.url}/register", json=registration_payload("x"), verify=tls)
    # TLS 1.2: the server's check comes first, so the handshake itself fails.
    tls.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{mtls_server.url}/register", json=registration_payload("x"), verify=tls)
    # The same client with a good certificate gets through, over either version.
    good = worker_tls(pki, "a")
    good.maximum_version = ssl.TLSVersion.TLSv1_2
    assert httpx.get(f"{mtls_server.url}/health", verify=good).status_code == 200
    assert "x" not in workers(mtls_server, good)


def test_a_worker_cannot_act_on_another_workers_record(
    pki: Path, mtls_server: ServerProcess
) -> None:
    as_a, as_b = worker_tls(pki, "a"), worker_tls(pki, "b")
    assert httpx.post(
        f"{mtls_server.url}/register", json=registration_payload("b"), verify=as_b
    ).is_success
    for path, body in [
        ("/heartbeat", {"worker_id": "b"}),
        ("/deregister", {"worker_id": "b"}),
        ("/register", registration_payload("b", worker_url="https://127.0.0.1:9999")),
    ]:
        answer = httpx.post(f"{mtls_server.url}{path}", json=body, verify=as_a)
        assert answer.status_code == 403, (path, answer.text)
        assert answer.json()["error"] == "forbidden"
    # b's record is intact, and b itself may still act on it.
    listed = httpx.get(f"{mtls_server.url}/workers", verify=as_b).json()["workers"]
    (record,) = [worker for worker in listed if worker["worker_id"] == "b"]
    assert record["worker_url"] == WORKER_URL
    assert httpx.post(
        f"{mtls_server.url}/heartbeat", json={"worker_id": "b"}, verify=as_b
    ).is_success
    assert httpx.post(
        f"{mtls_server.url}/deregister", json={"worker_id": "b"}, verify=as_b
    ).is_success


def test_insecure_serves_plain_http_on_loopback_and_stops_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    port = free_port()
    state_dir = tmp_path / "state"
    with serving(
        ["--insecure", "--port", str(port), "--state-dir", str(state_dir)],
        tmp_path / "server.log",
        port=port,
        scheme="http",
    ) as server:
        with httpx.Client(base_url=server.url) as client:
            assert client.post("/register", json=registration_payload("w1")).status_code == 200
            # No identities without TLS: no per-worker checks either.
            assert client.post("/heartbeat", json={"worker_id": "w1"}).status_code == 200
            routed = client.post(
                "/route", json={"verb": "classify", "capability": "image.classify"}
            )
            assert routed.json()["worker_id"] == "w1"
        assert server.stop() == 0, server.log()
    log = server.log()
    assert "WARNING crank_registry_asgi.cli serving plain HTTP (--insecure)" in log
    assert "WARNING crank_registry_asgi mTLS: worker identity checks off: any caller" in log
    assert "stopped: connections closed, app shut down" in log
    assert "Traceback" not in log
    assert (state_dir / "registry.jsonl").exists()


def proxy_server_args(pki: Path, tmp_path: Path, port: int, *extra: str) -> list[str]:
    """A plain-HTTP controller behind a TLS-terminating proxy that passes X-Client-Cert."""
    return [
        "--insecure",
        "--port",
        str(port),
        "--state-dir",
        str(tmp_path / "state"),
        "--trust-proxy-cert-header",
        "X-Client-Cert",
        "--ca-certs",
        str(pki / "ca.pem"),
        *extra,
    ]


def as_header(pem: bytes | str) -> dict[str, str]:
    return {"X-Client-Cert": quote(pem if isinstance(pem, str) else pem.decode())}


def test_the_identity_comes_from_a_verified_proxy_header(pki: Path, tmp_path: Path) -> None:
    port = free_port()
    now = datetime.datetime.now(datetime.UTC)
    authority = certs.read_authority(pki / "ca.pem", pki / "ca.key")
    refused = {
        "another CA's": certs.make_worker_certificate(certs.make_authority("another CA"), "a"),
        "expired": certs.make_worker_certificate(
            authority,
            "a",
            not_before=now - datetime.timedelta(days=2),
            not_after=now - datetime.timedelta(days=1),
        ),
        "self-signed": certs.make_authority("a"),
    }
    with serving(
        proxy_server_args(pki, tmp_path, port),
        tmp_path / "server.log",
        port=port,
        scheme="http",
    ) as server:
        as_a = as_header((pki / "worker-a.pem").read_text())
        as_b = as_header((pki / "worker-b.pem").read_text())
        with httpx.Client(base_url=server.url) as client:
            assert client.post("/register", json=registration_payload("a"), headers=as_a).is_success
            forbidden = client.post("/heartbeat", json={"worker_id": "a"}, headers=as_b)
            assert forbidden.status_code == 403
            assert forbidden.json()["error"] == "forbidden"
            # Named as the source of identities, the header is then required.
            anonymous = client.post("/deregister", json={"worker_id": "a"})
            assert anonymous.status_code == 403
            # A certificate the handshake would refuse is refused in the header too.
            for label, certified in refused.items():
                answer = client.post(
                    "/deregister",
                    json={"worker_id": "a"},
                    headers=as_header(certified.certificate_pem()),
                )
                assert answer.status_code == 403, label
                assert answer.json()["error"] == "forbidden"
                assert "does not verify against the CA certificates" in answer.json()["message"]
            assert client.post("/heartbeat", json={"worker_id": "a"}, headers=as_a).is_success
            assert client.post("/deregister", json={"worker_id": "a"}, headers=as_a).is_success
        log = server.log()
        assert server.stop() == 0, log
    assert (
        "identities are taken from the client certificate header X-Client-Cert sent by ANY" in log
    )
    assert "Traceback" not in log


def test_over_mutual_tls_a_proxy_passes_the_callers_certificate(pki: Path, tmp_path: Path) -> None:
    """HTTPS with --ca-certs and the header flag: a re-encrypting proxy's header wins."""
    port = free_port()
    tls = ["--certfile", str(pki / "controller.pem"), "--keyfile", str(pki / "controller.key")]
    proxy = client_context(pki / "ca.pem", pki / "client-ops.pem", pki / "client-ops.key")
    with serving(
        [
            *tls,
            "--ca-certs",
            str(pki / "ca.pem"),
            "--trust-proxy-cert-header",
            "X-Client-Cert",
            "--port",
            str(port),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        tmp_path / "server.log",
        port=port,
        scheme="https",
        verify=proxy,
    ) as server:
        as_a = as_header((pki / "worker-a.pem").read_text())
        with httpx.Client(base_url=server.url, verify=proxy) as client:
            # The proxy's own certificate (a client's) may not register a worker...
            assert client.post("/register", json=registration_payload("a")).status_code == 403
            # ... the caller's certificate it passes on may.
            registered = client.post("/register", json=registration_payload("a"), headers=as_a)
            assert registered.status_code == 200, registered.text
            as_b = as_header((pki / "worker-b.pem").read_text())
            refused = client.post("/heartbeat", json={"worker_id": "a"}, headers=as_b)
            assert refused.status_code == 403
        assert server.stop() == 0, server.log()


def test_only_a_trusted_proxy_may_send_the_header(pki: Path, tmp_path: Path) -> None:
    port = free_port()
    with serving(
        proxy_server_args(pki, tmp_path, port, "--trusted-proxy", "192.0.2.0/24"),
        tmp_path / "server.log",
        port=port,
        scheme="http",
    ) as server:
        as_a = as_header((pki / "worker-a.pem").read_text())
        answer = httpx.post(f"{server.url}/register", json=registration_payload("a"), headers=as_a)
        assert answer.status_code == 403
        assert answer.json()["message"] == (
            "the peer 127.0.0.1 may not send the client certificate header X-Client-Cert: "
            "only trusted proxies (192.0.2.0/24) may (--trusted-proxy)"
        )
        log = server.log()
        assert server.stop() == 0, log
    assert "trusted_proxies=192.0.2.0/24" in log


def test_identities_outside_the_trust_domain_or_longer_are_refused(
    pki: Path, mtls_server: ServerProcess
) -> None:
    authority = certs.read_authority(pki / "ca.pem", pki / "ca.key")
    assert httpx.post(
        f"{mtls_server.url}/register", json=registration_payload("a"), verify=worker_tls(pki, "a")
    ).is_success
    impostors = {
        # Signed by the trusted CA, but in another trust domain...
        "spiffe://evil.local/worker/a": certs.make_identity_certificate(
            authority, "worker", "a", trust_domain="evil.local"
        ),
        # ... or with a longer path that merely ends in /worker/a.
        "spiffe://crank.local/client/gw/worker/a": certs.make_identity_certificate(
            authority, "worker", "a", trust_domain="crank.local/client/gw"
        ),
    }
    for identity, certified in impostors.items():
        stem = pki / f"impostor-{len(identity)}"
        certified.write(stem.with_suffix(".pem"), stem.with_suffix(".key"))
        tls = client_context(pki / "ca.pem", stem.with_suffix(".pem"), stem.with_suffix(".key"))
        for path, body in [
            ("/register", registration_payload("a", worker_url="https://127.0.0.1:9999")),
            ("/heartbeat", {"worker_id": "a"}),
            ("/deregister", {"worker_id": "a"}),
        ]:
            answer = httpx.post(f"{mtls_server.url}{path}", json=body, verify=tls)
            assert answer.status_code == 403, (identity, path, answer.text)
            assert answer.json()["error"] == "forbidden"
            assert answer.json()["message"].startswith(f"identity {identity!r} is refused: ")
    listed = workers(mtls_server, worker_tls(pki, "a"))
    assert "a" in listed


def test_serve_without_a_certificate_refuses_to_start_and_says_how(tmp_path: Path) -> None:
    result = subprocess.run(
        command("serve", "--port", str(free_port()), "--state-dir", str(tmp_path / "state")),
        check=False,
        capture_output=True,
        text=True,
        env=clean_environment(),
        timeout=60,
    )
    assert result.returncode == 2
    assert "crank-registry certs --out certs --worker NAME" in result.stderr
    assert "--certfile" in result.stderr
    assert "--insecure" in result.stderr
    assert not (tmp_path / "state").exists()


def test_a_port_in_use_is_reported_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in COMMAND_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        state_dir = tmp_path / "state"
        status = cli.main(
            ["serve", "--insecure", "--port", str(port), "--state-dir", str(state_dir)]
        )
    assert status == 2
    err = capsys.readouterr().err
    assert err == f"crank-registry serve: error: cannot listen on 127.0.0.1 port {port}: " + (
        "Address already in use\n"
    )
    assert "Traceback" not in err
    # Reported before the app started: the journal was never opened.
    assert not state_dir.exists()


def test_a_failed_start_is_reported_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in COMMAND_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    state_dir = not_a_directory / "state"
    status = cli.main(
        ["serve", "--insecure", "--port", str(free_port()), "--state-dir", str(state_dir)]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("crank-registry serve: error: the controller failed to start: ")
    assert str(state_dir) in err
    assert len(err.splitlines()) == 1, err
    assert "JournalError" not in err


def test_an_unexpected_failure_at_start_is_one_line_with_exit_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from crank_registry_asgi.app import ControllerService

    for variable in COMMAND_VARIABLES:
        monkeypatch.delenv(variable, raising=False)

    def fails(self: ControllerService) -> None:
        raise RuntimeError("the sweeper's clock is missing")

    monkeypatch.setattr(ControllerService, "_check_identity_source", fails)
    status = cli.main(
        ["serve", "--insecure", "--port", str(free_port()), "--state-dir", str(tmp_path)]
    )
    assert status == 1
    assert capsys.readouterr().err == (
        "crank-registry serve: error: the controller failed to start: RuntimeError: "
        "the sweeper's clock is missing (--log-level debug shows more)\n"
    )


def test_a_second_controller_on_the_same_state_dir_says_so_in_one_line(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    port = free_port()
    with serving(
        ["--insecure", "--port", str(port), "--state-dir", str(state_dir)],
        tmp_path / "first.log",
        port=port,
        scheme="http",
    ) as first:
        second = subprocess.run(
            command(
                "serve", "--insecure", "--port", str(free_port()), "--state-dir", str(state_dir)
            ),
            check=False,
            capture_output=True,
            text=True,
            env=clean_environment(),
            timeout=60,
        )
        assert first.stop() == 0, first.log()
    assert second.returncode == 2, second.stderr
    # The log lines before it (level, logger, message) come from the logging setup.
    errors = [line for line in second.stderr.splitlines() if " ERROR " in line or "error:" in line]
    assert errors == [
        "crank-registry serve: error: the controller failed to start: another controller "
        f"(pid {first.process.pid}) holds the state directory {state_dir} "
        f"(lock {state_dir / 'registry.lock'}); stop it or use another --state-dir"
    ], second.stderr
    assert "crank_registry_asgi.journal" not in second.stderr
    assert "Traceback" not in second.stderr
