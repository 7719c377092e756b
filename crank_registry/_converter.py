"""The one converter for the wire and the journal.

Structuring is strict: ``"4"`` is not an int, ``"yes"`` is not a bool,
``1`` is not a bool, unknown fields are rejected by name, and every problem of
an input is reported at once as ``path: message`` (one
:class:`ValidationError`), never a traceback. Unstructuring produces
JSON-safe values; optional fields that are ``None`` are left out.

The answers of the HTTP API (:data:`~crank_registry._wire.ANSWER_TYPES`) are
the one exception to "unknown fields are rejected": a client reads them
with the fields it does not know ignored, since a newer controller may add
some.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_unstructure_fn, override

from ._errors import Problem, ValidationError
from ._events import (
    Event,
    HeartbeatReceived,
    PolicyChanged,
    SelfPreservationChanged,
    SlosChanged,
    WorkerDeregistered,
    WorkerDraining,
    WorkerEjected,
    WorkerEvicted,
    WorkerHealthy,
    WorkerImported,
    WorkerRegistered,
    WorkerRestored,
    WorkerUndrained,
    WorkerUnhealthy,
)
from ._models import OMIT_IF_FALSE, CapabilitySchema, HealthState, WorkerState
from ._wire import ANSWER_TYPES

__all__ = [
    "EVENT_TYPES",
    "converter",
    "structure",
    "structure_event",
    "unstructure",
    "unstructure_event",
]

T = TypeVar("T")

#: The tag written as ``"type"`` for each event class, and back.
EVENT_TYPES: Mapping[str, type[Event]] = types.MappingProxyType(
    {
        "registered": WorkerRegistered,
        "heartbeat": HeartbeatReceived,
        "deregistered": WorkerDeregistered,
        "evicted": WorkerEvicted,
        "unhealthy": WorkerUnhealthy,
        "healthy": WorkerHealthy,
        "imported": WorkerImported,
        "slos_changed": SlosChanged,
        "policy_changed": PolicyChanged,
        "self_preservation": SelfPreservationChanged,
        "draining": WorkerDraining,
        "undrained": WorkerUndrained,
        "ejected": WorkerEjected,
        "restored": WorkerRestored,
    }
)
_TAG_OF: dict[type[Event], str] = {cls: tag for tag, cls in EVENT_TYPES.items()}


def _strict_str(value: Any, _: type) -> str:
    if not isinstance(value, str):
        raise ValidationError.single("", "must be a string")
    return value


def _strict_int(value: Any, _: type) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValidationError.single("", "must be an integer")
    return value


def _strict_float(value: Any, _: type) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValidationError.single("", "must be a number")
    try:
        number = float(value)  # an int too large for a float overflows
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValidationError.single("", "must be a finite number")
    return number


def _strict_bool(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise ValidationError.single("", "must be a boolean")
    return value


def _json_object(value: Any, _: type) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError.single("", "must be an object")
    return value


def _health_state(value: Any, tp: type[HealthState] | type[WorkerState]) -> Any:
    for state in tp:
        if value == state.value and isinstance(value, str):
            return state
    names = ", ".join(state.value for state in tp)
    raise ValidationError.single("", f"must be one of {names}")


def _any(value: Any, _: type) -> Any:
    return value


def _is_literal(tp: Any) -> bool:
    return typing.get_origin(tp) is Literal


def _literal(value: Any, tp: Any) -> Any:
    # Compared with its type too: 1 == True, but the literal True is not 1.
    for option in typing.get_args(tp):
        if type(value) is type(option) and value == option:
            return value
    raise ValidationError.single(
        "", f"must be {' or '.join(repr(option) for option in typing.get_args(tp))}"
    )


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(tp)


def _is_homogeneous_tuple(tp: Any) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis


def _is_json_object_type(tp: Any) -> bool:
    return typing.get_origin(tp) is dict


def make_converter() -> cattrs.Converter:
    """Build the strict converter (one instance, :data:`converter`, is shared)."""
    conv = cattrs.Converter()
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(Any, _any)
    conv.register_structure_hook(HealthState, _health_state)
    conv.register_structure_hook(WorkerState, _health_state)
    conv.register_structure_hook_func(_is_json_object_type, _json_object)
    conv.register_structure_hook_func(_is_literal, _literal)

    def structure_optional(value: Any, tp: Any) -> Any:
        if value is None:
            return None
        (inner,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return conv.structure(value, inner)

    def structure_tuple(value: Any, tp: Any) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            raise ValidationError.single("", "must be a list")
        item_type = typing.get_args(tp)[0]
        items: list[Any] = []
        problems: list[Problem] = []
        for index, item in enumerate(value):
            try:
                items.append(conv.structure(item, item_type))
            except ValidationError as error:
                problems.extend(error.prefixed(f"[{index}]").problems)
        if problems:
            raise ValidationError(problems)
        return tuple(items)

    conv.register_structure_hook_func(_is_optional, structure_optional)
    conv.register_structure_hook_func(_is_homogeneous_tuple, structure_tuple)
    conv.register_structure_hook_factory(attrs.has, lambda cls: _attrs_structure_fn(conv, cls))

    conv.register_unstructure_hook(HealthState, lambda state: state.value)
    conv.register_unstructure_hook(WorkerState, lambda state: state.value)
    conv.register_unstructure_hook_factory(attrs.has, lambda cls: _attrs_unstructure_fn(conv, cls))
    return conv


def _attrs_structure_fn(conv: cattrs.Converter, cls: type[T]) -> Callable[[Any, Any], T]:
    """Structure an attrs class field by field, collecting every problem."""
    model: Any = cls
    attrs.resolve_types(model)
    fields = attrs.fields(model)
    names = frozenset(a.name for a in fields)
    lenient = cls in ANSWER_TYPES

    def structure(data: Any, _: Any) -> T:
        if not isinstance(data, dict):
            raise ValidationError.single("", "must be an object")
        unknown = () if lenient else (key for key in data if key not in names)
        problems = [Problem(str(key), "unknown field") for key in unknown]
        kwargs: dict[str, Any] = {}
        for field in fields:
            if field.name not in data:
                if field.default is attrs.NOTHING:
                    problems.append(Problem(field.name, "is required"))
                continue
            try:
                value = conv.structure(data[field.name], field.type)
            except ValidationError as error:
                # Hooks report paths relative to the value they were given.
                problems.extend(error.prefixed(field.name).problems)
                continue
            if field.validator is not None:
                try:
                    field.validator(None, field, value)
                except ValidationError as error:
                    # Validators name their field themselves.
                    problems.extend(error.problems)
                    continue
            kwargs[field.name] = value
        if problems:
            raise ValidationError(problems)
        return cls(**kwargs)

    return structure


def _attrs_unstructure_fn(conv: cattrs.Converter, cls: type[Any]) -> Callable[[Any], Any]:
    overrides: dict[str, Any] = {
        a.name: override(omit_if_default=True)
        for a in attrs.fields(cls)
        if a.default is None or (a.metadata.get(OMIT_IF_FALSE) and not a.default)
    }
    return make_dict_unstructure_fn(cls, conv, **overrides)


#: The converter shared by the wire and the journal.
converter = make_converter()


def structure(data: Any, cls: type[T]) -> T:
    """Turn JSON-like ``data`` into ``cls``; raises :class:`ValidationError` only."""
    try:
        return converter.structure(data, cls)
    except ValidationError:
        raise
    except RecursionError:
        raise ValidationError.single("", "nested too deeply") from None


def unstructure(value: Any) -> Any:
    """Turn a model (or a list of them) into JSON-safe values."""
    return converter.unstructure(value)


def unstructure_event(event: Event) -> dict[str, Any]:
    """An event as a dict with its ``"type"`` tag first."""
    body: dict[str, Any] = converter.unstructure(event)
    return {"type": _TAG_OF[type(event)], **body}


def structure_event(data: Any) -> Event:
    """Read an event written by :func:`unstructure_event`."""
    if not isinstance(data, dict):
        raise ValidationError.single("", "must be an object")
    tag = data.get("type")
    cls = EVENT_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ValidationError.single("type", f"must be one of {', '.join(sorted(EVENT_TYPES))}")
    body = {key: value for key, value in data.items() if key != "type"}
    return structure(body, cls)


# Keep the CapabilitySchema hook warm: it is the hot path of every registration.
converter.get_structure_hook(CapabilitySchema)
