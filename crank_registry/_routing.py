"""Routing options: the filters, the strategies, idempotency memory and ``explain``.

A route without options is the rotation's round-robin (:mod:`._rotation`),
O(1). A route with options (:class:`RouteOptions`, DESIGN "Routing
options") walks the members of its one ``(verb, capability)``, never the
registry, in O(k) for k members:

1. the filters, in the settled order, each worker removed by the first
   that rejects it: ``unhealthy`` (not routable at ``now``), ``draining``
   (routable by its health, but drained), ``ejected`` (outlier ejection,
   :mod:`._ejection`), ``version``
   (its version is not PEP 440 or not in the specifier set), ``excluded``,
   ``slo`` (its effective SLO, :func:`effective_slo`: an observed latency,
   else the SLO files', else the declared one, misses a bound or has no
   value for it), ``budget`` (it costs more than ``budget_tokens``, or more
   than the cheapest candidate left: the cheapest tier is kept), and with
   ``least_loaded`` only ``at_capacity`` (its reported ``in_flight`` is at
   least the capability's ``max_concurrency``; removed only while another
   candidate is not at capacity);
2. a worker remembered for the ``idempotency_key``, if still a candidate;
3. else the strategy: ``round_robin`` on the rotation's cursor
   (:meth:`~._rotation.Rotation.next_of`), or ``affinity``, rendezvous
   hashing of ``affinity_key`` (the candidate with the highest
   :func:`rendezvous_weight` of the key and its id wins, so when one of n
   workers leaves only the keys it held, about 1/n, move), or ``least_loaded``, power of two
   choices (:func:`least_loaded`; a route with no other option draws its
   two from the ring in O(1), :func:`sample_least_loaded`).

The access policy (:mod:`._policy`, asked by the registry for
``requester_identity``) decides for the whole pair: when it denies, every
worker the filters before it left is removed by ``policy``
(:func:`policy_explanation`) and the route is refused.

A ``least_loaded`` route counts its hand-out toward the chosen worker's
load (:class:`~._records.Load`); the next ones read it (as Envoy's
least-request counts what it handed out; other routes are not counted, so
the plain path pays nothing).
"""

from __future__ import annotations

import collections
import hashlib
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ._errors import ValidationError
from ._idempotency import MAX_TTL
from ._models import (
    CapabilityKey,
    CapabilitySchema,
    HealthPolicy,
    RemovedWorker,
    RouteExplanation,
    RouteRequest,
    _optional_non_negative,
    _optional_specifier,
    _optional_text,
    _slo_constraints,
    _strategy,
    _worker_ids,
    check_affinity,
    version_verdicts,
)
from ._records import Load, Member, Worker
from ._rotation import Rotation
from ._slos import ServiceLevels, applying

if TYPE_CHECKING:
    from ._wire import ExecuteRequest

__all__ = [
    "IdempotencyMemory",
    "RouteOptions",
    "RoutingSettings",
    "choose",
    "effective_slo",
    "least_loaded",
    "meeting_slo",
    "misses_slo",
    "policy_explanation",
    "rendezvous_weight",
    "sample_least_loaded",
]

_DEFAULT_STRATEGY = "round_robin"


def _id_tuple(value: Any) -> Any:
    # Any collection of ids (the gateway passes the set it tried); a string
    # is left as it is, for the validator to refuse, not split into ids.
    if value is None or isinstance(value, (str, tuple)):
        return value
    try:
        return tuple(value)
    except TypeError:
        return value


