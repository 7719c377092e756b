"""The command's flags, help and errors, and ``crank-registry certs``."""

from __future__ import annotations

import asyncio
import datetime
import logging
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from crank_registry_asgi import certs, cli
from tests.cli.helpers import COMMAND_VARIABLES, command


@pytest.fixture(autouse=True)
def no_command_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in COMMAND_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        status = cli.main(args)
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["serve", "certs"]),
        (
            ["serve"],
            [
                "--host",
                "--port",
                "CONTROLLER_HTTPS_PORT",
                "--state-dir",
                "--heartbeat-interval",
                "--unhealthy-after",
                "--evict-after",
                "--certfile",
                "CONTROLLER_CERT_PATH",
                "--keyfile",
                "CONTROLLER_KEY_PATH",
                "--ca-certs",
                "CA_CERT_PATH",
                "--insecure",
                "--trust-proxy-cert-header",
                "--trusted-proxy",
                "--trust-domain",
                "--log-level",
                "crank-registry certs --out certs --worker NAME",
            ],
        ),
        (["certs"], ["--out", "--worker", "--client", "spiffe://crank.local/worker/NAME"]),
    ],
)
def test_help_of_each_subcommand(
    args: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run_main([*args, "--help"], capsys)
    assert status == 0
    for text in expected:
        assert text in out


def test_python_dash_m_runs_the_command() -> None:
    result = subprocess.run(
        command("serve", "--help"), capture_output=True, text=True, check=True, timeout=60
    )
    assert "usage: crank-registry serve" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--certfile", "c.pem"], "--keyfile is required too"),
        (["--keyfile", "c.key"], "--certfile is required too"),
        (["--insecure", "--certfile", "c.pem", "--keyfile", "c.key"], "cannot be combined with"),
        (
            ["--insecure", "--ca-certs", "ca.pem"],
            "--ca-certs with --insecure verifies only the certificate of "
            "--trust-proxy-cert-header NAME",
        ),
        (["--ca-certs", "ca.pem"], "--ca-certs (mutual TLS) needs the server's --certfile"),
        (["--insecure", "--unhealthy-after", "10"], "--heartbeat-interval <= --unhealthy-after"),
        (["--insecure", "--evict-after", "59"], "--unhealthy-after <= --evict-after"),
        (["--insecure", "--heartbeat-interval", "0"], "must be a finite number of seconds > 0"),
        (["--insecure", "--heartbeat-interval", "nan"], "must be a finite number of seconds > 0"),
        (["--insecure", "--evict-after", "soon"], "not a number of seconds"),
        (["--insecure", "--port", "70000"], "port must be 0 to 65535"),
        (["--insecure", "--port", "http"], "not a port number"),
        (["--insecure", "--log-level", "loud"], "invalid choice"),
        (["--insecure", "--tls-handshake-timeout", "5"], "--tls-handshake-timeout needs TLS"),
        (["--insecure", "--max-connections", "0"], "must be at least 1"),
        (["--insecure", "--request-read-timeout", "0"], "must be a finite number of seconds"),
        (["--insecure", "--trust-proxy-cert-header", "X Client"], "not an HTTP header name"),
        (
            ["--insecure", "--trust-proxy-cert-header", "X-Client-Cert"],
            "--trust-proxy-cert-header needs --ca-certs (or CA_CERT_PATH): the CA certificates "
            "that the header's certificate is verified against",
        ),
        (
            ["--insecure", "--trusted-proxy", "10.0.0.0/8"],
            "--trusted-proxy limits which peers may send --trust-proxy-cert-header",
        ),
        (["--insecure", "--trusted-proxy", "10.0.0.1/8"], "has host bits set"),
        (["--insecure", "--trusted-proxy", "proxy.local"], "not an IP network such as"),
        (["--insecure", "--trust-domain", "Crank.Local"], "not a SPIFFE trust domain"),
        (
            [
                "--insecure",
                "--ca-certs",
                "no-such-ca.pem",
                "--trust-proxy-cert-header",
                "X-Client-Cert",
            ],
            "--ca-certs no-such-ca.pem: cannot read it: No such file or directory",
        ),
        ([], "no certificate given"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_main(["serve", *args], capsys)
    assert status == 2
    assert message in err


def test_environment_variables_stand_for_flags(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONTROLLER_CERT_PATH", "c.pem")
    status, _, err = run_main(["serve"], capsys)
    assert (status, "--keyfile is required too" in err) == (2, True)
    monkeypatch.setenv("CONTROLLER_KEY_PATH", "c.key")
    status, _, err = run_main(["serve", "--insecure"], capsys)
    assert status == 2
    assert "cannot be combined with --certfile, --keyfile" in err
    # Behind a TLS-terminating proxy, CA_CERT_PATH verifies the header's certificate.
    monkeypatch.delenv("CONTROLLER_CERT_PATH")
    monkeypatch.delenv("CONTROLLER_KEY_PATH")
    monkeypatch.setenv("CA_CERT_PATH", "ca.pem")
    status, _, err = run_main(["serve", "--insecure"], capsys)
    assert status == 2
    assert "--ca-certs with --insecure verifies only the certificate of" in err
    monkeypatch.delenv("CA_CERT_PATH")
    monkeypatch.setenv("CONTROLLER_CERT_PATH", "c.pem")
    monkeypatch.setenv("CONTROLLER_KEY_PATH", "c.key")
    monkeypatch.delenv("CONTROLLER_CERT_PATH")
    monkeypatch.delenv("CONTROLLER_KEY_PATH")
    monkeypatch.setenv("CONTROLLER_HTTPS_PORT", "ninety")
    status, _, err = run_main(["serve", "--insecure"], capsys)
    assert status == 2
    assert "CONTROLLER_HTTPS_PORT: not a port number" in err


@pytest.mark.parametrize(
    ("files", "named", "flag", "says"),
    [
        (("nope.pem", "controller.key", "ca.pem"), "nope.pem", "--certfile", "not found"),
        (("junk.pem", "controller.key", "ca.pem"), "junk.pem", "--certfile", "is not a PEM"),
        (("controller.pem", "junk.pem", "ca.pem"), "junk.pem", "--keyfile", "not a PEM private"),
        (
            ("controller.pem", "worker-a.key", "ca.pem"),
            "worker-a.key",
            "--keyfile",
            "is not the key of certificate",
        ),
        (("controller.pem", "controller.key", "gone.pem"), "gone.pem", "--ca-certs", "not found"),
        (("controller.pem", "controller.key", "junk.pem"), "junk.pem", "--ca-certs", "is not PEM"),
    ],
)
def test_unusable_certificate_files_are_named_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    files: tuple[str, str, str],
    named: str,
    flag: str,
    says: str,
) -> None:
    certs.write_development_certificates(tmp_path, workers=["a"])
    (tmp_path / "junk.pem").write_text("this is not PEM\n")
    certfile, keyfile, ca_certs = (str(tmp_path / name) for name in files)
    args = ["serve", "--certfile", certfile, "--keyfile", keyfile, "--ca-certs", ca_certs]
    status, _, err = run_main([*args, "--state-dir", str(tmp_path / "s")], capsys)
    assert status == 2
    assert err.count("\n") == 1, err
    assert says in err
    assert str(tmp_path / named) in err
    assert err.rstrip().endswith(f"(given by {flag})")
    assert not (tmp_path / "s").exists()  # refused before the journal was opened


def test_a_certificate_file_from_the_environment_is_named_with_its_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    certs.write_development_certificates(tmp_path, workers=["a"])
    monkeypatch.setenv("CA_CERT_PATH", str(tmp_path / "missing-ca.pem"))
    args = ["serve", "--certfile", str(tmp_path / "controller.pem")]
    args += ["--keyfile", str(tmp_path / "controller.key"), "--state-dir", str(tmp_path / "s")]
    status, _, err = run_main(args, capsys)
    assert status == 2
    assert f"CA certificates file not found: {tmp_path / 'missing-ca.pem'}" in err
    assert "(given by CA_CERT_PATH)" in err


def test_certs_writes_a_ca_a_controller_and_worker_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    status, printed, _ = run_main(
        ["certs", "--out", str(out), "--worker", "a", "--worker", "b", "--client", "ops"], capsys
    )
    assert status == 0
    names = sorted(path.name for path in out.iterdir())
    assert names == sorted(
        f"{stem}.{suffix}"
        for stem in ("ca", "controller", "worker-a", "worker-b", "client-ops")
        for suffix in ("pem", "key")
    )
    assert printed.split() == [str(out / name) for name in _written_order()]
    for key in out.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")

    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    controller = x509.load_pem_x509_certificate((out / "controller.pem").read_bytes())
    worker = x509.load_pem_x509_certificate((out / "worker-a.pem").read_bytes())
    client = x509.load_pem_x509_certificate((out / "client-ops.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for leaf in (controller, worker, client):
        leaf.verify_directly_issued_by(ca)
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    def sans(certificate: x509.Certificate) -> list[str]:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [str(getattr(name, "value", name)) for name in names]

    def usages(certificate: x509.Certificate) -> set[x509.ObjectIdentifier]:
        return set(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)

    assert sans(controller) == ["localhost", "127.0.0.1", "::1"]
    assert usages(controller) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert sans(worker) == ["spiffe://crank.local/worker/a", "localhost", "127.0.0.1", "::1"]
    assert usages(worker) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert sans(client) == ["spiffe://crank.local/client/ops"]
    assert usages(client) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert worker.not_valid_after_utc - worker.not_valid_before_utc > datetime.timedelta(days=365)


def _written_order() -> list[str]:
    stems = ["ca", "controller", "worker-a", "worker-b", "client-ops"]
    return [f"{stem}.{suffix}" for stem in stems for suffix in ("pem", "key")]


def test_certs_reuses_an_existing_ca_for_more_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["certs", "--out", str(tmp_path), "--worker", "a"], capsys)[0] == 0
    first_ca = (tmp_path / "ca.pem").read_bytes()
    status, printed, _ = run_main(["certs", "--out", str(tmp_path), "--worker", "b"], capsys)
    assert status == 0
    assert "reused the CA" in printed
    assert (tmp_path / "ca.pem").read_bytes() == first_ca
    ca = x509.load_pem_x509_certificate(first_ca)
    for name in ("worker-a.pem", "worker-b.pem"):
        x509.load_pem_x509_certificate((tmp_path / name).read_bytes()).verify_directly_issued_by(ca)


@pytest.mark.parametrize("name", ["", "a/b", "../x", "a b", "x" * 129])
def test_certs_refuses_names_that_are_not_worker_ids(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_main(["certs", "--out", str(tmp_path / "c"), "--worker", name], capsys)
    assert status == 2
    assert "invalid name" in err
    assert not (tmp_path / "c").exists()


def test_certs_requires_out(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_main(["certs", "--worker", "a"], capsys)
    assert status == 2
    assert "--out" in err


def test_the_certificate_library_makes_expired_and_foreign_certificates() -> None:
    now = datetime.datetime.now(datetime.UTC)
    authority, stranger = certs.make_authority(), certs.make_authority("another CA")
    expired = certs.make_worker_certificate(
        authority,
        "a",
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(days=1),
    )
    assert expired.certificate.not_valid_after_utc < now
    foreign = certs.make_worker_certificate(stranger, "a")
    with pytest.raises(ValueError):
        foreign.certificate.verify_directly_issued_by(authority.certificate)
    with pytest.raises(ValueError, match="later than"):
        certs.make_worker_certificate(authority, "a", not_before=now, not_after=now)


def test_serve_warns_about_plain_http_and_identity_checks_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    from crank_registry_asgi import server, tls
    from crank_registry_asgi.app import identity_checks_off_warning

    def start_and_stop(app: Any, settings: Any, **options: Any) -> None:
        # What server.run does around the app, without a socket: the capture,
        # then the app's lifespan, which warns when identities are not checked.
        async def lifespan() -> None:
            async with app.router.lifespan_context(app):
                pass

        tls.install()
        asyncio.run(lifespan())

    monkeypatch.setattr(server, "run", start_and_stop)
    # The certificates are loaded before the server starts: real ones.
    certs.write_development_certificates(tmp_path, workers=[])
    monkeypatch.chdir(tmp_path)

    def warnings_of(*flags: str) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="crank_registry_asgi"):
            assert cli.main(["serve", *flags, "--state-dir", str(tmp_path)]) == 0
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    certificate = ["--certfile", "controller.pem", "--keyfile", "controller.key"]
    assert warnings_of(*certificate, "--ca-certs", "ca.pem") == []
    # The same warning as an application embedding create_app logs.
    assert warnings_of(*certificate) == [identity_checks_off_warning()]
    assert warnings_of("--insecure") == [
        "serving plain HTTP (--insecure): nothing is encrypted",
        identity_checks_off_warning(),
    ]
    # Behind a TLS-terminating proxy that passes the certificate on, identities are checked.
    ca = tmp_path / "ca.pem"
    ca.write_bytes(certs.make_authority().certificate_pem())
    exposed = ["--insecure", "--host", "0.0.0.0", "--trust-proxy-cert-header", "X-Client-Cert"]
    header_warnings = warnings_of(*exposed, "--ca-certs", str(ca))
    assert header_warnings[0] == (
        "serving plain HTTP (--insecure) on 0.0.0.0, reachable from other machines: "
        "nothing is encrypted"
    )
    # ... and the header is trusted from any peer: said loudly, with the fix.
    assert len(header_warnings) == 2
    assert "sent by ANY peer" in header_warnings[1]
    assert "give --trusted-proxy CIDR" in header_warnings[1]


def test_the_proxy_header_with_ca_certs_is_served(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--insecure or HTTPS, with --ca-certs and the header: the header's certificate is verified."""
    from crank_registry_asgi import server

    started: list[tuple[Any, Any]] = []
    monkeypatch.setattr(
        server, "run", lambda app, settings, **options: started.append((app, settings))
    )
    authority = certs.make_authority()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(authority.certificate_pem() + certs.make_authority("second").certificate_pem())
    header = ["--trust-proxy-cert-header", "X-Client-Cert", "--ca-certs", str(ca)]
    proxies = ["--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "fd00::1"]
    assert (
        cli.main(["serve", "--insecure", *header, *proxies, "--trust-domain", "prod.example"]) == 0
    )
    served = tmp_path / "served"  # the controller's own certificate: loaded before serving
    certs.write_development_certificates(served, workers=[])
    tls = [
        "--certfile",
        str(served / "controller.pem"),
        "--keyfile",
        str(served / "controller.key"),
    ]
    assert cli.main(["serve", *tls, *header]) == 0
    (behind_proxy, plain), (behind_tls_proxy, https) = started
    # Plain HTTP: no handshake; the CA certificates verify only the header's certificate.
    assert plain.ca_certs is None and not plain.uses_tls
    config = behind_proxy.state.service.config
    assert config.require_identity
    assert config.proxy_cert_header == "X-Client-Cert"
    assert len(config.proxy_cert_authorities) == 2
    assert config.proxy_cert_authorities[0] == authority.certificate
    assert [str(network) for network in config.trusted_proxies] == ["10.0.0.0/8", "fd00::1/128"]
    assert config.trust_domain == "prod.example"
    # HTTPS: mutual TLS with the proxy, and the header's certificate verified too.
    assert https.ca_certs == ca and https.mutual_tls
    config = behind_tls_proxy.state.service.config
    assert config.proxy_cert_header == "X-Client-Cert"
    assert config.trusted_proxies == ()
    assert config.trust_domain == "crank.local"


def test_ca_certs_without_certificates_are_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "ca.pem"
    empty.write_text("not a certificate\n")
    status, _, err = run_main(
        ["serve", "--insecure", "--trust-proxy-cert-header", "X-C", "--ca-certs", str(empty)],
        capsys,
    )
    assert status == 2
    assert f"--ca-certs {empty}: no PEM certificates in it" in err
