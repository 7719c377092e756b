"""Value classes: capabilities, registrations, route requests, endpoints, records.

Every class is frozen. ``__init__`` checks invariants and raises
:class:`ValidationError` naming the field; data from outside comes in through
the converter (:mod:`crank_registry._converter`), which reports every problem
of an input at once instead of the first.
"""

from __future__ import annotations

import enum
import math
import re
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import attrs

from ._errors import Problem, ValidationError

__all__ = [
    "CapabilityKey",
    "CapabilitySchema",
    "CapabilityView",
    "DeregisterRequest",
    "HealthPolicy",
    "HeartbeatRequest",
    "HealthState",
    "Registration",
    "RouteRequest",
    "WorkerEndpoint",
    "WorkerRecord",
    "WorkerView",
    "capability_label",
    "is_worker_id",
    "parse_capability_label",
]

#: A capability is addressed by ``(verb, name)``.
CapabilityKey = tuple[str, str]

_SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
    r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?",
    re.ASCII,  # \d is 0-9 only, not every Unicode digit
)
_WORKER_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# The characters str.isspace() accepts, and the other control characters:
# none belongs in a URL, and an HTTP client refuses them.
_NOT_IN_URL_CHARACTERS = r"\s\x00-\x1f\x7f"
_NOT_IN_URL = re.compile(f"[{_NOT_IN_URL_CHARACTERS}]")
_MAX_URL_LENGTH = 2048
_SLO_KEYS = ("latency_p95_ms", "availability", "error_budget_pct")
_MAX_TEXT = 256


