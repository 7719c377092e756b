"""The gateway's idempotency store: what is kept, replayed, refused, and for how long."""

from __future__ import annotations

import pytest

from crank_registry import (
    AnswerStore,
    KeptAnswer,
    Replay,
    Reused,
    Run,
    Running,
    ValidationError,
    body_fingerprint,
    idempotency_key_problem,
)

KEY = ("", "order-1")
OK = KeptAnswer(200, "application/json", b'{"result": 1}', (("x-crank-worker-id", "w1"),))


def test_a_new_key_runs_and_its_answer_is_replayed_until_the_ttl() -> None:
    store = AnswerStore(ttl=10.0)
    assert store.begin(KEY, "body", now=0.0) == Run()
    assert store.finish(KEY, OK, now=1.0)
    assert store.begin(KEY, "body", now=10.9) == Replay(OK)
    # The TTL runs from when the answer was kept.
    assert store.begin(KEY, "body", now=11.0) == Run()


def test_a_duplicate_while_running_waits_and_another_body_is_reused() -> None:
    store = AnswerStore(ttl=10.0)
    assert store.begin(KEY, "body", now=0.0) == Run()
    assert store.begin(KEY, "body", now=0.5) == Running()
    assert store.begin(KEY, "other", now=0.5) == Reused()
    store.finish(KEY, OK, now=1.0)
    assert store.begin(KEY, "other", now=2.0) == Reused()


@pytest.mark.parametrize(
    ("status", "kept"),
    [(200, True), (201, True), (404, True), (422, True), (500, False), (503, False)],
)
def test_2xx_and_4xx_are_kept_5xx_are_not(status: int, kept: bool) -> None:
    store = AnswerStore(ttl=10.0)
    store.begin(KEY, "body", now=0.0)
    answer = KeptAnswer(status, "application/json", b"{}")
    assert store.finish(KEY, answer, now=0.0) is kept
    assert store.begin(KEY, "body", now=1.0) == (Replay(answer) if kept else Run())


def test_a_call_that_ended_without_an_answer_frees_its_key() -> None:
    store = AnswerStore(ttl=10.0)
    store.begin(KEY, "body", now=0.0)
    assert store.running == 1
    assert not store.finish(KEY, None, now=0.0)
    assert store.running == 0
    assert store.begin(KEY, "body", now=0.0) == Run()


def test_keys_are_scoped_by_the_caller() -> None:
    store = AnswerStore(ttl=10.0)
    store.begin(("spiffe://crank.local/client/a", "k"), "body", now=0.0)
    store.finish(("spiffe://crank.local/client/a", "k"), OK, now=0.0)
    assert store.begin(("spiffe://crank.local/client/b", "k"), "body", now=0.0) == Run()


def test_the_count_bound_drops_the_oldest_answer() -> None:
    store = AnswerStore(ttl=100.0, max_answers=2)
    for index in range(3):
        key = ("", f"k{index}")
        store.begin(key, "body", now=float(index))
        store.finish(key, OK, now=float(index))
    assert len(store) == 2
    assert store.begin(("", "k0"), "body", now=3.0) == Run()
    assert store.begin(("", "k2"), "body", now=3.0) == Replay(OK)


def test_the_byte_bound_drops_the_oldest_and_refuses_an_answer_alone_too_large() -> None:
    big = KeptAnswer(200, "application/json", b"x" * 60)
    store = AnswerStore(ttl=100.0, max_bytes=100)
    for name in ("a", "b"):
        store.begin(("", name), "body", now=0.0)
        store.finish(("", name), big, now=0.0)
    assert len(store) == 1
    assert store.kept_bytes == 60
    assert store.begin(("", "b"), "body", now=0.0) == Replay(big)
    huge = KeptAnswer(200, "application/json", b"x" * 101)
    store.begin(("", "c"), "body", now=0.0)
    assert not store.finish(("", "c"), huge, now=0.0)
    assert store.kept_bytes == 60


def test_expired_answers_are_dropped_before_the_bound_counts() -> None:
    store = AnswerStore(ttl=5.0, max_answers=1)
    store.begin(("", "a"), "body", now=0.0)
    store.finish(("", "a"), OK, now=0.0)
    store.begin(("", "b"), "body", now=6.0)
    assert len(store) == 0  # "a" expired on the way in
    store.finish(("", "b"), OK, now=6.0)
    assert len(store) == 1


def test_running_keys_are_never_dropped_by_the_bounds() -> None:
    store = AnswerStore(ttl=100.0, max_answers=1)
    for name in ("a", "b", "c"):
        assert store.begin(("", name), "body", now=0.0) == Run()
    assert store.running == 3
    assert store.begin(("", "a"), "body", now=0.0) == Running()


def test_the_fingerprint_ignores_key_order_and_spacing() -> None:
    assert body_fingerprint({"a": 1, "b": [1, 2]}) == body_fingerprint({"b": [1, 2], "a": 1})
    assert body_fingerprint({"a": 1}) != body_fingerprint({"a": 2})


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("", "must not be empty"),
        ("a" * 256, "at most 255"),
        ("with space", "visible ASCII"),
        ("caf\u00e9", "visible ASCII"),
    ],
)
def test_key_problems(key: str, problem: str) -> None:
    found = idempotency_key_problem(key)
    assert found is not None and problem in found


def test_a_uuid_is_a_key() -> None:
    assert idempotency_key_problem("0f8fad5b-d9cb-469f-a165-70867728950e") is None


@pytest.mark.parametrize(
    "settings",
    [{"ttl": 0}, {"ttl": True}, {"ttl": 1.0, "max_answers": 0}, {"ttl": 1.0, "max_bytes": 1.5}],
)
def test_the_store_checks_its_bounds(settings: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AnswerStore(**settings)  # type: ignore[arg-type]
