"""The answers of the HTTP API as values: one definition of each shape.

The service builds these and renders them with the converter
(:func:`~crank_registry.unstructure`); the worker client reads them with
:func:`~crank_registry.structure`; the OpenAPI document is generated from
them (``crank_registry_asgi.openapi``), each field's JSON Schema keywords
kept in its ``metadata`` under :data:`~crank_registry.JSON_SCHEMA`.

Three shapes are the core's own values: ``POST /route`` answers a
:class:`~crank_registry.WorkerEndpoint` (with its
:class:`~crank_registry.RouteExplanation` when asked), ``GET /capabilities`` lists
:class:`~crank_registry.CapabilityView` entries, and an ``invalid_request``
error lists :class:`~crank_registry.Problem` values.

Answers are read leniently: a field the reader does not know is ignored (a
newer controller may add one), where a request with an unknown field is
refused. :data:`ANSWER_TYPES` names the classes read that way.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterable
from typing import Any, Literal

import attrs

from ._errors import Problem, ValidationError
from ._events import Snapshot
from ._models import (
    _MAX_TEXT,
    _TEXT_SCHEMA,
    _WORKER_ID_PATTERN,
    JSON_SCHEMA,
    CapabilityView,
    HealthPolicy,
    HealthState,
    RemovedWorker,
    RouteExplanation,
    WorkerEndpoint,
    WorkerRecord,
    WorkerState,
    _positive,
    _text,
    affinity_key_option,
    budget_tokens_option,
    check_affinity,
    exclude_option,
    parse_capability_label,
    slo_constraints_option,
    strategy_option,
    version_option,
)
from ._policy import AccessRules
from ._slos import SloFile

__all__ = [
    "ANSWER_TYPES",
    "CapabilitiesAnswer",
    "DeregisterAnswer",
    "DrainAnswer",
    "ErrorAnswer",
    "ExecuteRequest",
    "FailedAttempt",
    "HealthAnswer",
    "HeartbeatAnswer",
    "InvocationAnswer",
    "ListingQuery",
    "PROTOCOL_FEATURES",
    "RATE_LIMIT_MODES",
    "RateLimitState",
    "ReadyAnswer",
    "RegisterAnswer",
    "STORE_STATES",
    "SlosAnswer",
    "SnapshotAnswer",
    "WatchAnswer",
    "WatchQuery",
    "WorkerEntry",
    "WorkerLoad",
    "WorkersAnswer",
]

#: What this controller accepts beyond the base protocol, listed in the
#: ``/register`` answer (DESIGN, "Formats and upgrades"): a worker sends an
#: optional field only to a controller that lists its feature.
#: ``load_reports``: a heartbeat may carry ``load``; ``drain``: ``POST
#: /workers/{worker_id}/drain`` and ``/undrain`` exist.
PROTOCOL_FEATURES: tuple[str, ...] = ("load_reports", "drain")

_WORKER_ID = {JSON_SCHEMA: {"pattern": _WORKER_ID_PATTERN}}
_COUNT = {JSON_SCHEMA: {"minimum": 0}}
_INTERVAL = {JSON_SCHEMA: {"exclusiveMinimum": 0}}
_TIME = {JSON_SCHEMA: {"format": "date-time"}}
_EPOCH = {JSON_SCHEMA: {"pattern": "^[0-9A-Za-z_-]{1,64}$"}}

#: A listing's page size: the default and the most a client may ask for.
DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 5_000


def _iso_time(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    try:
        datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError.single(
            attribute.name, f"must be an ISO 8601 time, got {value!r}"
        ) from None


def _capability_labels(_: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for index, label in enumerate(value):
        try:
            parse_capability_label(label)
        except ValidationError as error:
            (problem,) = error.problems
            raise ValidationError.single(f"{attribute.name}[{index}]", problem.message) from None


@attrs.frozen(kw_only=True)
class HealthAnswer:
    """``GET /health``: the controller is up; the workers it knows and can route to.

    ``self_preservation``: the controller takes it that it is cut off from
    its workers (most fell silent at once): it makes none unhealthy nor
    evicts any, and routes to the last known ones.

    The optional fields describe the controller for people (the dashboard's
    status strip); a controller of an older release leaves them out.
    ``heartbeats_last_minute`` counts the heartbeats accepted in the last 60
    seconds (to the second), ``expected_heartbeats_per_minute`` is what
    ``total_workers`` send at one heartbeat per ``heartbeat_interval_s``.
    ``controller_id`` names the controller that answered (``serve
    --controller-id``; with ``--processes N``, the process: ``ID#i``).
    """

    status: Literal["ok"] = "ok"
    total_workers: int = attrs.field(metadata=_COUNT)
    healthy_workers: int = attrs.field(metadata=_COUNT)
    self_preservation: bool = False
    epoch: str | None = attrs.field(default=None, metadata=_EPOCH)
    revision: int | None = attrs.field(default=None, metadata=_COUNT)
    timestamp: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_iso_time), metadata=_TIME
    )
    uptime_s: float | None = attrs.field(default=None, metadata=_COUNT)
    heartbeat_interval_s: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive), metadata=_INTERVAL
    )
    heartbeats_last_minute: int | None = attrs.field(default=None, metadata=_COUNT)
    expected_heartbeats_per_minute: float | None = attrs.field(default=None, metadata=_COUNT)
    controller_id: str | None = None


#: What ``GET /ready`` says of the store (the journal): it takes writes, or the last one failed.
STORE_STATES = ("ok", "unavailable")


def _store_state(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value not in STORE_STATES:
        raise ValidationError.single(attribute.name, f"must be one of {', '.join(STORE_STATES)}")


#: Where ``GET /ready``'s rate limit is kept: this process alone (no Redis),
#: shared by the fleet in Redis, or this process' share while Redis is unreachable.
RATE_LIMIT_MODES = ("local", "shared", "local_fallback")


def _rate_limit_mode(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value not in RATE_LIMIT_MODES:
        raise ValidationError.single(
            attribute.name, f"must be one of {', '.join(RATE_LIMIT_MODES)}"
        )


@attrs.frozen(kw_only=True)
class RateLimitState:
    """The rate limit a controller applies now (``--rate-limit``), in ``GET /ready``.

    ``mode``: ``local`` (no Redis: each controller process keeps its own
    buckets), ``shared`` (one bucket per caller in Redis for all controllers
    together) or ``local_fallback`` (Redis unreachable: each process keeps
    ``rate`` and ``burst``, its share of the limit). ``controllers``: the
    live controller processes counted at the last contact with Redis.
    """

    mode: str = attrs.field(
        validator=_rate_limit_mode,
        metadata={
            JSON_SCHEMA: {
                "enum": list(RATE_LIMIT_MODES),
                "description": "local (no Redis), shared (one bucket per caller for the whole "
                "fleet, in Redis) or local_fallback (Redis unreachable: this process' share).",
            }
        },
    )
    rate: float = attrs.field(metadata=_INTERVAL)
    burst: int = attrs.field(metadata={JSON_SCHEMA: {"minimum": 1}})
    controllers: int | None = attrs.field(default=None, metadata={JSON_SCHEMA: {"minimum": 1}})


@attrs.frozen(kw_only=True)
class ReadyAnswer:
    """``GET /ready``: the controller can route (readiness; ``/health`` is liveness).

    ``store``: ``ok``, or ``unavailable`` while the journal (or the shared
    registry's Redis) takes no writes (not open, unreachable, or its last
    write failed); ``self_preservation``: the controller is in
    self-preservation. Routing goes on either way, so the controller stays
    ready: neither takes it out of a load balancer.
    """

    status: Literal["ready"] = "ready"
    store: str = attrs.field(
        validator=_store_state,
        metadata={
            JSON_SCHEMA: {
                "enum": list(STORE_STATES),
                "description": "ok, or unavailable: the journal (or Redis, for a shared "
                "registry) takes no writes (registrations and deregistrations are refused "
                "503); routing goes on.",
            }
        },
    )
    self_preservation: bool = attrs.field(
        default=False,
        metadata={
            JSON_SCHEMA: {
                "description": "true while the controller is in self-preservation (it makes no "
                "worker unhealthy and evicts none); routing goes on."
            }
        },
    )
    #: The rate limit in effect (absent without ``--rate-limit``).
    rate_limit: RateLimitState | None = None


@attrs.frozen(kw_only=True)
class RegisterAnswer:
    """``POST /register``: registered; heartbeat every ``heartbeat_interval_s`` seconds.

    ``features``: what the controller accepts beyond the base protocol
    (:data:`PROTOCOL_FEATURES`); absent from an older controller's answer,
    which is read as none.
    """

    status: Literal["registered"] = "registered"
    worker_id: str = attrs.field(metadata=_WORKER_ID)
    heartbeat_interval_s: float = attrs.field(validator=_positive, metadata=_INTERVAL)
    features: tuple[str, ...] = attrs.field(
        default=(),
        metadata={
            JSON_SCHEMA: {
                "description": "What the controller accepts beyond the base protocol, "
                "e.g. load_reports (a heartbeat may carry load)."
            }
        },
    )


@attrs.frozen(kw_only=True)
class HeartbeatAnswer:
    """``POST /heartbeat``: acknowledged at ``timestamp`` (ISO 8601 UTC)."""

    status: Literal["acknowledged"] = "acknowledged"
    timestamp: str = attrs.field(validator=_iso_time, metadata=_TIME)
    heartbeat_interval_s: float = attrs.field(validator=_positive, metadata=_INTERVAL)


@attrs.frozen(kw_only=True)
class DeregisterAnswer:
    """``POST /deregister``: the worker is removed."""

    status: Literal["deregistered"] = "deregistered"
    worker_id: str = attrs.field(metadata=_WORKER_ID)


def _page_size(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise ValidationError.single(
            attribute.name, f"must be from 1 to {MAX_PAGE_SIZE}, got {value}"
        )


_STATE_NAMES = ", ".join(state.value for state in WorkerState)


@attrs.frozen(kw_only=True)
class ListingQuery:
    """The query of ``GET /workers`` and ``GET /capabilities``: a page, and filters.

    ``limit``: the page size; ``cursor``: the ``next_cursor`` of the
    previous page (absent: the first page); ``state``, ``verb``,
    ``capability``: keep only workers in that state and offering a
    capability with that verb and/or name.
    """

    limit: int = attrs.field(
        default=DEFAULT_PAGE_SIZE,
        validator=_page_size,
        metadata={
            JSON_SCHEMA: {
                "minimum": 1,
                "maximum": MAX_PAGE_SIZE,
                "description": f"Page size (default {DEFAULT_PAGE_SIZE}).",
            }
        },
    )
    cursor: str | None = attrs.field(
        default=None,
        metadata={
            JSON_SCHEMA: {
                "description": "The next_cursor of the previous page, unchanged.",
                "pattern": "^[A-Za-z0-9_-]+$",
            }
        },
    )
    state: WorkerState | None = attrs.field(
        default=None,
        metadata={
            JSON_SCHEMA: {
                "description": "Only workers in this state (draining: the draining workers; "
                "a health state: the workers in it that are not draining)."
            }
        },
    )
    verb: str | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(_text),
        metadata={JSON_SCHEMA: _TEXT_SCHEMA},
    )
    capability: str | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(_text),
        metadata={JSON_SCHEMA: _TEXT_SCHEMA},
    )

    @classmethod
    def parse(cls, items: Iterable[tuple[str, str]]) -> ListingQuery:
        """The query of a request's ``(name, value)`` pairs; every problem is named.

        Raises :class:`ValidationError` for an unknown or repeated parameter,
        a ``limit`` that is not an integer from 1 to :data:`MAX_PAGE_SIZE`,
        an unknown ``state`` or an empty value.
        """
        problems: list[Problem] = []
        values: dict[str, str] = {}
        fields = attrs.fields_dict(cls)
        for name, value in items:
            if name not in fields:
                known = ", ".join(fields)
                problems.append(Problem(name, f"unknown query parameter (known: {known})"))
            elif name in values:
                problems.append(Problem(name, "is given more than once"))
            elif not value.strip():
                problems.append(Problem(name, "is empty: give a value or leave it out"))
            else:
                values[name] = value
        limit = DEFAULT_PAGE_SIZE
        if "limit" in values:
            text = values["limit"]
            if text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_PAGE_SIZE:
                limit = int(text)
            else:
                problems.append(
                    Problem("limit", f"must be an integer from 1 to {MAX_PAGE_SIZE}, got {text!r}")
                )
        state = None
        if "state" in values:
            try:
                state = WorkerState(values["state"])
            except ValueError:
                problems.append(
                    Problem("state", f"must be one of {_STATE_NAMES}, got {values['state']!r}")
                )
        for name in ("verb", "capability"):
            if len(values.get(name, "")) > _MAX_TEXT:
                problems.append(Problem(name, f"must be at most {_MAX_TEXT} characters"))
        if problems:
            raise ValidationError(problems)
        return cls(
            limit=limit,
            cursor=values.get("cursor"),
            state=state,
            verb=values.get("verb"),
            capability=values.get("capability"),
        )


@attrs.frozen(kw_only=True)
class CapabilitiesAnswer:
    """``GET /capabilities``: a page of ``(verb, capability, version)`` entries, and the counts.

    ``total_workers`` and ``healthy_workers`` count every worker (routable
    ones as healthy); ``next_cursor`` is absent on the last page.
    """

    capabilities: tuple[CapabilityView, ...]
    total_workers: int = attrs.field(metadata=_COUNT)
    healthy_workers: int = attrs.field(metadata=_COUNT)
    next_cursor: str | None = None


@attrs.frozen(kw_only=True)
class WorkerLoad:
    """A worker's latest load report (:class:`~crank_registry.LoadReport`) and when it arrived."""

    in_flight: int | None = attrs.field(default=None, metadata=_COUNT)
    latency_p95_ms: float | None = attrs.field(default=None, metadata=_COUNT)
    error_rate: float | None = attrs.field(
        default=None, metadata={JSON_SCHEMA: {"minimum": 0, "maximum": 1}}
    )
    reported_at: str = attrs.field(validator=_iso_time, metadata=_TIME)


@attrs.frozen(kw_only=True)
class WorkerEntry:
    """One worker of ``GET /workers``; ``is_healthy`` means routable now.

    ``health`` is the health state alone; ``draining``: it takes no new
    routes; ``ejected_until`` (absent: not ejected): when its ejection for
    failing calls ends; ``state`` is the first that applies of
    ``draining``, ``ejected``, then the health state. ``capabilities`` are
    ``"verb:name"`` labels (:func:`~crank_registry.capability_label`).
    """

    worker_id: str = attrs.field(metadata=_WORKER_ID)
    worker_url: str
    last_heartbeat: str = attrs.field(validator=_iso_time, metadata=_TIME)
    is_healthy: bool
    state: WorkerState
    #: The health state alone; absent in the answers of a controller from
    #: before drain and ejection: read as ``state``.
    health: HealthState | None = attrs.field(
        default=None,
        metadata={
            JSON_SCHEMA: {
                "description": "The health state alone, whether or not the worker is draining "
                "or ejected."
            }
        },
    )
    draining: bool = False
    capabilities: tuple[str, ...] = attrs.field(
        validator=_capability_labels, metadata={JSON_SCHEMA: {"items": {"pattern": ":"}}}
    )
    #: Absent when the worker has reported no load.
    load: WorkerLoad | None = None
    #: When its ejection ends; absent when it is not ejected.
    ejected_until: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_iso_time), metadata=_TIME
    )


