"""Value classes: capabilities, registrations, route requests, endpoints, records.

Every class is frozen. ``__init__`` checks invariants and raises
:class:`ValidationError` naming the field; data from outside comes in through
the converter (:mod:`crank_registry._converter`), which reports every problem
of an input at once instead of the first.
"""

from __future__ import annotations

import enum
import functools
import math
import re
from collections.abc import Mapping
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import attrs
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from ._errors import Problem, ValidationError

__all__ = [
    "CapabilityKey",
    "CapabilitySchema",
    "CapabilityView",
    "DeregisterRequest",
    "HealthPolicy",
    "HeartbeatRequest",
    "HealthState",
    "OMIT_IF_FALSE",
    "JSON_SCHEMA",
    "LoadReport",
    "REMOVAL_REASONS",
    "ROUTE_STRATEGIES",
    "SLO_CONSTRAINT_KEYS",
    "Registration",
    "RemovedWorker",
    "RouteExplanation",
    "RouteRequest",
    "WorkerEndpoint",
    "WorkerRecord",
    "WorkerState",
    "WorkerView",
    "capability_label",
    "is_worker_id",
    "is_worker_url",
    "parse_capability_label",
    "parse_specifier",
    "parse_version",
    "version_matches",
    "version_verdicts",
]

#: A capability is addressed by ``(verb, name)``.
CapabilityKey = tuple[str, str]

#: The attrs metadata key under which a field keeps the JSON Schema keywords
#: of its rule (patterns, lengths, bounds, a description), beside the type
#: that its annotation gives. The validators enforce the rule; the OpenAPI
#: document (``crank_registry_asgi.openapi``) is generated from this.
JSON_SCHEMA = "json_schema"
#: The attrs metadata key of a field the converter leaves out when it is false
#: (``False``, an empty tuple) and that is its default: a field added later, so
#: that a reader from before it reads the value while it is off or empty
#: (DESIGN, "Formats and upgrades").
OMIT_IF_FALSE = "omit_if_false"


def _schema(**keywords: Any) -> dict[str, Any]:
    """The ``metadata=`` of a field whose rule these JSON Schema keywords state."""
    return {JSON_SCHEMA: keywords}


# Written with [0-9], not \d, so that Python and ECMA-262 (the document's
# regex dialect) read it the same way. The rule of a registration's version
# is PEP 440 (packaging's Version); a semantic version is the rule that older
# journals were written under, still read back (DESIGN, "Versions").
_SEMVER_PATTERN = (
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?"
    r"(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$"
)
_SEMVER = re.compile(_SEMVER_PATTERN)
# The canonical form of a PEP 440 version, which the document shows; the core
# accepts every spelling that packaging's Version parses ("v1.0", "1.0-alpha1").
_PEP440_PATTERN = (
    r"^([0-9]+!)?[0-9]+(\.[0-9]+)*((a|b|rc)[0-9]+)?(\.post[0-9]+)?(\.dev[0-9]+)?"
    r"(\+[a-z0-9]+(\.[a-z0-9]+)*)?$"
)
_VERSION_NUMBER = r"[0-9]+(\.[0-9]+)*"
_CLAUSE = (
    f"((==|!=) *{_VERSION_NUMBER}(\\.\\*)?|(<=|>=|<|>) *{_VERSION_NUMBER}"
    r"|~= *[0-9]+(\.[0-9]+)+)"
)
# The common subset of PEP 440 specifier sets, which the document shows; the
# core accepts every set that packaging's SpecifierSet parses.
_SPECIFIER_PATTERN = f"^ *{_CLAUSE} *(, *{_CLAUSE} *)*$"
_WORKER_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
#: A worker id as a JSON Schema pattern (the rule of :func:`is_worker_id`).
_WORKER_ID_PATTERN = f"^{_WORKER_ID.pattern}$"
#: What a worker id is, as a JSON Schema pattern.
WORKER_ID_PATTERN = _WORKER_ID_PATTERN
# The characters str.isspace() accepts, and the other control characters:
# none belongs in a URL, and an HTTP client refuses them.
_NOT_IN_URL_CHARACTERS = r"\s\x00-\x1f\x7f"
_NOT_IN_URL = re.compile(f"[{_NOT_IN_URL_CHARACTERS}]")
_MAX_URL_LENGTH = 2048
_SLO_KEYS = ("latency_p95_ms", "availability", "error_budget_pct")
_MAX_TEXT = 256
#: "Not blank" as a JSON Schema pattern: some character that is not blank.
#: Blank is Python's idea of it (``str.isspace``, which ``str.strip`` uses),
#: which also counts characters such as U+001C..U+001F that a regex
#: engine's ``\s`` may not: the class lists them literally so that every
#: engine reads it the same way.
_NOT_BLANK = "[^" + "".join(chr(c) for c in range(0x3001) if chr(c).isspace()) + "]"
_TEXT_SCHEMA = {"minLength": 1, "maxLength": _MAX_TEXT, "pattern": _NOT_BLANK}
_WORKER_ID_SCHEMA = _schema(
    pattern=_WORKER_ID_PATTERN,
    description="1 to 128 letters, digits, '.', '_' and '-'; the last segment of "
    "the worker's SPIFFE ID.",
)
# The core accepts any absolute http(s) URL with a host; the document
# describes the common subset (a DNS name or IPv4 address and an optional
# port from 1 to 65535), which every schema-driven client can produce and
# the core accepts. Bracketed IPv6 hosts are accepted too, but left out of
# the pattern: JSON Schema cannot tell a valid IPv6 literal from a bad one.
_PORT = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_WORKER_URL_SCHEMA = _schema(
    format="uri",
    maxLength=_MAX_URL_LENGTH,
    pattern=r"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.-]+(:"
    + _PORT
    + r")?(/[A-Za-z0-9._~!$&'()*+,;=:@/%-]*)?$",
    description="An absolute http:// or https:// URL (a host name or IPv4 address, "
    "an optional port; the service also accepts bracketed IPv6 addresses).",
)


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


