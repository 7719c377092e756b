"""GET /ui: the dashboard's files, served from the package with their media types.

What the page does in a browser is tested in a real one (tests/cli/test_dashboard_browser.py).
"""

from __future__ import annotations

import importlib.resources
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urljoin

import pytest

from crank_registry_asgi.dashboard import ASSETS, SECURITY_HEADERS
from tests.service.helpers import running
from tests.service.test_contract import mounted

pytestmark = pytest.mark.anyio

UI = Path(str(importlib.resources.files("crank_registry_asgi") / "ui"))
REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("path", "media_type", "file"),
    [
        ("/ui", "text/html; charset=utf-8", "index.html"),
        ("/ui/app.js", "text/javascript; charset=utf-8", "app.js"),
        ("/ui/style.css", "text/css; charset=utf-8", "style.css"),
    ],
)
async def test_each_file_is_served_with_its_media_type(
    path: str, media_type: str, file: str
) -> None:
    async with running() as api:
        response = await api.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.content == (UI / file).read_bytes()
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value


async def test_a_trailing_slash_leads_to_the_page() -> None:
    async with running() as api:
        response = await api.client.get("/ui/")
    assert response.status_code == 307
    assert response.headers["location"] == "http://test/ui"


def test_the_page_loads_its_own_files_by_relative_paths() -> None:
    page = (UI / "index.html").read_text()
    loaded = re.findall(r'(?:src|href)="(?!data:)([^"]+)"', page)
    assert sorted(loaded) == ["ui/app.js", "ui/style.css"]
    # Relative to the page /ui, they are the dashboard's other paths.
    assert sorted(urljoin("http://controller/ui", name) for name in loaded) == [
        f"http://controller{path}" for path in sorted(ASSETS) if path != "/ui"
    ]


@pytest.mark.parametrize("file", ["index.html", "app.js", "style.css"])
def test_nothing_is_fetched_from_elsewhere(file: str) -> None:
    # No CDN, no absolute URL: the page works offline and under a prefix.
    text = (UI / file).read_text()
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.IGNORECASE), file
    assert "@import" not in text


def test_the_script_reads_the_api_by_relative_paths() -> None:
    # "health", never "/health": a controller mounted under a prefix serves its page too.
    script = (UI / "app.js").read_text()
    asked = set(re.findall(r"getJson\(\s*[`\"]([a-z]+)", script))
    assert asked == {"health", "capabilities", "workers", "watch", "openapi"}
    assert not re.search(r"getJson\(\s*[`\"]/", script)


async def test_the_document_says_where_the_page_looks_for_the_event_stream() -> None:
    # The script reads paths["/watch"].get.responses["200"].content of /openapi.json
    # to choose between Server-Sent Events and the long poll (for a controller of an
    # older release, which serves only the long poll).
    script = (UI / "app.js").read_text()
    assert '.paths["/watch"].get.responses["200"].content' in script
    async with running() as api:
        document = (await api.get("/openapi.json")).json()
    content = document["paths"]["/watch"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"application/json", "text/event-stream"}


async def test_the_dashboard_of_a_mounted_controller() -> None:
    async with mounted() as client:
        page = await client.get("/crank/ui")
        assert page.status_code == 200
        for name in re.findall(r'(?:src|href)="(?!data:)([^"]+)"', page.text):
            asset = await client.get(urljoin("/crank/ui", name))
            assert asset.status_code == 200, name
        # The API paths the script asks for, relative to the page.
        health = await client.get(urljoin("/crank/ui", "health"))
        assert health.json()["status"] == "ok"


def test_no_ignore_rule_keeps_the_files_out_of_the_wheel() -> None:
    # hatchling takes the package folder whole, less what .gitignore ignores.
    git = shutil.which("git")
    if git is None or not (REPOSITORY / ".git").exists():
        pytest.skip("not a git checkout: no ignore rules to check")
    files = [str(UI / asset.file) for asset in ASSETS.values()]
    # check-ignore exits 1 when it ignores none of them, which is the point.
    ignored = subprocess.run(
        [git, "check-ignore", *files], check=False, cwd=REPOSITORY, capture_output=True, text=True
    )
    assert ignored.stdout == "", ignored.stdout
