"""The settings' shared checks: one rule for a count and one for a duration."""

from __future__ import annotations

import pytest

from crank_registry_asgi.cli import build_parser
from crank_registry_asgi.config import (
    GatewayConfig,
    ServiceConfig,
    is_positive_int,
    is_positive_number,
    is_redis_prefix,
    is_redis_url,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, True), (2**70, True), (0, False), (-3, False), (True, False), (1.0, False), ("1", False)],
)
def test_a_count_is_a_whole_number_of_at_least_one(value: object, expected: bool) -> None:
    assert is_positive_int(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.5, True),
        (3, True),
        (0, False),
        (-1.0, False),
        (float("nan"), False),
        (float("inf"), False),
        (10**400, False),  # finite as an int, not as a float
        (True, False),
        ("2", False),
    ],
)
def test_a_duration_is_a_finite_number_above_zero(value: object, expected: bool) -> None:
    assert is_positive_number(value) is expected


def test_an_int_too_large_for_a_float_is_a_value_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match="connect_timeout must be a finite number > 0"):
        GatewayConfig(connect_timeout=10**400)
    with pytest.raises(ValueError, match="max_body_bytes must be an integer >= 1"):
        ServiceConfig(max_body_bytes=0)


@pytest.mark.parametrize("flag", ["--gateway-timeout", "--heartbeat-interval"])
def test_the_command_applies_the_same_duration_rule(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--insecure", "--gateway", flag, "inf"])
    assert f"argument {flag}: must be a finite number of seconds > 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", True),
        ("rediss://user:secret@redis.internal:6380/1", True),
        ("unix:///run/redis.sock", True),
        ("http://127.0.0.1:6379", False),
        ("127.0.0.1:6379", False),
        (None, False),
    ],
)
def test_a_redis_url_is_one_redis_py_opens(url: object, expected: bool) -> None:
    assert is_redis_url(url) is expected
    if expected:
        assert ServiceConfig(redis_url=url).redis_url == url  # type: ignore[arg-type]
    elif url is not None:
        with pytest.raises(ValueError, match="redis_url must be a redis://"):
            ServiceConfig(redis_url=url)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [("crank", True), ("team-a.prod:v2", True), ("", False), ("a{b}", False), ("x" * 65, False)],
)
def test_a_redis_prefix_cannot_break_out_of_its_hash_tag(prefix: str, expected: bool) -> None:
    assert is_redis_prefix(prefix) is expected
    if not expected:
        with pytest.raises(ValueError, match="redis_prefix must be 1 to 64"):
            ServiceConfig(redis_prefix=prefix)
