"""``POST /execute`` routes as its caller: the access policy applies to the gateway too."""

from __future__ import annotations

from pathlib import Path

import httpx
import jsonschema
import pytest

from crank_registry.testing import FakeClock
from crank_registry_asgi import ServiceConfig, create_app
from crank_registry_asgi.gateway import (
    EXECUTE_PATH,
    GatewayConfig,
    create_gateway_app,
    gateway_openapi_document,
)
from tests.gateway.helpers import (
    POLICY,
    FakeWorker,
    WorkerNetwork,
    execute,
    hello,
    register,
    serving,
)
from tests.service.helpers import CertificateAuthority, WithClientCertificate

pytestmark = pytest.mark.anyio

DOCUMENT = gateway_openapi_document()

RULES = """
default = "deny"

[[rule]]
identity = "spiffe://crank.local/client/web"
allow = ["greet:*"]
"""


async def test_execute_is_denied_or_allowed_by_the_callers_identity(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(RULES)
    network = WorkerNetwork()
    worker = network.add("w1.test", FakeWorker(serving({("greet", "hello"): hello})))
    controller = create_app(
        config=ServiceConfig(policy=POLICY, policy_file=path), clock=FakeClock()
    )
    app = create_gateway_app(controller, GatewayConfig(), transport=network)
    wrapper = WithClientCertificate(app)
    authority = CertificateAuthority()
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=wrapper), base_url="http://c"
        ) as client,
    ):
        await register(client, "w1", "https://w1.test:8443")
        denied = await execute(client)
        schema = DOCUMENT["paths"][EXECUTE_PATH]["post"]["responses"]["403"]["content"]
        jsonschema.validate(
            denied.json(),
            {**schema["application/json"]["schema"], "components": DOCUMENT["components"]},
            cls=jsonschema.Draft202012Validator,
        )
        assert denied.status_code == 403
        assert denied.json()["error"] == "policy_denied"
        assert denied.json()["reason"] == "no rule matches 'greet:hello'; default deny"
        assert worker.received == []
        wrapper.pem = authority.issue("spiffe://crank.local/client/web")
        allowed = await execute(client)
        assert allowed.status_code == 200, allowed.text
        assert allowed.json() == {"result": {"greeting": "Hello, Ada!"}}