@attrs.frozen(kw_only=True)
class DrainAnswer:
    """``POST /workers/{worker_id}/drain`` and ``/undrain``: the worker's drain as it now is.

    ``draining``: it takes no new routes; ``changed``: this request changed
    it (false: it was so already).
    """

    worker_id: str = attrs.field(metadata=_WORKER_ID)
    draining: bool
    changed: bool


@attrs.frozen(kw_only=True)
class WorkersAnswer:
    """``GET /workers``: a page of workers and their health, and the counts.

    ``total_workers`` and ``healthy_workers`` count every worker;
    ``matching_workers`` (a filtered listing only) those the filters keep,
    over all pages; ``next_cursor`` is absent on the last page.
    """

    workers: tuple[WorkerEntry, ...]
    total_workers: int = attrs.field(metadata=_COUNT)
    healthy_workers: int = attrs.field(metadata=_COUNT)
    matching_workers: int | None = attrs.field(default=None, metadata=_COUNT)
    next_cursor: str | None = None


@attrs.frozen(kw_only=True)
class SlosAnswer:
    """``GET /slos``: the SLO files in effect, in the order of their names.

    Each ``slo`` is a file's content as it was read; an SLO file's keys are
    a file format, checked strictly (an unknown key is refused), so a
    reader of this answer knows every key.
    """

    slos: tuple[SloFile, ...]


