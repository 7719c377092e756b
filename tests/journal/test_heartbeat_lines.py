"""The journal's fast reading of heartbeat lines gives exactly what the converter gives."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from crank_registry import (
    JOURNAL_FORMAT_VERSION,
    HeartbeatReceived,
    ValidationError,
    decode_heartbeat_line,
    encode_event,
    structure_event,
)

worker_ids = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-",
    min_size=1,
    max_size=128,
)
times = st.floats(allow_nan=False, allow_infinity=False)


def _by_the_converter(line: bytes) -> HeartbeatReceived | None:
    """What the general path reads from ``line`` (None: it refuses it)."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.pop("v", None) != JOURNAL_FORMAT_VERSION:
        return None
    try:
        event = structure_event(data)
    except ValidationError:
        return None
    return event if isinstance(event, HeartbeatReceived) else None


@given(worker_ids, times)
def test_every_heartbeat_line_reads_back_as_the_converter_reads_it(
    worker_id: str, at: float
) -> None:
    line = encode_event(HeartbeatReceived(worker_id, at))
    fast = decode_heartbeat_line(line)
    assert fast is not None, line
    assert fast == _by_the_converter(line) == HeartbeatReceived(worker_id, at)
    assert type(fast.at) is float


@given(worker_ids, times, st.data())
def test_a_changed_heartbeat_line_is_read_alike_or_left_to_the_converter(
    worker_id: str, at: float, data: st.DataObject
) -> None:
    line = bytearray(encode_event(HeartbeatReceived(worker_id, at)))
    index = data.draw(st.integers(0, len(line) - 1))
    line[index : index + 1] = data.draw(st.binary(max_size=3))
    fast = decode_heartbeat_line(bytes(line))
    # Either it is not a heartbeat line as the encoder writes one (the
    # converter reads it), or both read the same event.
    assert fast is None or fast == _by_the_converter(bytes(line))


def test_numbers_json_refuses_are_left_to_the_converter() -> None:
    for at in (b"01.5", b"1.", b".5", b"1e400", b"NaN", b"Infinity", b"+1.0"):
        line = b'{"v":%d,"type":"heartbeat","worker_id":"w","at":%s}\n' % (
            JOURNAL_FORMAT_VERSION,
            at,
        )
        assert decode_heartbeat_line(line) is None, at
