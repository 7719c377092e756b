"""document_conversion: a small, safe Markdown to HTML converter.

The subset: ATX headings (``#`` to ``######``), paragraphs, fenced code
blocks (```` ``` ```` with an optional language), block quotes (``>``),
unordered (``-``, ``*``, ``+``) and ordered (``1.``) lists without nesting,
horizontal rules (``---``, ``***``, ``___``), and inline code, ``**strong**``,
``*emphasis*`` / ``_emphasis_``, ``[links](https://...)`` and backslash
escapes. All text is HTML-escaped; a link whose URL has a scheme other than
http, https or mailto (``javascript:``, ``data:``...) is rendered as its
text only.
"""

from __future__ import annotations

import html
import re

__all__ = ["markdown_to_html"]

_HEADING = re.compile(r"(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
_RULE = re.compile(r"(?:(?:\*[ \t]*){3,}|(?:-[ \t]*){3,}|(?:_[ \t]*){3,})$")
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[ \t]*$")
_BULLET = re.compile(r"[-*+][ \t]+(.*)$")
_NUMBERED = re.compile(r"\d{1,9}[.)][ \t]+(.*)$")
_QUOTE = re.compile(r">[ \t]?(.*)$")

_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_ESCAPABLE = re.compile(r"\\([!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])")
_LINK = re.compile(r"\[([^\]\n]+)\]\(([^()\s]+)\)")
_STRONG = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__")
_EMPHASIS = re.compile(r"\*(?=\S)(.+?)(?<=\S)\*|(?<![\w])_(?=\S)(.+?)(?<=\S)_(?![\w])")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_SAFE_SCHEMES = frozenset({"http", "https", "mailto"})
_PLACEHOLDER = re.compile("\x00(\\d+)\x00")


def markdown_to_html(source: str) -> str:
    """Convert ``source`` (the subset in the module docstring) to an HTML fragment."""
    # NUL is used for placeholders below; Markdown replaces it anyway.
    lines = source.replace("\x00", "\ufffd").replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(_blocks(lines.split("\n")))


def _blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    paragraph: list[str] = []

    def flush_paragraph() -> None:
        if paragraph:
            text = "\n".join(line.strip() for line in paragraph)
            out.append(f"<p>{_inline(text)}</p>")
            paragraph.clear()

    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        fence = _FENCE.match(stripped)
        if fence:
            flush_paragraph()
            body: list[str] = []
            index += 1
            while index < len(lines) and lines[index].strip() != "```":
                body.append(lines[index])
                index += 1
            index += 1  # the closing fence (an unclosed block runs to the end)
            language = fence.group(1)
            attribute = f' class="language-{html.escape(language)}"' if language else ""
            code = html.escape("\n".join(body), quote=False)
            out.append(f"<pre><code{attribute}>{code}</code></pre>")
            continue
        if not stripped:
            flush_paragraph()
            index += 1
            continue
        heading = _HEADING.match(stripped)
        if heading:
            flush_paragraph()
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
            index += 1
            continue
        if _RULE.match(stripped):
            flush_paragraph()
            out.append("<hr>")
            index += 1
            continue
        if _QUOTE.match(stripped):
            flush_paragraph()
            quoted: list[str] = []
            while index < len(lines):
                match = _QUOTE.match(lines[index].strip())
                if not match:
                    break
                quoted.append(match.group(1))
                index += 1
            inner = "\n".join(_blocks(quoted))
            out.append(f"<blockquote>\n{inner}\n</blockquote>")
            continue
        for pattern, tag in ((_BULLET, "ul"), (_NUMBERED, "ol")):
            if pattern.match(stripped):
                flush_paragraph()
                items: list[str] = []
                while index < len(lines):
                    match = pattern.match(lines[index].strip())
                    if not match:
                        break
                    items.append(f"<li>{_inline(match.group(1))}</li>")
                    index += 1
                out.append(f"<{tag}>\n" + "\n".join(items) + f"\n</{tag}>")
                break
        else:
            paragraph.append(line)
            index += 1
    flush_paragraph()
    return out


def _inline(text: str) -> str:
    stash: list[str] = []

    def keep(fragment: str) -> str:
        stash.append(fragment)
        return f"\x00{len(stash) - 1}\x00"

    # Code spans and escaped characters are final: nothing inside them is markup.
    text = _CODE_SPAN.sub(
        lambda m: keep(f"<code>{html.escape(m.group(2).strip(), quote=False)}</code>"), text
    )
    text = _ESCAPABLE.sub(lambda m: keep(html.escape(m.group(1))), text)
    text = html.escape(text)
    text = _LINK.sub(_link, text)
    text = _STRONG.sub(lambda m: f"<strong>{m.group(1) or m.group(2)}</strong>", text)
    text = _EMPHASIS.sub(lambda m: f"<em>{m.group(1) or m.group(2)}</em>", text)
    return _PLACEHOLDER.sub(lambda m: stash[int(m.group(1))], text)


def _link(match: re.Match[str]) -> str:
    label, url = match.group(1), match.group(2)
    # The URL is already HTML-escaped (safe inside a quoted attribute); its
    # scheme decides whether it becomes a link at all.
    scheme = _SCHEME.match(html.unescape(url))
    if scheme and scheme.group(1).lower() not in _SAFE_SCHEMES:
        return label
    return f'<a href="{url}">{label}</a>'
