"""streaming: split a text into the tokens a streaming worker sends one by one."""

from __future__ import annotations

import re

# A token is a word (letters, digits, apostrophes inside words) or a single
# punctuation mark; whitespace separates tokens and is not sent.
_TOKEN = re.compile(r"\w+(?:['\u2019]\w+)*|[^\w\s]", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """The tokens of ``text`` in order: words and punctuation marks."""
    return _TOKEN.findall(text)


def detokenize(tokens: list[str]) -> str:
    """Join tokens back into readable text (no space before punctuation)."""
    out: list[str] = []
    for token in tokens:
        if out and (token[0].isalnum() or token[0] == "_"):
            out.append(" ")
        out.append(token)
    return "".join(out)
