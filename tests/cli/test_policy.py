"""``crank-registry serve --policy FILE``: refused at start when invalid, re-read when changed."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from crank_registry_asgi import cli
from crank_registry_asgi.cli import build_parser, main
from tests.builders import registration_payload
from tests.cli.helpers import clean_environment, command, free_port, serving
from tests.cli.test_client_commands import columns
from tests.cli.test_serve import pki, worker_tls

__all__ = ["pki"]  # a fixture, shared with the serve tests

ROUTE = {"verb": "classify", "capability": "image.classify"}


@pytest.mark.slow
def test_an_invalid_policy_file_refuses_to_start_naming_file_rule_and_field(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[[rule]]\nidentity = "*"\nallow = ["*"]\n\n[[rule]]\nidentity = "*"\n')
    result = subprocess.run(
        command(
            "serve",
            "--insecure",
            "--port",
            str(free_port()),
            "--state-dir",
            str(tmp_path / "state"),
            "--policy",
            str(policy),
        ),
        check=False,
        capture_output=True,
        text=True,
        env=clean_environment(),
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert not (tmp_path / "state").exists()
    # One line, after the --insecure warning.
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [
        f"crank-registry serve: error: {policy}: rule[1] needs allow or deny (or both) "
        "(given by --policy)"
    ]


@pytest.mark.slow
def test_a_changed_policy_file_applies_while_serving(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('default = "deny"\n')
    port = free_port()
    args = ["--insecure", "--port", str(port), "--state-dir", str(tmp_path / "state")]
    args += ["--policy", str(policy)]
    with (
        serving(
            [*args, "--policy-watch-interval", "0.2"],
            tmp_path / "server.log",
            port=port,
            scheme="http",
        ) as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        assert client.post("/register", json=registration_payload("w1")).status_code == 200
        denied = client.post("/route", json=ROUTE)
        assert denied.status_code == 403
        assert denied.json()["error"] == "policy_denied"
        policy.write_text('default = "allow"\n')
        deadline = time.monotonic() + 30
        while (answer := client.post("/route", json=ROUTE)).status_code == 403:
            assert time.monotonic() < deadline, f"not reloaded:\n{server.log()}"
            time.sleep(0.1)
        assert answer.status_code == 200, answer.text
        assert "policy file reloaded" in server.log()


def test_policy_flags_parse() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--policy",
            "p.toml",
            "--policy-watch-interval",
            "0.5",
            "--trusted-gateway",
            "spiffe://crank.local/client/a",
            "--trusted-gateway",
            "spiffe://crank.local/client/b",
        ]
    )
    assert (args.policy, args.policy_watch_interval) == (Path("p.toml"), 0.5)
    assert args.trusted_gateway == [
        "spiffe://crank.local/client/a",
        "spiffe://crank.local/client/b",
    ]


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--trusted-gateway", "platform"], "expected a SPIFFE ID"),
        (
            ["--trusted-gateway", "spiffe://evil.local/client/p"],
            "--trusted-gateway 'spiffe://evil.local/client/p' its trust domain 'evil.local'",
        ),
        (["--policy-watch-interval", "0"], "--policy-watch-interval"),
        (["--policy-watch-interval", "2"], "--policy-watch-interval needs --policy"),
    ],
)
def test_bad_policy_flags_are_usage_errors(
    flags: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--insecure", "--state-dir", str(tmp_path / "state"), *flags])
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.slow
def test_under_mutual_tls_the_certificate_is_the_requester_and_a_trusted_gateway_routes_for_others(
    pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'default = "deny"\n\n'
        '[[rule]]\nidentity = "spiffe://crank.local/client/web"\nallow = ["classify:*"]\n'
    )
    port = free_port()
    args = ["--port", str(port), "--state-dir", str(tmp_path / "state"), "--policy", str(policy)]
    args += ["--certfile", str(pki / "controller.pem"), "--keyfile", str(pki / "controller.key")]
    args += ["--ca-certs", str(pki / "ca.pem")]
    args += ["--trusted-gateway", "spiffe://crank.local/client/ops"]
    tls = ["--cert", str(pki / "client-ops.pem"), "--key", str(pki / "client-ops.key")]
    tls += ["--ca-certs", str(pki / "ca.pem")]
    with serving(
        args, tmp_path / "server.log", port=port, scheme="https", verify=worker_tls(pki, "a")
    ) as server:
        answer = httpx.post(
            f"{server.url}/register",
            json=registration_payload("a", worker_url="https://a.example:8443"),
            verify=worker_tls(pki, "a"),
        )
        assert answer.status_code == 200, answer.text
        route = ["route", "classify", "image.classify", "--controller", server.url, *tls]
        # As itself, ops matches no rule: denied, and the explanation says by what.
        assert cli.main([*route, "--explain"]) == 1
        out, err = capsys.readouterr()
        assert columns(out) == [
            ["strategy: round_robin"],
            ["WORKER ID", "OUTCOME"],
            ["a", "removed: policy"],
        ]
        assert "403 policy_denied" not in err  # the client's own words, one line
        assert err.count("\n") == 1
        assert "the access policy denies routing to classify:image.classify" in err
        assert "default deny" in err
        # A trusted gateway routes for its user, whom rule[0] allows.
        web = ["--requester-identity", "spiffe://crank.local/client/web", "--json"]
        assert cli.main([*route, *web]) == 0
        assert json.loads(capsys.readouterr().out)["worker_id"] == "a"
        # A worker's certificate is no gateway: 403 forbidden.
        refused = httpx.post(
            f"{server.url}/route",
            json={**ROUTE, "requester_identity": "spiffe://crank.local/client/web"},
            verify=worker_tls(pki, "b"),
        )
        assert refused.status_code == 403
        assert refused.json()["error"] == "forbidden"
        assert "--trusted-gateway" in refused.json()["message"]
