"""The gateway checks an ``/execute`` payload against the ``input_schema`` of the worker it calls.

DESIGN ("Operations"): the gateway checks payloads with the jsonschema
library, so a worker that does not validate its own (one that does not use
the invocation server of ``crank_worker_client.serving``) still gets only
payloads its schema accepts. The rule is the workers' own,
:class:`crank_worker_client.payload.PayloadSchema`, and so is the answer:
422 ``invalid_payload``, ``message`` every problem and ``detail`` each as
``{"path": "payload.items[2].name", "message": ...}``; a caller gets the
same from the gateway as from such a worker.

The schema is per worker registration: the capability's version a worker
registered may differ from another's. So the schema that applies is that
of the worker chosen for the call (a failover to another worker checks
again, against that one's), read from the registry when it is chosen,
before its slot is taken: a refused payload reaches no worker, takes no
slot and is no outcome for outlier ejection.

A schema the gateway cannot apply (one that was never checked by
``/register``, or whose ``$ref`` does not resolve) is the worker's to
answer: the call goes on, and the fault is logged once per schema.

A validator is compiled once per distinct schema (its ``repr``, as
:mod:`crank_registry_asgi.schemas` keys its answers), and at most
``max_schemas`` are kept, the least recently used out first;
``benchmarks/gateway.py`` prints the check's cost per call.
"""

from __future__ import annotations

import collections
from typing import Any

from crank_registry import Problem
from crank_worker_client.payload import JsonSchemaError, PayloadSchema

from .effects import log_fields, logger

__all__ = ["MAX_SCHEMAS", "PayloadChecks"]

#: How many distinct schemas keep a compiled validator.
MAX_SCHEMAS = 1024


class _Compiled:
    """One schema's validator, or why it has none; whether its fault was logged."""

    __slots__ = ("fault", "logged", "validator")

    def __init__(self, validator: PayloadSchema | None, fault: str | None) -> None:
        self.validator = validator
        self.fault = fault
        self.logged = False


class PayloadChecks:
    """Payloads against ``input_schema`` values, a compiled validator kept per distinct schema."""

    def __init__(self, max_schemas: int = MAX_SCHEMAS) -> None:
        if max_schemas < 1:
            raise ValueError(f"max_schemas must be at least 1, not {max_schemas}")
        self.max_schemas = max_schemas
        self._compiled: collections.OrderedDict[str, _Compiled] = collections.OrderedDict()

    def __len__(self) -> int:
        """How many schemas have a compiled validator kept."""
        return len(self._compiled)

    def problems(self, schema: dict[str, Any], payload: Any, *, where: str) -> list[Problem]:
        """Every way ``payload`` fails ``schema`` (paths from ``payload``); empty: it passes.

        ``where`` names the schema's worker and capability in the log line
        of a schema that cannot be applied (its payloads pass here).
        """
        compiled = self._compile(schema)
        if compiled.validator is not None:
            try:
                return compiled.validator.problems(payload)
            except JsonSchemaError as error:  # a $ref that does not resolve
                compiled.fault = str(error)
        if not compiled.logged:
            compiled.logged = True
            logger.warning(
                "payloads not checked against an input_schema the gateway cannot apply; "
                "the worker answers them %s",
                log_fields(schema_of=where, reason=compiled.fault),
            )
        return []

    def _compile(self, schema: dict[str, Any]) -> _Compiled:
        try:
            # Keys in their order, and 1, 1.0 and True told apart: equal reprs, equal schemas.
            key = repr(schema)
        except RecursionError:
            return _compiled(schema)  # too deep to key; compiling says why
        found = self._compiled.get(key)
        if found is not None:
            self._compiled.move_to_end(key)
            return found
        found = self._compiled[key] = _compiled(schema)
        if len(self._compiled) > self.max_schemas:
            self._compiled.popitem(last=False)
        return found


def _compiled(schema: dict[str, Any]) -> _Compiled:
    try:
        return _Compiled(PayloadSchema(schema), None)
    except JsonSchemaError as error:
        return _Compiled(None, str(error))
    except RecursionError:
        return _Compiled(None, "input_schema: nested too deeply to be checked")