@attrs.frozen(kw_only=True)
class FailedAttempt:
    """A worker the gateway could not reach, and why."""

    worker_id: str
    error: str


@attrs.frozen(kw_only=True)
class ErrorAnswer:
    """Every error: a stable ``error`` code, a ``message``, and the fields of that code.

    Which code carries which of the optional fields is listed with the codes
    in the service's OpenAPI document (``crank_registry_asgi.openapi``).
    """

    error: str
    message: str
    #: ``invalid_request``: every problem of the input.
    detail: tuple[Problem, ...] | None = attrs.field(
        default=None, metadata={JSON_SCHEMA: {"minItems": 1}}
    )
    #: The worker acted on, or (gateway) the last one tried.
    worker_id: str | None = attrs.field(default=None, metadata=_WORKER_ID)
    #: ``no_worker_available``: what was asked for.
    verb: str | None = None
    capability: str | None = None
    #: ``worker_failed``: the worker's status and its JSON error, when it sent one.
    worker_status: int | None = None
    worker_error: Any = None
    #: ``worker_failed``, ``worker_timeout``: the workers that refused the connection.
    attempts: tuple[FailedAttempt, ...] | None = None
    #: ``no_worker_available`` for a route that asked ``explain``: why no worker was left
    #: (``policy_denied``: the workers the policy removed).
    explain: RouteExplanation | None = None
    #: ``policy_denied``: the rule that denied the route, in words.
    reason: str | None = None
    #: ``revision_compacted``: the lowest ``since`` the change feed still answers.
    oldest: int | None = attrs.field(default=None, metadata=_COUNT)
    #: ``revision_reset``: the registry's latest revision.
    revision: int | None = attrs.field(default=None, metadata=_COUNT)


