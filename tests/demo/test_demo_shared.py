"""``python3 dev.py demo --shared``: two controllers on one Redis, one killed, as a user runs it."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import redis

from crank_registry_asgi.redis_store import StoreKeys
from examples.demo.processes import Processes
from examples.demo.shared import SharedSystem
from tests.demo.test_demo import CAPABILITIES, DEMO, ROOT, processes_mentioning, workdir_of
from tests.redis.helpers import machine_url, server_binary


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_the_shared_demo_passes_end_to_end() -> None:
    server_binary()  # the demo starts its own redis-server
    started = time.monotonic()
    result = subprocess.run(
        [*DEMO, "--shared"], cwd=ROOT, capture_output=True, text=True, timeout=90, check=False
    )
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert time.monotonic() - started < 90
    assert re.search(r"redis-server of the demo's own on 127\.0\.0\.1:\d+", output)
    assert "share one registry on Redis, key prefix crank-demo-" in output
    assert "controller-b knows all 9 too" in output
    assert "killing controller-a with SIGKILL: the workers' first controller" in output
    assert "routing goes on through controller-b: all 9 capabilities routed" in output
    assert re.search(
        r"all 9 agents failed over to controller-b \d+\.\d+ s after the kill .* "
        r"as heartbeats: 0 registered again",
        output,
    )
    assert "controller-a restarted: it loaded all 9 workers from Redis" in output
    summary = output.split("\nSummary\n", 1)[1]
    for verb, name in CAPABILITIES:
        assert re.search(rf"^{re.escape(verb)}:{re.escape(name)} +\w+ +\S", summary, re.M), summary
    assert "greet:hello (via controller-b)" in summary
    assert "404 unknown_capability" in summary
    assert "Demo passed" in output
    # Everything it started is gone: redis-server ran with --dir inside the workdir.
    workdir = workdir_of(output)
    assert not Path(workdir).exists()
    assert processes_mentioning(workdir) == []


def test_on_a_given_redis_the_demo_deletes_its_keys(tmp_path: Path) -> None:
    url = machine_url()
    system = SharedSystem(tmp_path, Processes(ROOT, tmp_path / "logs"), redis_given=url)
    keys = StoreKeys(system.prefix)
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        client.set(keys.epoch, "demo")
        client.xadd(keys.stream, {"v": "2"})
        system.stop_everything()
        assert client.exists(*keys.all()) == 0
    finally:
        client.delete(*keys.all())
        client.close()


def test_redis_without_shared_is_a_usage_error() -> None:
    result = subprocess.run(
        [*DEMO, "--redis", "redis://127.0.0.1:6379/0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--redis URL goes with --shared" in result.stderr
