"""crank_registry: the sans-IO core of the crank capability registry.

Models, validation, the health state table, the registry, round-robin
routing and the journal codec. No I/O, no clock reads, no async: every
call that depends on time takes ``now``, every mutation returns the events
that happened, and every change is applied by one fold
(:meth:`CapabilityRegistry.apply`), whoever applies it.

Where each rule lives:

* ``_models``: the values and their invariants (what a valid worker id,
  URL, capability is), with the JSON Schema rules the OpenAPI document
  shows; ``_wire``: the answers of the HTTP API; ``_converter``: the one
  converter for the wire and the journal; ``_errors``: the error tree.
* ``_events``: the events and the snapshot, the fold's inputs.
* ``_health``: the state table of a worker and all health arithmetic.
* ``_rotation``: the round-robin ring of one ``(verb, capability)``.
* ``_routing``: the routing options: filters, strategies, idempotency, explain.
* ``_records``: the registry's mutable records (below health and rotation).
* ``_registry``: the public registry: decide with the table, apply with the fold.
* ``_journal``: events and snapshots as JSON lines, and their replay.
"""

from ._convention import INVOKE_PREFIX, NDJSON, invocation_path, iso_utc
from ._converter import (
    EVENT_TYPES,
    converter,
    structure,
    structure_event,
    unstructure,
    unstructure_event,
)
from ._errors import (
    Forbidden,
    NotSupported,
    Problem,
    RegistryError,
    UnknownCapability,
    ValidationError,
    WorkerNotRegistered,
)
from ._events import (
    Change,
    Event,
    HeartbeatReceived,
    Snapshot,
    WorkerDeregistered,
    WorkerEvicted,
    WorkerHealthy,
    WorkerImported,
    WorkerRegistered,
    WorkerUnhealthy,
)
from ._health import TRANSITIONS, Health, HealthInput, Refusal, Transition, TransitionError
from ._identity import authorize_worker, worker_name_of
from ._journal import (
    JOURNAL_FORMAT_VERSION,
    SNAPSHOT_PART_SIZE,
    JournalDecodeError,
    JournalEntry,
    JournalReader,
    NewerJournalFormat,
    ReplayResult,
    SkippedLine,
    SnapshotPart,
    decode_heartbeat_line,
    decode_line,
    encode_event,
    encode_snapshot,
    replay,
    replay_bytes,
)
from ._models import (
    JSON_SCHEMA,
    REMOVAL_REASONS,
    ROUTE_STRATEGIES,
    SLO_CONSTRAINT_KEYS,
    CapabilityKey,
    CapabilitySchema,
    CapabilityView,
    DeregisterRequest,
    HealthPolicy,
    HealthState,
    HeartbeatRequest,
    Registration,
    RemovedWorker,
    RouteExplanation,
    RouteRequest,
    WorkerEndpoint,
    WorkerRecord,
    WorkerView,
    capability_label,
    is_worker_id,
    is_worker_url,
    parse_capability_label,
)
from ._registry import STATE_FORMAT_VERSION, CapabilityRegistry
from ._routing import RouteOptions, RoutingSettings, effective_slo, rendezvous_weight
from ._wire import (
    ANSWER_TYPES,
    CapabilitiesAnswer,
    DeregisterAnswer,
    ErrorAnswer,
    ExecuteRequest,
    FailedAttempt,
    HealthAnswer,
    HeartbeatAnswer,
    InvocationAnswer,
    RegisterAnswer,
    WorkerEntry,
    WorkersAnswer,
)

__all__ = [
    "ANSWER_TYPES",
    "EVENT_TYPES",
    "INVOKE_PREFIX",
    "JOURNAL_FORMAT_VERSION",
    "JSON_SCHEMA",
    "NDJSON",
    "REMOVAL_REASONS",
    "ROUTE_STRATEGIES",
    "SLO_CONSTRAINT_KEYS",
    "SNAPSHOT_PART_SIZE",
    "STATE_FORMAT_VERSION",
    "TRANSITIONS",
    "CapabilitiesAnswer",
    "CapabilityKey",
    "CapabilityRegistry",
    "CapabilitySchema",
    "CapabilityView",
    "Change",
    "DeregisterAnswer",
    "DeregisterRequest",
    "ErrorAnswer",
    "Event",
    "ExecuteRequest",
    "FailedAttempt",
    "Forbidden",
    "Health",
    "HealthInput",
    "HealthAnswer",
    "HealthPolicy",
    "HealthState",
    "HeartbeatAnswer",
    "HeartbeatReceived",
    "HeartbeatRequest",
    "InvocationAnswer",
    "JournalDecodeError",
    "JournalEntry",
    "JournalReader",
    "NewerJournalFormat",
    "NotSupported",
    "Problem",
    "Refusal",
    "RegisterAnswer",
    "Registration",
    "RegistryError",
    "RemovedWorker",
    "ReplayResult",
    "RouteExplanation",
    "RouteOptions",
    "RouteRequest",
    "RoutingSettings",
    "SkippedLine",
    "Snapshot",
    "SnapshotPart",
    "Transition",
    "TransitionError",
    "ValidationError",
    "WorkerDeregistered",
    "WorkerEndpoint",
    "WorkerEntry",
    "WorkerEvicted",
    "WorkerHealthy",
    "WorkerImported",
    "UnknownCapability",
    "WorkerNotRegistered",
    "WorkerRecord",
    "WorkerRegistered",
    "WorkerUnhealthy",
    "WorkerView",
    "WorkersAnswer",
    "authorize_worker",
    "capability_label",
    "converter",
    "decode_heartbeat_line",
    "decode_line",
    "effective_slo",
    "encode_event",
    "encode_snapshot",
    "invocation_path",
    "is_worker_id",
    "is_worker_url",
    "iso_utc",
    "parse_capability_label",
    "rendezvous_weight",
    "replay",
    "replay_bytes",
    "structure",
    "structure_event",
    "unstructure",
    "unstructure_event",
    "worker_name_of",
]
