"""SLO files as values: what the operator says a capability offers.

One file, ``STATE_DIR/slos/NAME.yaml``, states the service level of one
``(verb, capability)``, optionally only for the workers whose version is in
a PEP 440 specifier set (DESIGN, "Routing options"). The service reads and
watches the files; the core takes them as values (:class:`SloFile`, each a
file name and its :class:`ServiceLevel`) through
:meth:`~crank_registry.CapabilityRegistry.set_slos`, and routing reads them
through :class:`ServiceLevels` (:func:`~crank_registry.effective_slo`).

A :class:`ServiceLevel` is strict like a request: an unknown key is refused
by name, so a typo in a file (``latency_p99_ms``) is an error, not an SLO
silently missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ._errors import Problem, ValidationError
from ._models import (
    _MAX_TEXT,
    _SLO_KEYS,
    _SLO_SCHEMA,
    _SPECIFIER_PATTERN,
    _TEXT_SCHEMA,
    JSON_SCHEMA,
    CapabilityKey,
    _fail,
    _is_finite_number,
    _optional_specifier,
    _text,
    _verb,
    version_matches,
)

__all__ = ["ServiceLevel", "ServiceLevels", "SloFile", "applying"]


def _slo_value(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """One SLO value, under the rule of a declared ``slo``'s key of the same name."""
    if value is None:
        return
    if not _is_finite_number(value):
        raise _fail(attribute.name, "must be a finite number")
    assert isinstance(value, (int, float))
    if attribute.name == "latency_p95_ms" and not value > 0:
        raise _fail(attribute.name, f"must be > 0 (milliseconds), got {value!r}")
    if attribute.name == "availability" and not 0 <= value <= 1:
        raise _fail(attribute.name, f"must be a fraction between 0 and 1, got {value!r}")
    if attribute.name == "error_budget_pct" and not 0 <= value <= 100:
        raise _fail(attribute.name, f"must be a percentage between 0 and 100, got {value!r}")


def _value_schema(key: str) -> dict[str, Any]:
    return {JSON_SCHEMA: dict(_SLO_SCHEMA["properties"][key])}


@attrs.frozen(kw_only=True)
class ServiceLevel:
    """The content of one SLO file: a capability and the service level it offers.

    ``version``, a PEP 440 specifier set, limits it to the workers whose
    capability version is in the set (absent: every worker of the pair).
    At least one of ``latency_p95_ms``, ``availability`` and
    ``error_budget_pct`` is set; each has the rule of the same key of a
    capability's declared ``slo``.
    """

    verb: str = attrs.field(
        validator=_verb,
        metadata={JSON_SCHEMA: {**_TEXT_SCHEMA, "pattern": "^[^:]*$"}},
    )
    capability: str = attrs.field(validator=_text, metadata={JSON_SCHEMA: _TEXT_SCHEMA})
    version: str | None = attrs.field(
        default=None,
        validator=_optional_specifier,
        metadata={
            JSON_SCHEMA: {
                "maxLength": _MAX_TEXT,
                "pattern": _SPECIFIER_PATTERN,
                "description": "Only the workers whose version is in this PEP 440 "
                "specifier set, e.g. '>=1.2,<2'.",
            }
        },
    )
    latency_p95_ms: float | None = attrs.field(
        default=None, validator=_slo_value, metadata=_value_schema("latency_p95_ms")
    )
    availability: float | None = attrs.field(
        default=None, validator=_slo_value, metadata=_value_schema("availability")
    )
    error_budget_pct: float | None = attrs.field(
        default=None, validator=_slo_value, metadata=_value_schema("error_budget_pct")
    )

    def __attrs_post_init__(self) -> None:
        if not self.values:
            raise _fail("", f"sets no SLO value: give at least one of {', '.join(_SLO_KEYS)}")

    @property
    def key(self) -> CapabilityKey:
        """The capability it is about, ``(verb, capability)``."""
        return (self.verb, self.capability)

    @property
    def values(self) -> dict[str, float]:
        """The SLO keys it sets and their values, in the order of a declared ``slo``."""
        return {key: value for key in _SLO_KEYS if (value := getattr(self, key)) is not None}


@attrs.frozen(kw_only=True)
class SloFile:
    """One SLO file in effect: its name (in the SLO directory) and what it says."""

    file: str = attrs.field(
        validator=_text,
        metadata={JSON_SCHEMA: {**_TEXT_SCHEMA, "description": "The file's name, e.g. a.yaml."}},
    )
    slo: ServiceLevel


class ServiceLevels:
    """The SLO files in effect, indexed by capability: what routing looks up.

    Files are kept in the order of their names: where two files of the
    same pair match one worker (overlapping version sets), the first name
    wins. Two files for the same pair and the same ``version`` (or both
    without one) are refused: one of them would never apply.
    """

    __slots__ = ("_by_key", "files")

    #: What routing reads of one file: its ``version`` set (``None``: every
    #: version) and the values it states (:attr:`ServiceLevel.values`).
    Rule = tuple[str | None, Mapping[str, float]]

    def __init__(self, files: Iterable[SloFile] = ()) -> None:
        given = tuple(files)
        for slo_file in given:
            if not isinstance(slo_file, SloFile):
                raise ValidationError.single("", f"expected SloFile values, got {slo_file!r}")
        ordered = tuple(sorted(given, key=lambda slo_file: slo_file.file))
        by_key: dict[CapabilityKey, list[SloFile]] = {}
        seen: dict[tuple[str, str, str | None], str] = {}
        problems: list[Problem] = []
        for slo_file in ordered:
            level = slo_file.slo
            claim = (level.verb, level.capability, level.version)
            first = seen.setdefault(claim, slo_file.file)
            if first == slo_file.file:
                by_key.setdefault(level.key, []).append(slo_file)
                continue
            scope = "every version" if level.version is None else f"version {level.version!r}"
            problems.append(
                Problem(
                    slo_file.file,
                    f"states the SLO of {level.verb}:{level.capability} for {scope} "
                    f"that {first} states already; merge the two files",
                )
            )
        if problems:
            raise ValidationError(problems)
        #: Every file, in the order of their names.
        self.files: tuple[SloFile, ...] = ordered
        # Each file's values are made once here, not at every route.
        self._by_key: Mapping[CapabilityKey, tuple[ServiceLevels.Rule, ...]] = {
            key: tuple((f.slo.version, f.slo.values) for f in value)
            for key, value in by_key.items()
        }

    def of(self, key: CapabilityKey) -> tuple[ServiceLevels.Rule, ...]:
        """The ``(version set, values)`` of each file about ``key``, in the order of their names."""
        return self._by_key.get(key, ())

    def __len__(self) -> int:
        return len(self.files)


def applying(files: Iterable[ServiceLevels.Rule], version: str) -> Mapping[str, float] | None:
    """The values of the file that applies to a capability ``version``; ``None``: none does.

    ``files``: the files of the capability (:meth:`ServiceLevels.of`). The
    first (by name) whose ``version`` set, if it has one, contains
    ``version``; a version that is not PEP 440 (an older journal's) is in
    no set.
    """
    for specifier, values in files:
        if specifier is None or version_matches(specifier, version):
            return values
    return None
