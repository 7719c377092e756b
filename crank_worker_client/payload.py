"""Payloads against a capability's ``input_schema``, with the jsonschema library.

:class:`PayloadSchema` checks a schema once, when the invocation server is
built, by the rule the controller's ``/register`` applies too
(:mod:`crank_worker_client.json_schema`: the dialect the schema's
``$schema`` names, Draft 2020-12 without one), and then lists every way a
payload fails it; ``format`` is an annotation, as that draft has it.

A problem is a :class:`~crank_registry.Problem`: the path from the body's
``payload`` (``payload.items[2].name``) and a message. The messages of the
common keywords are written below, in one table, so that they name the rule
(``must be at most 10 characters``) rather than repeat the value; the
others are jsonschema's own. A missing required field, or a field that
``additionalProperties: false`` forbids, is a problem at that field's path.

The worker's invocation server and the controller's gateway (before it
forwards an ``/execute`` call) both answer a refused payload with
:func:`refusal_message` and the problems as ``detail``, so a caller gets
the same 422 ``invalid_payload`` from either.

This module is the reason for the ``serving`` extra
(``pip install 'crank-worker-client[serving]'``): it imports jsonschema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from crank_registry import Problem

try:
    import referencing.exceptions
    from jsonschema.exceptions import ValidationError
    from jsonschema.protocols import Validator
except ImportError as error:  # pragma: no cover - exercised by the client_isolated session
    raise ImportError(
        "crank_worker_client.serving validates payloads with jsonschema, which comes with "
        "the serving extra: pip install 'crank-worker-client[serving]'"
    ) from error

from .json_schema import JsonSchemaError, checked_validator_class, schema_path

__all__ = ["INVALID_PAYLOAD", "JsonSchemaError", "PayloadSchema", "refusal_message"]

#: The error code of a payload the ``input_schema`` refuses (status 422).
INVALID_PAYLOAD = "invalid_payload"


def refusal_message(problems: Iterable[Problem]) -> str:
    """The ``message`` of a 422 ``invalid_payload``: every problem, ``path: message``."""
    return "; ".join(map(str, problems))


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def _bound(word: str, exclusive_word: str, key: str) -> Callable[[ValidationError], str]:
    # Draft 4 writes an exclusive bound as a boolean beside minimum/maximum.
    def message(error: ValidationError) -> str:
        exclusive = isinstance(error.schema, dict) and error.schema.get(key) is True
        return f"must be {exclusive_word if exclusive else word} {_json(error.validator_value)}"

    return message


def _type(error: ValidationError) -> str:
    kinds = error.validator_value
    return f"must be of type {' or '.join(kinds) if isinstance(kinds, list) else kinds}"


#: The message of a failed keyword, from its error; other keywords keep
#: jsonschema's message.
_MESSAGES: dict[str, Callable[[ValidationError], str]] = {
    "type": _type,
    "enum": lambda e: f"must be one of {', '.join(map(_json, cast(list[Any], e.validator_value)))}",
    "const": lambda e: f"must be {_json(e.validator_value)}",
    "minLength": lambda e: f"must be at least {e.validator_value} characters",
    "maxLength": lambda e: f"must be at most {e.validator_value} characters",
    "pattern": lambda e: f"must match the pattern {e.validator_value!r}",
    "minimum": _bound(">=", ">", "exclusiveMinimum"),
    "maximum": _bound("<=", "<", "exclusiveMaximum"),
    "exclusiveMinimum": lambda e: f"must be > {_json(e.validator_value)}",
    "exclusiveMaximum": lambda e: f"must be < {_json(e.validator_value)}",
    "multipleOf": lambda e: f"must be a multiple of {_json(e.validator_value)}",
    "minItems": lambda e: f"must have at least {e.validator_value} items",
    "maxItems": lambda e: f"must have at most {e.validator_value} items",
    "uniqueItems": lambda e: "must not hold the same item twice",
    "minProperties": lambda e: f"must have at least {e.validator_value} fields",
    "maxProperties": lambda e: f"must have at most {e.validator_value} fields",
    "anyOf": lambda e: "must match at least one of the schemas of anyOf",
    "oneOf": lambda e: "must match exactly one of the schemas of oneOf",
    "not": lambda e: "must not match the schema of not",
}


class PayloadSchema:
    """One ``input_schema``, checked once; :meth:`problems` validates a payload.

    Raises :class:`JsonSchemaError` when ``schema`` is not a valid JSON
    Schema (the message names the place in the schema and what is wrong).
    """

    def __init__(self, schema: dict[str, Any]) -> None:
        validator_class = checked_validator_class(schema, "input_schema")
        self._validator: Validator = validator_class(schema)

    def problems(self, payload: Any, root: str = "payload") -> list[Problem]:
        """Every way ``payload`` fails the schema, in the schema's order, each once.

        Raises :class:`JsonSchemaError` when the schema holds a ``$ref``
        that does not resolve (nothing is fetched from the network).
        """
        try:
            errors = list(self._validator.iter_errors(payload))
        except referencing.exceptions.Unresolvable as error:
            raise JsonSchemaError(f"input_schema: a $ref does not resolve: {error}") from None
        found = (problem for error in errors for problem in _problems_of(error, root))
        return list(dict.fromkeys(found))


def _problems_of(error: ValidationError, root: str) -> Iterator[Problem]:
    where = schema_path(root, error.absolute_path)
    instance, keyword, value = error.instance, error.validator, error.validator_value
    if keyword == "required" and isinstance(value, list) and isinstance(instance, dict):
        # jsonschema reports each missing field at the object; it belongs at the field.
        for name in value:
            if name not in instance:
                yield Problem(f"{where}.{name}", "is required")
    elif keyword == "additionalProperties" and value is False and isinstance(instance, dict):
        schema = error.schema if isinstance(error.schema, dict) else {}
        declared = schema.get("properties", {})
        patterns = list(schema.get("patternProperties", {}))
        for name in instance:
            if name not in declared and not any(re.search(p, name) for p in patterns):
                yield Problem(f"{where}.{name}", "unknown field")
    elif error.schema is False:
        yield Problem(where, "is not allowed")
    elif isinstance(keyword, str) and keyword in _MESSAGES:
        yield Problem(where, _MESSAGES[keyword](error))
    else:
        yield Problem(where, error.message)
