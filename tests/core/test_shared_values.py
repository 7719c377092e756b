"""Equal capability values are stored once: the sharing rule, against an eager model of it.

:class:`~crank_registry._records.CapabilityValues` renders a value's JSON
text only when a second value of its ``(verb, name)`` must be told apart
from it. The model below renders every value at once, as the rule reads:
a value is shared with the first stored value of equal JSON text, and at
most ``MAX_VARIANTS`` values are stored. Both must hand out the same
objects for any sequence of registrations and departures.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from crank_registry import CapabilitySchema, structure, unstructure
from crank_registry._records import MAX_VARIANTS, CapabilityValues
from tests.builders import capability_payload

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True)


class EagerValues:
    """The sharing rule with every value rendered when it comes."""

    def __init__(self) -> None:
        self.variants: list[list[Any]] = []  # [value, text, users]

    def share(self, capability: CapabilitySchema) -> CapabilitySchema:
        for variant in self.variants:
            if variant[0] is capability:
                variant[2] += 1
                return capability
        text = json.dumps(unstructure(capability), sort_keys=True, separators=(",", ":"))
        for variant in self.variants:
            if variant[1] == text:
                variant[2] += 1
                return variant[0]  # type: ignore[no-any-return]
        if len(self.variants) < MAX_VARIANTS:
            self.variants.append([capability, text, 1])
        return capability

    def release(self, capability: CapabilitySchema) -> None:
        for index, variant in enumerate(self.variants):
            if variant[0] is capability:
                variant[2] -= 1
                if not variant[2]:
                    del self.variants[index]
                return


def _pool() -> list[CapabilitySchema]:
    """Values of one (verb, name): more distinct ones than are stored, each in two copies.

    The copies are equal in text and distinct objects, as two registrations'
    values are; ``1`` and ``1.0`` are equal in Python and not in JSON.
    """
    payloads = [capability_payload(version=f"1.0.{n}") for n in range(MAX_VARIANTS + 3)]
    payloads.append(capability_payload(input_schema={"maxLength": 1}))
    payloads.append(capability_payload(input_schema={"maxLength": 1.0}))
    return [structure(payload, CapabilitySchema) for payload in payloads for _ in range(2)]


POOL = _pool()


@SETTINGS
@given(st.lists(st.tuples(st.booleans(), st.integers(0, len(POOL) - 1)), max_size=60))
def test_values_are_shared_as_when_every_value_is_rendered_at_once(
    steps: list[tuple[bool, int]],
) -> None:
    values = CapabilityValues(("classify", "image.classify"))
    model = EagerValues()
    held: list[CapabilitySchema] = []  # what the workers hold, as share() returned it
    for joins, index in steps:
        if joins or not held:
            given_value = POOL[index]
            stored = values.share(given_value)
            assert stored is model.share(given_value)
            held.append(stored)
        else:
            left = held.pop(index % len(held))
            values.release(left)
            model.release(left)
        assert [(v.value, v.users) for v in values.variants] == [
            (value, users) for value, _, users in model.variants
        ]


def test_a_value_alone_is_not_rendered_and_is_when_another_comes() -> None:
    values = CapabilityValues(("classify", "image.classify"))
    first, copy, other = POOL[0], POOL[1], POOL[2]
    assert values.share(first) is first
    assert values.share(first) is first
    [variant] = values.variants
    assert variant.text is None
    # An equal copy must be told apart from it by text: both are rendered then.
    assert values.share(copy) is first
    assert variant.text is not None
    assert values.share(other) is other
    assert [v.users for v in values.variants] == [3, 1]
