"""``serve --rate-limit RATE:BURST``: validated, and handed to the service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from crank_registry import RateLimit
from crank_registry_asgi import cli
from tests.builders import registration_payload
from tests.cli.helpers import free_port, serving
from tests.cli.test_cli import run_main
from tests.cli.test_serve import pki, worker_tls

__all__ = ["pki"]  # a fixture, shared with the serve tests


def test_the_flag_reaches_the_service(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from crank_registry_asgi import server

    started: list[Any] = []
    monkeypatch.setattr(server, "run", lambda app, settings, **options: started.append(app))
    state = ["--insecure", "--state-dir", str(tmp_path)]
    assert cli.main(["serve", *state]) == 0
    assert cli.main(["serve", *state, "--rate-limit", "2000:200"]) == 0
    unlimited, limited = (app.state.service for app in started)
    assert unlimited.config.rate_limit is None and unlimited.admission is None
    assert limited.config.rate_limit == RateLimit(2000, 200)
    assert limited.admission.limit == RateLimit(2000, 200)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("100", "expected RATE:BURST"),
        ("0:5", "RATE must be a finite number > 0"),
        ("fast:5", "RATE is not a number"),
        ("10:0", "BURST must be from 1 to"),
        ("1e6:10", "RATE must be at most 100000"),
        ("10:1.5", "BURST is not a whole number"),
    ],
)
def test_a_bad_value_exits_2_naming_the_flag_and_the_fix(
    value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_main(["serve", "--insecure", "--rate-limit", value], capsys)
    assert status == 2
    assert "argument --rate-limit" in err
    assert says in err
    assert "such as 100:20" in err


@pytest.mark.slow
def test_a_real_controller_limits_routes_per_certificate_identity(
    pki: Path, tmp_path: Path
) -> None:
    port = free_port()
    args = ["--port", str(port), "--state-dir", str(tmp_path / "state")]
    args += ["--certfile", str(pki / "controller.pem"), "--keyfile", str(pki / "controller.key")]
    args += ["--ca-certs", str(pki / "ca.pem")]
    # A token every 100 s: none comes back while the test runs.
    args += ["--rate-limit", "0.01:2"]
    a, b = worker_tls(pki, "a"), worker_tls(pki, "b")
    with serving(args, tmp_path / "server.log", port=port, scheme="https", verify=a) as server:
        with httpx.Client(base_url=server.url, verify=a) as as_a:
            # A storm of re-registrations from one identity: never limited.
            for _ in range(20):
                payload = registration_payload("a", worker_url="https://a.example:8443")
                assert as_a.post("/register", json=payload).status_code == 200
            route = {"verb": "classify", "capability": "image.classify"}
            assert [as_a.post("/route", json=route).status_code for _ in range(2)] == [200, 200]
            refused = as_a.post("/route", json=route)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"] == "rate_limited"
            assert 99 <= int(refused.headers["retry-after"]) <= 100
            assert "spiffe://crank.local/worker/a" in refused.json()["message"]
            # Without --redis, each controller process keeps its own buckets.
            assert as_a.get("/ready").json() == {
                "status": "ready",
                "store": "ok",
                "self_preservation": False,
                "rate_limit": {"mode": "local", "rate": 0.01, "burst": 2},
            }
        with httpx.Client(base_url=server.url, verify=b) as as_b:
            # The same address, another certificate: a bucket of its own.
            assert as_b.post("/route", json=route).status_code == 200
        assert server.stop() == 0, server.log()