def _dict_or_none(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


@attrs.frozen(kw_only=True)
class RouteOptions:
    """The options of one route; each ``None`` (or empty) is "not asked".

    The same fields and rules as :class:`~crank_registry.RouteRequest`'s
    options, for in-process callers::

        registry.route("classify", "image.classify", now=now,
                       options=RouteOptions(version=">=1.2,<2", budget_tokens=5))
    """

    version: str | None = attrs.field(default=None, validator=_optional_specifier)
    exclude: tuple[str, ...] | None = attrs.field(
        default=None, converter=_id_tuple, validator=_worker_ids
    )
    slo_constraints: Mapping[str, float] | None = attrs.field(
        default=None,
        converter=_dict_or_none,
        validator=_slo_constraints,
    )
    budget_tokens: float | None = attrs.field(default=None, validator=_optional_non_negative)
    strategy: str | None = attrs.field(default=None, validator=_strategy)
    affinity_key: str | None = attrs.field(default=None, validator=_optional_text)
    idempotency_key: str | None = attrs.field(default=None, validator=_optional_text)
    requester_identity: str | None = attrs.field(default=None, validator=_optional_text)

    def __attrs_post_init__(self) -> None:
        check_affinity(self.strategy, self.affinity_key)

    def with_requester(self, requester_identity: str | None) -> RouteOptions:
        """These options, routed for ``requester_identity`` (the access policy's requester)."""
        return attrs.evolve(self, requester_identity=requester_identity)

    @classmethod
    def from_request(cls, request: RouteRequest | ExecuteRequest) -> RouteOptions | None:
        """The options of a ``/route`` or ``/execute`` body; ``None`` when it asks for none.

        Each option is the body's field of the same name; one a body does
        not carry (``/execute`` takes no ``idempotency_key`` nor
        ``requester_identity``) is ``None``. ``None`` for the whole: the
        plain path.
        """
        given = {name: getattr(request, name, None) for name in _OPTION_NAMES}
        if all(value is None for value in given.values()):
            return None
        return cls(**given)


#: The fields of :class:`RouteOptions`, the names the request bodies use for them.
_OPTION_NAMES = tuple(field.name for field in attrs.fields(RouteOptions))


def _positive_seconds(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < MAX_TTL:
        raise ValidationError.single(
            attribute.name, f"must be a number of seconds > 0 and < {MAX_TTL:g}"
        )


def _positive_count(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError.single(attribute.name, "must be an integer >= 1")


@attrs.frozen(kw_only=True)
class RoutingSettings:
    """The registry's routing settings.

    ``idempotency_ttl``: seconds an ``idempotency_key`` keeps its worker;
    ``idempotency_keys``: the most keys remembered (the oldest is forgotten
    first), which bounds the memory.
    """

    idempotency_ttl: float = attrs.field(default=3600.0, validator=_positive_seconds)
    idempotency_keys: int = attrs.field(default=100_000, validator=_positive_count)


class IdempotencyMemory:
    """Which worker each ``(verb, capability, idempotency_key)`` was given, until when.

    Entries are kept in the order they were made, which (time never going
    backwards) is the order they expire in: expiry pops from the front, and
    a full memory forgets its oldest entry. Both O(1) amortised.
    """

    __slots__ = ("_entries", "_settings")

    def __init__(self, settings: RoutingSettings) -> None:
        self._settings = settings
        self._entries: collections.OrderedDict[tuple[str, str, str], tuple[str, float]] = (
            collections.OrderedDict()
        )

    def recall(self, key: tuple[str, str, str], now: float) -> str | None:
        """The worker remembered for ``key`` at ``now``, or ``None`` (never given, or expired)."""
        self._expire(now)
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def remember(self, key: tuple[str, str, str], worker_id: str, now: float) -> None:
        """Give ``key`` to ``worker_id`` for ``idempotency_ttl`` from ``now``."""
        entries = self._entries
        entries.pop(key, None)
        entries[key] = (worker_id, now + self._settings.idempotency_ttl)
        while len(entries) > self._settings.idempotency_keys:
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, (_, until) = next(iter(entries.items()))
            if until > now:
                return
            del entries[key]


#: No SLO files.
NO_SLOS = ServiceLevels()
_NO_WORKERS: frozenset[Worker | None] = frozenset()
_UNKNOWN: Any = object()
_NO_VALUES: Mapping[str, float] = {}


def effective_slo(
    worker: Worker,
    capability: CapabilitySchema,
    files: Sequence[ServiceLevels.Rule] = (),
    *,
    now: float,
    fresh_for: float,
) -> Mapping[str, float]:
    """The SLO a worker offers for one capability: what ``slo_constraints`` is checked against.

    Per key, the first source that has a value wins (DESIGN, "SLO
    precedence"): the value observed in a load report younger than
    ``fresh_for`` (the registry's ``unhealthy_after``; only
    ``latency_p95_ms`` is observed), else the SLO file, else the
    capability's declared ``slo``. ``files``: the SLO files of the
    capability's ``(verb, name)`` (:meth:`ServiceLevels.of
    <crank_registry.ServiceLevels.of>`, looked up once per route), of which
    the one :func:`~._slos.applying` to the capability's version counts.
    """
    offered: Mapping[str, float] = capability.slo or {}
    filed = applying(files, capability.version)
    if filed is not None:
        offered = {**offered, **filed}
    load = worker.load
    if load is None:  # most workers of most routes
        return offered
    report = load.report
    if report is None or report.latency_p95_ms is None or now - load.reported_at >= fresh_for:
        return offered
    return {**offered, "latency_p95_ms": report.latency_p95_ms}


#: Weights are 64-bit: the low bits of a product.
_MASK64 = (1 << 64) - 1


def _stable_hash(text: str) -> int:
    """A 64-bit hash of ``text``, the same in every process and run (unlike Python's ``hash``).

    Odd: a product with it keeps every bit of the other factor.
    """
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") | 1


def _id_hash(worker: Worker) -> int:
    """The worker's part of every :func:`rendezvous_weight`, hashed on its first affinity route."""
    if not worker.id_hash:
        worker.id_hash = _stable_hash(worker.worker_id)
    return worker.id_hash


def rendezvous_weight(key: str, worker_id: str) -> int:
    """The weight of ``worker_id`` for affinity ``key``: the candidate of highest weight wins.

    Rendezvous hashing: each worker's weight depends on the key and on it
    alone, so when a worker leaves only the keys it won move. The weight is
    the product of the two stable hashes modulo 2**64 (multiplicative
    hashing: its high bits depend on every bit of both; both odd, so no bit
    is lost), the key hashed once per route and each worker id once,
    instead of a blake2b of the two for every candidate (most of an
    affinity route; benchmarks/README.md, "Routing options").
    """
    return (_stable_hash(key) * _stable_hash(worker_id)) & _MASK64


def _heaviest(key: str, candidates: Sequence[Member]) -> Member:
    """The candidate of highest :func:`rendezvous_weight` for ``key`` (the first of equals).

    The weights computed in this loop (the same arithmetic as
    :func:`rendezvous_weight`), not by a call per candidate.
    """
    key_hash = _stable_hash(key)  # once per route
    chosen = candidates[0]
    highest = -1  # below every weight
    for member in candidates:
        weight = (key_hash * (member.worker.id_hash or _id_hash(member.worker))) & _MASK64
        if weight > highest:
            chosen, highest = member, weight
    return chosen


def misses_slo(slo: Mapping[str, float], bounds: Mapping[str, float]) -> bool:
    """Whether an effective SLO (:func:`effective_slo`) misses a bound of ``slo_constraints``.

    The rule as DESIGN states it; routes check it through :func:`meeting_slo`.
    A key asked and absent misses.
    """
    latency = bounds.get("latency_p95_ms")
    if latency is not None:
        offered = slo.get("latency_p95_ms")
        if offered is None or offered > latency:
            return True
    availability = bounds.get("availability")
    if availability is not None:
        offered = slo.get("availability")
        if offered is None or offered < availability:
            return True
    return False


def meeting_slo(  # noqa: PLR0917 (positional: called once a route)
    members: Sequence[Member],
    bounds: Mapping[str, float],
    files: Sequence[ServiceLevels.Rule],
    now: float,
    fresh_for: float,
    reasons: dict[str, str] | None,
) -> list[Member]:
    """The members whose effective SLO meets ``bounds``; the others removed as ``slo``.

    ``reasons`` (``None`` unless the route explains itself) gets the
    removed members' ids.

    Keeps the members for which ``misses_slo(effective_slo(...), bounds)``
    is false, comparing each bound directly along the chain of DESIGN's
    "SLO precedence" (observed, else file, else declared) instead of
    building each worker's effective SLO: two dicts and three calls per
    worker were most of an SLO route's cost (benchmarks/core.py, route
    options). ``files``: the SLO files of the route's capability
    (:meth:`ServiceLevels.of`), the one that applies looked up once per
    version a route meets, not per worker. A function, not an object made
    per route (making one was a tenth of the route). One loop, no call per
    member: the route's cost is per member. tests/core/test_slos.py checks
    that it agrees with :func:`effective_slo`.
    """
    latency_bound = bounds.get("latency_p95_ms")
    availability_bound = bounds.get("availability")
    if availability_bound is None and not files and latency_bound is not None:
        return _meeting_latency(members, latency_bound, now, fresh_for, reasons)
    filed_of: dict[str, Mapping[str, float] | None] = {}  # per version
    kept: list[Member] = []
    for member in members:
        capability = member.capability
        declared = capability.slo or _NO_VALUES
        filed = None
        if files:
            filed = filed_of.get(capability.version, _UNKNOWN)
            if filed is _UNKNOWN:
                filed = filed_of[capability.version] = applying(files, capability.version)
        if latency_bound is not None:
            offered = None
            load = member.worker.load
            # effective_slo's freshness test, to the same float (reported_at
            # is -inf until a report: no report is never fresh), only for a
            # latency observed: most reports have none, and reported_at is
            # another object in memory.
            if (
                load is not None
                and load.latency_p95_ms is not None
                and now - load.reported_at < fresh_for
            ):
                offered = load.latency_p95_ms
            if offered is None and filed is not None:
                offered = filed.get("latency_p95_ms")
            if offered is None:
                offered = declared.get("latency_p95_ms")
            if offered is None or offered > latency_bound:
                if reasons is not None:
                    reasons[member.worker.worker_id] = "slo"
                continue
        if availability_bound is not None:
            offered = None if filed is None else filed.get("availability")
            if offered is None:
                offered = declared.get("availability")
            if offered is None or offered < availability_bound:
                if reasons is not None:
                    reasons[member.worker.worker_id] = "slo"
                continue
        kept.append(member)
    return kept


def _meeting_latency(
    members: Sequence[Member],
    bound: float,
    now: float,
    fresh_for: float,
    reasons: dict[str, str] | None,
) -> list[Member]:
    """:func:`meeting_slo` for the most common question: a latency bound alone, no SLO file.

    The same chain without its other tests (observed, else declared).
    """
    kept: list[Member] = []
    for member in members:
        load = member.worker.load
        offered = None
        if (
            load is not None
            and load.latency_p95_ms is not None
            and now - load.reported_at < fresh_for
        ):
            offered = load.latency_p95_ms
        if offered is None:
            offered = (member.capability.slo or _NO_VALUES).get("latency_p95_ms")
        if offered is not None and offered <= bound:
            kept.append(member)
        elif reasons is not None:
            reasons[member.worker.worker_id] = "slo"
    return kept


def _cheapest(
    members: Sequence[Member], budget: float, reasons: dict[str, str] | None
) -> list[Member]:
    """The members within ``budget`` at the cheapest cost among them; the others as ``budget``."""
    kept: list[Member] = []
    cheapest = budget
    for member in members:
        cost = member.capability.cost_tokens_per_invocation or 0.0
        if cost > cheapest:
            if reasons is not None:
                reasons[member.worker.worker_id] = "budget"
            continue
        if cost < cheapest and kept:  # a cheaper tier: the one kept so far goes
            if reasons is not None:
                for dearer in kept:
                    reasons[dearer.worker.worker_id] = "budget"
            kept = []
        cheapest = cost
        kept.append(member)
    return kept


def _filter(  # noqa: PLR0917 (positional: called once a route)
    everyone: Sequence[Member],
    options: RouteOptions,
    now: float,
    routable_at: float,
    workers: Mapping[str, Worker],
    reasons: dict[str, str] | None,
    files: Sequence[ServiceLevels.Rule] = (),
    fresh_for: float = 0.0,
) -> list[Member]:
    """The candidates; in ``reasons``, for each other worker the first rule that removed it.

    The rules in their order over the members of one capability, each on
    those the rules before it left; routability is judged at
    ``routable_at``; ``workers``: the registered workers by id, for
    ``exclude``. ``reasons`` is ``None`` unless the route explains
    itself: a route that does not reads nothing more of a removed worker
    (its id is another object in memory, and the members of a route are
    mostly out of the CPU's cache). ``files`` and ``fresh_for``:
    :func:`meeting_slo`'s, for a route with ``slo_constraints``.
    """
    specifier = options.version
    verdicts = None if specifier is None else version_verdicts(specifier)
    # The registered workers exclude names (None for an id no worker has: it
    # excludes none), compared by identity: a member's id is another object
    # in memory, which the filter would read for every member.
    excluded = frozenset(map(workers.get, options.exclude)) if options.exclude else _NO_WORKERS
    passed: list[Member] = []
    if specifier is None and not excluded:
        # Routability alone (most routes): the loop below, without its other tests.
        for member in everyone:
            if routable_at <= member.worker.routable_until:
                passed.append(member)
            elif reasons is not None:
                reasons[member.worker.worker_id] = _unroutable(member.worker, routable_at)
    else:
        for member in everyone:
            worker = member.worker
            if routable_at > worker.routable_until:
                reason = _unroutable(worker, routable_at)
            elif verdicts is not None and not verdicts[member.capability.version]:
                reason = "version"
            elif excluded and worker in excluded:
                reason = "excluded"
            else:
                passed.append(member)
                continue
            if reasons is not None:
                reasons[worker.worker_id] = reason
    bounds = options.slo_constraints
    if bounds is not None and passed:
        passed = meeting_slo(passed, bounds, files, now, fresh_for, reasons)
    if options.budget_tokens is not None and passed:
        passed = _cheapest(passed, options.budget_tokens, reasons)
    return passed


def _unroutable(worker: Worker, alive_at: float) -> str:
    """Why a worker not routable at ``alive_at`` is not (DESIGN, "How options combine").

    For its health first, then draining, then ejection.
    """
    if alive_at > worker.healthy_until():
        return "unhealthy"
    return "draining" if worker.draining else "ejected"


def policy_explanation(
    rotation: Rotation, options: RouteOptions, now: float, workers: Mapping[str, Worker]
) -> RouteExplanation:
    """The explanation of a route the access policy denied (``workers``: the registered, by id).

    The policy comes after health, ``version`` and ``exclude`` (DESIGN, "How
    options combine"): the workers those rules removed keep their reason,
    every other worker is removed by ``policy``; no candidate is left.
    """
    everyone = rotation.everyone()
    before = attrs.evolve(options, slo_constraints=None, budget_tokens=None)
    reasons: dict[str, str] = {}
    _filter(everyone, before, now, now, workers, reasons)  # no SLO asked
    return RouteExplanation(
        strategy=options.strategy or _DEFAULT_STRATEGY,
        candidates=(),
        removed=tuple(
            RemovedWorker(
                worker_id=member.worker.worker_id,
                reason=reasons.get(member.worker.worker_id, "policy"),
            )
            for member in everyone
        ),
    )


def _at_capacity(member: Member) -> bool:
    load = member.worker.load
    if load is None or load.in_flight is None:
        return False
    return load.in_flight >= member.capability.max_concurrency


def _drop_at_capacity(candidates: list[Member], reasons: dict[str, str] | None) -> list[Member]:
    """The candidates not at capacity (the others removed as ``at_capacity``); all if none is."""
    free: list[Member] = []
    full: list[Member] = []
    for member in candidates:
        # _at_capacity(member), inline: a call per candidate was a tenth of the route.
        load = member.worker.load
        in_flight = None if load is None else load.in_flight
        if in_flight is not None and in_flight >= member.capability.max_concurrency:
            full.append(member)
        else:
            free.append(member)
    if not full or not free:
        return candidates
    if reasons is not None:
        for member in full:
            reasons[member.worker.worker_id] = "at_capacity"
    return free


def least_loaded(
    candidates: Sequence[Member], rng: random.Random, *, now: float, interval: float
) -> Member | None:
    """Power of two choices: of two candidates drawn with ``rng``, the less loaded.

    Load is the reported ``in_flight`` plus routes handed out since
    (:meth:`~._records.Load.estimate`; ``interval``, the heartbeat
    interval, fades hand-outs without a count to start from). A tie goes
    to the smaller worker id, whichever was drawn first.
    """
    count = len(candidates)
    if count <= 1:
        return candidates[0] if candidates else None
    # int(random() * n): uniform over the candidates, cheaper than randrange.
    first = int(rng.random() * count)
    second = int(rng.random() * (count - 1))
    if second >= first:
        second += 1  # two distinct candidates
    return _less_loaded(candidates[first], candidates[second], now, interval)


def _less_loaded(one: Member, other: Member, now: float, interval: float) -> Member:
    mine = _estimate(one, now, interval)
    theirs = _estimate(other, now, interval)
    if mine != theirs:
        return one if mine < theirs else other
    return one if one.worker.worker_id < other.worker.worker_id else other


#: A route whose only option is ``strategy: least_loaded`` (compared whole, so
#: that any other option, present or future, takes the full path).
_BARE_LEAST_LOADED = RouteOptions(strategy="least_loaded")
#: Draws per candidate before :func:`sample_least_loaded` gives up.
_DRAWS = 8


def sample_least_loaded(
    rotation: Rotation,
    rng: random.Random,
    *,
    now: float,
    interval: float,
    routable_at: float | None = None,
) -> Member | None:
    """:func:`least_loaded` in O(1) for a route with no other option; ``None``: take the full path.

    Draws ring slots until two distinct members are candidates (routable at
    ``now``, not at capacity), each draw uniform, so each of the two is
    uniform among the candidates as the full path's are. Members out of
    the ring are not routable. When draws keep missing (fewer than two
    candidates not at capacity, or mostly holes) the caller filters the
    members instead.
    """
    ring = rotation.ring
    size = len(ring)
    if rotation.live < 2:
        return None
    draw = rng.random  # int(random() * size): uniform over slots, cheaper than randrange
    alive_at = now if routable_at is None else routable_at
    first: Member | None = None
    for _ in range(_DRAWS):
        member = ring[int(draw() * size)]
        if member is None or member is first or alive_at > member.worker.routable_until:
            continue
        if _at_capacity(member):
            continue
        if first is None:
            first = member
            continue
        return _less_loaded(first, member, now, interval)
    return None


def _estimate(member: Member, now: float, interval: float) -> int:
    load = member.worker.load
    return 0 if load is None else load.estimate(now, interval)


def _hand_out(member: Member, now: float, interval: float) -> None:
    worker = member.worker
    if worker.load is None:
        worker.load = Load()
    worker.load.hand_out(now, interval)


def _pick(  # noqa: PLR0917 (positional: called once a route)
    rotation: Rotation,
    candidates: Sequence[Member],
    options: RouteOptions,
    now: float,
    rng: random.Random,
    interval: float,
) -> Member | None:
    if options.strategy == "affinity" and candidates:
        assert options.affinity_key is not None  # RouteOptions checks it
        return _heaviest(options.affinity_key, candidates)
    if options.strategy == "least_loaded":
        return least_loaded(candidates, rng, now=now, interval=interval)
    return rotation.next_of(candidates)


def choose(
    key: CapabilityKey,
    rotation: Rotation,
    options: RouteOptions,
    *,
    now: float,
    memory: IdempotencyMemory,
    explain: bool,
    slos: ServiceLevels = NO_SLOS,
    rng: random.Random,
    health: HealthPolicy,
    routable_at: float | None = None,
    workers: Mapping[str, Worker],
) -> tuple[Member | None, RouteExplanation | None]:
    """The member to route to under ``options`` (``None``: no candidate), and the explanation.

    The explanation is built only when ``explain`` is asked. ``slos``: the
    SLO files in effect, for ``slo_constraints``. ``rng`` draws
    ``least_loaded``'s two candidates; ``health`` gives the age beyond
    which a load report is not an observed SLO (``unhealthy_after``) and
    the heartbeat interval over which hand-outs fade. ``routable_at``:
    the moment routability is judged at (default ``now``; in
    self-preservation, the earliest moment: every routable state).
    ``workers``: the registered workers by id (``exclude`` names them).
    """
    interval = health.heartbeat_interval
    alive_at = now if routable_at is None else routable_at
    loaded = options.strategy == "least_loaded"
    if loaded and not explain and options == _BARE_LEAST_LOADED:
        sampled = sample_least_loaded(
            rotation, rng, now=now, interval=interval, routable_at=alive_at
        )
        if sampled is not None:
            _hand_out(sampled, now, interval)
            return sampled, None
    everyone = rotation.everyone()
    reasons: dict[str, str] | None = {} if explain else None
    if options.slo_constraints is None:
        candidates = _filter(everyone, options, now, alive_at, workers, reasons)
    else:
        candidates = _filter(
            everyone, options, now, alive_at, workers, reasons, slos.of(key), health.unhealthy_after
        )
    if loaded:
        candidates = _drop_at_capacity(candidates, reasons)
    chosen: Member | None = None
    remembered_as = None
    if options.idempotency_key is not None:
        remembered_as = (key[0], key[1], options.idempotency_key)
        remembered = memory.recall(remembered_as, now)
        # The remembered worker by identity, as exclude: no candidate's id is read.
        worker = None if remembered is None else workers.get(remembered)
        if worker is not None:
            chosen = next((m for m in candidates if m.worker is worker), None)
    if chosen is None:
        chosen = _pick(rotation, candidates, options, now, rng, interval)
        if chosen is not None and remembered_as is not None:
            memory.remember(remembered_as, chosen.worker.worker_id, now)
    if loaded and chosen is not None:
        _hand_out(chosen, now, interval)
    if reasons is None:
        return chosen, None
    explanation = RouteExplanation(
        strategy=options.strategy or _DEFAULT_STRATEGY,
        candidates=tuple(member.worker.worker_id for member in candidates),
        removed=tuple(
            RemovedWorker(worker_id=member.worker.worker_id, reason=reason)
            for member in everyone
            if (reason := reasons.get(member.worker.worker_id)) is not None
        ),
    )
    return chosen, explanation
