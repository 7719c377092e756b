"""``crank-registry serve --policy FILE``: refused at start when invalid, re-read when changed."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from crank_registry_asgi.cli import build_parser, main
from tests.builders import registration_payload
from tests.cli.helpers import clean_environment, command, free_port, serving

ROUTE = {"verb": "classify", "capability": "image.classify"}


def test_an_invalid_policy_file_refuses_to_start_naming_file_rule_and_field(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[[rule]]\nidentity = "*"\nallow = ["*"]\n\n[[rule]]\nidentity = "*"\n')
    result = subprocess.run(
        command("serve", "--insecure", "--port", str(free_port()), "--policy", str(policy)),
        check=False,
        capture_output=True,
        text=True,
        env=clean_environment(),
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    # One line, after the --insecure warning.
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [
        f"crank-registry serve: error: {policy}: rule[1] needs allow or deny (or both) "
        "(given by --policy)"
    ]


def test_a_changed_policy_file_applies_while_serving(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('default = "deny"\n')
    port = free_port()
    args = ["--insecure", "--port", str(port), "--policy", str(policy)]
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
        (["--policy-watch-interval", "0"], "--policy-watch-interval"),
        (["--policy-watch-interval", "2"], "--policy-watch-interval needs --policy"),
    ],
)
def test_bad_policy_flags_are_usage_errors(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--insecure", *flags])
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err
