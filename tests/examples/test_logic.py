"""Each example worker's own logic, tested directly."""

from __future__ import annotations

import random
import re
import struct
import zlib
from pathlib import Path

import pytest

from examples.workers.logic.greeting import greet
from examples.workers.logic.markdown import markdown_to_html
from examples.workers.logic.png_colour import (
    PNG_SIGNATURE,
    PngError,
    colour_name,
    decode_png,
    dominant_colour,
    encode_png,
)
from examples.workers.logic.spam import NaiveBayes, load_training_set, tokenize
from examples.workers.logic.tfidf import Document, SearchIndex, load_corpus, terms
from examples.workers.logic.tokens import detokenize
from examples.workers.logic.tokens import tokenize as split_tokens
from examples.workers.logic.zettel import UnknownNote, ZettelStore
from tests.examples.png_helpers import chunk, make_png

# ------------------------------------------------------------------ greeting


def test_greet_in_each_language() -> None:
    assert greet("Ada") == "Hello, Ada!"
    assert greet("  Ada ", "fr") == "Bonjour, Ada !"
    assert greet("Ada", "de") == "Hallo, Ada!"
    assert greet("Ada", "es") == "¡Hola, Ada!"


def test_greet_refuses_blank_names_and_unknown_languages() -> None:
    with pytest.raises(ValueError, match="empty"):
        greet("   ")
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        greet("Ada", "xx")


# -------------------------------------------------------------------- tokens


def test_tokens_are_words_and_punctuation() -> None:
    assert split_tokens("Hello, world! It's 3 o'clock.") == [
        "Hello",
        ",",
        "world",
        "!",
        "It's",
        "3",
        "o'clock",
        ".",
    ]
    assert split_tokens("   ") == []


def test_detokenize_restores_ordinary_text() -> None:
    text = "Workers heartbeat, the controller routes; nothing else."
    assert detokenize(split_tokens(text)) == text


# ------------------------------------------------------------------ markdown


@pytest.mark.parametrize(
    ("source", "html"),
    [
        ("# Title", "<h1>Title</h1>"),
        ("###### Six ##", "<h6>Six</h6>"),
        ("####### seven", "<p>####### seven</p>"),
        ("one\ntwo\n\nthree", "<p>one\ntwo</p>\n<p>three</p>"),
        (
            "**bold** and *it* and _it_",
            "<p><strong>bold</strong> and <em>it</em> and <em>it</em></p>",
        ),
        ("snake_case_name", "<p>snake_case_name</p>"),
        ("`a <b> *c*`", "<p><code>a &lt;b&gt; *c*</code></p>"),
        ("\\*literal\\*", "<p>*literal*</p>"),
        ("- a\n- b\n* c", "<ul>\n<li>a</li>\n<li>b</li>\n<li>c</li>\n</ul>"),
        ("1. a\n2. b", "<ol>\n<li>a</li>\n<li>b</li>\n</ol>"),
        ("> quoted\n> *more*", "<blockquote>\n<p>quoted\n<em>more</em></p>\n</blockquote>"),
        ("---", "<hr>"),
        ("```py\nx = '<y>'\n```", "<pre><code class=\"language-py\">x = '&lt;y&gt;'</code></pre>"),
        ("```\nunclosed", "<pre><code>unclosed</code></pre>"),
        (
            "[site](https://example.com/a?b=1&c=2)",
            '<p><a href="https://example.com/a?b=1&amp;c=2">site</a></p>',
        ),
        ("[rel](/docs#x)", '<p><a href="/docs#x">rel</a></p>'),
        ("[mail](mailto:a@example.com)", '<p><a href="mailto:a@example.com">mail</a></p>'),
    ],
)
def test_markdown_subset(source: str, html: str) -> None:
    assert markdown_to_html(source) == html


@pytest.mark.parametrize(
    "source",
    [
        "<script>alert(1)</script>",
        '[x](javascript:alert)"',
        "[x](JavaScript:alert)",
        "[x](data:text/html;base64,PHNjcmlwdD4=)",
        '[x](https://e.com/"onmouseover="alert)',
        "# <img src=x onerror=alert(1)>",
        "`</code><script>`",
        "- <b>\n1. <i>",
        "> <iframe>",
    ],
)
def test_markdown_never_lets_markup_or_unsafe_links_through(source: str) -> None:
    html = markdown_to_html(source).lower()
    for tag in ("<script", "<img", "<iframe", "<b>", "<i>"):
        assert tag not in html
    assert 'href="javascript' not in html
    assert 'href="data' not in html
    assert '"onmouseover' not in html  # the quote inside the URL is escaped