def _fail(field: str, message: str) -> ValidationError:
    return ValidationError.single(field, message)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    """A number that is finite as a float (JSON allows ints too large for one)."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _text(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise _fail(attribute.name, "must be a string")
    if not value.strip():
        raise _fail(attribute.name, "must not be empty")
    if len(value) > _MAX_TEXT:
        raise _fail(attribute.name, f"must be at most {_MAX_TEXT} characters")


def _optional_text(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _text(instance, attribute, value)


def _semver(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise _fail(attribute.name, "must be a string")
    if not _SEMVER.fullmatch(value):
        raise _fail(attribute.name, f"must be a semantic version MAJOR.MINOR.PATCH, got {value!r}")


def _json_object(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, dict):
        raise _fail(attribute.name, "must be an object")
    if not all(isinstance(key, str) for key in value):
        raise _fail(attribute.name, "keys must be strings")


def _optional_json_object(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _json_object(instance, attribute, value)


def _flag(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise _fail(attribute.name, "must be a boolean")


def _concurrency(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(attribute.name, "must be an integer")
    if value < 1:
        raise _fail(attribute.name, "must be >= 1")


def _optional_non_negative(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not _is_number(value):
        raise _fail(attribute.name, "must be a number")
    if not _is_finite_number(value) or value < 0:
        raise _fail(attribute.name, "must be a finite number >= 0")


def _slo(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise _fail(attribute.name, "must be an object")
    problems: list[Problem] = []
    for key, item in value.items():
        path = f"{attribute.name}.{key}"
        if key not in _SLO_KEYS:
            message = f"unknown field (expected one of {', '.join(_SLO_KEYS)})"
        elif not _is_finite_number(item):
            message = "must be a finite number"
        elif key == "availability" and not 0 <= item <= 1:
            message = "must be a fraction between 0 and 1"
        elif key == "error_budget_pct" and not 0 <= item <= 100:
            message = "must be between 0 and 100"
        elif key == "latency_p95_ms" and item <= 0:
            message = "must be > 0"
        else:
            continue
        problems.append(Problem(path, message))
    if problems:
        raise ValidationError(problems)


def _spiffe_id(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    _text(instance, attribute, value)
    assert isinstance(value, str)
    if not value.startswith("spiffe://") or len(value) <= len("spiffe://"):
        raise _fail(attribute.name, "must be a SPIFFE ID starting with 'spiffe://'")


def _text_list(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, tuple):
        raise _fail(attribute.name, "must be a list of strings")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise _fail(f"{attribute.name}[{index}]", "must be a non-empty string")


def _tuple_or_none(value: Any) -> Any:
    # In-process callers may pass a list; the model stores a tuple so that a
    # frozen value stays frozen.
    return tuple(value) if isinstance(value, list) else value


def _verb(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    _text(instance, attribute, value)
    # Listings print a capability as "verb:name"; a colon in the verb would
    # make that form ambiguous (a name may hold colons).
    if ":" in value:  # type: ignore[operator]
        raise _fail(attribute.name, "must not contain ':'")


@attrs.frozen
class CapabilitySchema:
    """What a worker can do: a verb on a named capability at a version.

    The capability is addressed by ``(verb, name)``; schemas are JSON
    Schemas (dicts), treated as immutable once registered.
    """

    name: str = attrs.field(validator=_text)
    verb: str = attrs.field(validator=_verb)
    version: str = attrs.field(validator=_semver)
    input_schema: dict[str, Any] = attrs.field(validator=_json_object)
    output_schema: dict[str, Any] = attrs.field(validator=_json_object)
    requires_gpu: bool = attrs.field(validator=_flag)
    max_concurrency: int = attrs.field(validator=_concurrency)
    runtime: str | None = attrs.field(default=None, validator=_optional_text)
    env_profile: str | None = attrs.field(default=None, validator=_optional_text)
    constraints: dict[str, Any] | None = attrs.field(default=None, validator=_optional_json_object)
    slo: dict[str, float] | None = attrs.field(default=None, validator=_slo)
    spiffe_id: str | None = attrs.field(default=None, validator=_spiffe_id)
    required_capabilities: tuple[str, ...] | None = attrs.field(
        default=None, converter=_tuple_or_none, validator=_text_list
    )
    cost_tokens_per_invocation: float | None = attrs.field(
        default=None, validator=_optional_non_negative
    )
    slo_bid: dict[str, Any] | None = attrs.field(default=None, validator=_optional_json_object)
    controller_affinity: str | None = attrs.field(default=None, validator=_optional_text)

    @property
    def key(self) -> CapabilityKey:
        """The address of this capability, ``(verb, name)``."""
        return (self.verb, self.name)


def capability_label(key: CapabilityKey) -> str:
    """``(verb, name)`` as the ``"verb:name"`` form used by listings."""
    return f"{key[0]}:{key[1]}"


def parse_capability_label(label: str) -> CapabilityKey:
    """Parse ``"verb:name"``; raises :class:`ValidationError` on another form."""
    verb, sep, name = label.partition(":")
    if not sep or not verb or not name:
        raise _fail("capability", f"must have the form 'verb:name', got {label!r}")
    return (verb, name)


def is_worker_id(value: object) -> bool:
    """Whether ``value`` is a worker id: 1 to 128 letters, digits, ``.``, ``_`` and ``-``.

    A worker id is also the last segment of the worker's SPIFFE ID, so the
    names of worker certificates follow the same rule.
    """
    return isinstance(value, str) and _WORKER_ID.fullmatch(value) is not None


def _worker_id(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise _fail(attribute.name, "must be a string")
    if not is_worker_id(value):
        raise _fail(
            attribute.name,
            "must be 1 to 128 characters of letters, digits, '.', '_' and '-'",
        )


def _worker_url(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise _fail(attribute.name, "must be a string")
    message = "must be an absolute http:// or https:// URL"
    if len(value) > _MAX_URL_LENGTH or _NOT_IN_URL.search(value):
        raise _fail(attribute.name, message)
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError for a port out of range
    except ValueError:
        raise _fail(attribute.name, message) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise _fail(attribute.name, message)


def _capability_list(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, tuple) or not all(isinstance(c, CapabilitySchema) for c in value):
        raise _fail(attribute.name, "must be a list of capabilities")
    if not value:
        raise _fail(attribute.name, "must not be empty")
    seen: dict[CapabilityKey, int] = {}
    for index, capability in enumerate(value):
        first = seen.setdefault(capability.key, index)
        if first != index:
            raise _fail(
                f"{attribute.name}[{index}]",
                f"duplicate capability {capability_label(capability.key)!r} (also at [{first}])",
            )


def _finite(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not _is_finite_number(value):
        raise _fail(attribute.name, "must be a finite number")


@attrs.frozen
class Registration:
    """A worker's announcement: who it is, where it listens, what it can do."""

    worker_id: str = attrs.field(validator=_worker_id)
    worker_url: str = attrs.field(validator=_worker_url)
    capabilities: tuple[CapabilitySchema, ...] = attrs.field(
        converter=_tuple_or_none, validator=_capability_list
    )


