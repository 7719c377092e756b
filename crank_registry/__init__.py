"""crank_registry: the sans-IO core of the crank capability registry.

Models, validation, the registry state machine, health rules, round-robin
routing and the state snapshot format. No I/O, no clock reads, no async:
every call that depends on time takes ``now``, and every mutation returns
the events that happened so that a service can turn them into I/O.
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
    ValidationError,
    WorkerNotRegistered,
)
from ._events import (
    Event,
    HeartbeatReceived,
    WorkerDeregistered,
    WorkerEvicted,
    WorkerImported,
    WorkerRegistered,
)
from ._identity import authorize_worker, worker_name_of
from ._journal import (
    JOURNAL_FORMAT_VERSION,
    JournalDecodeError,
    JournalEntry,
    JournalLines,
    JournalState,
    ReplayResult,
    SkippedLine,
    SnapshotPart,
    decode_line,
    encode_event,
    encode_snapshot,
    replay,
)
from ._models import (
    CapabilityKey,
    CapabilitySchema,
    CapabilityView,
    DeregisterRequest,
    HealthPolicy,
    HealthState,
    HeartbeatRequest,
    Registration,
    RouteRequest,
    WorkerEndpoint,
    WorkerRecord,
    WorkerView,
    capability_label,
    is_worker_id,
    parse_capability_label,
)
from ._registry import STATE_FORMAT_VERSION, CapabilityRegistry

__all__ = [
    "EVENT_TYPES",
    "INVOKE_PREFIX",
    "JOURNAL_FORMAT_VERSION",
    "NDJSON",
    "STATE_FORMAT_VERSION",
    "CapabilityKey",
    "CapabilityRegistry",
    "CapabilitySchema",
    "CapabilityView",
    "DeregisterRequest",
    "Event",
    "Forbidden",
    "HealthPolicy",
    "HealthState",
    "HeartbeatReceived",
    "HeartbeatRequest",
    "JournalDecodeError",
    "JournalEntry",
    "JournalLines",
    "JournalState",
    "NotSupported",
    "Problem",
    "Registration",
    "ReplayResult",
    "RegistryError",
    "RouteRequest",
    "SkippedLine",
    "SnapshotPart",
    "ValidationError",
    "WorkerDeregistered",
    "WorkerEndpoint",
    "WorkerEvicted",
    "WorkerImported",
    "WorkerNotRegistered",
    "WorkerRecord",
    "WorkerRegistered",
    "WorkerView",
    "authorize_worker",
    "capability_label",
    "converter",
    "decode_line",
    "encode_event",
    "encode_snapshot",
    "invocation_path",
    "iso_utc",
    "is_worker_id",
    "parse_capability_label",
    "replay",
    "structure",
    "structure_event",
    "unstructure",
    "unstructure_event",
    "worker_name_of",
]
