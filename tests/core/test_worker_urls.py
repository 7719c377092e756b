"""Worker URLs: the pattern that recognises plain URLs accepts only what parsing accepts.

This reads two private names of ``_models`` on purpose: the pattern is a
fast path of :func:`crank_registry.is_worker_url`, and what it must equal
is the parsing path beside it.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from crank_registry import is_worker_url
from crank_registry._models import _PLAIN_URL, _parses_as_worker_url


@given(st.from_regex(_PLAIN_URL, fullmatch=True))
def test_every_plain_url_is_one_parsing_accepts(url: str) -> None:
    assert _parses_as_worker_url(url)
    assert is_worker_url(url)


@given(st.text(max_size=60) | st.from_regex(r"https?://[^/]{0,20}(/.{0,10})?", fullmatch=True))
def test_the_answer_is_the_parsing_answer(url: str) -> None:
    assert is_worker_url(url) == _parses_as_worker_url(url)


def test_examples() -> None:
    for url in ("https://10.0.0.5:8443", "http://w1.example:8000/api", "https://[::1]:9"):
        assert is_worker_url(url), url
    for url in ("ftp://h:1", "https://h:0", "https://h:65536", "https://", "http://h :1"):
        assert not is_worker_url(url), url