@functools.lru_cache(maxsize=1024)
def parse_version(text: str) -> Version | None:
    """``text`` as a PEP 440 :class:`~packaging.version.Version`, or ``None`` if it is not one.

    Cached: a fleet registers few distinct versions, and routing with a
    ``version`` constraint compares every candidate's. Surrounding blanks,
    which packaging would strip, are refused: a version is shown as given.
    """
    if text != text.strip():
        return None
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _known_version(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """A capability's version as stored: PEP 440, or (older journals) a semantic version."""
    if not isinstance(value, str):
        raise _fail(attribute.name, "must be a string")
    if parse_version(value) is None and not _SEMVER.fullmatch(value):
        raise _fail(attribute.name, _NOT_PEP440.format(value))


_NOT_PEP440 = "must be a PEP 440 version such as 1.2.0 or 2.0rc1, got {!r}"


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


# What _slo checks, as JSON Schema.
_SLO_SCHEMA: dict[str, Any] = {
    "properties": {
        "latency_p95_ms": {"type": "number", "exclusiveMinimum": 0},
        "availability": {"type": "number", "minimum": 0, "maximum": 1},
        "error_budget_pct": {"type": "number", "minimum": 0, "maximum": 100},
    },
    "additionalProperties": False,
}
assert tuple(_SLO_SCHEMA["properties"]) == _SLO_KEYS


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


# What the document cannot state as a schema (the meta-schema depends on $schema),
# said in words; the service checks it (crank_registry_asgi.schemas).
_VALID_JSON_SCHEMA = (
    " It must be a valid JSON Schema of the draft its $schema names (Draft 2020-12"
    " without one; an unknown $schema is refused): POST /register answers 422"
    " invalid_request for one that is not, naming the place in the schema."
)


@attrs.frozen
class CapabilitySchema:
    """What a worker can do: a verb on a named capability at a version.

    The capability is addressed by ``(verb, name)``; schemas are JSON
    Schemas (dicts), treated as immutable once registered.
    """

    name: str = attrs.field(
        validator=_text,
        metadata=_schema(**_TEXT_SCHEMA, description="The capability's name, e.g. image.classify."),
    )
    verb: str = attrs.field(
        validator=_verb,
        metadata=_schema(
            minLength=1,
            maxLength=_MAX_TEXT,
            allOf=[{"pattern": _NOT_BLANK}, {"pattern": "^[^:]*$"}],
            description="What is done with it, e.g. classify; no ':'.",
        ),
    )
    version: str = attrs.field(
        validator=_known_version,
        metadata=_schema(
            pattern=_PEP440_PATTERN,
            description="A PEP 440 version, e.g. 1.2.0 or 2.0rc1 (MAJOR.MINOR.PATCH is one).",
        ),
    )
    input_schema: dict[str, Any] = attrs.field(
        validator=_json_object,
        metadata=_schema(description="A JSON Schema of the input." + _VALID_JSON_SCHEMA),
    )
    output_schema: dict[str, Any] = attrs.field(
        validator=_json_object,
        metadata=_schema(description="A JSON Schema of the output." + _VALID_JSON_SCHEMA),
    )
    requires_gpu: bool = attrs.field(validator=_flag)
    max_concurrency: int = attrs.field(validator=_concurrency, metadata=_schema(minimum=1))
    runtime: str | None = attrs.field(
        default=None, validator=_optional_text, metadata=_schema(**_TEXT_SCHEMA)
    )
    env_profile: str | None = attrs.field(
        default=None, validator=_optional_text, metadata=_schema(**_TEXT_SCHEMA)
    )
    constraints: dict[str, Any] | None = attrs.field(default=None, validator=_optional_json_object)
    slo: dict[str, float] | None = attrs.field(
        default=None, validator=_slo, metadata=_schema(**_SLO_SCHEMA)
    )
    spiffe_id: str | None = attrs.field(
        default=None,
        validator=_spiffe_id,
        metadata=_schema(maxLength=_MAX_TEXT, pattern=r"^spiffe://."),
    )
    required_capabilities: tuple[str, ...] | None = attrs.field(
        default=None,
        converter=_tuple_or_none,
        validator=_text_list,
        metadata=_schema(items={"pattern": _NOT_BLANK}),
    )
    cost_tokens_per_invocation: float | None = attrs.field(
        default=None, validator=_optional_non_negative, metadata=_schema(minimum=0)
    )
    slo_bid: dict[str, Any] | None = attrs.field(default=None, validator=_optional_json_object)
    controller_affinity: str | None = attrs.field(
        default=None, validator=_optional_text, metadata=_schema(**_TEXT_SCHEMA)
    )

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
    if not is_worker_url(value):
        raise _fail(attribute.name, "must be an absolute http:// or https:// URL")


# The URL of most workers: a scheme, a host name or IPv4 address, a port from
# 1 to 65535 and a plain path. Every URL it matches is one that
# _parses_as_worker_url accepts.
_PLAIN_URL = re.compile(
    r"https?://(?:[A-Za-z0-9-]+\.)*[A-Za-z0-9-]+"
    r"(?::(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
    r"(?:/[A-Za-z0-9._~/-]*)?",
    re.ASCII,
)


def is_worker_url(value: str) -> bool:
    """Whether ``value`` is a worker URL: absolute ``http://`` or ``https://``, with a host.

    A plain URL is recognised by a pattern, any other by parsing it: every
    journal recovery checks each worker's URL again, and parsing is most of
    that check's cost (``benchmarks/journal_recovery.py``). The pattern
    accepts only URLs that parsing accepts (``tests/core/test_worker_urls.py``).
    """
    if len(value) > _MAX_URL_LENGTH:
        return False
    return _PLAIN_URL.fullmatch(value) is not None or _parses_as_worker_url(value)


def _parses_as_worker_url(value: str) -> bool:
    if _NOT_IN_URL.search(value):
        return False
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError for a port out of range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port != 0


def _capability_list(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, tuple) or not all(isinstance(c, CapabilitySchema) for c in value):
        raise _fail(attribute.name, "must be a list of capabilities")
    if not value:
        raise _fail(attribute.name, "must not be empty")
    # Every record read back passes here (benchmarks/redis_recovery.py): the
    # common case, no (verb, name) twice, costs one set.
    if len({c.key for c in value}) == len(value):
        return
    seen: dict[CapabilityKey, int] = {}
    for index, capability in enumerate(value):
        first = seen.setdefault(capability.key, index)
        if first != index:
            raise _fail(
                f"{attribute.name}[{index}]",
                f"duplicate capability {capability_label(capability.key)!r} (also at [{first}])",
            )


def _registered_capabilities(
    instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    """A registration's capabilities: as any record's, and each version PEP 440 (no legacy)."""
    _capability_list(instance, attribute, value)
    assert isinstance(value, tuple)
    for index, capability in enumerate(value):
        if parse_version(capability.version) is None:
            raise _fail(
                f"{attribute.name}[{index}].version", _NOT_PEP440.format(capability.version)
            )


def _finite(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not _is_finite_number(value):
        raise _fail(attribute.name, "must be a finite number")


def _optional_finite(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not _is_finite_number(value):
        raise _fail(attribute.name, "must be a finite number")


def _optional_positive_count(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise _fail(attribute.name, "must be an integer >= 1")


@attrs.frozen
class Registration:
    """A worker's announcement: who it is, where it listens, what it can do."""

    worker_id: str = attrs.field(validator=_worker_id, metadata=_WORKER_ID_SCHEMA)
    worker_url: str = attrs.field(validator=_worker_url, metadata=_WORKER_URL_SCHEMA)
    capabilities: tuple[CapabilitySchema, ...] = attrs.field(
        converter=_tuple_or_none,
        validator=_registered_capabilities,
        metadata=_schema(minItems=1, description="What the worker can do; no (verb, name) twice."),
    )


@attrs.frozen
class WorkerRecord:
    """A worker as the registry stores it, exports it and journals it.

    ``verified`` is false for a record restored from the journal or imported
    from another controller: this registry has not heard from it directly.
    ``silent``: the sweep found it silent past ``unhealthy_after``, and it
    is not routable until it is heard from again. ``draining``: it takes
    no new routes (``POST /workers/{id}/drain``) until it is undrained or
    registers again; written only when true.
    """

    worker_id: str = attrs.field(validator=_worker_id)
    worker_url: str = attrs.field(validator=_worker_url)
    capabilities: tuple[CapabilitySchema, ...] = attrs.field(
        converter=_tuple_or_none, validator=_capability_list
    )
    last_heartbeat: float = attrs.field(validator=_finite)
    verified: bool = attrs.field(default=True, validator=_flag)
    silent: bool = attrs.field(default=False, validator=_flag)
    draining: bool = attrs.field(default=False, validator=_flag, metadata={OMIT_IF_FALSE: True})
    #: Outlier ejection: until when it takes no routes (absent: it is not ejected)...
    ejected_until: float | None = attrs.field(default=None, validator=_optional_finite)
    #: ... the ejections of its current streak (absent: none) ...
    ejections: int | None = attrs.field(default=None, validator=_optional_positive_count)
    #: ... and when the last of them ended (absent: none did).
    ejection_ended: float | None = attrs.field(default=None, validator=_optional_finite)


@attrs.frozen
class WorkerEndpoint:
    """Where to send a request: the worker and the matched capability's version.

    Also the answer to ``POST /route``, which adds ``explain`` when asked.
    """

    worker_id: str = attrs.field(metadata=_WORKER_ID_SCHEMA)
    worker_url: str
    version: str
    explain: RouteExplanation | None = None


class HealthState(enum.Enum):
    """What ``/workers`` reports as ``health``: the health state alone."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    UNVERIFIED = "unverified"


class WorkerState(enum.Enum):
    """What ``/workers`` reports as ``state``: ``draining``, ``ejected``, else the health state.

    The first that applies. The health states keep their names, so a reader of ``state`` from before
    drain and ejection reads every other worker as it did.
    """

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    UNVERIFIED = "unverified"
    DRAINING = "draining"
    EJECTED = "ejected"

    @classmethod
    def of(cls, health: HealthState, *, draining: bool, ejected: bool = False) -> WorkerState:
        """The listed state of a worker in ``health``, draining or not, ejected or not."""
        if draining:
            return cls.DRAINING
        if ejected:
            return cls.EJECTED
        return _STATE_OF_HEALTH[health]


_STATE_OF_HEALTH = {health: WorkerState(health.value) for health in HealthState}


@attrs.frozen
class WorkerView:
    """A worker as seen at one moment ``now``."""

    worker_id: str
    worker_url: str
    last_heartbeat: float
    #: The health state alone (the listings' ``health``; their ``state`` is :attr:`listed_state`).
    state: HealthState
    is_healthy: bool
    capabilities: tuple[CapabilitySchema, ...]
    #: It takes no new routes (drained), whatever its health.
    draining: bool = False
    #: Its latest load report and when it arrived; ``None`` if it sent none.
    load: LoadReport | None = None
    load_reported_at: float | None = None
    #: Until when it is ejected (outlier ejection); ``None``: it is not.
    ejected_until: float | None = attrs.field(default=None, kw_only=True)

    @property
    def listed_state(self) -> WorkerState:
        """The listings' ``state``: ``draining``, ``ejected``, else the health state."""
        return WorkerState.of(
            self.state, draining=self.draining, ejected=self.ejected_until is not None
        )


@attrs.frozen
class CapabilityView:
    """One ``(verb, capability, version)`` and the workers that offer it."""

    verb: str
    capability: str
    version: str
    workers: tuple[str, ...] = attrs.field(metadata=_schema(items={"pattern": _WORKER_ID_PATTERN}))
    healthy_workers: tuple[str, ...] = attrs.field(
        metadata=_schema(items={"pattern": _WORKER_ID_PATTERN})
    )


@functools.lru_cache(maxsize=256)
def parse_specifier(text: str) -> SpecifierSet:
    """``text`` as a PEP 440 specifier set; :class:`ValidationError` naming ``version`` if not.

    Cached: callers repeat the same few constraints.
    """
    try:
        return SpecifierSet(text)
    except InvalidSpecifier:
        raise _fail(
            "version",
            f"must be a PEP 440 specifier set such as '>=1.2,<2', '~=1.4' or '==2.*', got {text!r}",
        ) from None


@functools.lru_cache(maxsize=4096)
def version_matches(specifier: str, version: str) -> bool:
    """Whether a capability's ``version`` is in the ``specifier`` set.

    A version that is not PEP 440 (an older journal's) is in none.
    Pre-releases are versions like any other: a worker runs what it runs
    (and the answer must not depend on packaging's default). Cached: few
    constraints meet few versions, and the comparison is the filter's cost.
    """
    parsed = parse_version(version)
    return parsed is not None and parse_specifier(specifier).contains(parsed, prereleases=True)


#: The most versions a :func:`version_verdicts` table keeps (then it starts again).
_MAX_VERDICTS = 1024


class _Verdicts(dict[str, bool]):
    """:func:`version_matches` of one specifier set, by version, filled as routes ask."""

    __slots__ = ("specifier",)

    def __init__(self, specifier: str) -> None:
        super().__init__()
        self.specifier = specifier

    def __missing__(self, version: str) -> bool:
        if len(self) >= _MAX_VERDICTS:
            self.clear()  # bounded: a pair has few versions; a flood of new ones starts over
        verdict = self[version] = version_matches(self.specifier, version)
        return verdict


@functools.lru_cache(maxsize=256)
def version_verdicts(specifier: str) -> Mapping[str, bool]:
    """Whether each version is in the ``specifier`` set: ``version_verdicts(s)[v]``.

    The same answer as ``version_matches(s, v)``, read by the version filter
    for every member of a route: a lookup in a table kept per specifier set
    (a dict subscript, no call), not a call of :func:`version_matches` (a
    tuple key hashed per member; a fifth of a route with ``version``).
    """
    return _Verdicts(specifier)


def _optional_specifier(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    _text(instance, attribute, value)
    assert isinstance(value, str)
    parse_specifier(value)


#: The keys of ``slo_constraints``: what a caller may bound.
SLO_CONSTRAINT_KEYS = ("latency_p95_ms", "availability")
_SLO_CONSTRAINTS_SCHEMA: dict[str, Any] = {
    "properties": {
        "latency_p95_ms": {"type": "number", "minimum": 0},
        "availability": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "additionalProperties": False,
    "minProperties": 1,
    "description": "A candidate's effective SLO must have latency_p95_ms <= and "
    "availability >= these; a worker with no value for an asked key is not a candidate.",
}


def _slo_constraints(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise _fail(attribute.name, "must be an object")
    if not value:
        raise _fail(attribute.name, f"must bound {' and/or '.join(SLO_CONSTRAINT_KEYS)}")
    problems: list[Problem] = []
    for key, item in value.items():
        path = f"{attribute.name}.{key}"
        if key not in SLO_CONSTRAINT_KEYS:
            message = f"unknown field (expected {' or '.join(SLO_CONSTRAINT_KEYS)})"
        elif not _is_finite_number(item):
            message = "must be a finite number"
        elif key == "availability" and not 0 <= item <= 1:
            message = "must be a fraction between 0 and 1"
        elif key == "latency_p95_ms" and item < 0:
            message = "must be >= 0"
        else:
            continue
        problems.append(Problem(path, message))
    if problems:
        raise ValidationError(problems)


def _worker_ids(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, tuple):
        raise _fail(attribute.name, "must be a list of worker ids")
    for index, item in enumerate(value):
        if not is_worker_id(item):
            raise _fail(
                f"{attribute.name}[{index}]",
                "must be a worker id: 1 to 128 letters, digits, '.', '_' and '-'",
            )


#: The routing strategies, the first the default.
ROUTE_STRATEGIES = ("round_robin", "least_loaded", "affinity")


def _strategy(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if value not in ROUTE_STRATEGIES or not isinstance(value, str):
        raise _fail(attribute.name, f"must be one of {', '.join(ROUTE_STRATEGIES)}, got {value!r}")


def _optional_flag(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _flag(instance, attribute, value)


def check_affinity(strategy: str | None, affinity_key: str | None) -> None:
    """``affinity_key`` goes with ``strategy: affinity``, and only with it."""
    if strategy == "affinity" and affinity_key is None:
        raise _fail("affinity_key", "is required by strategy 'affinity'")
    if affinity_key is not None and strategy != "affinity":
        raise _fail("affinity_key", "is used only with strategy 'affinity'; add it or drop the key")


# The routing options' fields, shared by /route's body (RouteRequest) and
# /execute's (ExecuteRequest): one definition of each rule and its schema.


def slo_constraints_option() -> Any:
    """The ``slo_constraints`` field of a request with routing options."""
    return attrs.field(
        default=None, validator=_slo_constraints, metadata=_schema(**_SLO_CONSTRAINTS_SCHEMA)
    )


def budget_tokens_option() -> Any:
    """The ``budget_tokens`` field of a request with routing options."""
    return attrs.field(
        default=None,
        validator=_optional_non_negative,
        metadata=_schema(
            minimum=0,
            description="Only workers costing at most this many tokens per call; "
            "the cheapest cost wins, round-robin among equal cost.",
        ),
    )


def version_option() -> Any:
    """The ``version`` field (a PEP 440 specifier set) of a request with routing options."""
    return attrs.field(
        default=None,
        validator=_optional_specifier,
        metadata=_schema(
            maxLength=_MAX_TEXT,
            pattern=_SPECIFIER_PATTERN,
            description="A PEP 440 specifier set over the capability's version, "
            "e.g. '>=1.2,<2', '~=1.4', '==2.*'.",
        ),
    )


def exclude_option() -> Any:
    """The ``exclude`` field (worker ids) of a request with routing options."""
    return attrs.field(
        default=None,
        converter=_tuple_or_none,
        validator=_worker_ids,
        metadata=_schema(
            items={"pattern": _WORKER_ID_PATTERN},
            description="Worker ids not to return (a caller retrying after a failed call).",
        ),
    )


def strategy_option() -> Any:
    """The ``strategy`` field of a request with routing options."""
    return attrs.field(
        default=None,
        validator=_strategy,
        metadata=_schema(
            enum=[*ROUTE_STRATEGIES, None],
            description="How to choose among the candidates; round_robin by default.",
        ),
    )


def affinity_key_option() -> Any:
    """The ``affinity_key`` field (only with ``strategy: affinity``) of a routed request."""
    return attrs.field(
        default=None,
        validator=_optional_text,
        metadata=_schema(
            **_TEXT_SCHEMA,
            description="Required by, and only with, strategy affinity: the same key goes "
            "to the same worker while it stays a candidate.",
        ),
    )


@attrs.frozen
class RouteRequest:
    """A caller's question: which worker should serve ``verb`` on ``capability``.

    The optional fields are the routing options (DESIGN, "Routing
    options"); the registry applies them (``crank_registry._routing``).
    ``requester_identity`` is the SPIFFE ID the access policy decides for;
    over HTTP only a ``--trusted-gateway`` may set it (for its users).
    """

    verb: str = attrs.field(validator=_text, metadata=_schema(**_TEXT_SCHEMA))
    capability: str = attrs.field(validator=_text, metadata=_schema(**_TEXT_SCHEMA))
    requester_identity: str | None = attrs.field(
        default=None,
        validator=_optional_text,
        metadata=_schema(
            **_TEXT_SCHEMA,
            description="The SPIFFE ID the access policy decides for, in place of the "
            "caller's: accepted only from an identity named by --trusted-gateway.",
        ),
    )
    slo_constraints: dict[str, Any] | None = slo_constraints_option()  # noqa: RUF009 (a field)
    budget_tokens: float | None = budget_tokens_option()
    idempotency_key: str | None = attrs.field(
        default=None,
        validator=_optional_text,
        metadata=_schema(
            **_TEXT_SCHEMA,
            description="The same key for the same verb and capability returns the same "
            "worker while it stays a candidate, for the registry's idempotency TTL.",
        ),
    )
    version: str | None = version_option()
    exclude: tuple[str, ...] | None = exclude_option()
    strategy: str | None = strategy_option()
    affinity_key: str | None = affinity_key_option()
    explain: bool | None = attrs.field(
        default=None,
        validator=_optional_flag,
        metadata=_schema(
            description="true: the answer (and a 503 no_worker_available) says why each "
            "worker was or was not a candidate."
        ),
    )

    def __attrs_post_init__(self) -> None:
        check_affinity(self.strategy, self.affinity_key)


#: Why a worker of the capability was not a candidate, in the order of the rules.
REMOVAL_REASONS = (
    "unhealthy",
    "draining",
    "version",
    "excluded",
    "policy",
    "slo",
    "budget",
    "at_capacity",
)


@attrs.frozen(kw_only=True)
class RemovedWorker:
    """A worker that was not a candidate, and the first rule that removed it."""

    worker_id: str = attrs.field(metadata=_WORKER_ID_SCHEMA)
    reason: str = attrs.field(metadata=_schema(enum=list(REMOVAL_REASONS)))


@attrs.frozen(kw_only=True)
class RouteExplanation:
    """Why a route chose as it did: every worker of the capability appears once.

    ``candidates`` passed every rule (the strategy chose among them);
    ``removed`` names the first rule that removed each other worker.
    """

    strategy: str = attrs.field(metadata=_schema(enum=list(ROUTE_STRATEGIES)))
    candidates: tuple[str, ...] = attrs.field(
        metadata=_schema(items={"pattern": _WORKER_ID_PATTERN})
    )
    removed: tuple[RemovedWorker, ...]


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


def _optional_count(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(attribute.name, "must be an integer")
    if value < 0:
        raise _fail(attribute.name, "must be >= 0")


def _optional_fraction(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not _is_finite_number(value) or not 0 <= value <= 1:  # type: ignore[operator]
        raise _fail(attribute.name, "must be a fraction between 0 and 1")


@attrs.frozen(kw_only=True)
class LoadReport:
    """A worker's load, as its heartbeat reports it (DESIGN, "Load reports"); each field optional.

    ``in_flight``: calls the worker is serving now (all its capabilities);
    ``latency_p95_ms``: the 95th percentile of its recent calls' latency;
    ``error_rate``: the share of its recent calls that failed.
    """

    in_flight: int | None = attrs.field(
        default=None,
        validator=_optional_count,
        metadata=_schema(minimum=0, description="Calls being served now, all capabilities."),
    )
    latency_p95_ms: float | None = attrs.field(
        default=None,
        validator=_optional_non_negative,
        metadata=_schema(minimum=0, description="p95 latency of recent calls, in ms."),
    )
    error_rate: float | None = attrs.field(
        default=None,
        validator=_optional_fraction,
        metadata=_schema(
            minimum=0, maximum=1, description="The share of recent calls that failed."
        ),
    )


@attrs.frozen
class HeartbeatRequest:
    """The body of a heartbeat: the worker proving it is alive, and optionally its load."""

    worker_id: str = attrs.field(validator=_worker_id, metadata=_WORKER_ID_SCHEMA)
    load: LoadReport | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class DeregisterRequest:
    """The body of a deregistration: the worker leaving."""

    worker_id: str = attrs.field(validator=_worker_id, metadata=_WORKER_ID_SCHEMA)
