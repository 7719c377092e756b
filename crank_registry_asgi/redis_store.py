"""The shared registry on Redis: a stream of changes, a snapshot that bounds it, a sweeper lease.

Several controllers on one Redis (and one ``--redis-prefix``) share one
registry. Each holds a full replica and routes from it; every change goes
through Redis and comes back to every controller, its writer included, in
one order: the stream's, which is the revision order.

Keys (``P`` the prefix), all with one hash tag so that the scripts would
run unchanged on a Redis Cluster::

    {P}:epoch     the name of the registry's history; missing: Redis lost
                  its data (restarted empty), and a new history starts
    {P}:revision  the last revision given
    {P}:stream    the changes and the heartbeat batches, in revision order
    {P}:records   worker id -> the revision of its last change
    {P}:heard     worker id -> its latest heartbeat time written
    {P}:snapshot  a hash: the registry at ``revision`` (the journal codec's
                  lines), the last stream entry it covers, ``records`` (JSON)
    {P}:lease     the sweeper lease: the holder's controller id, expiring

Writing. The registry *decides* a change on the replica; one script
(:data:`WRITE_CHANGES`) checks the epoch, gives the changes their revisions,
appends them to the stream as one entry (the journal codec's lines) and
keeps ``records`` and ``heard``, atomically. A registration is answered 200
only once the script returned, and once this controller applied the entry
from the stream (so a route on the same controller right after finds it).
Decisions on replicas can race: a time-driven change (``unhealthy``,
``evicted``, ``restored``) carries the revision of the worker's record it
was decided on and is dropped by the script when the record changed since,
when its writer no longer holds the sweeper lease, or (but for
``restored``, which no heartbeat decides) when a later heartbeat was
written; ``healthy`` and ``ejected`` are dropped when the record changed;
the registry's settings (``slos_changed``, ``policy_changed``: see
:mod:`~crank_registry_asgi.shared_settings`) and ``self_preservation``
(which the lease holder's sweep decides) are dropped when their writer no
longer holds the lease. Registrations, deregistrations and drains
always apply, in stream order. The cap on ejected workers is the fold's,
which every replica applies alike.

Heartbeats are batched: the latest per worker, written by
:data:`WRITE_HEARTBEATS` as one stream entry per controller every few
milliseconds (at most :data:`HEARTBEAT_BATCH_MAX` workers an entry), and
applied by every controller, so that routability and the ``unverified``
window work on every replica as on one controller. A heartbeat's load
report travels in the same entry (``least_loaded`` on every replica).

Reading. At start a controller loads the snapshot key, then tails the
stream with ``XREAD BLOCK`` (on its own connection, with a socket timeout
longer than the block) and applies every entry with the core's one fold.
Each entry the tail applies reports its replication lag
(:attr:`RedisStore.replicated`): from its ID's time, Redis' clock when it
was appended, to the moment it was applied here, on this host's clock
corrected by the offset to Redis ``TIME`` measured at each connect (an
offset over one second is logged).
An entry whose first revision is not the next one means the stream was
trimmed past this controller's position: it loads the snapshot again. An
entry of a newer format stops the applying: the controller keeps routing
and answers writes 503 ``incompatible_peer``.

Snapshots. The lease holder writes a snapshot once the stream holds
``snapshot_every`` entries past the last one, with :data:`WRITE_SNAPSHOT`,
which trims the stream of exactly the entries the snapshot covers.

Sweeper lease. ``SET NX PX`` in a script (:data:`TAKE_LEASE`), renewed every
quarter of the lease period; the key lives three quarters of it, so a dead
holder's lease is taken over within one lease period. Only the holder
sweeps, and not before one ``unhealthy_after`` after an outage of the
store, so that the heartbeats kept during it land first.

Outage. When Redis cannot be reached, controllers keep routing from their
replicas; registrations and deregistrations are 503 ``store_unavailable``
with ``Retry-After`` (nothing changed); heartbeats are answered 200 and kept
(the latest per worker) to be written in one batch when Redis returns; no
sweep runs. On reconnect the tail catches up from its position, or from the
snapshot when the stream was trimmed past it. Redis restarted empty (the
epoch key is gone): the first controller to notice starts a new history,
every controller replaces its replica with it, and the workers' next
heartbeats, answered ``worker_not_registered``, register them again.

Errors::

    RedisStoreError     the store cannot be used at start-up (unreachable,
                        a newer format): the controller must not start
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import attrs

from crank_registry import (
    JOURNAL_FORMAT_VERSION,
    AccessRules,
    CapabilityRegistry,
    Change,
    Event,
    HeartbeatReceived,
    JournalDecodeError,
    JournalReader,
    LoadReport,
    NewerJournalFormat,
    PolicyChanged,
    RegistryError,
    SelfPreservationChanged,
    SlosChanged,
    Snapshot,
    SnapshotPart,
    ValidationError,
    WorkerChange,
    WorkerDeregistered,
    WorkerDraining,
    WorkerEjected,
    WorkerEvicted,
    WorkerHealthy,
    WorkerImported,
    WorkerRecord,
    WorkerRegistered,
    WorkerRestored,
    WorkerUndrained,
    WorkerUnhealthy,
    decode_heartbeat_line,
    encode_event,
    encode_snapshot,
    structure,
    unstructure,
)

from .http import ApiError
from .schemas import capability_schema_problems

try:  # the optional extra crank-registry-asgi[redis]
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import RedisError
except ImportError:  # pragma: no cover - checked by RedisStore.__init__
    aioredis = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_LEASE_PERIOD",
    "DEFAULT_SNAPSHOT_EVERY",
    "HEARTBEAT_BATCH_MAX",
    "RedisStore",
    "RedisStoreError",
    "StoreKeys",
]

logger = logging.getLogger("crank_registry_asgi.redis")

#: Seconds within which another controller takes the sweeper lease of a dead holder.
DEFAULT_LEASE_PERIOD = 10.0
#: Stream entries past the last snapshot after which the lease holder writes another.
DEFAULT_SNAPSHOT_EVERY = 10_000
#: The most workers one heartbeat batch entry holds.
HEARTBEAT_BATCH_MAX = 1000
#: Seconds a heartbeat waits for others to join its batch.
HEARTBEAT_BATCH_DELAY = 0.005
#: Seconds an XREAD blocks waiting for entries.
DEFAULT_BLOCK = 1.0
# Entries read by one XREAD.
_READ_COUNT = 512
# Seconds a write waits for its own entry to come back from the stream
# before it is answered anyway (it is in Redis already).
_APPLY_WAIT = 2.0
# Seconds between two attempts to reach Redis again after an outage.
_RECONNECT_DELAY = 0.1
# A clock offset to Redis over this many seconds is logged.
_OFFSET_LOGGED = 1.0

_NOT_CONNECTED = (OSError,) if aioredis is None else (RedisError, OSError)


@attrs.frozen
class StoreKeys:
    """The keys of one registry in Redis, all under the hash tag ``{prefix}``."""

    prefix: str

    def key(self, name: str) -> str:
        """The key ``{prefix}:name``."""
        return f"{{{self.prefix}}}:{name}"

    @property
    def epoch(self) -> str:
        """The name of the registry's history."""
        return self.key("epoch")

    @property
    def revision(self) -> str:
        """The last revision given."""
        return self.key("revision")

    @property
    def stream(self) -> str:
        """The changes and heartbeat batches, in revision order."""
        return self.key("stream")

    @property
    def records(self) -> str:
        """Worker id -> the revision of its last change."""
        return self.key("records")

    @property
    def heard(self) -> str:
        """Worker id -> its latest heartbeat time written."""
        return self.key("heard")

    @property
    def snapshot(self) -> str:
        """The snapshot hash."""
        return self.key("snapshot")

    @property
    def lease(self) -> str:
        """The sweeper lease."""
        return self.key("lease")

    def all(self) -> tuple[str, ...]:
        """Every key of the registry (to start a history, or for a test to clean up)."""
        return (
            self.epoch,
            self.revision,
            self.stream,
            self.records,
            self.heard,
            self.snapshot,
            self.lease,
        )


