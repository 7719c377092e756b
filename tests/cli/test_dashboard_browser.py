"""GET /ui in a real headless Chromium against a real ``crank-registry serve``.

The browser opens the dashboard, sees a registered worker, and sees it leave
when it deregisters, without reloading the page (the feed brings the change).
Needs ``chromium`` and ``chromium-driver`` (Debian packages) and ``selenium``:
skipped without them, failed without them when ``CI=true`` (``.ci/run``
installs them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from time import monotonic
from typing import Any

import httpx
import pytest

from tests.builders import capability_payload, registration_payload
from tests.cli.helpers import ServerProcess, free_port, require_tool, serving

pytestmark = pytest.mark.slow

#: Generous for a loaded 2-core machine; a long poll answers a change at once.
DEADLINE_S = 30.0


def _selenium() -> Any:
    try:
        import selenium.webdriver
    except ImportError:
        reason = "selenium is not installed (pip install -r requirements-dev.txt)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must have it", pytrace=False)
        pytest.skip(reason)
    return selenium.webdriver


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium driven by chromedriver, with the page's console log kept."""
    webdriver = _selenium()
    chromium = require_tool("chromium", package="chromium")
    chromedriver = require_tool("chromedriver", package="chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def _serve(tmp_path: Path, *timings: str) -> Iterator[ServerProcess]:
    port = free_port()
    args = ["--insecure", "--port", str(port), "--state-dir", str(tmp_path / "state"), *timings]
    with serving(args, tmp_path / "server.log", port=port, scheme="http") as server:
        yield server


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[ServerProcess]:
    yield from _serve(tmp_path)


@pytest.fixture
def forgetful_controller(tmp_path: Path) -> Iterator[ServerProcess]:
    """A controller that keeps only the last change for its feed (--feed-window 1)."""
    yield from _serve(tmp_path, "--feed-window", "1")


@pytest.fixture
def quick_controller(tmp_path: Path) -> Iterator[ServerProcess]:
    """A controller whose workers turn unhealthy after two seconds of silence."""
    timings = ("--heartbeat-interval", "1", "--unhealthy-after", "2", "--evict-after", "600")
    yield from _serve(tmp_path, *timings)


@pytest.fixture
def preserving_controller(tmp_path: Path) -> Iterator[ServerProcess]:
    """A quick controller whose self-preservation starts when both of two workers fall silent."""
    timings = ("--heartbeat-interval", "1", "--unhealthy-after", "2", "--evict-after", "600")
    yield from _serve(tmp_path, *timings, "--self-preservation-min-workers", "2")


# Read in one script: the page re-renders its tables as changes come, so an element
# found by one command may be gone by the next (a stale element).
_TEXTS = "return Array.from(document.querySelectorAll(arguments[0]), (e) => e.innerText.trim());"


def _rows(driver: Any, css: str) -> list[str]:
    """The text of every element ``css`` selects, cells separated by spaces."""
    return [" ".join(text.split()) for text in driver.execute_script(_TEXTS, css)]


def _cells(driver: Any, css: str) -> list[str]:
    """The text of every element ``css`` selects, as it is."""
    return list(driver.execute_script(_TEXTS, css))


def _text(driver: Any, css: str) -> str:
    """The text of the element ``css`` selects ("" when there is none)."""
    texts = _rows(driver, css)
    return texts[0] if texts else ""


def _served_feed(url: str) -> str:
    """How the page follows a controller at ``url`` by itself: its badge once live."""
    document = httpx.get(f"{url}/openapi.json").json()
    streams = (
        "text/event-stream" in document["paths"]["/watch"]["get"]["responses"]["200"]["content"]
    )
    return "live (events)" if streams else "live (long poll)"


@pytest.mark.parametrize(
    "page", ["/ui", "/ui?feed=poll"], ids=["the controller's feed", "the long poll"]
)
def test_a_worker_appears_then_leaves_without_a_reload(
    browser: Any, controller: ServerProcess, page: str
) -> None:
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(browser, DEADLINE_S)
    api = httpx.Client(base_url=controller.url, timeout=10.0)
    ocr = capability_payload("document.ocr", "extract", version="2.0.0")
    assert api.post("/register", json=registration_payload("w1")).status_code == 200
    registered = registration_payload("w2", capabilities=[ocr])
    assert api.post("/register", json=registered).status_code == 200

    browser.get(f"{controller.url}{page}")
    wait.until(lambda d: _rows(d, '#worker-rows tr[data-worker-id="w1"]'))
    assert [row.split()[0] for row in _rows(browser, "#worker-rows tr")] == ["w1", "w2"]
    assert "healthy" in _rows(browser, '#worker-rows tr[data-worker-id="w1"]')[0]
    wait.until(lambda d: _text(d, "#worker-counts") == "2 / 2")
    feed = "live (long poll)" if page.endswith("poll") else _served_feed(controller.url)
    wait.until(lambda d: _text(d, "#feed-status") == feed)
    capabilities = _rows(browser, "#capability-rows tr")
    assert capabilities == [
        "classify image.classify 1.0.0 1 / 1",
        "extract document.ocr 2.0.0 1 / 1",
    ]

    # A mark that a reload of the page would wipe out.
    browser.execute_script("window.notReloaded = true;")
    assert api.post("/deregister", json={"worker_id": "w1"}).status_code == 200

    wait.until(lambda d: not _rows(d, '#worker-rows tr[data-worker-id="w1"]'))
    assert [row.split()[0] for row in _rows(browser, "#worker-rows tr")] == ["w2"]
    assert browser.execute_script("return window.notReloaded === true;")
    wait.until(lambda d: _cells(d, "#change-rows tr:first-child td")[:1] == ["3"])
    revision, time, change, worker = _cells(browser, "#change-rows tr:first-child td")
    assert (revision, change, worker) == ("3", "deregistered", "w1")
    assert re.fullmatch(r"\d\d:\d\d:\d\d", time), time
    assert _rows(browser, "#capability-rows tr") == ["extract document.ocr 2.0.0 1 / 1"]
    wait.until(lambda d: _text(d, "#worker-counts") == "1 / 1")
    assert _text(browser, "#revision") == "3"

    # Nothing the page did was refused by the browser (its content security policy
    # included) or failed.
    problems = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert problems == []
    api.close()


def test_pages_and_filters_of_a_larger_fleet(browser: Any, controller: ServerProcess) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(browser, DEADLINE_S)
    ocr = [capability_payload("document.ocr", "extract")]
    with httpx.Client(base_url=controller.url, timeout=10.0) as api:
        for index in range(60):
            body = registration_payload(f"w{index:02d}", capabilities=ocr if index % 3 else None)
            assert api.post("/register", json=body).status_code == 200

        browser.get(f"{controller.url}/ui")
        wait.until(lambda d: len(_rows(d, "#worker-rows tr")) == 50)
        Select(browser.find_element(By.ID, "page-size")).select_by_visible_text("25")
        wait.until(lambda d: len(_rows(d, "#worker-rows tr")) == 25)
        assert _text(browser, "#page-position") == "page 1 of 3 · 1\u201325"
        browser.find_element(By.ID, "next-page").click()
        wait.until(lambda d: _text(d, "#page-position") == "page 2 of 3 · 26\u201350")
        shown = [row.split()[0] for row in _rows(browser, "#worker-rows tr")]
        assert shown == [f"w{index:02d}" for index in range(25, 50)]

        # A capability's row filters the table by it: a third of the fleet, one page.
        browser.find_element(
            By.CSS_SELECTOR, '#capability-rows tr[data-capability="classify:image.classify"]'
        ).click()
        wait.until(lambda d: _text(d, "#worker-matching") == "(20 of 60)")
        shown = [row.split()[0] for row in _rows(browser, "#worker-rows tr")]
        assert shown == [f"w{index:02d}" for index in range(0, 60, 3)]
        assert _text(browser, "#page-position") == "page 1 of 1 · 1\u201320"

        # A state filter too; a worker that deregisters leaves the filtered page.
        Select(browser.find_element(By.ID, "filter-state")).select_by_value("healthy")
        wait.until(lambda d: _text(d, "#worker-matching") == "(20 of 60)")
        assert api.post("/deregister", json={"worker_id": "w03"}).status_code == 200
        wait.until(lambda d: not _rows(d, '#worker-rows tr[data-worker-id="w03"]'))
        wait.until(lambda d: _text(d, "#worker-matching") == "(19 of 59)")
        Select(browser.find_element(By.ID, "filter-state")).select_by_value("unhealthy")
        wait.until(lambda d: _text(d, "#worker-matching") == "(0 of 59)")
        assert _rows(browser, "#worker-rows tr") == []
        assert browser.find_element(By.ID, "workers-empty").is_displayed()


def test_a_silent_worker_turns_unhealthy_and_back_on_the_page(
    browser: Any, quick_controller: ServerProcess
) -> None:
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(browser, DEADLINE_S)
    row = '#worker-rows tr[data-worker-id="w1"]'
    counts = '#capability-rows tr[data-capability="classify:image.classify"] td.number'
    with httpx.Client(base_url=quick_controller.url, timeout=10.0) as api:
        assert api.post("/register", json=registration_payload("w1")).status_code == 200
        browser.get(f"{quick_controller.url}/ui")

        def heard_and_shown_healthy(driver: Any) -> bool:
            # Heartbeats until the page shows the worker, however long it takes to load.
            assert api.post("/heartbeat", json={"worker_id": "w1"}).status_code == 200
            return _rows(driver, f"{row} td.state") == ["healthy"]

        wait.until(heard_and_shown_healthy)
        browser.execute_script("window.notReloaded = true;")
        # Silent past --unhealthy-after: the sweep's change reaches the page.
        wait.until(lambda d: _rows(d, f"{row} td.state") == ["unhealthy"])
        assert _rows(browser, counts) == ["0 / 1"]
        assert api.post("/heartbeat", json={"worker_id": "w1"}).status_code == 200
        wait.until(lambda d: _rows(d, f"{row} td.state") == ["healthy"])
        assert _rows(browser, counts) == ["1 / 1"]
        assert browser.execute_script("return window.notReloaded === true;")
        changes = [" ".join(r.split()[2:]) for r in _rows(browser, "#change-rows tr")]
        assert changes[:2] == ["healthy w1", "unhealthy w1"]
        assert changes[-1] == "registered w1"  # from before the page opened


def test_the_banner_says_self_preservation_while_it_lasts(
    browser: Any, preserving_controller: ServerProcess
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(browser, DEADLINE_S)
    workers = ("w1", "w2")
    with httpx.Client(base_url=preserving_controller.url, timeout=10.0) as api:

        def heard() -> None:
            for worker_id in workers:
                assert api.post("/heartbeat", json={"worker_id": worker_id}).status_code == 200

        for worker_id in workers:
            assert api.post("/register", json=registration_payload(worker_id)).status_code == 200
        browser.get(f"{preserving_controller.url}/ui")
        # Heard for longer than --unhealthy-after: a sweep has started a window with both.
        started = monotonic()

        def heard_and_shown(driver: Any) -> bool:
            heard()
            return monotonic() - started > 3 and _text(driver, "#worker-counts") == "2 / 2"

        wait.until(heard_and_shown)
        assert not browser.find_element(By.ID, "self-preservation").is_displayed()
        # Both fall silent: the controller takes it that it is the one cut off.
        wait.until(lambda d: d.find_element(By.ID, "self-preservation").is_displayed())
        assert api.get("/health").json()["self_preservation"] is True
        assert _text(browser, "#self-preservation").startswith(
            "Self-preservation: the controller is not evicting silent workers"
        )

        def heard_and_hidden(driver: Any) -> bool:
            heard()
            return not driver.find_element(By.ID, "self-preservation").is_displayed()

        wait.until(heard_and_hidden)  # heartbeats came back: it ended
        assert api.get("/health").json()["self_preservation"] is False
    problems = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert problems == []


def test_a_drained_worker_shows_draining_and_back_without_a_reload(
    browser: Any, controller: ServerProcess
) -> None:
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(browser, DEADLINE_S)
    row = '#worker-rows tr[data-worker-id="w1"]'
    counts = '#capability-rows tr[data-capability="classify:image.classify"] td.number'
    with httpx.Client(base_url=controller.url, timeout=10.0) as api:
        for worker_id in ("w1", "w2"):
            assert api.post("/register", json=registration_payload(worker_id)).status_code == 200
        browser.get(f"{controller.url}/ui")
        wait.until(lambda d: _rows(d, f"{row} td.state") == ["healthy"])
        wait.until(lambda d: _rows(d, counts) == ["2 / 2"])
        browser.execute_script("window.notReloaded = true;")
        assert api.post("/workers/w1/drain").status_code == 200
        wait.until(lambda d: _rows(d, f"{row} td.state") == ["draining"])
        wait.until(lambda d: _rows(d, counts) == ["1 / 2"])
        assert api.post("/workers/w1/undrain").status_code == 200
        wait.until(lambda d: _rows(d, f"{row} td.state") == ["healthy"])
        wait.until(lambda d: _rows(d, counts) == ["2 / 2"])
        assert browser.execute_script("return window.notReloaded === true;")
        changes = [" ".join(r.split()[2:]) for r in _rows(browser, "#change-rows tr")]
        assert changes[:2] == ["undrained w1", "draining w1"]
    problems = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert problems == []


def test_a_feed_that_lost_its_place_reloads_the_data_not_the_page(
    browser: Any, forgetful_controller: ServerProcess
) -> None:
    # The long poll: the browser's offline mode stops its next ask (an event stream
    # already open would go on receiving, and never lose its place).
    page = "/ui?feed=poll"
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(browser, DEADLINE_S)
    reads = (
        "return performance.getEntriesByType('resource')"
        ".filter((e) => /\\/capabilities/.test(e.name)).length;"
    )
    with httpx.Client(base_url=forgetful_controller.url, timeout=10.0) as api:
        assert api.post("/register", json=registration_payload("w0")).status_code == 200
        browser.get(f"{forgetful_controller.url}{page}")
        wait.until(
            lambda d: _rows(d, "#worker-rows tr") and _text(d, "#feed-status").startswith("live")
        )
        assert browser.execute_script(reads) == 1
        browser.execute_script("window.notReloaded = true;")
        # The browser offline while five workers register: the feed keeps only the
        # last change, so the page's place in it is gone (410) and it reads
        # everything again.
        browser.set_network_conditions(
            offline=True, latency=0, download_throughput=-1, upload_throughput=-1
        )
        for index in range(1, 6):
            body = registration_payload(f"w{index}")
            assert api.post("/register", json=body).status_code == 200
        browser.set_network_conditions(
            offline=False, latency=0, download_throughput=-1, upload_throughput=-1
        )
        wanted = [f"w{index}" for index in range(6)]
        wait.until(lambda d: [r.split()[0] for r in _rows(d, "#worker-rows tr")] == wanted)
        wait.until(lambda d: _text(d, "#revision") == "6")
        wait.until(lambda d: _text(d, "#feed-status").startswith("live"))
        assert browser.execute_script(reads) >= 2  # the capabilities were read again
        assert browser.execute_script("return window.notReloaded === true;")
