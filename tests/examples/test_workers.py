"""The nine worker programs: capabilities, handlers through the invocation app, settings."""

from __future__ import annotations

import argparse
import base64
import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from crank_registry import CapabilityRegistry, CapabilitySchema, structure, unstructure
from crank_worker_client.serving import invocation_app
from examples.workers import WORKER_NAMES
from examples.workers._runner import (
    describe_capabilities,
    parse_settings,
    server_config,
    worker_url,
)
from examples.workers.logic.png_colour import encode_png
from tests.examples.helpers import invoke, ndjson, running

pytestmark = pytest.mark.anyio


def load(name: str) -> ModuleType:
    return importlib.import_module(f"examples.workers.{name}")


def test_there_are_nine_workers_with_distinct_capabilities() -> None:
    keys = [c.key for name in WORKER_NAMES for c in load(name).CAPABILITIES]
    assert len(WORKER_NAMES) == 9
    assert len(set(keys)) == len(keys) == 9
    assert set(keys) == {
        ("greet", "hello"),
        ("stream", "text"),
        ("convert", "markdown_to_html"),
        ("classify", "email.spam"),
        ("search", "documents"),
        ("create", "zettel.note"),
        ("search", "zettel.notes"),
        ("link", "zettel.links"),
        ("classify", "image.color"),
    }


@pytest.mark.parametrize("name", WORKER_NAMES)
def test_capabilities_are_complete_and_registrable(name: str) -> None:
    for capability in load(name).CAPABILITIES:
        assert capability.input_schema["type"] == "object"
        assert capability.input_schema["required"]
        assert capability.input_schema["additionalProperties"] is False
        assert capability.output_schema["properties"]
        assert capability.version == "1.0.0"
        assert capability.requires_gpu is False
        assert capability.max_concurrency >= 1
        # The wire form round-trips through the registry's strict converter.
        assert structure(unstructure(capability), CapabilitySchema) == capability
    registry = CapabilityRegistry()
    registry.register(name, "https://127.0.0.1:8443", load(name).CAPABILITIES, now=0.0)
    for capability in load(name).CAPABILITIES:
        assert registry.route(capability.verb, capability.name, now=0.0) is not None


def app_of(name: str, tmp_path: Path) -> Any:
    module = load(name)
    options = argparse.Namespace(db=tmp_path / "zettel.sqlite3", corpus=None)
    if name == "semantic_search":
        from examples.workers.logic.tfidf import CORPUS

        options.corpus = CORPUS
    return invocation_app(module.make_handlers(options), module.CAPABILITIES)


async def test_hello_world(tmp_path: Path) -> None:
    async with running(app_of("hello_world", tmp_path)) as client:
        ok = await invoke(client, "greet", "hello", {"name": "Ada", "language": "de"})
        bad = await invoke(client, "greet", "hello", {"name": "Ada", "language": "xx"})
        blank = await invoke(client, "greet", "hello", {"name": "  "})
    assert ok.json() == {"result": {"greeting": "Hallo, Ada!"}}
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_payload"
    assert blank.status_code == 422 and "empty" in blank.json()["message"]


async def test_streaming(tmp_path: Path) -> None:
    async with running(app_of("streaming", tmp_path)) as client:
        response = await invoke(client, "stream", "text", {"text": "Hi, you.", "delay_ms": 1})
        bad = await invoke(client, "stream", "text", {"text": ""})
    assert response.headers["content-type"] == "application/x-ndjson"
    assert ndjson(response) == [
        {"index": 0, "token": "Hi"},
        {"index": 1, "token": ","},
        {"index": 2, "token": "you"},
        {"index": 3, "token": "."},
        {"done": True, "count": 4},
    ]
    assert bad.status_code == 422


