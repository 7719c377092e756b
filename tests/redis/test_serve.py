"""``crank-registry serve --redis``: controller processes sharing one registry on Redis."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis

from crank_registry_asgi.redis_store import StoreKeys
from tests.builders import registration_payload
from tests.cli.helpers import clean_environment, command, free_port
from tests.redis.helpers import machine_url, shared_controller, unique_prefix

pytestmark = pytest.mark.slow

ROUTE = {"verb": "classify", "capability": "image.classify"}


def wait_for(predicate: object, *, timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; the seconds it took."""
    started = time.monotonic()
    while not predicate():  # type: ignore[operator]
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)
    return time.monotonic() - started


def test_two_serve_processes_share_one_registry(tmp_path: Path) -> None:
    url = machine_url()
    with (
        unique_prefix(url) as prefix,
        shared_controller(tmp_path, url, prefix, "a") as a,
        shared_controller(tmp_path, url, prefix, "b") as b,
        httpx.Client(base_url=a.url) as on_a,
        httpx.Client(base_url=b.url) as on_b,
    ):
        assert on_a.post("/register", json=registration_payload("w1")).status_code == 200

        def routable_on_b() -> bool:
            return on_b.post("/route", json=ROUTE).status_code == 200

        wait_for(routable_on_b, timeout=5, what="w1 routable on B")
        assert on_b.post("/route", json=ROUTE).json()["worker_id"] == "w1"
        assert on_b.post("/deregister", json={"worker_id": "w1"}).status_code == 200
        wait_for(
            lambda: on_a.get("/health").json()["total_workers"] == 0, timeout=5, what="gone on A"
        )
        assert a.stop() == 0 and b.stop() == 0
    for server in (a, b):
        assert "Traceback" not in server.log()
        assert "redis store loaded" in server.log()
        # The journal is not used with --redis.
        assert not (tmp_path / server.log_path.stem / "registry.jsonl").exists()


def test_killing_the_lease_holder_moves_the_sweep_and_evicts_once(tmp_path: Path) -> None:
    url = machine_url()
    lease_period = 1.0
    timings = ["--heartbeat-interval", "0.5", "--unhealthy-after", "1.5", "--evict-after", "3"]
    timings += ["--redis-lease-period", str(lease_period)]
    keys_client = redis.Redis.from_url(url)
    with (
        unique_prefix(url) as prefix,
        shared_controller(tmp_path, url, prefix, "a", *timings) as a,
    ):
        keys = StoreKeys(prefix)
        wait_for(lambda: keys_client.get(keys.lease) == b"a", timeout=5, what="A holds the lease")
        with (
            shared_controller(tmp_path, url, prefix, "b", *timings) as b,
            httpx.Client(base_url=a.url) as on_a,
            httpx.Client(base_url=b.url) as on_b,
        ):
            assert on_a.post("/register", json=registration_payload("w1")).status_code == 200
            a.process.send_signal(signal.SIGKILL)
            a.process.wait()
            taken = wait_for(
                lambda: keys_client.get(keys.lease) == b"b", timeout=5, what="B takes the lease"
            )
            # Within one lease period (with room for a loaded machine's scheduling).
            assert taken <= lease_period + 0.5, taken
            wait_for(
                lambda: on_b.get("/health").json()["total_workers"] == 0,
                timeout=10,
                what="w1 evicted by B",
            )
            lines = b"".join(
                fields[b"changes"]
                for _, fields in keys_client.xrange(keys.stream)
                if b"changes" in fields
            )
            assert lines.count(b'"type":"unhealthy"') == 1
            assert lines.count(b'"type":"evicted"') == 1
            assert "sweeper lease taken controller_id=b" in b.log()
    keys_client.close()


def test_redis_flags_are_checked_before_starting(tmp_path: Path) -> None:
    def serve(*args: str, **environment: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command("serve", "--insecure", "--state-dir", str(tmp_path), *args),
            check=False,
            capture_output=True,
            text=True,
            env=clean_environment(**environment),
            timeout=60,
        )

    lonely = serve("--redis-lease-period", "2")
    assert lonely.returncode == 2
    assert "--redis-lease-period needs --redis (or CRANK_REDIS_URL)" in lonely.stderr
    # A prefix without a Redis to use it on would be ignored: refused instead.
    lonely_prefix = serve("--redis-prefix", "other")
    assert lonely_prefix.returncode == 2
    assert "--redis-prefix needs --redis (or CRANK_REDIS_URL)" in lonely_prefix.stderr
    no_journal = serve("--redis", "redis://127.0.0.1:1/0", "--journal-compact-min-bytes", "4096")
    assert no_journal.returncode == 2
    assert "--journal-compact-min-bytes has no journal to compact with --redis" in no_journal.stderr
    wrong = serve(CRANK_REDIS_URL="http://127.0.0.1:6379")
    assert wrong.returncode == 2
    assert "CRANK_REDIS_URL: expected a redis://HOST:PORT/DB" in wrong.stderr
    prefix = serve("--redis", "redis://127.0.0.1:1/0", "--redis-prefix", "a{b}")
    assert prefix.returncode == 2 and "--redis-prefix" in prefix.stderr
    unreachable = serve("--redis", "redis://127.0.0.1:1/0", "--port", str(free_port()))
    assert unreachable.returncode == 2, unreachable.stderr
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