def test_markdown_fuzz_never_emits_raw_angle_brackets_from_input() -> None:
    rng = random.Random(7)
    alphabet = "<>&\"'*_`[]()#->!\\ \nabc:/"
    for _ in range(300):
        source = "".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))
        html = markdown_to_html(source)
        # Every tag in the output is one the converter writes itself.
        for tag in re.findall(r"</?([a-z0-9]+)", html):
            assert tag in {
                "p",
                "h1",
                "h2",
                "h3",
                "h4",
                "h5",
                "h6",
                "em",
                "strong",
                "code",
                "pre",
                "ul",
                "ol",
                "li",
                "blockquote",
                "hr",
                "a",
            }


# ---------------------------------------------------------------------- spam


def test_spam_tokenizer_keeps_money_and_exclamation() -> None:
    assert tokenize("WIN $1000 now!!!") == ["win", "$1000", "now!!!"]


def test_naive_bayes_on_the_bundled_training_set() -> None:
    model = NaiveBayes(load_training_set())
    spam = model.classify("Claim your free prize now, click here to win cash")
    ham = model.classify("Can we move the design review meeting to Thursday?")
    assert spam.label == "spam" and spam.spam_probability > 0.95
    assert ham.label == "ham" and ham.spam_probability < 0.05
    assert set(spam.evidence) <= {
        "claim",
        "free",
        "prize",
        "now",
        "click",
        "win",
        "cash",
        "here",
        "your",
    }
    assert "free" in spam.evidence
    assert 0 < len(ham.evidence) <= 5


def test_naive_bayes_without_evidence_is_ham_at_the_prior() -> None:
    model = NaiveBayes([("spam", "buy pills"), ("ham", "see you at lunch")])
    verdict = model.classify("qwerty zxcvb")
    assert verdict.label == "ham"
    assert verdict.spam_probability == pytest.approx(0.5)
    assert verdict.evidence == ()


def test_naive_bayes_probabilities_follow_the_counts() -> None:
    model = NaiveBayes([("spam", "offer offer"), ("ham", "meeting")])
    # vocabulary {offer, meeting}; P(offer|spam) = 3/4, P(offer|ham) = 1/3
    verdict = model.classify("offer")
    assert verdict.spam_probability == pytest.approx((3 / 4) / (3 / 4 + 1 / 3))


def test_naive_bayes_handles_very_long_mail_without_underflow() -> None:
    model = NaiveBayes(load_training_set())
    verdict = model.classify("free prize " * 5000)
    assert verdict.spam_probability == pytest.approx(1.0)
    assert verdict.label == "spam"


def test_naive_bayes_needs_both_labels() -> None:
    with pytest.raises(ValueError, match="each label"):
        NaiveBayes([("spam", "x")])
    with pytest.raises(ValueError, match="unknown label"):
        NaiveBayes([("eggs", "x")])


# --------------------------------------------------------------------- tfidf


def test_terms_drop_stop_words_and_fold_plurals() -> None:
    assert terms("How do the Heartbeats of workers work?") == ["heartbeat", "worker", "work"]
    assert terms("policies glass") == ["policy", "glass"]


def test_search_ranks_the_relevant_document_first() -> None:
    index = SearchIndex(load_corpus())
    assert index.search("how do heartbeats work")[0].document.id == "heartbeats"
    assert index.search("certificate identity")[0].document.id == "mtls"
    assert index.search("compressed image chunks")[0].document.id == "png"
    assert index.search("notes and backlinks")[0].document.id == "zettelkasten"
    assert index.search("zzz qqq") == []


def test_search_scores_are_cosine_similarities() -> None:
    docs = [
        Document("a", "", "apple banana"),
        Document("b", "", "banana cherry"),
        Document("c", "", "durian"),
    ]
    index = SearchIndex(docs)
    hits = index.search("apple banana", limit=5)
    assert [hit.document.id for hit in hits] == ["a", "b"]
    assert hits[0].score == pytest.approx(1.0)
    assert 0 < hits[1].score < 1
    assert index.search("apple banana", limit=1) == hits[:1]


# -------------------------------------------------------------------- zettel


