"""Certificate files reloaded into a live TLS context, their expiry, and TLS file errors.

Handshakes run in memory (``ssl.MemoryBIO``) between a client and a server
context, so each test sees which certificate a new connection presents
without a socket or a clock: expiry checks take a fixed ``clock``.
"""

from __future__ import annotations

import datetime
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from crank_registry_asgi import certs
from crank_worker_client import ConfigurationError, ControllerClient, TLSConfig, WorkerAgent
from crank_worker_client.certificates import CertificateFiles, tls_files_problem
from tests.builders import capability

DAY = 86400.0
NOW = datetime.datetime(2026, 12, 6, tzinfo=datetime.UTC)
LOGGER = logging.getLogger("tests.certificate_files")


def handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> tuple[int, int | None]:
    """Connect in memory; the serials of the server's and the client's certificates."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(to_client, to_server, server_hostname="localhost")
    server_side = server.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", client_side), ("server", server_side)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(to_server.read())
        to_client.write(server_out.read())
        if all(done.values()):
            break
    server_der = client_side.getpeercert(binary_form=True)
    client_der = server_side.getpeercert(binary_form=True)
    assert server_der is not None
    return (
        x509.load_der_x509_certificate(server_der).serial_number,
        None if client_der is None else x509.load_der_x509_certificate(client_der).serial_number,
    )


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    certs.write_development_certificates(tmp_path, workers=["w1"])
    return tmp_path


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def server_context(pki: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    context.load_cert_chain(str(pki / "controller.pem"), str(pki / "controller.key"))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def worker_files(
    pki: Path, *, clock: Callable[[], float] = time.time, expiry_warning: float = 7 * DAY
) -> CertificateFiles:
    tls = TLSConfig(
        ca_certs=pki / "ca.pem", certfile=pki / "worker-w1.pem", keyfile=pki / "worker-w1.key"
    )
    return CertificateFiles.open(
        tls.ssl_context,
        certfile=tls.certfile,
        keyfile=tls.keyfile,
        ca_certs=tls.ca_certs,
        label="worker certificate",
        logger=LOGGER,
        clock=clock,
        expiry_warning=expiry_warning,
    )


def test_a_renewed_pair_is_presented_by_new_connections(pki: Path) -> None:
    files = worker_files(pki)
    first = serial_of(pki / "worker-w1.pem")
    assert handshake(files.context, server_context(pki))[1] == first
    assert files.check() is False  # nothing changed

    certs.renew_worker_certificate(pki, "w1")
    renewed = serial_of(pki / "worker-w1.pem")
    assert renewed != first
    assert files.check() is False  # changed: one more look to be sure it is whole
    assert files.check() is True
    assert handshake(files.context, server_context(pki))[1] == renewed
    assert files.reloads == 1


def test_a_pair_that_does_not_load_is_logged_and_the_previous_one_kept(
    pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = worker_files(pki)
    first = serial_of(pki / "worker-w1.pem")
    # The key of another certificate: a half-done renewal.
    (pki / "worker-w1.key").write_bytes((pki / "controller.key").read_bytes())
    with caplog.at_level(logging.ERROR, logger=LOGGER.name):
        assert files.check() is False  # changed: not read yet
        assert files.check() is False
    [record] = caplog.records
    assert "worker certificate not reloaded, the previous one stays in use" in record.message
    assert f"key file {pki / 'worker-w1.key'} is not the key of certificate" in record.message
    assert str(pki / "worker-w1.pem") in record.message
    assert handshake(files.context, server_context(pki))[1] == first

    # A half-written certificate: not PEM yet.
    (pki / "worker-w1.pem").write_text("-----BEGIN CERT")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger=LOGGER.name):
        assert files.check() is False  # changed: not read yet
        assert files.check() is False
    assert f"certificate file {pki / 'worker-w1.pem'} is not a PEM certificate" in caplog.text
    assert handshake(files.context, server_context(pki))[1] == first

    # The renewal completes: the second look at the whole pair takes it.
    renewed = certs.make_worker_certificate(
        certs.read_authority(pki / "ca.pem", pki / "ca.key"), "w1"
    )
    renewed.write(pki / "worker-w1.pem", pki / "worker-w1.key")
    assert files.check() is False  # changed: one more look to be sure it is whole
    assert files.check() is True
    assert handshake(files.context, server_context(pki))[1] == renewed.certificate.serial_number


def test_a_renewal_seen_between_its_key_and_its_certificate_is_waited_for(
    pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = worker_files(pki)
    renewed = certs.make_worker_certificate(
        certs.read_authority(pki / "ca.pem", pki / "ca.key"), "w1"
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        certs.replace_file(pki / "worker-w1.key", renewed.private_key_pem(), mode=0o600)
        assert files.check() is False
        certs.replace_file(pki / "worker-w1.pem", renewed.certificate_pem(), mode=0o644)
        assert files.check() is False
        assert files.check() is True
    assert caplog.records == []
    assert handshake(files.context, server_context(pki))[1] == renewed.certificate.serial_number


def test_an_added_ca_is_trusted_and_a_removed_one_is_reported(
    pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = worker_files(pki)
    other = certs.make_authority("another CA")
    other_server = certs.make_controller_certificate(other)
    other_server.write(pki / "other-server.pem", pki / "other-server.key")
    elsewhere = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    elsewhere.load_cert_chain(str(pki / "other-server.pem"), str(pki / "other-server.key"))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(files.context, elsewhere)

    original = (pki / "ca.pem").read_bytes()
    certs.replace_file(pki / "ca.pem", original + other.certificate_pem(), mode=0o644)
    assert files.check() is False  # changed: one more look to be sure it is whole
    assert files.check() is True
    assert handshake(files.context, elsewhere)[0] == other_server.certificate.serial_number
    assert set(files.expiry_times()) == {"certificate", "ca"}

    certs.replace_file(pki / "ca.pem", original, mode=0o644)
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        files.check()
        files.check()
    assert "1 CA certificate(s) removed from" in caplog.text
    assert "stay trusted until the process restarts" in caplog.text


def expiring_pki(tmp_path: Path, days: float, now: datetime.datetime = NOW) -> Path:
    """A CA and a worker certificate that expires ``days`` after ``now``."""
    authority = certs.make_authority(not_before=now - datetime.timedelta(days=1))
    authority.write(tmp_path / "ca.pem", tmp_path / "ca.key")
    leaf = certs.make_worker_certificate(
        authority,
        "w1",
        not_before=now - datetime.timedelta(days=1),
        not_after=now + datetime.timedelta(days=days),
    )
    leaf.write(tmp_path / "worker-w1.pem", tmp_path / "worker-w1.key")
    return tmp_path


def test_a_certificate_expiring_in_three_days_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = expiring_pki(tmp_path, days=3)
    now = [NOW.timestamp()]
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        files = worker_files(pki, clock=lambda: now[0])
        files.check()
        now[0] += DAY
        files.check()
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING
    assert warning.getMessage() == (
        f"worker certificate {pki / 'worker-w1.pem'} expires at 2026-12-09 00:00:00 UTC, "
        "in 3.0 days: renew it (crank-registry certs --renew), it is reloaded without a restart"
    )

    caplog.clear()
    now[0] = NOW.timestamp() + 3 * DAY + 1
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        files.check()
    [expired] = caplog.records
    assert expired.levelno == logging.ERROR
    assert "expired at 2026-12-09 00:00:00 UTC" in expired.getMessage()


def test_the_warning_window_is_configurable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = expiring_pki(tmp_path, days=3)
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        worker_files(pki, clock=NOW.timestamp, expiry_warning=2 * DAY)
        assert caplog.records == []
        worker_files(pki, clock=NOW.timestamp, expiry_warning=3 * DAY)
    assert len(caplog.records) == 1


def test_the_worker_client_warns_about_its_own_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The client reads the real clock: the certificate expires 3 days from now.
    pki = expiring_pki(tmp_path, days=3, now=datetime.datetime.now(datetime.UTC))
    tls = TLSConfig(
        ca_certs=pki / "ca.pem", certfile=pki / "worker-w1.pem", keyfile=pki / "worker-w1.key"
    )
    with caplog.at_level(logging.WARNING, logger="crank_worker_client"):
        agent = WorkerAgent(
            "https://localhost:9000", "w1", "https://localhost:8001", [capability()], tls=tls
        )
    assert agent.certificates is not None
    [warning] = caplog.records
    assert f"client certificate {pki / 'worker-w1.pem'} expires at" in warning.getMessage()
    assert "in 3.0 days: renew it" in warning.getMessage()


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (
            {"certfile": "junk.pem", "keyfile": "worker-w1.key"},
            "certificate file {junk.pem} is not a PEM",
        ),
        ({"certfile": "worker-w1.pem", "keyfile": "junk.pem"}, "key file {junk.pem} is not a PEM"),
        (
            {"certfile": "worker-w1.pem", "keyfile": "controller.key"},
            "key file {controller.key} is not the key of certificate {worker-w1.pem}",
        ),
        ({"ca_certs": "gone.pem"}, "CA certificates file not found: {gone.pem}"),
        ({"ca_certs": "junk.pem"}, "CA certificates file {junk.pem} is not PEM"),
    ],
)
def test_the_client_names_the_tls_file_that_is_wrong(
    pki: Path, options: dict[str, str], says: str
) -> None:
    (pki / "junk.pem").write_text("not PEM at all\n")
    paths = {name: pki / file for name, file in options.items()}
    expected = says
    for file in options.values():
        expected = expected.replace("{" + file + "}", str(pki / file))
    with pytest.raises(ConfigurationError) as raised:
        ControllerClient("https://localhost:9000", tls=TLSConfig(**paths))
    assert expected in str(raised.value)
    assert str(raised.value).startswith("TLSConfig: ")
    assert tls_files_problem(paths.get("certfile"), paths.get("keyfile"), paths.get("ca_certs"))
