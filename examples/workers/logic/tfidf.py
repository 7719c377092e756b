"""semantic_search: TF-IDF vectors and cosine similarity over a small corpus.

The bundled corpus is ``examples/workers/data/corpus.json``. Terms are
lower-cased words with a few English stop words removed and a light
plural stemming, so that "heartbeat" also finds "heartbeats".
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import attrs

__all__ = ["CORPUS", "Document", "Hit", "SearchIndex", "load_corpus", "terms"]

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus.json"
_WORD = re.compile(r"[a-z0-9]+")
_STOP_WORDS = frozenset(
    {
        "a",
        "all",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "do",
        "does",
        "each",
        "every",
        "for",
        "from",
        "how",
        "i",
        "in",
        "into",
        "is",
        "it",
        "its",
        "my",
        "no",
        "not",
        "of",
        "on",
        "or",
        "our",
        "so",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "they",
        "this",
        "to",
        "until",
        "up",
        "was",
        "were",
        "what",
        "when",
        "which",
        "who",
        "with",
    }
)


def _stem(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def terms(text: str) -> list[str]:
    """The index terms of ``text``: lower-cased, stop words out, plurals folded."""
    return [_stem(word) for word in _WORD.findall(text.lower()) if word not in _STOP_WORDS]


@attrs.frozen
class Document:
    """One searchable document."""

    id: str
    title: str
    text: str


@attrs.frozen
class Hit:
    """A ranked search result."""

    document: Document
    score: float


def load_corpus(path: Path = CORPUS) -> list[Document]:
    """The documents of a corpus file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return [Document(d["id"], d["title"], d["text"]) for d in data["documents"]]


class SearchIndex:
    """An in-memory TF-IDF index; the title counts as part of the text."""

    def __init__(self, documents: Iterable[Document]) -> None:
        self.documents = list(documents)
        counts = [Counter(terms(f"{d.title} {d.text}")) for d in self.documents]
        document_frequency: Counter[str] = Counter()
        for count in counts:
            document_frequency.update(count.keys())
        total = len(self.documents)
        # Smoothed IDF: a term in every document still weighs a little.
        self.idf = {
            term: math.log((1 + total) / (1 + frequency)) + 1
            for term, frequency in document_frequency.items()
        }
        self.vectors = [self._vector(count) for count in counts]

    def _vector(self, count: Counter[str]) -> dict[str, float]:
        vector = {
            term: (1 + math.log(frequency)) * self.idf[term]
            for term, frequency in count.items()
            if term in self.idf
        }
        norm = math.sqrt(sum(weight * weight for weight in vector.values()))
        return {term: weight / norm for term, weight in vector.items()} if norm else {}

    def search(self, query: str, limit: int = 3) -> list[Hit]:
        """The best ``limit`` documents for ``query`` with a score > 0, best first."""
        query_vector = self._vector(Counter(terms(query)))
        hits = []
        for document, vector in zip(self.documents, self.vectors, strict=True):
            score = sum(weight * vector.get(term, 0.0) for term, weight in query_vector.items())
            if score > 0:
                hits.append(Hit(document, score))
        hits.sort(key=lambda hit: (-hit.score, hit.document.id))
        return hits[:limit]