@attrs.frozen(kw_only=True)
class ExecuteRequest:
    """``POST /execute`` (the gateway): the capability to call, its payload, the routing options.

    The options are those of ``POST /route`` (:class:`RouteRequest`), with
    the same rules, but for three: the idempotency key is the
    ``Idempotency-Key`` header here (it keeps the answer, not only the
    worker); the requester is the caller; and ``explain`` has no answer to
    go into (a worker's answer is passed on as it came).
    """

    verb: str = attrs.field(validator=_text, metadata={JSON_SCHEMA: _TEXT_SCHEMA})
    capability: str = attrs.field(validator=_text, metadata={JSON_SCHEMA: _TEXT_SCHEMA})
    payload: Any = attrs.field(
        metadata={JSON_SCHEMA: {"description": "Any JSON value the capability accepts."}}
    )
    version: str | None = version_option()
    slo_constraints: dict[str, Any] | None = slo_constraints_option()  # noqa: RUF009 (a field)
    budget_tokens: float | None = budget_tokens_option()
    strategy: str | None = strategy_option()
    affinity_key: str | None = affinity_key_option()
    exclude: tuple[str, ...] | None = exclude_option()

    def __attrs_post_init__(self) -> None:
        check_affinity(self.strategy, self.affinity_key)


@attrs.frozen(kw_only=True)
class InvocationAnswer:
    """A worker's answer to an invocation, which the gateway passes on: the ``result``."""

    result: Any


