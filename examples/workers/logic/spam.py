"""email_classifier: a multinomial naive Bayes spam filter.

Trained on the small labelled set in ``examples/workers/data/spam_training.json``
(word counts with Laplace smoothing, log probabilities so that long emails
do not underflow).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import attrs

__all__ = ["TRAINING_SET", "Classification", "NaiveBayes", "load_training_set", "tokenize"]

TRAINING_SET = Path(__file__).resolve().parent.parent / "data" / "spam_training.json"
LABELS = ("ham", "spam")
_WORD = re.compile(r"[a-z0-9$€£%!]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased words; currency signs, percent and '!' are kept as evidence."""
    return _WORD.findall(text.lower())


def load_training_set(path: Path = TRAINING_SET) -> list[tuple[str, str]]:
    """The ``(label, text)`` pairs of a training file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return [(example["label"], example["text"]) for example in data["examples"]]


@attrs.frozen
class Classification:
    """The verdict: the label, P(spam) and the words that weighed most for it."""

    label: str
    spam_probability: float
    evidence: tuple[str, ...]


class NaiveBayes:
    """A multinomial naive Bayes classifier over the labels ``ham`` and ``spam``."""

    def __init__(self, examples: Iterable[tuple[str, str]]) -> None:
        self.word_counts: dict[str, Counter[str]] = {label: Counter() for label in LABELS}
        self.document_counts: Counter[str] = Counter()
        for label, text in examples:
            if label not in LABELS:
                raise ValueError(f"unknown label {label!r}")
            self.document_counts[label] += 1
            self.word_counts[label].update(tokenize(text))
        if not all(self.document_counts[label] for label in LABELS):
            raise ValueError("the training set needs at least one example of each label")
        self.vocabulary = set(self.word_counts["ham"]) | set(self.word_counts["spam"])
        self.totals = {label: sum(self.word_counts[label].values()) for label in LABELS}

    def word_log_likelihood(self, word: str, label: str) -> float:
        """log P(word | label) with add-one smoothing."""
        count = self.word_counts[label][word]
        return math.log((count + 1) / (self.totals[label] + len(self.vocabulary)))

    def classify(self, text: str) -> Classification:
        """Classify ``text``; words never seen in training carry no evidence."""
        total_documents = sum(self.document_counts.values())
        scores = {
            label: math.log(self.document_counts[label] / total_documents) for label in LABELS
        }
        weights: dict[str, float] = {}
        for word in tokenize(text):
            if word not in self.vocabulary:
                continue
            spam = self.word_log_likelihood(word, "spam")
            ham = self.word_log_likelihood(word, "ham")
            scores["spam"] += spam
            scores["ham"] += ham
            weights[word] = spam - ham
        # P(spam) = 1 / (1 + exp(ham - spam)), computed without overflow.
        difference = scores["ham"] - scores["spam"]
        if difference > 0:
            spam_probability = math.exp(-difference) / (1 + math.exp(-difference))
        else:
            spam_probability = 1 / (1 + math.exp(difference))
        # A tie is ham: without evidence, do not call mail spam.
        label = "spam" if spam_probability > 0.5 else "ham"
        sign = 1 if label == "spam" else -1
        ranked = sorted(weights, key=lambda word: (-sign * weights[word], word))
        evidence = tuple(word for word in ranked[:5] if sign * weights[word] > 0)
        return Classification(label, spam_probability, evidence)
