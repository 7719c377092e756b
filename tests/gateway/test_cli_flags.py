"""``crank-registry serve --gateway`` flags: parsed, checked, and refused without --gateway."""

from __future__ import annotations

import pytest

from crank_registry_asgi.cli import build_parser, main


def test_gateway_flags_parse() -> None:
    args = build_parser().parse_args(
        ["serve", "--insecure", "--gateway", "--gateway-attempts", "5", "--gateway-timeout", "2.5"]
    )
    assert (args.gateway, args.gateway_attempts, args.gateway_timeout) == (True, 5, 2.5)


@pytest.mark.parametrize(
    "flags",
    [["--gateway-attempts", "0"], ["--gateway-attempts", "x"], ["--gateway-timeout", "-1"]],
)
def test_bad_gateway_values_are_usage_errors(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--insecure", "--gateway", *flags])
    assert exit_info.value.code == 2
    assert "--gateway-" in capsys.readouterr().err


def test_gateway_settings_without_gateway_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--insecure", "--gateway-attempts", "2"])
    assert exit_info.value.code == 2
    assert "need --gateway" in capsys.readouterr().err


def test_demo_is_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--keep-running" in capsys.readouterr().out
