"""Helpers for the controller's tests: a documented client, bodies, certificates."""

from __future__ import annotations

import contextlib
import datetime
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jsonschema
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from crank_registry import CapabilityRegistry
from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, create_app
from crank_registry_asgi.openapi import openapi_document
from tests.builders import registration_payload

DOCUMENT = openapi_document()
_ROOT = {"components": DOCUMENT["components"]}


def documented_schema(method: str, path: str, status: int) -> dict[str, Any]:
    """The JSON Schema the document gives for this answer (asserts it is documented)."""
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
    """Assert that a response is JSON and agrees with the document; return its body."""
    assert response.status_code != 500, response.text
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    schema = documented_schema(method, path, response.status_code)
    jsonschema.validate(body, {**schema, **_ROOT}, cls=jsonschema.Draft202012Validator)
    return body


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
        """The routed worker's id, or ``None`` for no_worker_available."""
        response = await self.post("/route", {"verb": verb, "capability": capability})
        if response.status_code == 503:
            return None
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
    wrap: Callable[[Starlette], Any] | None = None,
    lifespan: bool = True,
) -> AsyncIterator[Controller]:
    """Create the app with a fake clock, run its lifespan, and yield a :class:`Controller`.

    ``wrap`` puts an ASGI app around it (e.g. to add a TLS extension).
    """
    clock = clock or FakeClock()
    app = create_app(registry, config=config or ServiceConfig(), clock=clock)
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
    """Issues client certificates with URI SANs (trustme cannot add URI SANs)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crank test CA")])

    def issue(self, *uris: str, dns: tuple[str, ...] = ()) -> str:
        """A PEM certificate for ``uris`` (URI SANs) and ``dns`` names."""
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
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        return certificate.public_bytes(serialization.Encoding.PEM).decode()

    def worker(self, name: str) -> str:
        """A worker's certificate, ``spiffe://crank.local/worker/NAME``."""
        return self.issue(f"spiffe://crank.local/worker/{name}")