@attrs.frozen
class WorkerRecord:
    """A worker as the registry stores it, exports it and journals it.

    ``verified`` is false for a record restored from the journal or imported
    from another controller: this registry has not heard from it directly.
    ``silent``: the sweep found it silent past ``unhealthy_after``, and it
    is not routable until it is heard from again.
    """

    worker_id: str = attrs.field(validator=_worker_id)
    worker_url: str = attrs.field(validator=_worker_url)
    capabilities: tuple[CapabilitySchema, ...] = attrs.field(
        converter=_tuple_or_none, validator=_capability_list
    )
    last_heartbeat: float = attrs.field(validator=_finite)
    verified: bool = attrs.field(default=True, validator=_flag)
    silent: bool = attrs.field(default=False, validator=_flag)


@attrs.frozen
class WorkerEndpoint:
    """Where to send a request: the worker and the matched capability's version."""

    worker_id: str
    worker_url: str
    version: str


class HealthState(enum.Enum):
    """What ``/workers`` reports as ``state``."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    UNVERIFIED = "unverified"


@attrs.frozen
class WorkerView:
    """A worker as seen at one moment ``now``."""

    worker_id: str
    worker_url: str
    last_heartbeat: float
    state: HealthState
    is_healthy: bool
    capabilities: tuple[CapabilitySchema, ...]


@attrs.frozen
class CapabilityView:
    """One ``(verb, capability, version)`` and the workers that offer it."""

    verb: str
    capability: str
    version: str
    workers: tuple[str, ...]
    healthy_workers: tuple[str, ...]


def _optional_version(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _semver(instance, attribute, value)


@attrs.frozen
class RouteRequest:
    """A caller's question: which worker should serve ``verb`` on ``capability``.

    The optional fields are part of the model so that clients can be written
    against it; the registry refuses each with ``not_supported`` until it has
    behaviour for it.
    """

    verb: str = attrs.field(validator=_text)
    capability: str = attrs.field(validator=_text)
    requester_identity: str | None = attrs.field(default=None, validator=_optional_text)
    slo_constraints: dict[str, Any] | None = attrs.field(
        default=None, validator=_optional_json_object
    )
    budget_tokens: float | None = attrs.field(default=None, validator=_optional_non_negative)
    idempotency_key: str | None = attrs.field(default=None, validator=_optional_text)
    version: str | None = attrs.field(default=None, validator=_optional_version)


def _positive(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not _is_finite_number(value) or value <= 0:  # type: ignore[operator]
        raise _fail(attribute.name, "must be a finite number > 0")


@attrs.frozen
class HealthPolicy:
    """The registry's timings, in seconds.

    A worker is routable while its last heartbeat is at most
    ``unhealthy_after`` old and is evicted once it is more than
    ``evict_after`` old.
    """

    heartbeat_interval: float = attrs.field(default=30.0, validator=_positive)
    unhealthy_after: float = attrs.field(default=60.0, validator=_positive)
    evict_after: float = attrs.field(default=120.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if not self.heartbeat_interval <= self.unhealthy_after <= self.evict_after:
            raise ValidationError.single(
                "", "expected heartbeat_interval <= unhealthy_after <= evict_after"
            )


@attrs.frozen
class HeartbeatRequest:
    """The body of a heartbeat: the worker proving it is alive."""

    worker_id: str = attrs.field(validator=_worker_id)


@attrs.frozen
class DeregisterRequest:
    """The body of a deregistration: the worker leaving."""

    worker_id: str = attrs.field(validator=_worker_id)