# Each script checks the epoch first: a write meant for another history (Redis
# lost its data since this controller loaded) changes nothing.

#: Start a history: when the epoch key is missing, clear the registry's keys and
#: name a new one. KEYS: StoreKeys.all(); ARGV: the new epoch. Returns the epoch.
START_HISTORY = """
local epoch = redis.call('GET', KEYS[1])
if epoch then return epoch end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

#: Append changes. KEYS: epoch, revision, stream, records, heard, lease.
#: ARGV: epoch, controller id, format, count, then per change six values:
#: worker id, condition (always | unchanged | swept | leased), the record revision it
#: was decided on, the heartbeat it was decided on ('' for none), what it
#: does to the record (new | hold | drop | none) with the heartbeat time it
#: brings ('' for none), and its line.
#: Returns {'epoch'}, {'none'} (all dropped) or {'ok', id, revision, kept...}.
WRITE_CHANGES = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'epoch'} end
local holder = redis.call('GET', KEYS[6])
local revision = tonumber(redis.call('GET', KEYS[2]) or '0')
local lines = {}
local kept = {}
for i = 0, tonumber(ARGV[4]) - 1 do
  local at = 5 + i * 7
  local worker, condition, based, decided = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local effect, brings, line = ARGV[at + 4], ARGV[at + 5], ARGV[at + 6]
  local ok = true
  if condition == 'leased' then
    ok = holder == ARGV[2]
  elseif condition ~= 'always' then
    ok = (redis.call('HGET', KEYS[4], worker) or '0') == based
    if ok and condition == 'swept' then
      ok = holder == ARGV[2]
      local heard = redis.call('HGET', KEYS[5], worker)
      if ok and heard and decided ~= '' and tonumber(heard) > tonumber(decided) then
        ok = false
      end
    end
  end
  if ok then
    revision = revision + 1
    if effect == 'drop' then
      redis.call('HDEL', KEYS[4], worker)
      redis.call('HDEL', KEYS[5], worker)
    elseif effect ~= 'none' then
      redis.call('HSET', KEYS[4], worker, revision)
      if effect == 'new' then
        redis.call('HSET', KEYS[5], worker, brings)
      elseif brings ~= '' then
        local heard = redis.call('HGET', KEYS[5], worker)
        if not heard or tonumber(brings) > tonumber(heard) then
          redis.call('HSET', KEYS[5], worker, brings)
        end
      end
    end
    lines[#lines + 1] = line
    kept[#kept + 1] = i
  end
end
if #lines == 0 then return {'none'} end
redis.call('SET', KEYS[2], revision)
local id = redis.call('XADD', KEYS[3], '*', 'v', ARGV[3], 'revision', revision,
  'changes', table.concat(lines))
local reply = {'ok', id, tostring(revision)}
for _, i in ipairs(kept) do reply[#reply + 1] = i end
return reply
"""

