"""A capability's ``input_schema`` and ``output_schema`` must be valid JSON Schemas.

The rule is :func:`crank_worker_client.json_schema.checked_validator_class`,
the one the workers' invocation server applies: the dialect the schema's
``$schema`` names (an unknown one is refused), Draft 2020-12 without one,
and the schema valid in it. ``POST /register`` refuses a capability that
breaks it (422 ``invalid_request``, a problem at the place in the schema);
recovery (the journal, the Redis snapshot and stream) leaves out a worker
whose registration read back breaks it (DESIGN, "Targets": JSON Schema
validity is checked once per distinct schema).

:func:`capability_schema_problems` is that one check. Its fast path: a
fleet registers the same few schemas again and again, and recovery reads
every worker's back, so the answer is kept per distinct schema in a
bounded cache. The key is the schema's ``repr``: a schema is a JSON value
(the wire's, the journal's), whose ``repr`` tells two values apart exactly
when they differ (``1``, ``1.0`` and ``True`` too), keys in their order;
and it is five times cheaper than ``json.dumps``. Recovery of 100 000
workers in ``benchmarks/journal_recovery.py`` (<= 2 s) is the figure it
serves; ``tests/service/test_schemas.py`` holds that the cached answer
equals :func:`schema_problems_uncached`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from crank_registry import CapabilitySchema, Problem, ValidationError
from crank_worker_client.json_schema import InvalidJsonSchema, checked_validator_class

__all__ = [
    "CACHED_SCHEMAS",
    "capability_schema_problems",
    "refuse_invalid_schemas",
    "schema_problems_uncached",
]

#: How many distinct (field, schema) answers are kept.
CACHED_SCHEMAS = 4096

_FIX = (
    "a capability's {field} must be a valid JSON Schema (Draft 2020-12, or the draft its "
    "$schema names): fix the schema"
)


def capability_schema_problems(capability: CapabilitySchema) -> tuple[Problem, ...]:
    """What makes ``capability``'s schemas invalid; empty when both are valid.

    Paths are relative to the capability (``input_schema.properties.n.type``).
    Each distinct schema is checked once (bounded cache), for the figure of
    ``benchmarks/journal_recovery.py`` (100 000 workers recovered in <= 2 s);
    the answer is :func:`schema_problems_uncached`'s.
    """
    return _problems("input_schema", capability.input_schema) + _problems(
        "output_schema", capability.output_schema
    )


def refuse_invalid_schemas(capabilities: Sequence[CapabilitySchema]) -> None:
    """Raise :class:`~crank_registry.ValidationError` (422 ``invalid_request``) for every fault.

    Paths are the registration's: ``capabilities[1].input_schema.type``.
    """
    problems = [
        problem
        for index, capability in enumerate(capabilities)
        for problem in ValidationError(capability_schema_problems(capability))
        .prefixed(f"capabilities[{index}]")
        .problems
    ]
    if problems:
        raise ValidationError(problems)


def schema_problems_uncached(field: str, schema: dict[str, Any]) -> tuple[Problem, ...]:
    """The plain check of one schema held in ``field``: the rule, applied now."""
    try:
        checked_validator_class(schema, field)
    except InvalidJsonSchema as error:
        return (Problem(error.path, f"{error.reason}; {_FIX.format(field=field)}"),)
    return ()


def _problems(field: str, schema: dict[str, Any]) -> tuple[Problem, ...]:
    try:
        # Keys in their order: the first fault jsonschema reports may depend on it.
        key = (field, repr(schema))
    except RecursionError:
        return schema_problems_uncached(field, schema)  # which says it is nested too deeply
    found = _answers.get(key)
    if found is None:
        found = schema_problems_uncached(field, schema)
        if len(_answers) >= CACHED_SCHEMAS:
            del _answers[next(iter(_answers))]  # the oldest answer
        _answers[key] = found
    return found


# (field, the schema's repr) -> its problems; at most CACHED_SCHEMAS, oldest out first.
_answers: dict[tuple[str, str], tuple[Problem, ...]] = {}
