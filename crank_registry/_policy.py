"""The access policy: who may route to which ``verb:name``.

The registry asks a :class:`Policy` before it routes (the ``policy`` filter
of DESIGN "How options combine"): ``decide(requester, verb, capability)``.
The built-in one, :class:`BuiltinPolicy`, applies in order:

1. least privilege: a requester that is a registered worker
   (``spiffe://TRUST_DOMAIN/worker/NAME``) whose capabilities declare
   ``required_capabilities`` may route only to those ``verb:name`` labels
   (their union over its capabilities; declared on none: no restriction);
2. the rules (:class:`PolicyRules`, parsed from the ``--policy`` TOML file by
   :func:`parse_policy`): the first ``[[rule]]`` whose ``identity`` glob
   matches the requester and whose ``deny`` or ``allow`` globs match
   ``verb:name`` decides (``deny`` is looked at first within a rule); no
   rule matches: ``default``.

An anonymous requester (no identity) is matched as the empty string: only a
rule whose ``identity`` glob matches the empty string (``"*"``) applies to
it. Globs are :func:`fnmatch.fnmatchcase` (``*``, ``?``, ``[...]``; ``*``
crosses ``/`` and ``:``).

What travels: the built-in policy is data (:class:`AccessRules`: the rules
and the trust domain they are read in), so it is a change of the registry
(:class:`~crank_registry.PolicyChanged`), journalled and sent to followers,
which then answer ``policy_denied`` as the controller does. Any other
:class:`Policy` is code: a registry asks it in its own process only
(:meth:`~crank_registry.CapabilityRegistry.set_access_policy`), and it is
neither a change nor in a snapshot.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Callable
from typing import Protocol

import attrs

from ._errors import ValidationError
from ._identity import DEFAULT_TRUST_DOMAIN, is_trust_domain, worker_name_of

__all__ = [
    "AccessRules",
    "BuiltinPolicy",
    "Decision",
    "Policy",
    "PolicyFileError",
    "PolicyRule",
    "PolicyRules",
    "parse_policy",
]

_DEFAULTS = ("allow", "deny")


@attrs.frozen
class Decision:
    """A policy's answer: ``allowed``, and ``reason`` (the rule that decided, in words)."""

    allowed: bool
    reason: str


class Policy(Protocol):
    """Who may route to what; the registry asks before every route when it has one.

    (Except the built-in policy when it allows every anonymous route: a
    plain route does not ask it, knowing the answer.)
    """

    def decide(self, requester: str | None, verb: str, capability: str) -> Decision:
        """Whether ``requester`` (a SPIFFE ID; ``None``: anonymous) may route to the pair."""
        ...