#: Append a heartbeat batch. KEYS: epoch, revision, stream, records, heard.
#: ARGV: epoch, format, lines, load reports (JSON, or ''), then pairs of worker
#: id and time. Returns {'epoch'} or {'ok', id}.
WRITE_HEARTBEATS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'epoch'} end
for i = 5, #ARGV, 2 do
  local worker, at = ARGV[i], ARGV[i + 1]
  if redis.call('HEXISTS', KEYS[4], worker) == 1 then
    local heard = redis.call('HGET', KEYS[5], worker)
    if not heard or tonumber(at) > tonumber(heard) then
      redis.call('HSET', KEYS[5], worker, at)
    end
  end
end
local revision = redis.call('GET', KEYS[2]) or '0'
local id
if ARGV[4] == '' then
  id = redis.call('XADD', KEYS[3], '*', 'v', ARGV[2], 'revision', revision, 'beats', ARGV[3])
else
  id = redis.call('XADD', KEYS[3], '*', 'v', ARGV[2], 'revision', revision, 'beats', ARGV[3],
    'loads', ARGV[4])
end
return {'ok', id}
"""

#: Take or renew the sweeper lease (SET NX PX). KEYS: lease, epoch.
#: ARGV: controller id, time to live (ms), epoch. Returns 1 (held), 0 (another
#: holds it) or -1 (another history).
TAKE_LEASE = """
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return -1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

#: Give the lease back if this controller holds it. KEYS: lease; ARGV: controller id.
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: Write a snapshot and trim what it covers. KEYS: epoch, snapshot, stream.
#: ARGV: epoch, format, revision, the last entry it covers, the trim's MINID,
#: lines, records (JSON). Returns 1 (written), 0 (an older one than the key's)
#: or -1 (another history).
WRITE_SNAPSHOT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local current = redis.call('HGET', KEYS[2], 'revision')
if current and tonumber(current) > tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[2], 'v', ARGV[2], 'revision', ARGV[3], 'entry', ARGV[4],
  'lines', ARGV[6], 'records', ARGV[7])