def test_zettel_notes_search_and_links(tmp_path: Path) -> None:
    store = ZettelStore(tmp_path / "notes.sqlite3")
    first = store.create_note(
        "Sans-IO", "Keep protocol logic free of I/O.", ("Design", "design", " "), now=0
    )
    second = store.create_note(
        "Testing", "A fake clock makes sans-io tests deterministic.", (), now=60
    )
    assert (first.id, first.tags, first.created_at) == (1, ("design",), "1970-01-01T00:00:00+00:00")
    assert store.get_note(2) == second

    # Title matches weigh more than body matches.
    assert [n.id for n in store.search("sans-io")] == [1, 2]
    assert [n.id for n in store.search("SANS-IO clock")] == [2]
    assert [n.id for n in store.search("", tag="DESIGN")] == [1]
    assert store.search("100%_") == []  # LIKE wildcards are literal

    link = store.link(second.id, first.id, "builds-on")
    assert store.backlinks(first.id) == [link]
    store.link(second.id, first.id, "cites")  # replaces the relation
    assert [b.relation for b in store.backlinks(first.id)] == ["cites"]

    with pytest.raises(UnknownNote, match="no note with id 99"):
        store.link(first.id, 99)
    with pytest.raises(ValueError, match="itself"):
        store.link(first.id, first.id)
    with pytest.raises(UnknownNote):
        store.get_note(42)


def test_zettel_stores_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    writer, reader = ZettelStore(path), ZettelStore(path)
    note = writer.create_note("Shared", "Seen by another process.", (), now=0)
    assert reader.search("another") == [note]


# ----------------------------------------------------------------------- png


RED, GREEN, BLUE = (220, 20, 30), (30, 160, 40), (20, 40, 200)


@pytest.mark.parametrize("filters", [[0], [1], [2], [3], [4], [0, 1, 2, 3, 4]])
def test_png_every_filter_decodes_to_the_same_pixels(filters: list[int]) -> None:
    rng = random.Random(1)
    pixels = [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(7 * 5)]
    rows = [[c for p in pixels[y * 7 : (y + 1) * 7] for c in p] for y in range(5)]
    image = decode_png(make_png(7, 5, rows, filters=filters))
    assert [p[:3] for p in image.pixels] == pixels
    assert all(p[3] == 255 for p in image.pixels)


def test_png_colour_types_and_depths() -> None:
    # 16-bit RGB
    image = decode_png(make_png(1, 1, [[65535, 0, 32896]], depth=16))
    assert image.pixels == ((255, 0, 128, 255),)
    # 1-bit grey, 9 pixels wide: the row spans two bytes
    image = decode_png(make_png(9, 1, [[1, 0, 1, 0, 1, 0, 1, 0, 1]], colour_type=0, depth=1))
    assert [p[0] for p in image.pixels] == [255, 0, 255, 0, 255, 0, 255, 0, 255]
    # 2-bit palette with transparency for index 0
    palette = chunk(b"PLTE", bytes([0, 0, 0, *RED, *BLUE]))
    alpha = chunk(b"tRNS", bytes([0]))
    image = decode_png(
        make_png(3, 1, [[0, 1, 2]], colour_type=3, depth=2, extra_chunks=[palette, alpha])
    )
    assert image.pixels == ((0, 0, 0, 0), (*RED, 255), (*BLUE, 255))
    # grey + alpha, RGBA
    image = decode_png(make_png(1, 1, [[100, 50]], colour_type=4))
    assert image.pixels == ((100, 100, 100, 50),)
    image = decode_png(make_png(1, 1, [[1, 2, 3, 4]], colour_type=6, filters=[4]))
    assert image.pixels == ((1, 2, 3, 4),)
    # 8-bit grey with a transparent key
    key = chunk(b"tRNS", struct.pack(">H", 7))
    image = decode_png(make_png(2, 1, [[7, 8]], colour_type=0, extra_chunks=[key]))
    assert image.pixels == ((7, 7, 7, 0), (8, 8, 8, 255))


def test_dominant_colour_is_the_most_frequent_name() -> None:
    pixels = [RED] * 6 + [BLUE] * 3
    result = dominant_colour(decode_png(encode_png(3, 3, pixels)))
    assert result.name == "red"
    assert result.rgb == RED
    assert result.share == pytest.approx(6 / 9)
    assert result.hex == "#dc141e"


