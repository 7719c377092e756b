"""The epoch line: the name of a registry's history, kept by the journal."""

from __future__ import annotations

import pytest

from crank_registry import (
    CapabilityRegistry,
    EpochLine,
    JournalDecodeError,
    decode_line,
    encode_epoch,
    encode_event,
    encode_snapshot,
    replay,
)
from tests.builders import capability
from tests.core.helpers import T0


def test_an_epoch_line_round_trips() -> None:
    assert decode_line(encode_epoch("9f86d081884c7d65")) == (EpochLine("9f86d081884c7d65"),)


def test_replay_reports_the_last_epoch_and_applies_the_rest() -> None:
    source = CapabilityRegistry()
    events = source.register("w1", "https://w1:1", [capability("a", "run")], now=T0)
    lines = [
        encode_epoch("first"),
        *encode_snapshot(CapabilityRegistry().snapshot()),
        *(encode_event(event) for event in events),
        encode_epoch("second"),
    ]
    registry = CapabilityRegistry()
    result = replay(lines, registry)
    assert (result.epoch, result.lines_skipped, registry.revision) == ("second", 0, 1)


def test_a_journal_without_an_epoch_line_reports_none() -> None:
    source = CapabilityRegistry()
    events = source.register("w1", "https://w1:1", [capability("a", "run")], now=T0)
    result = replay([encode_event(event) for event in events], CapabilityRegistry())
    assert result.epoch is None


@pytest.mark.parametrize(
    "line",
    [
        b'{"v":2,"type":"epoch","epoch":""}\n',
        b'{"v":2,"type":"epoch","epoch":"a b"}\n',
        b'{"v":2,"type":"epoch","epoch":7}\n',
        b'{"v":2,"type":"epoch","epoch":"ab","extra":1}\n',
    ],
)
def test_a_malformed_epoch_line_is_damaged(line: bytes) -> None:
    with pytest.raises(JournalDecodeError, match="epoch"):
        decode_line(line)


def test_an_epoch_that_cannot_be_read_back_is_not_written() -> None:
    with pytest.raises(ValueError, match="epoch"):
        encode_epoch("not one\n")
