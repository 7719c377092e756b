"""``crank-registry certs``: names for real hosts (--san) and renewing one worker (--renew)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from crank_registry_asgi import certs
from tests.cli.test_cli import run_main


def names_of(path: Path) -> tuple[list[str], list[str], list[str]]:
    """The DNS names, IP addresses and URIs of a certificate's SAN."""
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        san.get_values_for_type(x509.DNSName),
        [str(address) for address in san.get_values_for_type(x509.IPAddress)],
        san.get_values_for_type(x509.UniformResourceIdentifier),
    )


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_san_adds_dns_names_and_ip_addresses_to_controller_and_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["certs", "--out", str(tmp_path), "--worker", "w1", "--client", "ops"]
    args += ["--san", "registry.example.com", "--san", "10.0.0.5", "--san", "fd00::7"]
    args += ["--san", "worker1.example.com"]
    status, _, _ = run_main(args, capsys)
    assert status == 0
    for stem in ("controller", "worker-w1"):
        dns, ips, _ = names_of(tmp_path / f"{stem}.pem")
        assert dns == ["localhost", "registry.example.com", "worker1.example.com"]
        assert ips == ["127.0.0.1", "::1", "10.0.0.5", "fd00::7"]
    assert names_of(tmp_path / "worker-w1.pem")[2] == ["spiffe://crank.local/worker/w1"]
    # A client certificate serves nothing: no host names.
    assert names_of(tmp_path / "client-ops.pem") == ([], [], ["spiffe://crank.local/client/ops"])


def test_trust_domain_names_the_identities_and_a_renewal_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["certs", "--out", str(tmp_path), "--worker", "w1", "--client", "ops"]
    status, _, _ = run_main([*args, "--trust-domain", "prod.example"], capsys)
    assert status == 0
    assert names_of(tmp_path / "worker-w1.pem")[2] == ["spiffe://prod.example/worker/w1"]
    assert names_of(tmp_path / "client-ops.pem")[2] == ["spiffe://prod.example/client/ops"]
    renew = ["certs", "--out", str(tmp_path), "--worker", "w1", "--renew"]
    assert run_main(renew, capsys)[0] == 0
    assert names_of(tmp_path / "worker-w1.pem")[2] == ["spiffe://prod.example/worker/w1"]
    status, _, err = run_main([*args, "--trust-domain", "Not A Domain"], capsys)
    assert status == 2
    assert "not a SPIFFE trust domain" in err


@pytest.mark.parametrize("bad", ["bad name", "-leading.example.com", "a..b", "http://x", ""])
def test_a_san_that_is_neither_a_name_nor_an_address_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    status, _, err = run_main(["certs", "--out", str(tmp_path), f"--san={bad}"], capsys)
    assert status == 2
    assert f"--san {bad!r} is neither an IP address nor a DNS name" in err
    assert not (tmp_path / "ca.pem").exists()


def test_check_host_tells_addresses_from_names() -> None:
    assert certs.check_host("10.0.0.5") == "10.0.0.5"
    assert certs.check_host("::FFFF:10.0.0.5") == str(ipaddress.ip_address("::ffff:10.0.0.5"))
    assert certs.check_host("Registry.Example.COM") == "registry.example.com"
    assert certs.check_host("*.workers.example.com") == "*.workers.example.com"


def test_renew_replaces_one_workers_certificate_with_the_same_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_main(["certs", "--out", str(tmp_path), "--worker", "w1", "--worker", "w2"], capsys)
    run_main(["certs", "--out", str(tmp_path), "--san", "w1.example.com"], capsys)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    old = load(tmp_path / "worker-w1.pem")

    status, printed, _ = run_main(
        [
            "certs",
            "--out",
            str(tmp_path),
            "--worker",
            "w1",
            "--renew",
            "--san",
            "10.1.2.3",
            "--days",
            "2",
        ],
        capsys,
    )
    assert status == 0
    assert printed.split() == [str(tmp_path / "worker-w1.pem"), str(tmp_path / "worker-w1.key")]
    new = load(tmp_path / "worker-w1.pem")
    authority = load(tmp_path / "ca.pem")
    assert new.serial_number != old.serial_number
    assert new.public_key() != old.public_key()
    new.verify_directly_issued_by(authority)
    assert (
        new.not_valid_after_utc - new.not_valid_before_utc
        < old.not_valid_after_utc - old.not_valid_before_utc
    )
    assert new.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage
    ).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    )
    # Same names as before, plus the new one.
    dns, ips, uris = names_of(tmp_path / "worker-w1.pem")
    assert (dns, ips, uris) == (
        ["localhost"],
        ["127.0.0.1", "::1", "10.1.2.3"],
        ["spiffe://crank.local/worker/w1"],
    )
    assert stat.S_IMODE((tmp_path / "worker-w1.key").stat().st_mode) == 0o600
    # Nothing else changed, and no temporary file is left behind.
    after = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert after.keys() == before.keys()
    assert {name for name in after if after[name] != before[name]} == {
        "worker-w1.pem",
        "worker-w1.key",
    }


def test_renew_refuses_without_the_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_main(["certs", "--out", str(tmp_path), "--worker", "w1"], capsys)
    (tmp_path / "ca.key").unlink()
    before = (tmp_path / "worker-w1.pem").read_bytes()
    status, _, err = run_main(
        ["certs", "--out", str(tmp_path), "--worker", "w1", "--renew"], capsys
    )
    assert status == 2
    assert f"cannot renew worker 'w1': the CA is missing ({tmp_path / 'ca.key'})" in err
    assert "Pass the --out directory that holds ca.pem and ca.key" in err
    assert (tmp_path / "worker-w1.pem").read_bytes() == before


def test_renew_refuses_a_worker_that_has_no_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_main(["certs", "--out", str(tmp_path)], capsys)
    status, _, err = run_main(
        ["certs", "--out", str(tmp_path), "--worker", "w9", "--renew"], capsys
    )
    assert status == 2
    assert f"{tmp_path / 'worker-w9.pem'} does not exist; issue it with --worker w9" in err


@pytest.mark.parametrize(
    "extra", [[], ["--worker", "a", "--worker", "b"], ["--worker", "a", "--client", "c"]]
)
def test_renew_takes_exactly_one_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    status, _, err = run_main(["certs", "--out", str(tmp_path), "--renew", *extra], capsys)
    assert status == 2
    assert "give exactly one --worker NAME" in err
