"""The gateway's idempotency keys: which answer each key keeps, for how long, in how much memory.

A call to ``POST /execute`` with an ``Idempotency-Key`` asks the
:class:`AnswerStore` first (:meth:`~AnswerStore.begin`), with the key, a
fingerprint of its body and ``now``:

* :class:`Run`: the key is new (or its answer expired): make the call, then
  :meth:`~AnswerStore.finish` with its answer;
* :class:`Replay`: the same key and body were answered: that answer again,
  and no worker is called;
* :class:`Running`: the same key and body are being answered now: wait for
  that answer, then ask again;
* :class:`Reused`: the key was given with another body (422
  ``idempotency_key_reused``), kept or running.

What is kept: answers below 500 (2xx and 4xx say what the call did, or
that it could not be done as asked); a 5xx, or a call that never ended,
keeps nothing, so the same key may be tried again. A kept answer lives
``ttl`` seconds from when it was kept. Memory is bounded twice, by the
number of answers (``max_answers``) and by their bytes (``max_bytes``):
expired answers go first, then the oldest; an answer larger than
``max_bytes`` alone is not kept. Keys being answered are not counted in
the bounds (there are as many as calls in flight) and are never dropped.

Time is an argument (``now``, never going backwards); nothing here waits or
reads a clock: the gateway does the waiting.
"""

from __future__ import annotations

import collections
import hashlib
import json
from typing import Any

import attrs

from ._errors import ValidationError

__all__ = [
    "AnswerStore",
    "Begin",
    "KeptAnswer",
    "Replay",
    "Reused",
    "Run",
    "Running",
    "answer_size",
    "body_fingerprint",
    "idempotency_key_problem",
    "is_kept",
    "MAX_KEY_LENGTH",
    "MAX_TTL",
    "StoreKey",
]

#: The longest time an idempotency key is remembered, in seconds (about 31,700 years:
#: beyond, ``now + ttl`` would lose the resolution of the clock's seconds).
MAX_TTL = 1e12

#: The longest ``Idempotency-Key`` accepted (Stripe's and the IETF draft's order of size).
MAX_KEY_LENGTH = 255


def idempotency_key_problem(key: str) -> str | None:
    """Why ``key`` is not an idempotency key (``None``: it is one).

    1 to :data:`MAX_KEY_LENGTH` visible ASCII characters (a UUID is the usual
    choice).
    """
    if not key:
        return "must not be empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"must be at most {MAX_KEY_LENGTH} characters, got {len(key)}"
    if not all("!" <= char <= "~" for char in key):
        return "must be visible ASCII characters only (no spaces), e.g. a UUID"
    return None


def body_fingerprint(body: Any) -> str:
    """A hash of a parsed JSON body that does not depend on key order or spacing."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@attrs.frozen
class KeptAnswer:
    """An answer as it is kept and replayed: status, media type, body and headers."""

    status: int
    media_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class Run:
    """The key is new: make the call, then :meth:`AnswerStore.finish`."""


@attrs.frozen
class Replay:
    """The same key and body were answered: ``answer`` again."""

    answer: KeptAnswer


@attrs.frozen
class Running:
    """The same key and body are being answered: wait for it, then ask again."""


@attrs.frozen
class Reused:
    """The key was used for another body."""


Begin = Run | Replay | Running | Reused

#: A key as the store holds it: the caller's scope (its identity, or ``""``
#: for anonymous callers) and the key, so that one caller cannot replay
#: another's answers by guessing its keys.
StoreKey = tuple[str, str]


def _check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < MAX_TTL:
        raise ValidationError.single(name, f"must be a number of seconds > 0 and < {MAX_TTL:g}")


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError.single(name, "must be an integer >= 1")


class AnswerStore:
    """The answers kept per idempotency key, and the keys being answered.

    ``ttl``: seconds an answer is kept; ``max_answers`` and ``max_bytes``:
    the bounds of what is kept (see the module). Kept answers are in the
    order they were kept, which (``ttl`` being one for all, and ``now``
    never going backwards) is the order they expire in: expiring and
    dropping the oldest both pop from the front, O(1) amortised.
    """

    __slots__ = ("_bytes", "_kept", "_running", "max_answers", "max_bytes", "ttl")

    def __init__(self, *, ttl: float, max_answers: int = 10_000, max_bytes: int = 64 << 20) -> None:
        _check_seconds("ttl", ttl)
        _check_count("max_answers", max_answers)
        _check_count("max_bytes", max_bytes)
        self.ttl = ttl
        self.max_answers = max_answers
        self.max_bytes = max_bytes
        # key -> (fingerprint, answer, until)
        self._kept: collections.OrderedDict[StoreKey, tuple[str, KeptAnswer, float]] = (
            collections.OrderedDict()
        )
        self._bytes = 0
        # key -> fingerprint of the body being answered
        self._running: dict[StoreKey, str] = {}

    def begin(self, key: StoreKey, fingerprint: str, now: float) -> Begin:
        """What to do with a call of ``key`` whose body has ``fingerprint``, at ``now``.

        :class:`Run` marks the key as being answered: the caller must
        :meth:`finish` it, whatever happens.
        """
        self._expire(now)
        running = self._running.get(key)
        if running is not None:
            return Running() if running == fingerprint else Reused()
        kept = self._kept.get(key)
        if kept is not None:
            return Replay(kept[1]) if kept[0] == fingerprint else Reused()
        self._running[key] = fingerprint
        return Run()

    def finish(self, key: StoreKey, answer: KeptAnswer | None, now: float) -> bool:
        """The call of ``key`` ended with ``answer`` (``None``: it did not end with one).

        Keeps the answer when it is below 500 and fits in ``max_bytes``; says
        whether it was kept. Either way the key is no longer being answered.
        """
        fingerprint = self._running.pop(key, None)
        if fingerprint is None or answer is None or not is_kept(answer, self.max_bytes):
            return False
        size = answer_size(answer)
        self._expire(now)
        self._kept[key] = (fingerprint, answer, now + self.ttl)
        self._bytes += size
        while len(self._kept) > self.max_answers or self._bytes > self.max_bytes:
            self._drop_oldest()
        return True

    def __len__(self) -> int:
        """How many answers are kept."""
        return len(self._kept)

    @property
    def kept_bytes(self) -> int:
        """The bytes of the answers kept (bodies and headers)."""
        return self._bytes

    @property
    def running(self) -> int:
        """How many keys are being answered."""
        return len(self._running)

    def _expire(self, now: float) -> None:
        kept = self._kept
        while kept:
            _, (_, _, until) = next(iter(kept.items()))
            if until > now:
                return
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, (_, answer, _) = self._kept.popitem(last=False)
        self._bytes -= answer_size(answer)


def answer_size(answer: KeptAnswer) -> int:
    """What an answer weighs in the store's byte bound."""
    return len(answer.body) + sum(len(name) + len(value) for name, value in answer.headers)


def is_kept(answer: KeptAnswer, max_bytes: int) -> bool:
    """Whether ``answer`` is kept for its key: below 500, and at most ``max_bytes`` alone.

    The one rule for every store of answers (in memory, or shared in Redis).
    """
    return answer.status < 500 and answer_size(answer) <= max_bytes
