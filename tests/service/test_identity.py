"""Worker identity: the SPIFFE ID of the client certificate, from TLS or a trusted header."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import hypercorn.asyncio
import hypercorn.asyncio.run
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypercorn.asyncio.run import worker_serve
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.config import Config
from hypercorn.utils import LifespanFailureError, wrap_app

from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, certs, create_app, create_gateway_app, tls
from crank_registry_asgi.app import identity_checks_off_warning
from crank_registry_asgi.identity import (
    ProxyCertificateHeader,
    caller_identity,
    peer_address,
    spiffe_id_of,
)
from tests.builders import registration_payload
from tests.service.helpers import (
    UNKNOWN,
    CertificateAuthority,
    WithClientCertificate,
    running,
)

pytestmark = pytest.mark.anyio

MTLS = ServiceConfig(require_identity=True)


def proxy_config(authority: CertificateAuthority, **fields: Any) -> ServiceConfig:
    """Identities from the header ``x-ssl-client-cert``, verified against ``authority``."""
    return ServiceConfig(
        require_identity=True,
        proxy_cert_header="x-ssl-client-cert",
        proxy_cert_authorities=[authority.certificate],
        **fields,
    )


@pytest.fixture
def capture_installed() -> None:
    """The certificate capture installed, as ``serve`` does before hypercorn starts.

    These tests hand the app its certificates with :class:`WithClientCertificate`,
    playing hypercorn with the capture.
    """
    tls.install()


@pytest.fixture
def capture_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """hypercorn as an embedding program finds it: no certificate capture."""
    monkeypatch.setattr(hypercorn.asyncio.run, "TCPServer", TCPServer)
    assert not tls.installed()


def test_spiffe_id_of_certificates(authority: CertificateAuthority) -> None:
    assert spiffe_id_of(authority.worker("w1")) == "spiffe://crank.local/worker/w1"
    # Other URI SANs are ignored; a DNS-only certificate has no identity.
    mixed = authority.issue("https://example.com/x", "spiffe://crank.local/worker/w2")
    assert spiffe_id_of(mixed) == "spiffe://crank.local/worker/w2"
    assert spiffe_id_of(authority.issue(dns=("w1.example",))) is None
    assert spiffe_id_of(authority.issue()) is None
    # SPIFFE allows exactly one: two make the identity ambiguous.
    two = authority.issue("spiffe://crank.local/worker/a", "spiffe://crank.local/worker/b")
    assert spiffe_id_of(two) is None
    assert spiffe_id_of("not a certificate") is None
    assert spiffe_id_of("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n") is None
    assert spiffe_id_of("\u00e9") is None


def test_caller_identity_sources(authority: CertificateAuthority) -> None:
    pem = authority.worker("w1")
    tls_scope = {"extensions": {"tls": {"client_cert_chain": [pem]}}}
    assert caller_identity(tls_scope, {}, None, time.time()) == "spiffe://crank.local/worker/w1"
    # The header counts only when named; then, when sent, it is the caller's identity
    # (a proxy's own certificate on the connection is not the caller's).
    header = {"x-client-cert": quote(authority.worker("w2"))}
    trusted = ProxyCertificateHeader("x-client-cert", [authority.certificate])
    assert caller_identity({}, header, None, time.time()) is None
    assert caller_identity({}, header, trusted, time.time()) == "spiffe://crank.local/worker/w2"
    assert (
        caller_identity(tls_scope, header, trusted, time.time()) == "spiffe://crank.local/worker/w2"
    )
    assert caller_identity(tls_scope, {}, trusted, time.time()) == "spiffe://crank.local/worker/w1"
    empty_chain = {"extensions": {"tls": {"client_cert_chain": []}}}
    assert caller_identity(empty_chain, {}, None, time.time()) is None


@pytest.mark.usefixtures("capture_installed")
async def test_a_worker_acts_only_on_its_own_record(authority: CertificateAuthority) -> None:
    wrapper: list[WithClientCertificate] = []

    def wrap(app: object) -> WithClientCertificate:
        wrapper.append(WithClientCertificate(app))  # type: ignore[arg-type]
        return wrapper[0]

    async with running(MTLS, wrap=wrap) as api:
        tls = wrapper[0]
        tls.pem = authority.worker("a")
        assert (await api.post("/register", registration_payload("a"))).status_code == 200
        tls.pem = authority.worker("b")
        assert (await api.post("/register", registration_payload("b"))).status_code == 200

        # b's certificate cannot register, heartbeat or deregister a.
        for path, body in [
            ("/register", registration_payload("a", worker_url="http://evil.example")),
            ("/heartbeat", {"worker_id": "a"}),
            ("/deregister", {"worker_id": "a"}),
        ]:
            before = api.registry.export_state()
            response = await api.post(path, body)
            assert response.status_code == 403, path
            assert response.json()["error"] == "forbidden"
            assert response.json()["worker_id"] == "a"
            assert api.registry.export_state() == before

        # Any authenticated caller may route and list.
        assert await api.route() in {"a", "b"}
        assert set(await api.workers()) == {"a", "b"}

        tls.pem = authority.worker("a")
        assert (await api.post("/heartbeat", {"worker_id": "a"})).status_code == 200
        assert (await api.post("/deregister", {"worker_id": "a"})).status_code == 200


@pytest.mark.usefixtures("capture_installed")
async def test_no_identity_is_forbidden_under_mtls(authority: CertificateAuthority) -> None:
    tls: list[WithClientCertificate] = []

    def wrap(app: object) -> WithClientCertificate:
        tls.append(WithClientCertificate(app))  # type: ignore[arg-type]
        return tls[0]

    async with running(MTLS, wrap=wrap) as api:
        for pem in (None, authority.issue(dns=("w1.example",))):
            tls[0].pem = pem
            response = await api.post("/register", registration_payload("w1"))
            assert response.status_code == 403
            assert response.json()["error"] == "forbidden"
            assert len(api.registry) == 0
        # Reads stay open.
        assert (await api.get("/health")).status_code == 200
        assert await api.route() == UNKNOWN


async def test_without_mtls_there_are_no_checks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="crank_registry_asgi")
    async with running() as api:
        assert (await api.post("/register", registration_payload("anyone"))).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [identity_checks_off_warning()]
    assert warnings[0].startswith("mTLS: worker identity checks off: any caller may register")
    assert "ServiceConfig(require_identity=True)" in warnings[0]
    assert "--ca-certs" in warnings[0]


@pytest.mark.usefixtures("capture_installed")
async def test_identity_checks_logged_on(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="crank_registry_asgi")
    async with running(MTLS):
        pass
    assert "mTLS: worker identity checks on trust_domain=crank.local" in caplog.messages
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.usefixtures("capture_not_installed")
async def test_identity_checks_without_the_capture_refuse_to_start(tmp_path: Path) -> None:
    config = ServiceConfig(require_identity=True, state_dir=tmp_path / "state")
    with pytest.raises(tls.CaptureNotInstalled) as refused:
        async with running(config):
            raise AssertionError("the app started")
    message = str(refused.value)
    assert "every worker would be refused (403 forbidden)" in message
    assert "call crank_registry_asgi.tls.install() before hypercorn starts serving" in message
    assert "ServiceConfig.proxy_cert_header" in message
    assert "--trust-proxy-cert-header" in message
    assert "\n" not in message
    # Refused before anything else started: the journal was not opened.
    assert not (tmp_path / "state").exists()


@pytest.mark.usefixtures("capture_not_installed")
async def test_the_gateway_app_refuses_to_start_as_well() -> None:
    app = create_gateway_app(create_app(config=MTLS))
    with pytest.raises(tls.CaptureNotInstalled):
        async with app.router.lifespan_context(app):
            raise AssertionError("the app started")


@pytest.mark.usefixtures("capture_not_installed")
async def test_a_trusted_proxy_header_needs_no_capture(
    caplog: pytest.LogCaptureFixture, authority: CertificateAuthority
) -> None:
    caplog.set_level(logging.INFO, logger="crank_registry_asgi")
    async with running(proxy_config(authority)) as api:
        assert (await api.get("/health")).status_code == 200
    assert "mTLS: worker identity checks on trust_domain=crank.local" in caplog.messages


async def test_hypercorn_with_the_capture_hands_the_app_each_workers_certificate(
    tmp_path: Path,
) -> None:
    """The README's embedding program: ``tls.install()``, then hypercorn with mutual TLS."""
    certs.write_development_certificates(tmp_path, workers=["a", "b"])
    tls.install()
    app = create_app(config=ServiceConfig(require_identity=True, state_dir=tmp_path / "state"))
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.certfile = str(tmp_path / "controller.pem")
    config.keyfile = str(tmp_path / "controller.key")
    config.ca_certs = str(tmp_path / "ca.pem")
    config.verify_mode = ssl.CERT_REQUIRED
    sockets = config.create_sockets()
    port = sockets.secure_sockets[0].getsockname()[1]
    stop = asyncio.Event()
    server = asyncio.create_task(
        worker_serve(
            wrap_app(app, config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
            config,
            sockets=sockets,
            shutdown_trigger=stop.wait,
        )
    )
    try:
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        context.load_cert_chain(str(tmp_path / "worker-a.pem"), str(tmp_path / "worker-a.key"))
        async with httpx.AsyncClient(
            base_url=f"https://127.0.0.1:{port}", verify=context, timeout=30
        ) as worker_a:
            await _until_serving(worker_a)
            own = await worker_a.post("/register", json=registration_payload("a"))
            assert own.status_code == 200, own.text
            other = await worker_a.post("/register", json=registration_payload("b"))
            assert other.status_code == 403
            assert other.json()["error"] == "forbidden"
    finally:
        stop.set()
        await asyncio.wait_for(server, timeout=30)
        for sock in sockets.secure_sockets:
            sock.close()


async def _until_serving(client: httpx.AsyncClient, deadline_s: float = 30.0) -> None:
    """Wait until the server listens (it does once the app's lifespan has started)."""
    with anyio.fail_after(deadline_s):
        while True:
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.ConnectError:
                pass
            await anyio.sleep(0.05)


def test_hypercorn_without_the_capture_stops_before_serving(
    capture_not_installed: None,
) -> None:
    """An embedding program serving the app with hypercorn, as the README shows."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None

    async def main() -> None:
        await hypercorn.asyncio.serve(create_app(config=MTLS), config)  # type: ignore[arg-type]

    with pytest.raises(LifespanFailureError) as failed:
        asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert "CaptureNotInstalled" in str(failed.value)
    assert "crank_registry_asgi.tls.install()" in str(failed.value)


async def test_proxy_header_identity(authority: CertificateAuthority) -> None:
    async with running(proxy_config(authority), clock=FakeClock(time.time())) as api:
        own = {"x-ssl-client-cert": quote(authority.worker("w1"))}
        other = {"x-ssl-client-cert": quote(authority.worker("w2"))}
        garbage = {"x-ssl-client-cert": "not%20a%20certificate"}
        body = registration_payload("w1")
        assert (await api.request("POST", "/register", json=body, headers=own)).status_code == 200
        response = await api.request("POST", "/heartbeat", json={"worker_id": "w1"}, headers=other)
        assert response.status_code == 403
        response = await api.request(
            "POST", "/heartbeat", json={"worker_id": "w1"}, headers=garbage
        )
        assert response.status_code == 403
        assert "does not hold a URL-encoded PEM certificate" in response.json()["message"]
        response = await api.request("POST", "/heartbeat", json={"worker_id": "w1"})
        assert response.status_code == 403
        response = await api.request("POST", "/heartbeat", json={"worker_id": "w1"}, headers=own)
        assert response.status_code == 200


async def test_proxy_header_is_ignored_unless_named(authority: CertificateAuthority) -> None:
    async with running(MTLS) as api:
        spoofed = {"x-ssl-client-cert": quote(authority.worker("w1"))}
        response = await api.request(
            "POST", "/register", json=registration_payload("w1"), headers=spoofed
        )
        assert response.status_code == 403


def test_header_name_is_validated() -> None:
    with pytest.raises(ValueError, match="header name"):
        ServiceConfig(proxy_cert_header="bad header")
    with pytest.raises(ValueError, match="header name"):
        ServiceConfig(proxy_cert_header="")
    # The same rule as the command's --trust-proxy-cert-header: an RFC 9110 token.
    with pytest.raises(ValueError, match="header name"):
        ServiceConfig(proxy_cert_header="x(y),z")


async def test_a_presented_identity_is_checked_even_when_not_required(
    authority: CertificateAuthority,
) -> None:
    tls: list[WithClientCertificate] = []

    def wrap(app: object) -> WithClientCertificate:
        tls.append(WithClientCertificate(app))  # type: ignore[arg-type]
        return tls[0]

    async with running(wrap=wrap) as api:
        tls[0].pem = authority.worker("b")
        response = await api.post("/register", registration_payload("a"))
        assert (response.status_code, response.json()["error"]) == (403, "forbidden")
        assert (await api.post("/register", registration_payload("b"))).status_code == 200
        tls[0].pem = None
        assert (await api.post("/register", registration_payload("a"))).status_code == 200


# ------------------------------------------------- exact identities (--trust-domain)

MALFORMED = {
    "spiffe://evil.local/worker/a": (
        "its trust domain 'evil.local' is not the trusted 'crank.local'"
    ),
    "spiffe://crank.local/client/gw/worker/a": (
        "its path '/client/gw/worker/a' is not /worker/NAME or /client/NAME"
    ),
    "spiffe://crank.local/ns/prod/worker/a": "its path '/ns/prod/worker/a' is not",
    "spiffe://crank.local/worker/a/": "its path '/worker/a/' is not",
    "spiffe://crank.local/a": "its path '/a' is not",
    "spiffe://crank.local/worker/a%20b": "its name 'a%20b' is not",
}


def with_certificate(wrapper: list[WithClientCertificate]) -> Any:
    def wrap(app: object) -> WithClientCertificate:
        wrapper.append(WithClientCertificate(app))  # type: ignore[arg-type]
        return wrapper[0]

    return wrap


async def test_only_exact_identities_of_the_trust_domain_act_on_a_record(
    authority: CertificateAuthority,
) -> None:
    tls: list[WithClientCertificate] = []
    async with running(MTLS, wrap=with_certificate(tls)) as api:
        tls[0].pem = authority.worker("a")
        assert (await api.post("/register", registration_payload("a"))).status_code == 200
        for identity, reason in MALFORMED.items():
            tls[0].pem = authority.issue(identity)
            for path, body in [
                ("/register", registration_payload("a", worker_url="http://evil.example")),
                ("/heartbeat", {"worker_id": "a"}),
                ("/deregister", {"worker_id": "a"}),
            ]:
                before = api.registry.export_state()
                response = await api.post(path, body)
                assert response.status_code == 403, (identity, path)
                answer = response.json()
                assert (answer["error"], answer["worker_id"]) == ("forbidden", "a")
                assert answer["message"].startswith(f"identity {identity!r} is refused: ")
                assert reason in answer["message"], answer["message"]
                assert "spiffe://crank.local/worker/NAME" in answer["message"]
                assert api.registry.export_state() == before
        # A well-formed client identity routes and lists, and is told why it may not act.
        tls[0].pem = authority.issue("spiffe://crank.local/client/gw")
        assert await api.route() == "a"
        response = await api.post("/heartbeat", {"worker_id": "a"})
        assert response.status_code == 403
        assert "may not act on worker 'a': it is a client's" in response.json()["message"]
        tls[0].pem = authority.worker("b")
        response = await api.post("/heartbeat", {"worker_id": "a"})
        assert "may not act on worker 'a': it is 'b'" in response.json()["message"]


async def test_the_trust_domain_is_the_configured_one(authority: CertificateAuthority) -> None:
    tls: list[WithClientCertificate] = []
    config = ServiceConfig(require_identity=True, trust_domain="prod.example")
    async with running(config, wrap=with_certificate(tls)) as api:
        tls[0].pem = authority.worker("a")  # spiffe://crank.local/worker/a
        response = await api.post("/register", registration_payload("a"))
        assert response.status_code == 403
        assert "'crank.local' is not the trusted 'prod.example'" in response.json()["message"]
        tls[0].pem = authority.issue("spiffe://prod.example/worker/a")
        assert (await api.post("/register", registration_payload("a"))).status_code == 200


def test_the_trust_domain_is_validated() -> None:
    for bad in ("", "Crank.local", "crank.local/x", "spiffe://crank.local", "a b"):
        with pytest.raises(ValueError, match="trust_domain must be a SPIFFE trust domain"):
            ServiceConfig(trust_domain=bad)


# ------------------------------------------ the proxy header, verified like a handshake


def expired_and_future(authority: CertificateAuthority) -> dict[str, str]:
    now = datetime.datetime.fromtimestamp(time.time(), datetime.UTC)
    day = datetime.timedelta(days=1)
    uri = "spiffe://crank.local/worker/a"
    return {
        "expired": authority.issue(uri, not_before=now - 2 * day, not_after=now - day),
        "not yet valid": authority.issue(uri, not_before=now + day, not_after=now + 2 * day),
    }


def self_signed(uri: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a")])
    now = datetime.datetime.fromtimestamp(time.time(), datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


async def test_the_header_certificate_is_verified_against_the_ca(
    authority: CertificateAuthority,
) -> None:
    stranger = CertificateAuthority("another CA")
    refused = {
        **expired_and_future(authority),
        "self-signed": self_signed("spiffe://crank.local/worker/a"),
        "another CA's": stranger.issue("spiffe://crank.local/worker/a"),
        "the CA itself": authority.pem,
    }
    async with running(proxy_config(authority), clock=FakeClock(time.time())) as api:
        good = {"x-ssl-client-cert": quote(authority.worker("a"))}
        assert (
            await api.request("POST", "/register", json=registration_payload("a"), headers=good)
        ).status_code == 200
        for label, pem in refused.items():
            header = {"x-ssl-client-cert": quote(pem)}
            for path, body in [
                ("/register", registration_payload("a", worker_url="http://evil.example")),
                ("/heartbeat", {"worker_id": "a"}),
                ("/deregister", {"worker_id": "a"}),
            ]:
                before = api.registry.export_state()
                response = await api.request("POST", path, json=body, headers=header)
                assert response.status_code == 403, (label, path)
                message = response.json()["message"]
                assert message.startswith(
                    "the certificate in header x-ssl-client-cert does not verify against the "
                    "CA certificates (--ca-certs): validation failed"
                ), (label, message)
                assert api.registry.export_state() == before
        # Validity is checked at the service's time, also for a certificate seen before.
        pem = authority.issue(
            "spiffe://crank.local/worker/a",
            not_after=datetime.datetime.fromtimestamp(time.time() + 3600, datetime.UTC),
        )
        header = {"x-ssl-client-cert": quote(pem)}
        beat = {"worker_id": "a"}
        assert (
            await api.request("POST", "/heartbeat", json=beat, headers=header)
        ).status_code == 200
        api.advance(3601)
        response = await api.request("POST", "/heartbeat", json=beat, headers=header)
        assert response.status_code == 403
        assert "not valid at validation time" in response.json()["message"]


async def test_only_trusted_proxies_may_send_the_header(authority: CertificateAuthority) -> None:
    header = {"x-ssl-client-cert": quote(authority.worker("a"))}
    body = registration_payload("a")
    # The test client's address is 127.0.0.1.
    loopback = proxy_config(authority, trusted_proxies=[ipaddress.ip_network("127.0.0.0/8")])
    async with running(loopback, clock=FakeClock(time.time())) as api:
        response = await api.request("POST", "/register", json=body, headers=header)
        assert response.status_code == 200
    elsewhere = proxy_config(
        authority,
        trusted_proxies=[ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")],
    )
    async with running(elsewhere, clock=FakeClock(time.time())) as api:
        response = await api.request("POST", "/register", json=body, headers=header)
        assert response.status_code == 403
        assert response.json()["message"] == (
            "the peer 127.0.0.1 may not send the client certificate header x-ssl-client-cert: "
            "only trusted proxies (10.0.0.0/8, fd00::/8) may (--trusted-proxy)"
        )
        assert len(api.registry) == 0


def test_the_peer_address() -> None:
    assert peer_address({"client": ("10.1.2.3", 5)}) == ipaddress.ip_address("10.1.2.3")
    assert peer_address({"client": ("::ffff:10.1.2.3", 5)}) == ipaddress.ip_address("10.1.2.3")
    assert peer_address({"client": ("::1", 5)}) == ipaddress.ip_address("::1")
    assert peer_address({"client": None}) is None
    assert peer_address({}) is None
    assert peer_address({"client": ("unix-socket", 0)}) is None


async def test_the_header_is_announced_loudly_with_who_may_send_it(
    authority: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crank_registry_asgi")
    async with running(proxy_config(authority)):
        pass
    [anyone] = [r for r in caplog.records if "certificate header" in r.getMessage()]
    assert anyone.levelno == logging.WARNING
    assert "sent by ANY peer" in anyone.getMessage()
    assert "give --trusted-proxy CIDR" in anyone.getMessage()
    caplog.clear()
    trusted = proxy_config(authority, trusted_proxies=[ipaddress.ip_network("10.0.0.0/8")])
    async with running(trusted):
        pass
    [limited] = [r for r in caplog.records if "certificate header" in r.getMessage()]
    assert limited.levelno == logging.WARNING
    assert "trusted_proxies=10.0.0.0/8" in limited.getMessage()
    assert "header=x-ssl-client-cert" in limited.getMessage()


def test_the_header_needs_ca_certificates(authority: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="proxy_cert_header needs proxy_cert_authorities"):
        ServiceConfig(proxy_cert_header="x-client-cert")
    with pytest.raises(ValueError, match="trusted_proxies limit who may send"):
        ServiceConfig(trusted_proxies=[ipaddress.ip_network("10.0.0.0/8")])
    with pytest.raises(ValueError, match="only with proxy_cert_header"):
        ServiceConfig(proxy_cert_authorities=[authority.certificate])