def test_dominant_colour_ignores_transparent_pixels() -> None:
    rows = [[*RED, 0, *RED, 0, *GREEN, 255]]
    result = dominant_colour(decode_png(make_png(3, 1, rows, colour_type=6)))
    assert result.name == "green"
    fully_transparent = decode_png(make_png(1, 1, [[1, 2, 3, 0]], colour_type=6))
    assert dominant_colour(fully_transparent).name == "transparent"


def test_dominant_colour_ties_do_not_depend_on_pixel_order() -> None:
    one = dominant_colour(decode_png(encode_png(2, 1, [RED, BLUE])))
    other = dominant_colour(decode_png(encode_png(2, 1, [BLUE, RED])))
    assert one == other
    assert one.name == "blue"


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((255, 0, 0), "red"),
        ((255, 140, 0), "orange"),
        ((250, 230, 20), "yellow"),
        ((0, 128, 0), "green"),
        ((0, 220, 220), "cyan"),
        ((0, 0, 255), "blue"),
        ((128, 0, 128), "purple"),
        ((255, 105, 180), "pink"),
        ((139, 69, 19), "brown"),
        ((5, 5, 5), "black"),
        ((250, 250, 250), "white"),
        ((128, 128, 128), "grey"),
    ],
)
def test_colour_names(rgb: tuple[int, int, int], name: str) -> None:
    assert colour_name(*rgb) == name


def _ihdr(
    width: int, height: int, depth: int = 8, colour_type: int = 2, interlace: int = 0
) -> bytes:
    return chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, interlace)
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GIF89a", "bad signature"),
        (PNG_SIGNATURE, "missing IEND"),
        (PNG_SIGNATURE + chunk(b"IEND", b""), "first chunk must be IHDR"),
        (PNG_SIGNATURE + _ihdr(1, 1)[:10], "truncated"),
        (PNG_SIGNATURE + chunk(b"IHDR", b"\0" * 13, crc=0), "CRC mismatch"),
        (PNG_SIGNATURE + _ihdr(1, 1, interlace=1) + chunk(b"IEND", b""), "interlaced"),
        (
            PNG_SIGNATURE + _ihdr(1, 1, depth=4) + chunk(b"IEND", b""),
            "colour type 2 with bit depth 4",
        ),
        (PNG_SIGNATURE + _ihdr(0, 1) + chunk(b"IEND", b""), "no pixels"),
        (PNG_SIGNATURE + _ihdr(1000, 1000) + chunk(b"IEND", b""), "too large"),
        (PNG_SIGNATURE + _ihdr(1, 1, colour_type=3) + chunk(b"IEND", b""), "without PLTE"),
        (PNG_SIGNATURE + chunk(b"IDAT", b""), "first chunk must be IHDR"),
        (
            PNG_SIGNATURE + _ihdr(1, 1) + chunk(b"IDAT", b"not zlib") + chunk(b"IEND", b""),
            "corrupt image data",
        ),
        (
            PNG_SIGNATURE
            + _ihdr(1, 1)
            + chunk(b"IDAT", zlib.compress(b"\0" * 3))
            + chunk(b"IEND", b""),
            "expected 4",
        ),
        (
            PNG_SIGNATURE
            + _ihdr(1, 1)
            + chunk(b"IDAT", zlib.compress(b"\x09abc"))
            + chunk(b"IEND", b""),
            "unknown filter type 9",
        ),
        (PNG_SIGNATURE + _ihdr(1, 1) + chunk(b"IDAT", zlib.compress(b"\0abc")), "missing IEND"),
    ],
)
def test_png_errors_are_clear(data: bytes, message: str) -> None:
    with pytest.raises(PngError, match=message):
        decode_png(data)


def test_png_decompression_is_bounded() -> None:
    # 1 x 1 RGB needs 4 bytes; 50 MB of zeros compresses to ~50 KB and must not be inflated.
    bomb = zlib.compress(b"\0" * 50_000_000, 9)
    data = PNG_SIGNATURE + _ihdr(1, 1) + chunk(b"IDAT", bomb) + chunk(b"IEND", b"")
    with pytest.raises(PngError, match="expected 4"):
        decode_png(data)


def test_png_palette_index_out_of_range() -> None:
    palette = chunk(b"PLTE", bytes(RED))
    data = make_png(1, 1, [[3]], colour_type=3, extra_chunks=[palette])
    with pytest.raises(PngError, match="palette index 3"):
        decode_png(data)
