"""``crank-registry serve --gateway`` flags: parsed, checked, and refused without --gateway."""

from __future__ import annotations

import pytest

from crank_registry_asgi.cli import build_parser, main


def test_gateway_flags_parse() -> None:
    flags = ["--gateway-attempts", "5", "--gateway-timeout", "2.5", "--gateway-queue", "0"]
    args = build_parser().parse_args(["serve", "--insecure", "--gateway", *flags])
    assert (args.gateway, args.gateway_attempts, args.gateway_timeout) == (True, 5, 2.5)
    assert args.gateway_queue == 0


@pytest.mark.parametrize(
    "flags",
    [
        ["--gateway-attempts", "0"],
        ["--gateway-attempts", "x"],
        ["--gateway-timeout", "-1"],
        ["--gateway-queue", "-1"],
        ["--gateway-queue", "many"],
    ],
)
def test_bad_gateway_values_are_usage_errors(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--insecure", "--gateway", *flags])
    assert exit_info.value.code == 2
    assert "--gateway-" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--gateway-attempts", "2"], ["--gateway-queue", "5"]])
def test_gateway_settings_without_gateway_are_refused(
    flag: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--insecure", *flag])
    assert exit_info.value.code == 2
    assert "need --gateway" in capsys.readouterr().err


def test_gateway_flags_fill_a_gateway_config_over_its_defaults(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from crank_registry_asgi import gateway, server
    from crank_registry_asgi.gateway import GatewayConfig

    configs: list[GatewayConfig] = []

    def capture(controller: object, config: GatewayConfig, **tls: object) -> object:
        configs.append(config)
        return controller

    monkeypatch.setattr(gateway, "serve_with_gateway", capture)
    monkeypatch.setattr(server, "run", lambda app, settings, **options: None)
    main(["serve", "--insecure", "--gateway"])
    main(["serve", "--insecure", "--gateway", "--gateway-timeout", "2.5"])
    main(["serve", "--insecure", "--gateway", "--gateway-queue", "7"])
    assert configs == [GatewayConfig(), GatewayConfig(timeout=2.5), GatewayConfig(queue_limit=7)]
    # The help says the same defaults.
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"refused ({GatewayConfig().max_attempts})" in help_text
    assert f"answering ({GatewayConfig().timeout:g})" in help_text
    assert f"503 overloaded ({GatewayConfig().queue_limit})" in help_text