async def test_document_conversion(tmp_path: Path) -> None:
    async with running(app_of("document_conversion", tmp_path)) as client:
        response = await invoke(
            client, "convert", "markdown_to_html", {"markdown": "# Hi\n\n*<b>*"}
        )
    assert response.json() == {"result": {"html": "<h1>Hi</h1>\n<p><em>&lt;b&gt;</em></p>"}}


async def test_email_classifier(tmp_path: Path) -> None:
    async with running(app_of("email_classifier", tmp_path)) as client:
        spam = await invoke(
            client,
            "classify",
            "email.spam",
            {"subject": "WINNER", "body": "Claim your free prize now, click here"},
        )
        ham = await invoke(
            client, "classify", "email.spam", {"body": "Agenda for the design review on Thursday"}
        )
    assert spam.json()["result"]["label"] == "spam"
    assert spam.json()["result"]["spam_probability"] > 0.9
    assert ham.json()["result"]["label"] == "ham"


async def test_semantic_search(tmp_path: Path) -> None:
    async with running(app_of("semantic_search", tmp_path)) as client:
        response = await invoke(
            client,
            "search",
            "documents",
            {"query": "retry with jitter after an outage", "limit": 2},
        )
    results = response.json()["result"]["results"]
    assert results[0]["id"] == "backoff"
    assert results[0]["title"] == "Exponential backoff with jitter"
    assert len(results) <= 2
    assert results[0]["score"] >= results[-1]["score"] > 0


async def test_the_three_zettel_workers_share_the_store(tmp_path: Path) -> None:
    create, search, link = (
        app_of(n, tmp_path) for n in ("zettel_create", "zettel_search", "zettel_link")
    )
    async with running(create) as creator:
        first = await invoke(
            creator,
            "create",
            "zettel.note",
            {"title": "Registry", "body": "Routes work.", "tags": ["Infra"]},
        )
        second = await invoke(
            creator,
            "create",
            "zettel.note",
            {"title": "Gateway", "body": "Forwards to the registry."},
        )
    assert first.json()["result"]["id"] == 1
    assert second.json()["result"]["id"] == 2
    assert first.json()["result"]["tags"] == ["infra"]
    async with running(search) as searcher:
        found = await invoke(searcher, "search", "zettel.notes", {"query": "registry"})
        tagged = await invoke(searcher, "search", "zettel.notes", {"query": "", "tag": "infra"})
    assert [n["id"] for n in found.json()["result"]["notes"]] == [1, 2]
    assert [n["title"] for n in tagged.json()["result"]["notes"]] == ["Registry"]
    async with running(link) as linker:
        linked = await invoke(linker, "link", "zettel.links", {"source": 2, "target": 1})
        missing = await invoke(linker, "link", "zettel.links", {"source": 2, "target": 9})
        itself = await invoke(linker, "link", "zettel.links", {"source": 2, "target": 2})
        bad_relation = await invoke(
            linker, "link", "zettel.links", {"source": 2, "target": 1, "relation": "Not OK"}
        )
    assert linked.json() == {
        "result": {
            "link": {"source": 2, "target": 1, "relation": "related"},
            "backlinks": [{"source": 2, "target": 1, "relation": "related"}],
        }
    }
    assert missing.status_code == 404 and missing.json()["error"] == "unknown_note"
    assert itself.status_code == 422 and itself.json()["error"] == "invalid_payload"
    assert bad_relation.status_code == 422


async def test_image_classifier(tmp_path: Path) -> None:
    png = encode_png(4, 4, [(20, 40, 200)] * 12 + [(250, 250, 250)] * 4)
    async with running(app_of("image_classifier", tmp_path)) as client:
        ok = await invoke(
            client, "classify", "image.color", {"png_base64": base64.b64encode(png).decode()}
        )
        not_base64 = await invoke(client, "classify", "image.color", {"png_base64": "***"})
        not_png = await invoke(
            client, "classify", "image.color", {"png_base64": base64.b64encode(b"GIF89a").decode()}
        )
    assert ok.json() == {
        "result": {
            "color": "blue",
            "rgb": [20, 40, 200],
            "hex": "#1428c8",
            "share": 0.75,
            "width": 4,
            "height": 4,
        }
    }
    assert not_base64.status_code == 422 and not_base64.json()["error"] == "invalid_image"
    assert not_png.status_code == 422 and "signature" in not_png.json()["message"]


