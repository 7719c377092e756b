"""The access policy over HTTP: callers' certificate identities, ``--trusted-gateway``, reloads.

Identities are handed to the app as the TLS layer would (:class:`WithClientCertificate`);
every answer is checked against the OpenAPI document by the test client.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from crank_registry import PolicyFileError
from crank_registry_asgi import ServiceConfig, create_app
from tests.builders import capability_payload
from tests.service.helpers import (
    CertificateAuthority,
    Controller,
    WithClientCertificate,
    running,
)

pytestmark = pytest.mark.anyio

ROUTE = {"verb": "classify", "capability": "image.classify"}
WEB = "spiffe://crank.local/client/web"
GATEWAY = "spiffe://crank.local/client/platform"

POLICY = """
default = "deny"

[[rule]]
identity = "spiffe://crank.local/client/web"
allow = ["classify:image.*"]

[[rule]]
identity = "spiffe://crank.local/client/platform"
allow = ["*"]
"""


class Caller:
    """A controller whose requests carry the certificate of ``as_(identity)``."""

    def __init__(self, api: Controller, wrapper: WithClientCertificate) -> None:
        self.api = api
        self.wrapper = wrapper
        self.authority = CertificateAuthority()

    def as_(self, identity: str | None) -> Caller:
        self.wrapper.pem = None if identity is None else self.authority.issue(identity)
        return self

    async def route(self, **fields: Any) -> httpx.Response:
        return await self.api.post("/route", {**ROUTE, **fields})


@contextlib.asynccontextmanager
async def controller(policy: str | None, tmp_path: Path, **fields: Any) -> AsyncIterator[Caller]:
    """A controller under ``policy`` (a TOML text; ``None``: no --policy) with one worker."""
    path = None
    if policy is not None:
        path = tmp_path / "policy.toml"
        path.write_text(policy)
    wrapper: list[WithClientCertificate] = []

    def wrap(app: Starlette) -> WithClientCertificate:
        wrapper.append(WithClientCertificate(app))
        return wrapper[0]

    async with running(ServiceConfig(policy_file=path, **fields), wrap=wrap) as api:
        await api.register("w1", capabilities=[capability_payload()])
        yield Caller(api, wrapper[0])


async def test_a_denied_route_is_403_policy_denied_with_the_reason(tmp_path: Path) -> None:
    async with controller(POLICY, tmp_path) as caller:
        allowed = await caller.as_(WEB).route()
        assert allowed.status_code == 200, allowed.text
        for identity in ("spiffe://crank.local/client/other", None):
            denied = await caller.as_(identity).route()
            assert denied.status_code == 403, denied.text
            body = denied.json()
            assert body["error"] == "policy_denied"
            assert body["reason"] == "no rule matches 'classify:image.classify'; default deny"
            assert (body["verb"], body["capability"]) == ("classify", "image.classify")
            assert "Retry-After" not in denied.headers


async def test_explain_of_a_denied_route_names_policy(tmp_path: Path) -> None:
    async with controller(POLICY, tmp_path) as caller:
        denied = await caller.as_(None).route(explain=True)
        assert denied.status_code == 403
        assert denied.json()["explain"] == {
            "strategy": "round_robin",
            "candidates": [],
            "removed": [{"worker_id": "w1", "reason": "policy"}],
        }


async def test_a_worker_with_required_capabilities_routes_only_to_them(tmp_path: Path) -> None:
    async with controller(None, tmp_path) as caller:
        await caller.api.register(
            "caller",
            capabilities=[
                capability_payload(
                    verb="call", name="caller", required_capabilities=["ocr:text.read"]
                )
            ],
        )
        denied = await caller.as_("spiffe://crank.local/worker/caller").route()
        assert denied.status_code == 403
        assert denied.json()["error"] == "policy_denied"
        assert "required_capabilities" in denied.json()["reason"]
        # Without a policy file anyone else routes anywhere.
        assert (await caller.as_(WEB).route()).status_code == 200
        assert (await caller.as_(None).route()).status_code == 200


async def test_a_body_requester_identity_from_an_untrusted_caller_is_403(tmp_path: Path) -> None:
    async with controller(POLICY, tmp_path, trusted_gateways=[GATEWAY]) as caller:
        for identity in (WEB, None):
            refused = await caller.as_(identity).route(requester_identity=WEB)
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"] == "forbidden"
            assert "--trusted-gateway" in refused.json()["message"]


async def test_a_trusted_gateway_routes_as_its_user(tmp_path: Path) -> None:
    async with controller(POLICY, tmp_path, trusted_gateways=[GATEWAY]) as caller:
        caller.as_(GATEWAY)
        assert (await caller.route()).status_code == 200  # as itself: rule[1]
        assert (await caller.route(requester_identity=WEB)).status_code == 200
        denied = await caller.route(requester_identity="spiffe://crank.local/client/other")
        assert denied.status_code == 403
        assert denied.json()["error"] == "policy_denied"


async def test_a_changed_policy_file_is_applied_and_an_invalid_one_kept_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with controller(POLICY, tmp_path) as caller:
        watcher = caller.api.service.policy_watcher
        assert watcher is not None
        assert not await watcher.check()  # unchanged
        assert (await caller.as_(None).route()).status_code == 403
        (tmp_path / "policy.toml").write_text('default = "allow"\n')
        assert await watcher.check()
        assert (await caller.as_(None).route()).status_code == 200
        (tmp_path / "policy.toml").write_text('default = "deny"\n[[rule]]\nidentity = 3\n')
        with caplog.at_level(logging.ERROR, logger="crank_registry_asgi.policy_file"):
            assert not await watcher.check()
            assert not await watcher.check()  # logged once
        assert [r.getMessage() for r in caplog.records if "policy file" in r.getMessage()] == [
            "policy file not reloaded, previous rules kept: "
            f"{tmp_path / 'policy.toml'}: rule[0].identity must be a non-empty string "
            '(a glob over SPIFFE IDs, e.g. "spiffe://example.org/client/*"), got 3'
        ]
        assert (await caller.as_(None).route()).status_code == 200  # the previous rules


def test_an_invalid_policy_file_stops_the_app(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[[rule]]\nidentity = "*"\nallow = "classify:*"\n')
    with pytest.raises(PolicyFileError, match=r"policy\.toml: rule\[0\]\.allow must be"):
        create_app(config=ServiceConfig(policy_file=path))
    with pytest.raises(PolicyFileError, match="cannot read the policy file"):
        create_app(config=ServiceConfig(policy_file=tmp_path / "missing.toml"))


@pytest.mark.parametrize(
    ("gateways", "says"),
    [
        (["platform"], "not a SPIFFE ID"),
        ("spiffe://crank.local/client/p", "not a SPIFFE ID"),  # a string is not a list of IDs
        ([5], "must be SPIFFE IDs"),
        (["spiffe://evil.local/client/p"], "trust domain 'evil.local' is not the trusted"),
    ],
)
def test_trusted_gateways_must_be_identities_of_the_trust_domain(gateways: Any, says: str) -> None:
    with pytest.raises(ValueError, match="trusted_gateways") as refused:
        ServiceConfig(trusted_gateways=gateways)
    assert says in str(refused.value)
    assert ServiceConfig(trusted_gateways=["spiffe://crank.local/client/p"]).trusted_gateways


async def test_a_plain_route_by_an_identified_caller_is_not_told_of_options(
    tmp_path: Path,
) -> None:
    """The caller's identity reaches the core as the requester, not as an option it asked for."""
    async with controller(POLICY, tmp_path) as caller:
        caller.api.advance(61)  # w1 silent past unhealthy_after
        answer = await caller.as_(WEB).route()
        assert answer.status_code == 503, answer.text
        assert answer.json()["message"] == "no healthy worker for 'classify' on 'image.classify'"
        optioned = await caller.as_(WEB).route(version=">=1")
        assert "meets the route's options" in optioned.json()["message"]
