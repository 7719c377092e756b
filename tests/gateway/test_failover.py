"""The failover's choice of the next worker: never one already tried."""

from __future__ import annotations

import pytest

from crank_registry import UnknownCapability
from crank_registry_asgi.failover import next_worker
from tests.core.helpers import T0, registry_with

VERB, NAME = "classify", "image.classify"


def test_each_worker_is_offered_once_then_none_is_left() -> None:
    registry = registry_with("w1", "w2", "w3")
    tried: set[str] = set()
    offered = []
    while (endpoint := next_worker(registry, VERB, NAME, tried=tried, now=T0)) is not None:
        offered.append(endpoint.worker_id)
        tried.add(endpoint.worker_id)
    assert offered == ["w1", "w2", "w3"]


def test_a_worker_already_tried_is_not_offered_again() -> None:
    registry = registry_with("w1")
    assert next_worker(registry, VERB, NAME, tried={"w1"}, now=T0) is None
    # Not tried: the same worker is offered.
    endpoint = next_worker(registry, VERB, NAME, tried=set(), now=T0)
    assert endpoint is not None
    assert endpoint.worker_id == "w1"


def test_an_unknown_capability_is_raised_at_the_first_choice() -> None:
    with pytest.raises(UnknownCapability):
        next_worker(registry_with("w1"), VERB, "other", tried=set(), now=T0)


def test_a_capability_whose_workers_left_after_an_attempt_gives_none() -> None:
    # The attempts made are the answer then (502), not a typo (404).
    registry = registry_with("w1")
    registry.deregister("w1", now=T0)
    assert next_worker(registry, VERB, NAME, tried={"w1"}, now=T0) is None


def test_a_worker_not_tried_is_found_when_the_rotation_comes_round_to_a_tried_one() -> None:
    # Other requests moved the rotation on: its next is w3, already tried. The
    # core's exclude skips it rather than ending the failover with w2 untried.
    registry = registry_with("w1", "w2", "w3")
    picks = [registry.route(VERB, NAME, now=T0) for _ in range(2)]
    assert [endpoint.worker_id for endpoint in picks if endpoint] == ["w1", "w2"]
    endpoint = next_worker(registry, VERB, NAME, tried={"w1", "w3"}, now=T0)
    assert endpoint is not None
    assert endpoint.worker_id == "w2"
    assert next_worker(registry, VERB, NAME, tried={"w1", "w2", "w3"}, now=T0) is None