def test_settings_from_flags_and_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    monkeypatch.setenv("CONTROLLER_URL", "https://localhost:9443")
    monkeypatch.setenv("WORKER_HTTPS_PORT", "8443")
    monkeypatch.setenv("WORKER_CERT_PATH", str(tmp_path / "cert.pem"))
    monkeypatch.setenv("WORKER_KEY_PATH", str(tmp_path / "key.pem"))
    monkeypatch.setenv("CA_CERT_PATH", str(tmp_path / "ca.pem"))
    settings, _ = parse_settings("hello_world", [])
    assert (settings.controller_url, settings.port, settings.worker_id) == (
        "https://localhost:9443",
        8443,
        "hello_world",
    )
    assert worker_url(settings, 8443) == "https://127.0.0.1:8443"
    settings, _ = parse_settings("hello_world", ["--port", "0", "--worker-id", "hello-2"])
    assert (settings.port, settings.worker_id) == (0, "hello-2")
    insecure, _ = parse_settings("hello_world", ["--insecure", "--host", "::1"])
    assert worker_url(insecure, 80) == "http://[::1]:80"


def test_missing_certificates_are_named_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for variable in ("WORKER_CERT_PATH", "WORKER_KEY_PATH", "CA_CERT_PATH"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(SystemExit):
        parse_settings("streaming", [])
    error = capsys.readouterr().err
    assert "certs/worker-streaming.pem" in error
    assert "crank-registry certs --out certs --worker streaming" in error


def test_help_describes_every_option_with_its_default_and_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for variable in ("CONTROLLER_URL", "WORKER_HTTPS_PORT", "ZETTEL_DB"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # one line per option
    with pytest.raises(SystemExit):
        parse_settings("zettel_link", ["--help"], load("zettel_link").add_arguments)
    lines = capsys.readouterr().out.splitlines()
    expected = {
        "--controller": ("env CONTROLLER_URL", "default: https://localhost:9000"),
        "--host": ("default: 127.0.0.1",),
        "--port": ("env WORKER_HTTPS_PORT", "default: 0"),
        "--worker-id": ("default: zettel_link",),
        "--certfile": ("env WORKER_CERT_PATH", "default: certs/worker-ID.pem"),
        "--keyfile": ("env WORKER_KEY_PATH", "default: certs/worker-ID.key"),
        "--ca-certs": ("env CA_CERT_PATH", "default: certs/ca.pem"),
        "--insecure": ("default: off",),
        "--db": ("env ZETTEL_DB", "default: state/zettel.sqlite3"),
    }
    for option, phrases in expected.items():
        [line] = [line for line in lines if line.strip().startswith(option + " ")]
        for phrase in phrases:
            assert phrase in line, (option, line)


def test_the_start_up_line_counts_capabilities_in_words() -> None:
    assert describe_capabilities(load("hello_world").CAPABILITIES) == "1 capability (greet:hello)"
    two = load("hello_world").CAPABILITIES + load("streaming").CAPABILITIES
    assert describe_capabilities(two) == "2 capabilities (greet:hello, stream:text)"


def test_hypercorn_logs_through_the_programs_handlers_only() -> None:
    # Left to its default, hypercorn adds its own handler to "hypercorn.error"
    # besides the root's, and "Running on ..." is logged twice.
    settings, _ = parse_settings("hello_world", ["--insecure"])
    logger = logging.getLogger("hypercorn.error")
    handlers = list(logger.handlers)
    config = server_config(settings, 3, shutdown_grace=1.0)
    assert config.log.error_logger is logger
    assert logger.handlers == handlers and logger.propagate
