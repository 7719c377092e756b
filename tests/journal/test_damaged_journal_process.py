"""A real ``crank-registry serve`` started on a damaged journal (DESIGN, Hardening: Journal).

Each kind of damage costs at most the workers of its line: a flipped bit in
the first snapshot part, checksummed parts whose values the wire refuses,
and a stale snapshot appended after newer state, which is reported with its
line number and ignored.
"""

from __future__ import annotations

import json
import pathlib
import time
import zlib
from typing import Any

import httpx
import pytest

from crank_registry import (
    CapabilityRegistry,
    Snapshot,
    WorkerRecord,
    encode_event,
    encode_snapshot,
)
from crank_registry_asgi.journal import JOURNAL_NAME
from tests.builders import capability
from tests.cli.helpers import free_port, serving

pytestmark = pytest.mark.slow

#: What each checksummed part after the second holds instead of a valid value.
REFUSED_VALUES: list[tuple[str, Any]] = [
    ("verb", "a:b"),
    ("version", "not-semver"),
    ("max_concurrency", -5),
    ("requires_gpu", "yes"),
]


def with_capability_value(part: bytes, field: str, value: Any) -> bytes:
    """``part`` with its own (last) capability's ``field`` set to ``value``, checksummed again."""
    data = json.loads(part)
    del data["crc32"]
    data["capabilities"][-1][field] = value
    body = json.dumps(data, separators=(",", ":")).encode()[:-1]
    return body + b',"crc32":%d}\n' % zlib.crc32(body)


def damaged_journal() -> bytes:
    # Heard from just now: no sweep of the started controller evicts them
    # before the test reads /workers (T0 is years ago: they would be due).
    now = time.time()
    registry = CapabilityRegistry()
    for i in range(12):
        offered = [capability(f"service.s{i // 2}")]  # one of its own per part
        registry.register(f"s{i}", f"http://10.0.0.{i + 1}:8080", offered, now=now)
    stale = encode_snapshot(Snapshot(2, (WorkerRecord("old", "http://h:1", (capability(),), now),)))
    part0, part1, *rest = encode_snapshot(registry.snapshot(), part_size=2)
    # One bit flipped inside a worker id ("s0" -> "r0"): still JSON, so only
    # the checksum can tell (a flip elsewhere may break the JSON instead).
    assert part0.count(b'"s0"') == 1
    flipped = part0.replace(b'"s0"', b'"%c0"' % (ord("s") ^ 0x01))
    lines = [flipped, part1]
    lines += [
        with_capability_value(p, f, v) for p, (f, v) in zip(rest, REFUSED_VALUES, strict=True)
    ]
    later = CapabilityRegistry()
    later.apply_snapshot(registry.snapshot())
    lines += [encode_event(e) for e in later.register("n1", "http://h:2", [capability()], now=now)]
    lines += stale  # line 8: revision 2, after revision 13
    lines += [encode_event(e) for e in later.register("n2", "http://h:3", [capability()], now=now)]
    return b"".join(lines)


def test_each_damage_costs_only_the_workers_of_its_line(tmp_path: pathlib.Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / JOURNAL_NAME).write_bytes(damaged_journal())
    port = free_port()
    args = ["--insecure", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--state-dir", str(state_dir), "--log-level", "info"]
    with serving(args, tmp_path / "controller.log", port=port, scheme="http") as server:
        response = httpx.get(f"{server.url}/workers", timeout=30.0)
        assert response.status_code == 200, response.text
        assert [w["worker_id"] for w in response.json()["workers"]] == ["s2", "s3", "n1", "n2"]
        assert server.stop() == 0
        skipped = [line for line in server.log().splitlines() if "journal line skipped" in line]
    assert [line.split(" line=")[1].split()[0] for line in skipped] == [
        "1",
        "3",
        "4",
        "5",
        "6",
        "8",
    ]
    assert "checksum" in skipped[0]
    for line, (field, _) in zip(skipped[1:5], REFUSED_VALUES, strict=True):
        assert field in line, line
    assert "stale snapshot: revision 2" in skipped[5]
