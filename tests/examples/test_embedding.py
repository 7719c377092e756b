"""The three embedding examples run as programs and show what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_example(module: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_in_process_drives_the_core_with_explicit_time() -> None:
    output = run_example("examples.in_process")
    assert "four routes, round robin: ['a', 'b', 'a', 'b']" in output
    assert "next deadline: t=60s" in output
    assert "b is silent; three routes go to ['a', 'a', 'a']" in output
    assert "states {'a': 'healthy', 'b': 'unhealthy'}" in output
    # After a sweep, the next deadline is a true one, not one already past.
    assert "t=  75s  cleanup_stale -> unhealthy" in output
    assert "t= 110s  cleanup_stale -> nothing" in output
    assert "t= 110s  next deadline: t=120s, when b becomes evictable" in output
    assert "t= 125s  cleanup_stale -> evicted" in output
    assert "workers left: ['a']" in output
    assert "a is unverified and still routable: route -> a" in output
    assert "heartbeat from a -> worker_not_registered" in output
    assert output.rstrip().endswith("a is healthy")


def test_embed_in_app_mounts_the_registry_under_a_prefix() -> None:
    output = run_example("examples.embed_in_app")
    assert "POST /registry/register -> 200" in output
    assert "POST /registry/route    -> 200 {'worker_id': 'docs-1'" in output
    assert "'healthy_workers': ['docs-1']" in output
    assert "POST /registry/route (pdf) -> 404" in output  # no worker offers it
    assert "{'app': 'my shop', 'registry': {'workers': 1, 'routable': 1}}" in output


def test_tracing_console_prints_one_trace_across_three_hops() -> None:
    output = run_example("examples.tracing_console")
    call = output.split("spans of one call", 1)[1]
    spans = re.findall(r"trace=(\w{32}) span=(\w{16}) parent=(\S{16}) (\w+) +(.+)", call)
    by_name = {
        name.strip(): (trace, span, parent, kind) for trace, span, parent, kind, name in spans
    }
    caller = by_name["caller: greet Ada"]
    server = by_name["POST /execute"]
    forward = by_name["POST greet hello"]
    worker = by_name["invoke greet hello"]
    assert len({caller[0], server[0], forward[0], worker[0]}) == 1
    assert (server[2], forward[2], worker[2]) == (caller[1], server[1], forward[1])
    assert (server[3], forward[3], worker[3]) == ("SERVER", "CLIENT", "SERVER")
    assert "answer: 200 {'result': {'greeting': 'Hello, Ada!'}}" in output
