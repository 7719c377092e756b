"""Helpers for the controller's tests: a documented client, bodies, certificates."""

from __future__ import annotations

import contextlib
import datetime
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jsonschema
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from crank_registry import CapabilityRegistry
from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, certs, create_app
from crank_registry_asgi.openapi import openapi_document
from tests.builders import registration_payload

DOCUMENT = openapi_document()

#: What :meth:`Controller.route` returns for 404 ``unknown_capability``.
UNKNOWN = "<unknown capability>"
_ROOT = {"components": DOCUMENT["components"]}


# The documented paths with parameters (/workers/{worker_id}), as patterns of the paths asked.
_TEMPLATES = [
    (re.compile("^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template)) + "$"), template)
    for template in DOCUMENT["paths"]
    if "{" in template
]


def documented_path(path: str) -> str:
    """The document's path of the path asked: its template if it has parameters."""
    if path in DOCUMENT["paths"]:
        return path
    return next((template for pattern, template in _TEMPLATES if pattern.match(path)), path)


def documented_schema(method: str, path: str, status: int) -> dict[str, Any]:
    """The JSON Schema the document gives for this answer (asserts it is documented)."""
    path = documented_path(path)
    operation = DOCUMENT["paths"].get(path, {}).get(method.lower())
    if operation is None:
        # Unknown paths and methods.
        assert status in (404, 405), f"{method} {path}: undocumented status {status}"
        return {
            "$ref": f"#/components/schemas/{'NotFound' if status == 404 else 'MethodNotAllowed'}"
        }
    responses = operation["responses"]
    assert str(status) in responses, f"{method} {path}: status {status} is not documented"
    return responses[str(status)]["content"]["application/json"]["schema"]  # type: ignore[no-any-return]


def check_documented(method: str, path: str, response: httpx.Response) -> Any:
    """Assert that a response agrees with the document; return its body (JSON, or text).

    A 200 answer documented in another media type than JSON (``/metrics``)
    must carry that media type; its body is returned as text.
    """
    assert response.status_code != 500, response.text
    path = documented_path(path)
    operation = DOCUMENT["paths"].get(path, {}).get(method.lower())
    if operation is not None and response.status_code == 200:
        content = operation["responses"]["200"]["content"]
        if "application/json" not in content:
            media_type = response.headers["content-type"].split(";")[0].strip()
            assert media_type in content, (method, path, response.headers)
            return response.text
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    schema = documented_schema(method, path, response.status_code)
    jsonschema.validate(body, {**schema, **_ROOT}, cls=jsonschema.Draft202012Validator)
    if operation is not None:
        check_documented_headers(operation["responses"][str(response.status_code)], response)
    return body


def check_documented_headers(documented: dict[str, Any], response: httpx.Response) -> None:
    """Assert that ``response`` carries every header its documented answer requires, as described.

    ``documented`` is the answer's object in the document (``responses[status]``).
    """
    for name, header in documented.get("headers", {}).items():
        value = response.headers.get(name)
        if value is None:
            assert not header.get("required"), f"{response.status_code} without {name}"
            continue
        schema = header["schema"]
        # A header is text; a documented integer is its decimal form.
        given: Any = int(value) if schema.get("type") == "integer" else value
        jsonschema.validate(given, schema, cls=jsonschema.Draft202012Validator)


class Controller:
    """An app under test with a fake clock and a client that checks every answer."""

    def __init__(self, app: Starlette, client: httpx.AsyncClient, clock: FakeClock) -> None:
        self.app = app
        self.client = client
        self.clock = clock
        self.service = app.state.service
        self.registry: CapabilityRegistry = self.service.registry

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request; the answer must agree with the OpenAPI document."""
        response = await self.client.request(method, path, **kwargs)
        check_documented(method, response.request.url.path, response)
        return response

    async def get(self, path: str) -> httpx.Response:
        return await self.request("GET", path)

    async def post(self, path: str, body: Any) -> httpx.Response:
        return await self.request("POST", path, json=body)

    async def register(self, worker_id: str = "w1", **kwargs: Any) -> httpx.Response:
        response = await self.post("/register", registration_payload(worker_id, **kwargs))
        assert response.status_code == 200, response.text
        return response

    async def workers(self) -> dict[str, dict[str, Any]]:
        """``/workers`` keyed by worker id."""
        listing = (await self.get("/workers")).json()["workers"]
        return {entry["worker_id"]: entry for entry in listing}

    async def route(self, verb: str = "classify", capability: str = "image.classify") -> str | None:
        """The routed worker's id, ``None`` for no_worker_available, :data:`UNKNOWN` for 404."""
        response = await self.post("/route", {"verb": verb, "capability": capability})
        if response.status_code == 503:
            assert response.json()["error"] == "no_worker_available", response.text
            return None
        if response.status_code == 404:
            assert response.json()["error"] == "unknown_capability", response.text
            return UNKNOWN
        assert response.status_code == 200, response.text
        return response.json()["worker_id"]  # type: ignore[no-any-return]

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


@contextlib.asynccontextmanager
async def running(
    config: ServiceConfig | None = None,
    *,
    registry: CapabilityRegistry | None = None,
    clock: FakeClock | None = None,
    service_clock: Callable[[], float] | None = None,
    wrap: Callable[[Starlette], Any] | None = None,
    lifespan: bool = True,
) -> AsyncIterator[Controller]:
    """Create the app with a fake clock, run its lifespan, and yield a :class:`Controller`.

    ``service_clock``, when given, is what the app reads instead of ``clock``
    (e.g. an ``AnchoredClock`` whose monotonic source is ``clock``; the
    controller's :meth:`~Controller.advance` still moves ``clock``).
    ``wrap`` puts an ASGI app around it (e.g. to add a TLS extension).
    """
    clock = clock or FakeClock()
    app = create_app(registry, config=config or ServiceConfig(), clock=service_clock or clock)
    outer = wrap(app) if wrap is not None else app
    transport = httpx.ASGITransport(app=outer)
    async with contextlib.AsyncExitStack() as stack:
        if lifespan:
            await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://test")
        )
        yield Controller(app, client, clock)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


class WithClientCertificate:
    """An ASGI wrapper that hands the app a client certificate, as the TLS layer would."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.pem: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.pem is not None:
            scope = {**scope, "extensions": {"tls": {"client_cert_chain": [self.pem]}}}
        await self.app(scope, receive, send)


class CertificateAuthority:
    """A CA issuing client certificates with any URI SANs (trustme cannot add URI SANs).

    Its certificate is a real CA's (:func:`crank_registry_asgi.certs.make_authority`)
    and its leaves carry what a client certificate needs to verify (basic
    constraints, key usage, client-auth EKU, key identifiers), so they pass
    ``cryptography``'s client verification unless made to fail it.
    """

    def __init__(
        self,
        common_name: str = "crank test CA",
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> None:
        # Backdated a day, as its leaves are (see issue).
        start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
        authority = certs.make_authority(common_name, not_before=start, not_after=not_after)
        self.certificate = authority.certificate
        self.key = authority.private_key
        self.name = self.certificate.subject

    @property
    def pem(self) -> str:
        """The CA certificate, PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def issue(
        self,
        *uris: str,
        dns: tuple[str, ...] = (),
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> str:
        """A PEM certificate for ``uris`` (URI SANs) and ``dns`` names.

        Valid by default from a day before to a day after: a test module's
        time read at import (``NOW``) still lies within it when the whole
        suite takes long to reach the test.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri) for uri in uris]
        names += [x509.DNSName(name) for name in dns]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - datetime.timedelta(days=1))
            .not_valid_after(not_after or now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        return certificate.public_bytes(serialization.Encoding.PEM).decode()

    def worker(self, name: str) -> str:
        """A worker's certificate, ``spiffe://crank.local/worker/NAME``."""
        return self.issue(f"spiffe://crank.local/worker/{name}")