#: The highest revision a query may name (a signed 64-bit integer, as most clients read one).
MAX_REVISION = 2**63 - 1
#: Seconds a long poll waits for a change: the default and the most.
DEFAULT_WATCH_TIMEOUT = 30.0
MAX_WATCH_TIMEOUT = 60.0


@attrs.frozen(kw_only=True)
class SnapshotAnswer:
    """``GET /snapshot``: the whole registry at ``revision``, of the history ``epoch``.

    Follow it with ``GET /watch?epoch=EPOCH&since=REVISION``; each worker
    is in the state ``verified`` and ``silent`` say (the journal's records),
    and ``draining`` when it is drained (written only then).
    ``access_policy`` (absent: none) and ``slos`` are the registry's
    settings at ``revision``, which ``policy_changed`` and ``slos_changed``
    replace; a follower routes under them as the controller does.
    ``self_preservation``: whether the registry is in self-preservation
    (since ``self_preservation_since``), which ``self_preservation``
    changes begin and end.
    """

    epoch: str = attrs.field(metadata=_EPOCH)
    revision: int = attrs.field(metadata=_COUNT)
    health_policy: HealthPolicy
    access_policy: AccessRules | None = attrs.field(
        default=None,
        metadata={
            JSON_SCHEMA: {
                "description": "The built-in access policy: the --policy file's rules and "
                "the trust domain of least privilege; absent: no access policy."
            }
        },
    )
    slos: tuple[SloFile, ...] = attrs.field(
        default=(),
        metadata={
            JSON_SCHEMA: {"description": "The SLO files in effect, in the order of their names."}
        },
    )
    self_preservation: bool = attrs.field(
        default=False,
        metadata={
            JSON_SCHEMA: {
                "description": "In self-preservation: no worker is made unhealthy or evicted, "
                "and routes go to every worker held as routable, silent or not."
            }
        },
    )
    self_preservation_since: float | None = attrs.field(
        default=None,
        metadata={JSON_SCHEMA: {"description": "When self-preservation began (Unix seconds)."}},
    )
    workers: tuple[WorkerRecord, ...]

    def snapshot(self) -> Snapshot:
        """The core's :class:`~crank_registry.Snapshot` of this answer, to apply it."""
        return Snapshot(
            self.revision,
            self.workers,
            access_policy=self.access_policy,
            slos=self.slos,
            self_preservation=self.self_preservation_since,
        )


