"""The demo's calls: one per capability of the example workers, each with its check.

:func:`calls` yields them in the order the zettel workers need (a note is
created before it is searched for and linked). A check returns the short
answer shown in the summary, or raises :class:`ValueError` (or a
``KeyError``/``IndexError``/``TypeError`` from an answer of the wrong
shape) when the answer is not the one expected.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import httpx

from examples.workers.logic.png_colour import encode_png
from examples.workers.logic.tokens import detokenize

from .processes import DemoFailure
from .system import System

__all__ = ["Call", "calls", "check_stream"]

Check = Callable[[httpx.Response], str]


@attrs.frozen
class Call:
    """``POST /execute`` of ``payload`` to ``verb:capability``, and how to check the answer."""

    verb: str
    capability: str
    payload: Any
    check: Check

    @property
    def label(self) -> str:
        """``verb:capability``, as the summary shows it."""
        return f"{self.verb}:{self.capability}"


def _expect(condition: bool, seen: object) -> None:
    """A check of an answer (not an assert: it must hold under ``python -O`` too)."""
    if not condition:
        raise ValueError(f"got {seen!r}")


def _result(response: httpx.Response) -> Any:
    return response.json()["result"]


def check_stream(response: httpx.Response) -> str:
    """``stream:text``: the NDJSON lines of the tokens, then the count."""
    lines = [json.loads(line) for line in response.text.splitlines() if line]
    tokens = [line["token"] for line in lines[:-1]]
    expected = ["Workers", "register", ",", "heartbeat", "and", "serve", "."]
    _expect(tokens == expected, tokens)
    _expect(lines[-1] == {"done": True, "count": len(expected)}, lines[-1])
    return f"{len(lines)} NDJSON lines: {detokenize(tokens)}"


def _check_greeting(response: httpx.Response) -> str:
    greeting: str = _result(response)["greeting"]
    _expect(greeting == "Hello, Ada!", greeting)
    return greeting


def _check_html(response: httpx.Response) -> str:
    html: str = _result(response)["html"]
    _expect(html == "<h1>Demo</h1>\n<p>Safe <strong>HTML</strong> &lt;script&gt;</p>", html)
    return html.replace("\n", " ")


def _check_spam(response: httpx.Response) -> str:
    result = _result(response)
    _expect(result["label"] == "spam", result)
    return f"spam (p={result['spam_probability']:.3f})"


def _check_search(response: httpx.Response) -> str:
    results = _result(response)["results"]
    _expect(results[0]["id"] == "heartbeats", results)
    return f"1. {results[0]['title']} ({results[0]['score']:.2f})"


def _check_colour(response: httpx.Response) -> str:
    result = _result(response)
    _expect(result["color"] == "blue" and result["share"] == 0.75, result)
    return f"blue {result['hex']} ({result['share']:.0%} of 8x8)"


def _blue_png() -> str:
    """An 8 x 8 PNG, its top six rows blue and the rest white, as base64."""
    blue, white = (20, 40, 200), (250, 250, 250)
    return base64.b64encode(encode_png(8, 8, [blue] * 48 + [white] * 16)).decode()


def calls(system: System) -> Iterator[Call]:
    """The calls in order; the zettel ones use the notes that the earlier ones made."""
    notes: dict[str, int] = {}

    def check_created(response: httpx.Response) -> str:
        note = _result(response)
        _expect(note["title"] == "Warm cache" and note["tags"] == ["registry"], note)
        notes["first"] = note["id"]
        return f"note {note['id']} created"

    def check_found(response: httpx.Response) -> str:
        found = [note["id"] for note in _result(response)["notes"]]
        _expect(found == [notes["first"]], found)
        return f"found note {found[0]}"

    def check_linked(response: httpx.Response) -> str:
        result = _result(response)
        expected = [{"source": notes["second"], "target": notes["first"], "relation": "supports"}]
        _expect(result["backlinks"] == expected, result)
        return f"note {notes['second']} -> note {notes['first']} (supports)"

    yield Call("greet", "hello", {"name": "Ada"}, _check_greeting)
    yield Call(
        "stream",
        "text",
        {"text": "Workers register, heartbeat and serve.", "delay_ms": 10},
        check_stream,
    )
    yield Call(
        "convert", "markdown_to_html", {"markdown": "# Demo\n\nSafe **HTML** <script>"}, _check_html
    )
    yield Call(
        "classify",
        "email.spam",
        {"subject": "You won!", "body": "Claim your free prize now, click here"},
        _check_spam,
    )
    yield Call("search", "documents", {"query": "heartbeat health eviction"}, _check_search)
    yield Call(
        "create",
        "zettel.note",
        {
            "title": "Warm cache",
            "body": "Restored workers stay routable until they re-register.",
            "tags": ["registry"],
        },
        check_created,
    )
    # A second note to link from, made outside the table.
    response, _ = system.execute(
        "create", "zettel.note", {"title": "Heartbeats", "body": "Proof of life."}
    )
    if response.status_code != 200:
        raise DemoFailure(f"create:zettel.note answered {response.status_code}")
    notes["second"] = response.json()["result"]["id"]
    yield Call("search", "zettel.notes", {"query": "routable"}, check_found)
    yield Call(
        "link",
        "zettel.links",
        {"source": notes["second"], "target": notes["first"], "relation": "supports"},
        check_linked,
    )
    yield Call("classify", "image.color", {"png_base64": _blue_png()}, _check_colour)