redis.call('XTRIM', KEYS[3], 'MINID', ARGV[5])
return 1
"""


class RedisStoreError(Exception):
    """The Redis store cannot be used at start-up: the controller must not start.

    The message names the URL (without its password) and says why.
    """


class _Reload(Exception):
    """The replica must load the snapshot again (the stream was trimmed past it)."""


# What a change does to its worker's record in Redis (and in the replica's copy
# of it): the rule is one function, used to write and to apply.
def _record_effect(change: Change) -> tuple[str, float | None]:
    """``(effect, heartbeat time)``: new | hold | drop | none, and the time the change brings."""
    if isinstance(change, WorkerRegistered):
        return "new", change.at
    if isinstance(change, WorkerImported):
        return "new", change.last_heartbeat
    if isinstance(change, WorkerHealthy):
        return "hold", change.at
    if isinstance(change, (WorkerUnhealthy, WorkerEjected, WorkerRestored)):
        return "hold", None
    if isinstance(change, (WorkerDeregistered, WorkerEvicted)):
        return "drop", None
    if isinstance(change, (WorkerDraining, WorkerUndrained)):
        # Beside health: it brings no heartbeat, and leaves the record's revision
        # alone, so that it makes no time-driven decision of the sweeper stale.
        return "none", None
    return "none", None


def _condition(change: Change) -> tuple[str, float | None]:
    """When the script keeps ``change``: always, while the record is unchanged, swept, or leased.

    ``leased``: while its writer holds the sweeper lease (the settings the
    lease holder publishes, and self-preservation, which its sweep decides).
    """
    if isinstance(change, (WorkerUnhealthy, WorkerEvicted)):
        return "swept", change.last_heartbeat
    if isinstance(change, WorkerRestored):
        return "swept", None  # no heartbeat decides it: the record and the lease only
    if isinstance(change, (WorkerHealthy, WorkerEjected)):
        return "unchanged", None
    if isinstance(change, (SlosChanged, PolicyChanged, SelfPreservationChanged)):
        # The lease holder's alone: a controller that lost the lease (paused,
        # cut off) must not turn self-preservation on or off for the fleet.
        return "leased", None
    # Registrations, deregistrations, drains (an operator's or the worker's
    # own act, applied in stream order) and the other registry-wide changes.
    return "always", None


def _number(value: float | None) -> str:
    """A time as the scripts read it (``repr`` round-trips a float); '' for none."""
    return "" if value is None else repr(float(value))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of an XREAD reply (RESP2's list of streams or RESP3's map)."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, Mapping) else (item[1] for item in reply)
    entries: list[tuple[bytes, dict[bytes, bytes]]] = []
    for stream in streams:
        entries.extend((entry_id, dict(fields)) for entry_id, fields in stream)
    return entries


def _after(entry_id: bytes) -> str:
    """The stream ID just after ``entry_id`` (``XTRIM MINID`` keeps it and what follows)."""
    ms, _, sequence = entry_id.decode().partition("-")
    return f"{ms}-{int(sequence or 0) + 1}"


def _safe_url(url: str) -> str:
    """The URL without a password, for messages."""
    scheme, found, rest = url.partition("://")
    if not found or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


class RedisStore:
    """Where the registry's changes become durable and get their revisions: one Redis.

    ``registry`` is this controller's replica; ``clock`` the service's
    clock (health decisions); ``controller_id`` names this controller in
    the sweeper lease. ``unhealthy_after``: the wait after an outage before
    the first sweep. Use: :meth:`open` (connects and loads), :meth:`run`
    in a task group while serving, :meth:`aclose` at shutdown.
    """

    def __init__(
        self,
        registry: CapabilityRegistry,
        *,
        url: str,
        prefix: str,
        controller_id: str,
        clock: Callable[[], float],
        retry_after: str = "1",
        lease_period: float = DEFAULT_LEASE_PERIOD,
        snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
        block: float = DEFAULT_BLOCK,
    ) -> None:
        if aioredis is None:
            raise RedisStoreError(
                "--redis needs the redis package: pip install 'crank-registry-asgi[redis]'"
            )
        self.registry = registry
        self.url = url
        self.keys = StoreKeys(prefix)
        self.controller_id = controller_id
        self.clock = clock
        self.retry_after = retry_after
        self.lease_period = lease_period
        self.snapshot_every = snapshot_every
        self.block = block
        #: The history this replica follows (None until :meth:`open`).
        self.epoch: str | None = None
        #: The last revision of the stream applied here.
        self.revision = 0
        #: The last stream entry applied here.
        self.position = b"0-0"
        #: Whether Redis answered the last command (writes are refused while not).
        self.available = False
        #: A newer format met in the stream (writes are refused, nothing more is applied).
        self.incompatible: int | None = None
        #: Redis' clock minus this host's wall clock, measured at the last connect.
        self.offset = 0.0
        #: This host's wall clock (the offset to Redis is measured against it).
        self.wall: Callable[[], float] = time.time
        #: Called with the replication lag of each stream entry the tail applied,
        #: in seconds (the ``crank_replication_lag_seconds`` histogram).
        self.replicated: Callable[[float], None] = _ignore_lag
        #: Called after entries were applied (the change feed wakes its watchers).
        self.applied: Callable[[], None] = _nothing
        #: Called with the new epoch when the history changed (Redis lost its data).
        self.epoch_changed: Callable[[str], None] = _ignore
        #: Called when this controller took the sweeper lease (wakes the sweeper).
        self.lease_taken: Callable[[], None] = _nothing
        #: Set the service's clock to Redis' time (its first connect only: the
        #: service's time must not jump while it serves); ``None``: a clock of
        #: the caller's, used as it is.
        self.align_clock: Callable[[float], float] | None = None
        # Worker id -> the revision of its last change, as in {P}:records.
        self._records: dict[str, int] = {}
        # The latest heartbeat per worker not written yet.
        self._beats: dict[str, HeartbeatReceived] = {}
        self._beats_waiting: anyio.Event | None = None
        self._moved = anyio.Event()
        self._reconnected = anyio.Event()
        self._lease_until = -math.inf  # monotonic time the lease is surely ours until
        self._sweep_not_before = -math.inf  # service time
        self._reload = False
        self._entries_since_snapshot = 0
        self._snapshotting = False
        self._tasks: anyio.abc.TaskGroup | None = None
        self._redis: Any = None
        self._reader: Any = None
        self._scripts: dict[str, Any] = {}

    # ---------------------------------------------------------------- start

    async def open(self) -> None:
        """Connect, check the clock, load the snapshot and catch up with the stream.

        Raises :class:`RedisStoreError` when Redis cannot be reached or holds
        a newer format.
        """
        # One retry: a pooled connection that Redis closed (a restart) is
        # replaced at once; a Redis that is down is reported at once.
        retry = Retry(ExponentialBackoff(cap=0.05, base=0.01), 1)
        # socket_timeout above the XREAD block, or a long block would time out.
        timeout = max(5.0, self.block + 5.0)
        self._redis = aioredis.Redis.from_url(
            self.url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=retry
        )
        self._reader = aioredis.Redis.from_url(
            self.url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=retry,
            single_connection_client=True,
        )
        for name, source in (
            ("start", START_HISTORY),
            ("changes", WRITE_CHANGES),
            ("heartbeats", WRITE_HEARTBEATS),
            ("lease", TAKE_LEASE),
            ("release", RELEASE_LEASE),
            ("snapshot", WRITE_SNAPSHOT),
        ):
            self._scripts[name] = self._redis.register_script(source)
        try:
            await self._connect()
            while True:
                entries = _entries(
                    await self._reader.xread({self.keys.stream: self.position}, count=_READ_COUNT)
                )
                if not entries or self.incompatible is not None:
                    break
                try:
                    self._apply_entries(entries)
                except _Reload:
                    await self._load()
        except _NOT_CONNECTED as error:
            await self.aclose()
            raise RedisStoreError(
                f"cannot reach Redis at {_safe_url(self.url)}: {error} "
                "(is redis-server running? see --redis / CRANK_REDIS_URL)"
            ) from None
        if self.incompatible is not None:
            await self.aclose()
            raise RedisStoreError(
                f"the registry in Redis at {_safe_url(self.url)} (prefix {self.keys.prefix!r}) "
                f"is written in format {self.incompatible}; this release reads up to "
                f"{JOURNAL_FORMAT_VERSION}: run a newer release"
            )
        self.available = True
        logger.info(
            "redis store loaded url=%s prefix=%s epoch=%s revision=%d workers=%d",
            _safe_url(self.url),
            self.keys.prefix,
            self.epoch,
            self.revision,
            len(self.registry),
        )

    async def _connect(self) -> None:
        """Measure the clock offset, check the epoch; load the history when it is another."""
        sent = self.wall()
        seconds, micros = await self._redis.time()
        received = self.wall()
        redis_now = seconds + micros / 1e6
        # Redis read its clock about halfway through the round trip.
        self.offset = redis_now - (sent + received) / 2
        if abs(self.offset) > _OFFSET_LOGGED:
            logger.warning(
                "this host's clock is %+.3f s off Redis' clock (controller_id=%s)%s",
                -self.offset,
                self.controller_id,
                "; the controller keeps Redis' time" if self.align_clock is not None else "",
            )
        if self.align_clock is not None:
            # Health is measured on one clock for all controllers: Redis'.
            self.align_clock(redis_now)
            self.align_clock = None
        epoch = await self._redis.get(self.keys.epoch)
        if epoch is None:
            epoch = await self._scripts["start"](
                keys=list(self.keys.all()), args=[secrets.token_hex(8)]
            )
        if _text(epoch) != self.epoch:
            await self._load()

    async def _load(self) -> None:
        """Replace the replica with the current history's snapshot key (or an empty registry)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(self.keys.epoch)
            pipe.hgetall(self.keys.snapshot)
            epoch, stored = await pipe.execute()
        if epoch is None:
            epoch = await self._scripts["start"](
                keys=list(self.keys.all()), args=[secrets.token_hex(8)]
            )
            stored = {}
        epoch = _text(epoch)
        started = time.perf_counter()
        try:
            snapshot, records, position = _read_snapshot(stored)
        except NewerJournalFormat as error:
            self.incompatible = error.version
            return
        if snapshot is None:
            # A history without a snapshot yet starts where every service
            # history does (create_app): under the default access rules.
            empty = Snapshot(0, (), access_policy=AccessRules())
            snapshot, records, position = empty, {}, b"0-0"
        self.registry.apply_snapshot(snapshot)
        self._records = records
        self.revision = snapshot.revision
        self.position = position
        self._entries_since_snapshot = 0
        self._reload = False
        changed = epoch != self.epoch
        previous, self.epoch = self.epoch, epoch
        if changed and previous is not None:
            # The lease was the old history's: taking the new one's is taking it
            # anew (the sweeper and the settings start again from it).
            self._lease_until = -math.inf
            logger.warning(
                "the registry's history in Redis changed (Redis restarted empty?): following "
                "the new one; workers register again at their next heartbeat "
                "old_epoch=%s epoch=%s",
                previous,
                epoch,
            )
        if changed:
            self.epoch_changed(epoch)
        logger.info(
            "redis snapshot loaded revision=%d workers=%d seconds=%.3f",
            snapshot.revision,
            len(snapshot.workers),
            time.perf_counter() - started,
        )
        self.applied()

    # -------------------------------------------------------------- serving

    async def run(self) -> None:
        """Tail the stream, write heartbeat batches and keep the lease, until cancelled."""
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            tasks.start_soon(self._tail)
            tasks.start_soon(self._write_heartbeats)
            tasks.start_soon(self._keep_lease)

    async def aclose(self) -> None:
        """Give the lease back and close the connections."""
        for client in (self._redis, self._reader):
            if client is None:
                continue
            with contextlib.suppress(*_NOT_CONNECTED), anyio.move_on_after(1, shield=True):
                if client is self._redis and self._lease_until > time.monotonic():
                    # Given back, so that another controller sweeps at once.
                    await self._scripts["release"](
                        keys=[self.keys.lease], args=[self.controller_id]
                    )
                await client.aclose()
        self._redis = self._reader = None
        self.available = False

    def check_writable(self) -> None:
        """Refuse a change up front when no change can be written (not open, a newer format)."""
        if self.incompatible is not None:
            raise ApiError(
                503,
                "incompatible_peer",
                f"a controller wrote the shared registry in format {self.incompatible}; "
                f"this one writes {JOURNAL_FORMAT_VERSION}: upgrade it",
                headers={"Retry-After": self.retry_after},
            )
        if self._redis is None:
            raise ApiError(
                503,
                "store_unavailable",
                "the Redis store is not open (the application's lifespan is not running)",
                headers={"Retry-After": self.retry_after},
            )

    def holds_lease(self) -> bool:
        """Whether this controller holds the sweeper lease now (and may write with it)."""
        return self.available and self.incompatible is None and time.monotonic() < self._lease_until

    def may_sweep(self) -> bool:
        """Whether this controller may write time-driven changes now (it holds the lease)."""
        return self.holds_lease() and self.clock() >= self._sweep_not_before

    # --------------------------------------------------------------- writes

    async def commit(self, events: Sequence[Event]) -> tuple[Event, ...]:
        """Write ``events`` (just decided by the replica); return them as written.

        Heartbeats are kept for the next batch (also during an outage).
        Changes are appended by one script; the ones it dropped (a race
        lost: see the module docstring) are not returned, and the ones
        returned carry the revisions Redis gave. Raises :class:`ApiError`
        503 ``store_unavailable`` when Redis cannot take them: nothing
        changed then.
        """
        # The replica applies changes from the stream, not from decisions.
        self.registry.discard_pending()
        beats: list[Event] = []
        changes: list[Change] = []
        for event in events:
            if isinstance(event, HeartbeatReceived):
                self._keep(event)
                beats.append(event)
            elif isinstance(event, Change):
                changes.append(event)
        if not changes:
            return tuple(beats)
        self.check_writable()
        if not self.available:
            raise self._unavailable("Redis cannot be reached")
        args: list[Any] = [self.epoch, self.controller_id, JOURNAL_FORMAT_VERSION, len(changes)]
        for change in changes:
            condition, decided = _condition(change)
            effect, brings = _record_effect(change)
            # A change of the whole registry (settings) touches no worker's record.
            worker_id = change.worker_id if isinstance(change, WorkerChange) else ""
            args += [
                worker_id,
                condition,
                self._records.get(worker_id, 0),
                _number(decided),
                effect,
                _number(brings),
                encode_event(change),
            ]
        keys = self.keys
        try:
            reply = await self._scripts["changes"](
                keys=[keys.epoch, keys.revision, keys.stream, keys.records, keys.heard, keys.lease],
                args=args,
            )
        except _NOT_CONNECTED as error:
            self._lost(error)
            raise self._unavailable(f"Redis cannot be reached ({error})") from None
        status = _text(reply[0])
        if status == "epoch":
            self._reload = True
            raise self._unavailable("the registry's history in Redis changed (restarted empty?)")
        if status == "none":
            return tuple(beats)
        revision = int(reply[2])
        kept = [changes[int(index)] for index in reply[3:]]
        first = revision - len(kept) + 1
        written = [attrs.evolve(change, revision=first + n) for n, change in enumerate(kept)]
        await self._wait_applied(revision)
        return (*beats, *written)

    def _unavailable(self, reason: str) -> ApiError:
        return ApiError(
            503,
            "store_unavailable",
            f"{reason}; nothing was changed, retry later",
            headers={"Retry-After": self.retry_after},
        )

    def _keep(self, beat: HeartbeatReceived) -> None:
        """Keep the latest heartbeat of its worker for the next batch."""
        kept = self._beats.get(beat.worker_id)
        if kept is None or beat.at > kept.at:
            self._beats[beat.worker_id] = beat
        waiting = self._beats_waiting
        if waiting is not None:
            self._beats_waiting = None
            waiting.set()

    async def _wait_applied(self, revision: int) -> None:
        """Wait (a bounded time) until this replica applied ``revision`` from the stream."""
        with anyio.move_on_after(_APPLY_WAIT):
            while self.revision < revision and self.epoch is not None:
                await self._moved.wait()

    async def _write_heartbeats(self) -> None:
        """Write the kept heartbeats, one batch entry every few milliseconds."""
        while True:
            if not self._beats:
                self._beats_waiting = anyio.Event()
                await self._beats_waiting.wait()
            await anyio.sleep(HEARTBEAT_BATCH_DELAY)
            while not self.available:
                await self._reconnected.wait()
            taken = {
                worker_id: self._beats.pop(worker_id)
                for worker_id in list(itertools.islice(self._beats, HEARTBEAT_BATCH_MAX))
            }
            args: list[Any] = [
                self.epoch,
                JOURNAL_FORMAT_VERSION,
                b"".join(encode_event(beat) for beat in taken.values()),
                self._loads_of(taken.values()),
            ]
            for beat in taken.values():
                args += [beat.worker_id, _number(beat.at)]
            keys = self.keys
            try:
                reply = await self._scripts["heartbeats"](
                    keys=[keys.epoch, keys.revision, keys.stream, keys.records, keys.heard],
                    args=args,
                )
            except _NOT_CONNECTED as error:
                self._lost(error)
                for beat in taken.values():  # kept for the next try, unless a later one came
                    self._keep(beat)
                continue
            if _text(reply[0]) == "epoch":
                self._reload = True  # another history: these workers must register again

    def _loads_of(self, beats: Iterable[HeartbeatReceived]) -> bytes:
        """The load reports these heartbeats carried, as JSON: ``{worker: [at, report]}``.

        A report is the worker's latest if it came with this heartbeat
        (reported at its time); the others' replicas keep it too.
        """
        loads: dict[str, Any] = {}
        for beat in beats:
            view = self.registry.get_worker(beat.worker_id, now=beat.at)
            if view is not None and view.load is not None and view.load_reported_at == beat.at:
                loads[beat.worker_id] = [beat.at, unstructure(view.load)]
        return json.dumps(loads, separators=(",", ":")).encode() if loads else b""

    # ---------------------------------------------------------------- reads

    async def _tail(self) -> None:
        """Apply the stream's entries as they come, reconnecting after an outage."""
        while True:
            try:
                if not self.available:
                    await self._reconnect()
                if self._reload:
                    await self._load()
                reply = await self._reader.xread(
                    {self.keys.stream: self.position},
                    count=_READ_COUNT,
                    block=max(1, int(self.block * 1000)),
                )
                entries = _entries(reply)
                if not entries and (await self._trimmed_past() or await self._behind()):
                    # A snapshot trimmed our position, or Redis lost what we
                    # applied, and nothing came after it: no entry shows it.
                    self._reload = True
                applied = self._apply_entries(entries)
                self._report_lag(entries[:applied])
                if self.incompatible is not None:
                    # Nothing more is applied: this release cannot read what follows.
                    await anyio.sleep_forever()
            except _Reload:
                self._reload = True
            except _NOT_CONNECTED as error:
                self._lost(error)
                await anyio.sleep(_RECONNECT_DELAY)

    async def _reconnect(self) -> None:
        """After an outage: reach Redis again, check the history, let the writes go on."""
        await self._redis.ping()
        await self._connect()
        if await self._trimmed_past() or await self._behind():
            await self._load()
        self.available = True
        # The heartbeats kept during the outage land before the first sweep.
        self._sweep_not_before = self.clock() + self.registry.policy.unhealthy_after
        event, self._reconnected = self._reconnected, anyio.Event()
        event.set()
        logger.warning(
            "redis reachable again; catching up from revision %d (sweeps resume after %gs)",
            self.revision,
            self.registry.policy.unhealthy_after,
        )

    async def _trimmed_past(self) -> bool:
        """Whether a snapshot newer than the replica trimmed the stream past its position."""
        stored = await self._redis.hget(self.keys.snapshot, "revision")
        if stored is None or int(stored) <= self.revision:
            return False
        if self.position == b"0-0":
            return True
        # MINID trims everything before a point: our entry gone, what followed it may be too.
        return not await self._redis.xrange(self.keys.stream, self.position, self.position)

    async def _behind(self) -> bool:
        """Whether Redis holds fewer changes than this replica applied (logged).

        Redis came back behind the replicas: restarted from an older RDB
        file, or from an append-only file that missed its last fsync. It
        would give its next revisions again, to other changes, which this
        replica would take for ones it applied: it loads what Redis holds
        instead (the workers Redis lost register again at their next
        heartbeat).
        """
        stored = int(await self._redis.get(self.keys.revision) or 0)
        if stored >= self.revision:
            return False
        self._log_behind(stored)
        return True

    def _log_behind(self, revision: int) -> None:
        logger.warning(
            "redis holds fewer changes than this replica applied (restarted from an older RDB "
            "file, or a lost fsync?): loading what it holds; workers it lost register again at "
            "their next heartbeat redis_revision=%d replica_revision=%d",
            revision,
            self.revision,
        )

    def _lost(self, error: BaseException) -> None:
        """Redis did not answer: refuse writes, stop sweeping, until it does again."""
        if self.available:
            logger.warning(
                "redis unreachable: routing goes on from the replica, writes answer 503 "
                "store_unavailable, heartbeats are kept error=%s",
                error,
            )
        self.available = False
        self._lease_until = -math.inf

    def _apply_entries(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> int:
        """Apply stream entries in order with the core's fold (raises :class:`_Reload`).

        Returns how many were applied: all, unless one of a newer format
        stopped the applying.
        """
        if not entries:
            return 0
        registry = self.registry
        applied = 0
        for entry_id, fields in entries:
            version = int(fields.get(b"v", b"0"))
            if version > JOURNAL_FORMAT_VERSION:
                if self.incompatible is None:
                    logger.error(
                        "a stream entry of format %d (this release writes %d): applying "
                        "stopped, routing goes on, writes answer 503 incompatible_peer; "
                        "upgrade this controller entry=%s",
                        version,
                        JOURNAL_FORMAT_VERSION,
                        entry_id.decode(),
                    )
                self.incompatible = version
                break
            revision = int(fields.get(b"revision", b"0"))
            if b"changes" in fields:
                lines = fields[b"changes"].splitlines(keepends=True)
                first = revision - len(lines) + 1
                if first > self.revision + 1:
                    raise _Reload  # changes were trimmed before we read them
                if first <= self.revision:
                    # After our position, revisions we applied: given again by
                    # a Redis that came back behind us.
                    self._log_behind(revision)
                    raise _Reload
                self._apply_changes(lines, first, entry_id)
                self.revision = revision
            elif b"beats" in fields:
                if revision > self.revision:
                    raise _Reload
                if revision < self.revision:
                    self._log_behind(revision)
                    raise _Reload
                for line in fields[b"beats"].splitlines(keepends=True):
                    beat = decode_heartbeat_line(line)
                    if beat is not None:
                        registry.apply(beat)
                if fields.get(b"loads"):
                    self._apply_loads(fields[b"loads"], entry_id)
            self.position = entry_id
            self._entries_since_snapshot += 1
            applied += 1
        moved, self._moved = self._moved, anyio.Event()
        moved.set()
        self.applied()
        self._snapshot_if_due()
        return applied

    def _report_lag(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Report each applied entry's lag: from its ID's time (Redis' clock) to now.

        Now is this host's clock plus the offset measured at the last
        connect. The entries of a read are applied in one go, so they all
        became routable at the same moment. Entries read at start-up are
        not reported: they are history, not replication.
        """
        if not entries:
            return
        now_ms = (self.wall() + self.offset) * 1000
        for entry_id, _ in entries:
            appended_ms = int(entry_id.split(b"-", 1)[0])
            # A clock measured to within a round trip: never below zero.
            self.replicated(max(now_ms - appended_ms, 0.0) / 1000)

    def _snapshot_if_due(self) -> None:
        """On the lease holder, snapshot once the stream grew by ``snapshot_every`` entries."""
        if (
            self._entries_since_snapshot >= self.snapshot_every
            and not self._snapshotting
            and self.may_sweep()
            and self._tasks is not None
        ):
            self._snapshotting = True
            self._tasks.start_soon(self._write_snapshot)

    def _apply_loads(self, data: bytes, entry_id: bytes) -> None:
        """Keep the load reports of a heartbeat batch; a malformed one is skipped and logged."""
        try:
            loads = json.loads(data)
            reports = [
                (str(worker), float(at), structure(report, LoadReport))
                for worker, (at, report) in loads.items()
            ]
        except (ValueError, TypeError, AttributeError, ValidationError) as error:
            logger.warning(
                "stream load reports skipped entry=%s reason=%s", entry_id.decode(), error
            )
            return
        for worker_id, at, report in reports:
            with contextlib.suppress(ValidationError):  # a time that is not finite
                self.registry.report_load(worker_id, report, now=at)

    def _apply_changes(self, lines: list[bytes], first: int, entry_id: bytes) -> None:
        """Apply one entry's changes, numbered from ``first``; skip what the fold refuses."""
        for number, line in enumerate(lines):
            revision = first + number
            if revision <= self.registry.revision:
                continue
            try:
                (event,) = JournalReader(capability_schema_problems).decode(line)
            except (JournalDecodeError, NewerJournalFormat, ValueError) as error:
                logger.warning(
                    "stream change skipped entry=%s revision=%d reason=%s",
                    entry_id.decode(),
                    revision,
                    error,
                )
                continue
            if not isinstance(event, Change):
                continue
            change = attrs.evolve(event, revision=revision)
            effect, _ = _record_effect(change)
            if isinstance(change, WorkerChange):
                if effect == "drop":
                    self._records.pop(change.worker_id, None)
                elif effect != "none":
                    self._records[change.worker_id] = revision
            try:
                self.registry.apply(change)
            except RegistryError as error:
                # Every replica refuses it alike (e.g. a deregistration that
                # raced with an eviction): the registries stay equal.
                logger.info(
                    "stream change not applied entry=%s revision=%d reason=%s",
                    entry_id.decode(),
                    revision,
                    error,
                )

    # ---------------------------------------------------------------- lease

    async def _keep_lease(self) -> None:
        """Take or renew the sweeper lease every quarter of the lease period."""
        while True:
            await self.renew_lease()
            await anyio.sleep(self.lease_period / 4)

    async def renew_lease(self) -> bool:
        """Take or renew the sweeper lease once; whether this controller holds it now.

        :meth:`run` does it every quarter of the lease period; the service
        also does it once at start, so that a first controller publishes
        its settings before it is ready.
        """
        if not self.available or self.epoch is None:
            return False
        ttl_ms = max(1, int(self.lease_period * 750))
        started = time.monotonic()
        try:
            held = await self._scripts["lease"](
                keys=[self.keys.lease, self.keys.epoch],
                args=[self.controller_id, ttl_ms, self.epoch],
            )
        except _NOT_CONNECTED as error:
            self._lost(error)
            held = 0
        had = self._lease_until > started
        if held == 1:
            self._lease_until = started + ttl_ms / 1000
            if not had:
                logger.info("sweeper lease taken controller_id=%s", self.controller_id)
                self.lease_taken()
            return True
        self._lease_until = -math.inf
        if had:
            logger.warning("sweeper lease lost controller_id=%s", self.controller_id)
        if held == -1:
            self._reload = True
        return False

    async def _write_snapshot(self) -> None:
        """Write the replica as the snapshot key, and trim the stream it covers."""
        # Taken in one step, between two entries: registry, records and position agree.
        copy = self.registry.snapshot_copy()
        records = dict(self._records)
        revision, position, epoch = self.revision, self.position, self.epoch
        covered, self._entries_since_snapshot = self._entries_since_snapshot, 0
        try:
            lines = await anyio.to_thread.run_sync(
                lambda: b"".join(encode_snapshot(copy.snapshot()))
            )
            written = await self._scripts["snapshot"](
                keys=[self.keys.epoch, self.keys.snapshot, self.keys.stream],
                args=[
                    epoch,
                    JOURNAL_FORMAT_VERSION,
                    revision,
                    position,
                    _after(position),
                    lines,
                    json.dumps(records, separators=(",", ":")),
                ],
            )
            if written == 1:
                logger.info(
                    "redis snapshot written revision=%d workers=%d bytes=%d",
                    revision,
                    len(copy),
                    len(lines),
                )
        except _NOT_CONNECTED as error:
            self._lost(error)
            if epoch == self.epoch:
                self._entries_since_snapshot += covered  # still due
            return
        finally:
            self._snapshotting = False
        self._snapshot_if_due()  # entries that came meanwhile may make another due


def _read_snapshot(
    stored: Mapping[bytes, bytes],
) -> tuple[Snapshot | None, dict[str, int], bytes]:
    """The snapshot hash's registry, records and last entry (``None`` when there is none).

    A damaged part costs its workers only (they register again at their
    next heartbeat), and a capability whose schemas are not valid JSON
    Schemas only the workers offering it; a newer format refuses to load.
    """
    if not stored:
        return None, {}, b"0-0"
    version = int(stored.get(b"v", b"0"))
    if version > JOURNAL_FORMAT_VERSION:
        raise NewerJournalFormat(version)
    revision = int(stored[b"revision"])
    reader = JournalReader(capability_schema_problems)
    workers: list[WorkerRecord] = []
    first: SnapshotPart | None = None
    for line in stored.get(b"lines", b"").splitlines(keepends=True):
        try:
            entries = reader.decode(line)
        except JournalDecodeError as error:
            logger.warning("redis snapshot part skipped reason=%s", error)
            continue
        for entry in entries:
            if isinstance(entry, SnapshotPart):
                for reason in entry.refused:
                    logger.warning(
                        "redis snapshot capability refused: its workers are left out "
                        "part=%d reason=%s",
                        entry.part,
                        reason,
                    )
                workers.extend(entry.records)
                if entry.part == 0:
                    first = entry  # the registry's settings travel on the first part
    records = _read_records(stored.get(b"records", b"{}"))
    snapshot = Snapshot(
        revision,
        tuple(workers),
        access_policy=None if first is None else first.access_policy,
        slos=() if first is None else first.slos,
        self_preservation=None if first is None else first.self_preservation,
    )
    return snapshot, records, stored.get(b"entry", b"0-0")


def _read_records(raw: bytes) -> dict[str, int]:
    """The snapshot's ``records`` (worker id -> the revision of its last change).

    What cannot be read is left out and logged: a worker without its record
    has its time-driven changes dropped by the scripts (decided again at the
    next sweep) until its next registration writes one.
    """
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
        data = None
    if type(data) is not dict:
        logger.warning("redis snapshot records skipped reason=not a JSON object")
        return {}
    records = {worker: revision for worker, revision in data.items() if type(revision) is int}
    if len(records) < len(data):
        logger.warning(
            "redis snapshot records skipped count=%d reason=not an integer revision",
            len(data) - len(records),
        )
    return records


def _nothing() -> None:
    pass


def _ignore(_: str) -> None:
    pass


def _ignore_lag(_: float) -> None:
    pass