def _identity_glob(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value:
        raise ValidationError.single(attribute.name, "must be a non-empty glob over SPIFFE IDs")


def _label_globs(
    _: object, attribute: attrs.Attribute[tuple[str, ...] | None], value: tuple[str, ...] | None
) -> None:
    if value is not None and (not value or not all(value)):
        raise ValidationError.single(
            attribute.name, 'must be a non-empty list of non-empty globs over "verb:name"'
        )


def _default(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in _DEFAULTS:
        raise ValidationError.single(attribute.name, f'must be "allow" or "deny", got {value!r}')


def _trust_domain(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not is_trust_domain(value):
        raise ValidationError.single(
            attribute.name,
            f"must be a SPIFFE trust domain (lowercase letters, digits, '.', '_', '-'), "
            f"got {value!r}",
        )


@attrs.frozen
class PolicyRule:
    """One ``[[rule]]``: for identities matching ``identity``, what is denied or allowed.

    ``allow`` and ``deny`` are globs over ``verb:name`` labels; ``None``: not given
    (a rule gives at least one of them).
    """

    identity: str = attrs.field(validator=_identity_glob)
    allow: tuple[str, ...] | None = attrs.field(default=None, validator=_label_globs)
    deny: tuple[str, ...] | None = attrs.field(default=None, validator=_label_globs)

    def __attrs_post_init__(self) -> None:
        if self.allow is None and self.deny is None:
            raise ValidationError.single("", "a rule needs allow or deny (or both)")


@attrs.frozen
class PolicyRules:
    """The parsed policy file: ordered rules and the ``default`` (``"allow"`` or ``"deny"``).

    A value: it compares equal when the file says the same thing.
    """

    rules: tuple[PolicyRule, ...] = ()
    default: str = attrs.field(default="allow", validator=_default)


@attrs.frozen
class AccessRules(PolicyRules):
    """The built-in policy as data: the file's rules, and the ``trust_domain`` of rule (1).

    What :class:`~crank_registry.PolicyChanged` and a snapshot carry; rule
    (1) reads a requester's worker name in ``trust_domain`` (a worker
    identity of another domain is not a registered worker).
    """

    trust_domain: str = attrs.field(default=DEFAULT_TRUST_DOMAIN, validator=_trust_domain)

    @classmethod
    def of(cls, rules: PolicyRules, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> AccessRules:
        """``rules`` (a parsed file) read in ``trust_domain``."""
        return cls(rules=rules.rules, default=rules.default, trust_domain=trust_domain)

    def policy(self, targets: Callable[[str], frozenset[str] | None]) -> BuiltinPolicy:
        """The :class:`BuiltinPolicy` of these rules, with a registry's ``targets`` for rule (1)."""
        return BuiltinPolicy(self, targets, self.trust_domain)


class PolicyFileError(ValueError):
    """A policy file that is not valid; the message names the file, the rule and the field."""


def _globs(source: str, where: str, field: str, value: object) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(item, str) and item for item in value)
    ):
        raise PolicyFileError(
            f"{source}: {where}.{field} must be a non-empty list of non-empty strings "
            f'(globs over "verb:name", e.g. ["classify:image.*"]), got {value!r}'
        )
    return tuple(value)


def _rule(source: str, index: int, table: object) -> PolicyRule:
    where = f"rule[{index}]"
    if not isinstance(table, dict):
        raise PolicyFileError(f"{source}: {where} must be a table ([[rule]]), got {table!r}")
    unknown = sorted(set(table) - {"identity", "allow", "deny"})
    if unknown:
        raise PolicyFileError(
            f"{source}: {where}.{unknown[0]} is not a rule field; "
            "a rule has identity, allow and deny"
        )
    identity = table.get("identity")
    if not isinstance(identity, str) or not identity:
        raise PolicyFileError(
            f"{source}: {where}.identity must be a non-empty string (a glob over SPIFFE IDs, "
            f'e.g. "spiffe://example.org/client/*"), got {identity!r}'
        )
    if "allow" not in table and "deny" not in table:
        raise PolicyFileError(f"{source}: {where} needs allow or deny (or both)")
    allow = _globs(source, where, "allow", table["allow"]) if "allow" in table else None
    deny = _globs(source, where, "deny", table["deny"]) if "deny" in table else None
    return PolicyRule(identity=identity, allow=allow, deny=deny)


def parse_policy(text: str, source: str) -> PolicyRules:
    """The rules of a policy file's TOML ``text``; ``source`` names the file in errors.

    Strict: an unknown key, a wrong type or TOML that does not parse
    raises :class:`PolicyFileError` naming ``source``, the rule and the field.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise PolicyFileError(f"{source}: not valid TOML: {error}") from None
    unknown = sorted(set(document) - {"default", "rule"})
    if unknown:
        raise PolicyFileError(
            f"{source}: {unknown[0]} is not a policy field; the file has default and [[rule]]"
        )
    default = document.get("default", "allow")
    if default not in _DEFAULTS:
        raise PolicyFileError(f'{source}: default must be "allow" or "deny", got {default!r}')
    tables = document.get("rule", [])
    if not isinstance(tables, list):
        raise PolicyFileError(
            f"{source}: rule must be an array of tables ([[rule]]), not a single [rule]"
        )
    return PolicyRules(
        rules=tuple(_rule(source, index, table) for index, table in enumerate(tables)),
        default=default,
    )


_Match = Callable[[str], object]


def _matcher(globs: tuple[str, ...]) -> _Match:
    """One compiled pattern for any of ``globs``: its ``match``."""
    return re.compile("|".join(fnmatch.translate(glob) for glob in globs)).match


class _Globs:
    """A rule's ``deny`` or ``allow`` globs, compiled, each with the decision it makes."""

    __slots__ = ("any", "each")

    def __init__(self, globs: tuple[str, ...], decision: Callable[[str], Decision]) -> None:
        # Any of them as one regex (most labels match none); on a match, the
        # first glob that matches gives its decision, made once here.
        self.any = _matcher(globs)
        self.each = tuple((_matcher((glob,)), decision(glob)) for glob in globs)

    def decision(self, label: str) -> Decision | None:
        """The decision of the first glob matching ``label``; ``None``: none does."""
        if self.any(label) is None:
            return None
        each = self.each
        if len(each) == 1:
            return each[0][1]  # the one glob matched: no second match
        return next(decision for match, decision in self.each if match(label) is not None)


class _Rule:
    """One ``[[rule]]`` compiled: its identity glob, and its deny and allow globs."""

    __slots__ = ("allow", "deny", "identity")

    def __init__(self, index: int, rule: PolicyRule) -> None:
        self.identity = _matcher((rule.identity,))
        self.deny = None if rule.deny is None else _Globs(rule.deny, _verdict(index, rule, False))
        self.allow = None if rule.allow is None else _Globs(rule.allow, _verdict(index, rule, True))


def _verdict(index: int, rule: PolicyRule, allowed: bool) -> Callable[[str], Decision]:
    verb = "allows" if allowed else "denies"
    return lambda glob: Decision(allowed, f"rule[{index}] {verb} {glob!r} to {rule.identity!r}")


#: At most this many requesters' rules are kept (:meth:`BuiltinPolicy.decide`).
_REQUESTERS_KEPT = 1_024


def _not_required(worker: str | None, label: str, allowed: frozenset[str]) -> str:
    shown = sorted(allowed)
    listed = ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
    return (
        f"worker {worker!r} declared required_capabilities without {label!r} "
        f"(least privilege: it may route only to {listed or 'nothing'})"
    )


_ANONYMOUS_ALLOWED = Decision(True, "no rule applies to an anonymous caller; default allow")


@attrs.frozen
class BuiltinPolicy:
    """The built-in policy (module docstring): least privilege, then the rules.

    ``targets(worker_id)`` is the union of the ``required_capabilities`` of a
    registered worker's capabilities (``None``: unregistered, or declared on
    none), e.g. :meth:`~crank_registry.CapabilityRegistry.required_targets`.
    """

    rules: PolicyRules
    targets: Callable[[str], frozenset[str] | None] = attrs.field(eq=False)
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    _compiled: tuple[_Rule, ...] = attrs.field(
        init=False,
        eq=False,
        repr=False,
        default=attrs.Factory(
            lambda policy: tuple(_Rule(*rule) for rule in enumerate(policy.rules.rules)),
            takes_self=True,
        ),
    )
    # Per requester (the oldest forgotten beyond _REQUESTERS_KEPT): its worker
    # name for rule (1), and the rules whose identity glob matches it. A
    # requester asks for many labels: its identity is matched against each
    # rule once, not at every route.
    _requesters: dict[str | None, tuple[str | None, tuple[_Rule, ...]]] = attrs.field(
        init=False, eq=False, repr=False, factory=dict
    )
    #: Whether every anonymous route is allowed (no rule, default allow: no
    #: ``--policy`` file): the registry then does not ask for a plain route.
    allows_anonymous: bool = attrs.field(
        init=False,
        eq=False,
        repr=False,
        default=attrs.Factory(
            lambda policy: not policy.rules.rules and policy.rules.default == "allow",
            takes_self=True,
        ),
    )

    def decide(self, requester: str | None, verb: str, capability: str) -> Decision:
        """Rule (1) for a registered worker, then the file's rules, then the default."""
        if requester is None and self.allows_anonymous:
            return _ANONYMOUS_ALLOWED
        label = f"{verb}:{capability}"
        name, rules = self._requesters.get(requester) or self._learn(requester)
        if name is not None:
            allowed = self.targets(name)
            if allowed is not None and label not in allowed:
                return Decision(False, _not_required(name, label, allowed))
        for rule in rules:
            decision = None if rule.deny is None else rule.deny.decision(label)
            if decision is None and rule.allow is not None:
                decision = rule.allow.decision(label)
            if decision is not None:
                return decision
        default = self.rules.default
        return Decision(default == "allow", f"no rule matches {label!r}; default {default}")

    def _learn(self, requester: str | None) -> tuple[str | None, tuple[_Rule, ...]]:
        """``requester``'s worker name (rule 1) and the rules its identity matches, kept."""
        identity = requester or ""  # anonymous: the empty string
        name = None if requester is None else worker_name_of(requester, self.trust_domain)
        learnt = (
            name,
            tuple(rule for rule in self._compiled if rule.identity(identity) is not None),
        )
        requesters = self._requesters
        if len(requesters) >= _REQUESTERS_KEPT:
            requesters.pop(next(iter(requesters)), None)  # the oldest
        requesters[requester] = learnt
        return learnt