@attrs.frozen(kw_only=True)
class WatchAnswer:
    """``GET /watch``: the changes after ``since`` (at most 1000, oldest first).

    ``revision`` is the latest revision: when it is beyond the last event's,
    ask again from the last event's; with no events (the wait timed out) it
    is the bookmark to follow from. Each event is the journal's form of a
    change (``crank_registry.unstructure_event``), applied with the one fold.
    """

    epoch: str = attrs.field(metadata=_EPOCH)
    revision: int = attrs.field(metadata=_COUNT)
    events: tuple[dict[str, Any], ...] = attrs.field(
        metadata={JSON_SCHEMA: {"items": {"$ref": "#/components/schemas/Change"}}}
    )


@attrs.frozen(kw_only=True)
class WatchQuery:
    """The query of ``GET /watch``: follow from revision ``since`` of history ``epoch``.

    ``since`` is required; ``epoch``, when given, must be the registry's
    (another is 410 ``revision_reset``); ``timeout`` is how long to wait for
    a change when there is none yet.
    """

    since: int = attrs.field(
        metadata={
            JSON_SCHEMA: {
                "minimum": 0,
                "maximum": MAX_REVISION,
                "description": "The revision held: a snapshot's, or the last event's.",
            }
        }
    )
    epoch: str | None = attrs.field(
        default=None,
        metadata={
            JSON_SCHEMA: {
                **_EPOCH[JSON_SCHEMA],
                "description": "The epoch of the snapshot the revision belongs to.",
            }
        },
    )
    timeout: float = attrs.field(
        default=DEFAULT_WATCH_TIMEOUT,
        metadata={
            JSON_SCHEMA: {
                "exclusiveMinimum": 0,
                "maximum": MAX_WATCH_TIMEOUT,
                "description": f"Seconds to wait for a change (default {DEFAULT_WATCH_TIMEOUT:g}).",
            }
        },
    )

    @classmethod
    def parse(cls, items: Iterable[tuple[str, str]]) -> WatchQuery:
        """The query of a request's ``(name, value)`` pairs; every problem is named.

        Raises :class:`ValidationError` for an unknown or repeated
        parameter, a missing or negative ``since``, an ``epoch`` that is not
        one, or a ``timeout`` that is not a number of seconds in
        ``(0, MAX_WATCH_TIMEOUT]``.
        """
        problems: list[Problem] = []
        values: dict[str, str] = {}
        fields = attrs.fields_dict(cls)
        for name, value in items:
            if name not in fields:
                known = ", ".join(fields)
                problems.append(Problem(name, f"unknown query parameter (known: {known})"))
            elif name in values:
                problems.append(Problem(name, "is given more than once"))
            else:
                values[name] = value
        since = 0
        text = values.get("since")
        if text is None:
            problems.append(
                Problem("since", "is required: the revision of /snapshot, or of the last event")
            )
        elif text.isascii() and text.isdigit() and len(text) <= 20 and int(text) <= MAX_REVISION:
            since = int(text)
        else:
            problems.append(
                Problem("since", f"must be an integer from 0 to {MAX_REVISION}, got {text!r}")
            )
        epoch = values.get("epoch")
        if epoch is not None and not re.fullmatch(r"[0-9A-Za-z_-]{1,64}", epoch):
            problems.append(
                Problem(
                    "epoch",
                    f"must be the epoch of /snapshot (1 to 64 letters or digits), got {epoch!r}",
                )
            )
        timeout = DEFAULT_WATCH_TIMEOUT
        if "timeout" in values:
            try:
                timeout = float(values["timeout"])
            except ValueError:
                timeout = math.nan
            if not 0 < timeout <= MAX_WATCH_TIMEOUT:
                problems.append(
                    Problem(
                        "timeout",
                        f"must be a number of seconds, more than 0 and at most "
                        f"{MAX_WATCH_TIMEOUT:g}, got {values['timeout']!r}",
                    )
                )
        if problems:
            raise ValidationError(problems)
        return cls(since=since, epoch=epoch, timeout=timeout)


#: The classes read with unknown fields ignored (see the module docstring).
ANSWER_TYPES: frozenset[type[Any]] = frozenset(
    {
        CapabilitiesAnswer,
        CapabilityView,
        DeregisterAnswer,
        DrainAnswer,
        ErrorAnswer,
        FailedAttempt,
        HealthAnswer,
        HeartbeatAnswer,
        InvocationAnswer,
        Problem,
        RateLimitState,
        ReadyAnswer,
        RegisterAnswer,
        RemovedWorker,
        RouteExplanation,
        SloFile,
        SlosAnswer,
        SnapshotAnswer,
        WatchAnswer,
        WorkerEndpoint,
        WorkerEntry,
        WorkerLoad,
        WorkersAnswer,
    }
)
