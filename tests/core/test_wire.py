"""The answer models through the converter: constants, leniency, round trips."""

from __future__ import annotations

from typing import Any

import pytest

from crank_registry import (
    ANSWER_TYPES,
    ErrorAnswer,
    FailedAttempt,
    HealthAnswer,
    HeartbeatRequest,
    Problem,
    ValidationError,
    WorkerEntry,
    WorkersAnswer,
    WorkerState,
    structure,
    unstructure,
)


@pytest.mark.parametrize("status", ["OK", True, 1, None])
def test_a_constant_field_takes_its_value_only(status: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        structure({"status": status, "total_workers": 0, "healthy_workers": 0}, HealthAnswer)
    assert [str(p) for p in caught.value.problems] == ["status: must be 'ok'"]


def test_an_answer_is_read_with_unknown_fields_ignored_a_request_is_not() -> None:
    entry = {
        "worker_id": "w1",
        "worker_url": "https://w1",
        "last_heartbeat": "2026-11-26T20:00:00.000Z",
        "is_healthy": True,
        "state": "healthy",
        "capabilities": ["classify:image.classify"],
        "queue_depth": 0.5,
    }
    body = {"workers": [entry], "total_workers": 1, "healthy_workers": 1, "next": None}
    answer = structure(body, WorkersAnswer)
    assert answer.workers[0].state is WorkerState.HEALTHY
    assert answer.workers[0].health is None  # an answer from before drain has none
    with pytest.raises(ValidationError, match="queue_depth: unknown field"):
        structure({"worker_id": "w1", "queue_depth": 0.5}, HeartbeatRequest)
    assert WorkersAnswer in ANSWER_TYPES and HeartbeatRequest not in ANSWER_TYPES


def test_answer_fields_are_checked() -> None:
    entry = {
        "worker_id": "w1",
        "worker_url": "https://w1",
        "last_heartbeat": "yesterday",
        "is_healthy": "yes",
        "state": "asleep",
        "capabilities": ["classify:image.classify", "nocolon"],
    }
    with pytest.raises(ValidationError) as caught:
        structure(entry, WorkerEntry)
    assert {p.path for p in caught.value.problems} == {
        "last_heartbeat",
        "is_healthy",
        "state",
        "capabilities[1]",
    }


def test_an_error_answer_leaves_out_what_it_does_not_carry() -> None:
    error = ErrorAnswer(
        error="worker_failed",
        message="no worker could be reached",
        worker_id="w1",
        attempts=(FailedAttempt(worker_id="w1", error="ConnectError"),),
    )
    body = unstructure(error)
    assert body == {
        "error": "worker_failed",
        "message": "no worker could be reached",
        "worker_id": "w1",
        "attempts": [{"worker_id": "w1", "error": "ConnectError"}],
    }
    assert structure(body, ErrorAnswer) == error
    invalid = ErrorAnswer(error="invalid_request", message="m", detail=(Problem("a", "b"),))
    assert unstructure(invalid)["detail"] == [{"path": "a", "message": "b"}]


def test_watch_since_is_bounded_as_the_document_says() -> None:
    from crank_registry._wire import MAX_REVISION, WatchQuery

    assert WatchQuery.parse([("since", str(MAX_REVISION))]).since == MAX_REVISION == 2**63 - 1
    with pytest.raises(ValidationError, match="since: must be an integer from 0 to"):
        WatchQuery.parse([("since", str(MAX_REVISION + 1))])
