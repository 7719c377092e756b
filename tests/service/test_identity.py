"""Worker identity: the SPIFFE ID of the client certificate, from TLS or a trusted header."""

from __future__ import annotations

import logging
from urllib.parse import quote

import pytest

from crank_registry_asgi import ServiceConfig
from crank_registry_asgi.identity import caller_identity, spiffe_id_of
from tests.builders import registration_payload
from tests.service.helpers import (
    UNKNOWN,
    CertificateAuthority,
    WithClientCertificate,
    running,
)

pytestmark = pytest.mark.anyio

MTLS = ServiceConfig(require_identity=True)


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
    assert caller_identity(tls_scope, {}, None) == "spiffe://crank.local/worker/w1"
    # The header counts only when named, and the TLS extension wins over it.
    header = {"x-client-cert": quote(authority.worker("w2"))}
    assert caller_identity({}, header, None) is None
    assert caller_identity({}, header, "x-client-cert") == "spiffe://crank.local/worker/w2"
    assert caller_identity(tls_scope, header, "x-client-cert") == "spiffe://crank.local/worker/w1"
    empty_chain = {"extensions": {"tls": {"client_cert_chain": []}}}
    assert caller_identity(empty_chain, {}, None) is None


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
    assert "mTLS: worker identity checks off" in caplog.messages


async def test_identity_checks_logged_on(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="crank_registry_asgi")
    async with running(MTLS):
        pass
    assert "mTLS: worker identity checks on" in caplog.messages


async def test_proxy_header_identity(authority: CertificateAuthority) -> None:
    config = ServiceConfig(require_identity=True, proxy_cert_header="x-ssl-client-cert")
    async with running(config) as api:
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
