"""The rule for a capability's JSON Schemas, with the jsonschema library.

A schema's dialect is the draft its ``$schema`` names (any draft jsonschema
knows), Draft 2020-12 without one; the schema must be valid in that dialect
(``check_schema``: the draft's meta-schema, and ``pattern`` a regular
expression). One rule for both sides of a call: the controller's
``/register`` refuses a capability whose ``input_schema`` or
``output_schema`` breaks it, and the invocation server
(:mod:`crank_worker_client.serving`) refuses to serve one, so a schema the
registry holds is one a worker can validate payloads with.

It imports jsonschema, which comes with the ``serving`` extra
(``pip install 'crank-worker-client[serving]'``); the controller's
distribution depends on that extra.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

try:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError
    from jsonschema.protocols import Validator
    from jsonschema.validators import validator_for
except ImportError as error:  # pragma: no cover - exercised by the client_isolated session
    raise ImportError(
        "crank_worker_client.serving validates payloads with jsonschema, which comes with "
        "the serving extra: pip install 'crank-worker-client[serving]'"
    ) from error

__all__ = ["InvalidJsonSchema", "JsonSchemaError", "checked_validator_class", "schema_path"]


class JsonSchemaError(ValueError):
    """A schema that is not a valid JSON Schema of its dialect, or cannot be applied.

    Found when the server is built (a malformed schema, an unknown
    ``$schema``), or while validating (a ``$ref`` that does not resolve).
    """


class InvalidJsonSchema(JsonSchemaError):
    """A schema that breaks the rule: ``path`` is the place in it, ``reason`` what is wrong.

    ``path`` starts with the field that holds the schema
    (``input_schema.properties.name.type``); the message is ``path: reason``.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def schema_path(root: str, parts: Iterable[str | int]) -> str:
    """``root`` then ``parts`` in attribute and index notation: ``payload.items[2].name``."""
    return root + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts)


def checked_validator_class(schema: dict[str, Any], field: str) -> type[Validator]:
    """The validator class of ``schema``'s dialect, once ``schema`` is valid in it.

    Raises :class:`InvalidJsonSchema` naming the place under ``field`` (the
    name of what holds the schema, e.g. ``input_schema``): an unknown
    ``$schema``, or the first fault jsonschema finds against the dialect's
    meta-schema. A schema nested past Python's recursion limit is refused
    at its root.
    """
    validator_class = _dialect(schema, field)
    try:
        validator_class.check_schema(schema)
    except SchemaError as error:
        raise InvalidJsonSchema(schema_path(field, error.absolute_path), error.message) from None
    except RecursionError:
        raise InvalidJsonSchema(field, "nested too deeply to be checked") from None
    return validator_class


def _dialect(schema: dict[str, Any], field: str) -> type[Validator]:
    if "$schema" not in schema:
        return Draft202012Validator
    named = schema["$schema"]
    # default=None: an unknown dialect is refused here, not taken for the latest draft
    # (the stubs do not admit None, which jsonschema returns as given).
    known: type[Validator] | None = (
        validator_for(schema, default=None)  # type: ignore[arg-type]
        if isinstance(named, str)
        else None
    )
    if known is None:
        raise InvalidJsonSchema(
            f"{field}.$schema",
            f"{named!r} is not a JSON Schema dialect that jsonschema knows; name one of its "
            f"drafts (such as {Draft202012Validator.META_SCHEMA['$id']!r}) or leave $schema out",
        )
    return known
