"""Payloads against a capability's ``input_schema``, with the jsonschema library.

:class:`PayloadSchema` checks a schema once, when the invocation server is
built, and then lists every way a payload fails it. The dialect is the one
the schema's ``$schema`` names (any draft jsonschema knows), Draft 2020-12
without one; ``format`` is an annotation, as that draft has it.

A problem is a :class:`~crank_registry.Problem`: the path from the body's
``payload`` (``payload.items[2].name``) and a message. The messages of the
common keywords are written below, in one table, so that they name the rule
(``must be at most 10 characters``) rather than repeat the value; the
others are jsonschema's own. A missing required field, or a field that
``additionalProperties: false`` forbids, is a problem at that field's path.

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
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError, ValidationError
    from jsonschema.protocols import Validator
    from jsonschema.validators import validator_for
except ImportError as error:  # pragma: no cover - exercised by the client_isolated session
    raise ImportError(
        "crank_worker_client.serving validates payloads with jsonschema, which comes with "
        "the serving extra: pip install 'crank-worker-client[serving]'"
    ) from error

__all__ = ["JsonSchemaError", "PayloadSchema"]


class JsonSchemaError(ValueError):
    """A schema that is not a valid JSON Schema of its dialect, or cannot be applied.

    Found when the server is built (a malformed schema, an unknown
    ``$schema``), or while validating (a ``$ref`` that does not resolve).
    """


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


def _path(root: str, parts: Iterable[str | int]) -> str:
    return root + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts)


class PayloadSchema:
    """One ``input_schema``, checked once; :meth:`problems` validates a payload.

    Raises :class:`JsonSchemaError` when ``schema`` is not a valid JSON
    Schema (the message names the place in the schema and what is wrong).
    """

    def __init__(self, schema: object) -> None:
        validator_class = _validator_class(schema)
        try:
            validator_class.check_schema(schema)  # type: ignore[arg-type]
        except SchemaError as error:
            where = _path("input_schema", error.absolute_path)
            raise JsonSchemaError(f"{where}: {error.message}") from None
        self._validator: Validator = validator_class(schema)  # type: ignore[arg-type]

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


def _validator_class(schema: object) -> type[Validator]:
    if not (isinstance(schema, dict) and "$schema" in schema):
        return Draft202012Validator
    known: type[Validator] | None = validator_for(schema, default=None)  # type: ignore[arg-type]
    if known is None:
        raise JsonSchemaError(
            f"input_schema.$schema: {schema['$schema']!r} is not a JSON Schema dialect that "
            "jsonschema knows; name one of its drafts (such as "
            f"{Draft202012Validator.META_SCHEMA['$id']!r}) or leave $schema out"
        )
    return known


def _problems_of(error: ValidationError, root: str) -> Iterator[Problem]:
    where = _path(root, error.absolute_path)
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
