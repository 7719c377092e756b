"""Take ``docs/dashboard.png``: the dashboard of a controller with 10 000 workers.

Starts ``crank-registry serve --insecure`` on a free port with a state
directory of its own, registers the workers (over twelve capabilities, some
in two versions), keeps all but a few of them heartbeating with load
reports until the silent ones are unhealthy (``--unhealthy-after 150``), then opens ``/ui`` in a
headless Chromium and saves the page::

    .venv/bin/python docs/dashboard_screenshot.py [--workers 10000] [--out docs/dashboard.png]

Needs ``chromium``, ``chromium-driver`` and ``selenium`` (requirements-dev.txt),
like the dashboard's browser test. Takes three to five minutes on two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

#: ``(verb, capability, versions)`` of the fleet.
CAPABILITIES = (
    ("classify", "image.classify", ("1.4.0", "2.0.0")),
    ("detect", "image.objects", ("3.1.2",)),
    ("extract", "document.ocr", ("2.2.0", "2.3.0")),
    ("summarize", "text.summarize", ("1.0.0",)),
    ("translate", "text.translate", ("5.0.1",)),
    ("embed", "text.embed", ("0.9.0", "1.0.0")),
    ("transcribe", "audio.transcribe", ("1.1.0",)),
    ("generate", "text.generate", ("4.2.0",)),
    ("moderate", "text.moderate", ("1.3.0",)),
    ("resize", "image.resize", ("1.0.3",)),
    ("convert", "document.convert", ("2.0.0",)),
    ("search", "vector.search", ("1.8.0",)),
)

#: The share of workers that stop heartbeating (and so turn unhealthy).
SILENT_SHARE = 0.015
# Loose enough for a round of 10 000 heartbeats from one Python client on a busy machine.
HEARTBEAT_INTERVAL = "60"
UNHEALTHY_AFTER = "150"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def registration(index: int, rng: random.Random) -> dict[str, Any]:
    """Worker ``index``'s registration: one capability, in one of its versions."""
    verb, name, versions = CAPABILITIES[index % len(CAPABILITIES)]
    return {
        "worker_id": f"{name.split('.')[1]}-{index:05d}",
        "worker_url": f"https://10.{index // 250 % 256}.{index % 250}.{7 + index % 3}:8443",
        "capabilities": [
            {
                "name": name,
                "verb": verb,
                "version": rng.choice(versions),
                "input_schema": {"type": "object"},
                "output_schema": {"type": "object"},
                "requires_gpu": False,
                "max_concurrency": 8,
            }
        ],
    }


async def for_each(bodies: list[dict[str, Any]], path: str, client: httpx.AsyncClient) -> None:
    """POST every body to ``path``, 64 at a time; any answer but 200 stops the script."""
    queue = iter(bodies)

    async def sender() -> None:
        for body in queue:
            response = await client.post(path, json=body)
            if response.status_code != 200:
                raise SystemExit(f"{path} answered {response.status_code}: {response.text}")

    await asyncio.gather(*(sender() for _ in range(64)))


async def populate(url: str, workers: int) -> None:
    """Register ``workers``, heartbeat all but the silent ones until the silent are unhealthy.

    A heartbeat round is sent every interval; the picture is taken once the
    last silent worker has been silent for longer than ``unhealthy_after``.
    """
    rng = random.Random(13)
    registrations = [registration(index, rng) for index in range(workers)]
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        started = time.monotonic()
        await for_each(registrations, "/register", client)
        registered = time.monotonic()
        print(f"registered {workers} workers in {registered - started:.1f} s")
        speaking = [r["worker_id"] for r in registrations if rng.random() > SILENT_SHARE]
        ready = registered + float(UNHEALTHY_AFTER) + 5
        while True:
            round_started = time.monotonic()
            beats = [
                {
                    "worker_id": worker_id,
                    "load": {
                        "in_flight": rng.randint(0, 8),
                        "latency_p95_ms": round(rng.lognormvariate(4.0, 0.5), 1),
                        "error_rate": round(rng.random() * 0.02, 4),
                    },
                }
                for worker_id in speaking
            ]
            await for_each(beats, "/heartbeat", client)
            took = time.monotonic() - round_started
            print(f"heartbeats of {len(speaking)} workers in {took:.1f} s")
            if time.monotonic() >= ready:
                return
            pause = float(HEARTBEAT_INTERVAL) - took
            await asyncio.sleep(max(0.0, min(pause, ready - time.monotonic())))


def screenshot(url: str, out: Path) -> None:
    """Open the dashboard in a headless Chromium and save it as ``out``."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1280,1400",
    ):
        options.add_argument(argument)
    service = webdriver.ChromeService(shutil.which("chromedriver") or "chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(f"{url}/ui")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#worker-rows tr"))
        size = driver.find_element(By.ID, "page-size")
        size.find_element(By.CSS_SELECTOR, "option[value='25'], option:first-child").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#worker-rows tr")) == 25)
        time.sleep(1.5)  # let the strip's figures and ages settle for the picture
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    """Run the controller, fill it, take the picture."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("dashboard.png"))
    args = parser.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as state:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "crank_registry_asgi",
                "serve",
                "--insecure",
                "--port",
                str(port),
                "--state-dir",
                state,
                "--heartbeat-interval",
                HEARTBEAT_INTERVAL,
                "--unhealthy-after",
                UNHEALTHY_AFTER,
                "--evict-after",
                "3600",
                "--log-format",
                "json",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            asyncio.run(populate(url, args.workers))
            screenshot(url, args.out)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
