"""The gateway's limits for a fleet of controllers on one Redis: calls in flight, idempotency keys.

With ``--redis``, every controller process that serves ``/execute`` shares
two things through Redis (the registry's own keys are
:mod:`crank_registry_asgi.redis_store`'s):

* **Calls in flight per worker.** Before a call, one script adds up the
  calls in flight to the chosen worker from every live process and takes a
  reservation when the total is below the routed capability's
  ``max_concurrency`` (as ``at_capacity`` does: the worker's total against
  the routed capability's limit); a refusal passes the worker over, as a
  locally full one is. The reservation is given back once the call has
  ended (also when it failed or was cancelled): by the next reservation
  this process takes (the script gives back before it counts), or within
  :data:`RELEASE_DELAY` by a task of its own, in batches.
* **Answers per Idempotency-Key.** The first call of a key claims it (an
  in-progress marker naming this process); a duplicate on any controller
  waits for the answer (here: on the call itself; elsewhere: asking again
  with a backoff from :data:`POLL_FIRST` to :data:`POLL_MAX` seconds),
  then replays it. The answer is kept as the core's
  :func:`~crank_registry.is_kept` says, for ``--idempotency-ttl`` from when
  it was kept; a claim whose process died (its liveness key expired) is
  taken over, so the duplicate then runs.

Keys (``P`` the registry's prefix; one hash tag, so the scripts would run
unchanged on one Redis Cluster slot)::

    {P}:controller:ID     process ID is alive: read here, written only by its
                          ControllerLiveness (crank_registry_asgi.fleet_limits)
    {P}:gateways          the ids of the processes that may have reservations or
                          claims (a set: where the dead ones' are found)
    {P}:reservations:ID   worker id -> the calls in flight from process ID
    {P}:claims:ID         the idempotency keys process ID claimed and has not finished
    {P}:idempotency:H     one key of one caller (H: a hash of both): running, or its
                          answer (status, media type, body, headers) while kept

Liveness is the controller's (:class:`~crank_registry_asgi.fleet_limits.ControllerLiveness`,
one per process, also counting the live ones for the shared rate limit): a
process's reservations count only while its liveness key exists, so the
reservation script skips the hashes of dead processes and their calls are
freed within one liveness period (3 s). After each renewal of the liveness
(:attr:`~crank_registry_asgi.fleet_limits.ControllerLiveness.on_renewed`),
:meth:`FleetCalls.run` deletes the hashes and claim sets of the processes
found dead. When the renewal reports that this process's own key had lapsed
(an outage or a stall longer than 3 s: the others may have deleted its
hash), or it is starting, or its own round trip to Redis had failed, it
rewrites its hash from the calls it really has in flight. (Until that
rewrite, one round trip after the renewal, the others count this process's
calls once too few; a reservation taken or given back while a rewrite is on
its way may be counted once too few until that worker has no call in
flight; the rewrites are rare: a start, an outage.) A process starting with
the id of a dead one (``HOST:PORT``) drops that one's unfinished claims.

Redis unreachable: each process allows a worker ``max_concurrency / n`` of
its own calls (at least 1), ``n`` the live processes its liveness counted
at the last renewal, and the calls with an ``Idempotency-Key`` are 503
``store_unavailable`` with ``Retry-After`` (the key's answer cannot be
looked up, and calling the worker again could repeat what it did); calls
without a key go on. :meth:`FleetCalls.run` tries a resync every
:data:`RETRY_EVERY` seconds until Redis answers again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import secrets
from typing import Any

import anyio
import attrs

from crank_registry import KeptAnswer, Replay, Reused, Running, is_kept

from .fleet_limits import ControllerLiveness, liveness_key
from .http import ApiError

try:  # the optional extra crank-registry-asgi[redis]
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError
except ImportError:  # pragma: no cover - --redis is refused without it (cli)
    aioredis = None  # type: ignore[assignment]

__all__ = [
    "POLL_FIRST",
    "POLL_MAX",
    "RELEASE_DELAY",
    "RETRY_EVERY",
    "Claimed",
    "FleetCalls",
    "FleetKeys",
]

logger = logging.getLogger("crank_registry_asgi.fleet")

#: Seconds between two attempts to reach Redis while it is unreachable.
RETRY_EVERY = 0.25
#: Seconds a reservation to give back waits for the next reservation to carry it.
RELEASE_DELAY = 0.002
#: The backoff of a call waiting for another controller (a slot, an answer), in seconds.
POLL_FIRST = 0.01
POLL_MAX = 0.2
# Seconds a command may take before Redis counts as unreachable: a call waits
# for its reservation, so this is short (Redis answers in microseconds).
_TIMEOUT = 2.0
# Connections to Redis per process (a script holds one for a round trip).
_CONNECTIONS = 32

_NOT_CONNECTED = (OSError,) if aioredis is None else (RedisError, OSError)


@attrs.frozen
class FleetKeys:
    """The gateway's keys in Redis, under the registry's hash tag ``{prefix}``."""

    prefix: str

    def key(self, name: str) -> str:
        """The key ``{prefix}:name``."""
        return f"{{{self.prefix}}}:{name}"

    def liveness(self, controller_id: str = "") -> str:
        """A process's liveness key (without an id: the prefix of them all)."""
        return liveness_key(self.prefix, controller_id)

    def reservations(self, controller_id: str = "") -> str:
        """A process's calls in flight per worker (without an id: the prefix)."""
        return self.key(f"reservations:{controller_id}")

    def claims(self, controller_id: str = "") -> str:
        """The idempotency keys a process claimed, unfinished (without an id: the prefix)."""
        return self.key(f"claims:{controller_id}")

    @property
    def gateways(self) -> str:
        """The ids of the processes that may have reservations or claims."""
        return self.key("gateways")

    def answer(self, key: tuple[str, str]) -> str:
        """The key of one caller's ``Idempotency-Key`` (hashed: any identity, any key)."""
        digest = hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()
        return self.key(f"idempotency:{digest}")


#: Sync with the fleet: rewrite this process's reservations unless mode is
#: 'renew' ('start', 'resync': its liveness had lapsed, or Redis was away);
#: on 'start', drop the unfinished claims of a dead process of the same id;
#: forget the dead processes (no liveness key) other than this one.
#: KEYS: gateways, reservations, claims. ARGV: id, mode (start | resync |
#: renew), liveness prefix, reservations prefix, claims prefix, then pairs
#: of worker id and calls. Returns 1 (rewritten) or 0.
SYNC = """
redis.call('SADD', KEYS[1], ARGV[1])
local rewrite = ARGV[2] ~= 'renew'
if rewrite then
  redis.call('DEL', KEYS[2])
  for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
end
if ARGV[2] == 'start' then
  for _, claim in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local held = redis.call('HMGET', claim, 'state', 'owner')
    if held[1] == 'running' and held[2] == ARGV[1] then redis.call('DEL', claim) end
  end
  redis.call('DEL', KEYS[3])
end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if id ~= ARGV[1] and redis.call('EXISTS', ARGV[3] .. id) == 0 then
    redis.call('SREM', KEYS[1], id)
    redis.call('DEL', ARGV[4] .. id, ARGV[5] .. id)
  end
end
return rewrite and 1 or 0
"""

# Give reservations back: the pairs of worker id and calls from ARGV[FIRST] on.
_GIVE_BACK = """
for i = FIRST, #ARGV, 2 do
  local left = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0') - tonumber(ARGV[i + 1])
  if left > 0 then
    redis.call('HSET', KEYS[1], ARGV[i], left)
  else
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
"""

#: Give reservations back, then take a reservation of a call to a worker if
#: the live processes' total is below the limit. KEYS: own reservations,
#: gateways. ARGV: id, worker id, limit, liveness prefix, reservations
#: prefix, then pairs of worker id and calls to give back. Returns 1 (taken)
#: or 0 (full).
RESERVE = (
    _GIVE_BACK.replace("FIRST", "6")
    + """
local total = tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0')
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if id ~= ARGV[1] and redis.call('EXISTS', ARGV[4] .. id) == 1 then
    total = total + tonumber(redis.call('HGET', ARGV[5] .. id, ARGV[2]) or '0')
  end
end
if total >= tonumber(ARGV[3]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
return 1
"""
)

#: Give reservations back. KEYS: own reservations. ARGV: pairs of worker id and calls.
RELEASE = _GIVE_BACK.replace("FIRST", "1") + "return 1\n"

#: What to do with a call of an idempotency key. KEYS: the key's, own claims.
#: ARGV: body fingerprint, id, claim token, ttl (ms), liveness prefix.
#: Returns {'reused'}, {'running'}, {'replay', status, media type, body,
#: headers} or {'run'} (claimed: the key is new, or its claimant died).
BEGIN = """
local held = redis.call('HMGET', KEYS[1], 'state', 'fingerprint', 'owner')
if held[1] then
  if held[2] ~= ARGV[1] then return {'reused'} end
  if held[1] == 'kept' then
    local answer = redis.call('HMGET', KEYS[1], 'status', 'media_type', 'body', 'headers')
    return {'replay', answer[1], answer[2], answer[3], answer[4]}
  end
  if redis.call('EXISTS', ARGV[5] .. held[3]) == 1 then return {'running'} end
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'state', 'running', 'fingerprint', ARGV[1], 'owner', ARGV[2],
  'token', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SADD', KEYS[2], KEYS[1])
return {'run'}
"""

#: End a claimed call: keep its answer, or forget the key. KEYS: the key's,
#: own claims. ARGV: claim token, ttl (ms), then status, media type, body,
#: headers to keep it (none: forget). Returns 1, or 0 when the claim was taken over.
FINISH = """
redis.call('SREM', KEYS[2], KEYS[1])
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if #ARGV == 2 then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('HDEL', KEYS[1], 'owner', 'token')
redis.call('HSET', KEYS[1], 'state', 'kept', 'status', ARGV[3], 'media_type', ARGV[4],
  'body', ARGV[5], 'headers', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

#: Leave the fleet at shutdown (the liveness key is the liveness' to remove).
#: KEYS: gateways, reservations, claims. ARGV: id.
LEAVE = """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
"""


@attrs.frozen
class Claimed:
    """The key is this call's to run (``token`` names the claim); finish it, whatever happens."""

    token: str


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class FleetCalls:
    """One process's part of the fleet-wide limits: reservations and claims.

    ``url``, ``prefix``: the shared registry's Redis and key prefix;
    ``liveness``: this process's (the controller service's), which renews
    its liveness key and counts the live processes; ``controller_id``: this
    process (``--controller-id``, the liveness' id); ``answer_ttl``:
    seconds an answer is kept (``--idempotency-ttl``); ``max_answer_bytes``:
    the largest answer kept; ``retry_after``: the ``Retry-After`` of a 503.
    Use: :meth:`open`, :meth:`run` in a task group while serving,
    :meth:`aclose` at shutdown (the liveness runs and closes on its own).
    """

    def __init__(
        self,
        *,
        url: str,
        prefix: str,
        liveness: ControllerLiveness,
        controller_id: str,
        answer_ttl: float,
        max_answer_bytes: int,
        retry_after: str = "1",
    ) -> None:
        if liveness.controller_id != controller_id:
            raise ValueError(
                f"liveness is controller {liveness.controller_id!r}'s, not {controller_id!r}'s: "
                "pass this process's ControllerLiveness"
            )
        self.url = url
        self.keys = FleetKeys(prefix)
        self.liveness = liveness
        self.controller_id = controller_id
        self.answer_ttl = answer_ttl
        self.max_answer_bytes = max_answer_bytes
        self.retry_after = retry_after
        #: Seconds before a call waiting for a worker routes again, doubling up to ``poll_max``.
        self.poll_first = POLL_FIRST
        self.poll_max = POLL_MAX
        #: Whether Redis answered the last command (while not: local shares).
        self.available = False
        #: Worker id -> this process's calls in flight that hold a reservation or a share.
        self.held: dict[str, int] = {}
        # Reservations to give back (worker id -> calls).
        self._releases: dict[str, int] = {}
        # Answers to write (the key's Redis key -> claim token, answer or None).
        self._finishes: dict[str, tuple[str, KeptAnswer | None]] = {}
        self._kick = anyio.Event()
        self._started = False
        # A sync is due (the liveness was renewed), and in it a rewrite (it had lapsed).
        self._sync_due = False
        self._rewrite_due = False
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}
        liveness.on_renewed.append(self._renewed)

    @property
    def live(self) -> int:
        """The live processes at the liveness' last renewal (the ``n`` of the local shares)."""
        return self.liveness.live

    # ------------------------------------------------------------ lifetime

    async def open(self) -> None:
        """Connect and join the fleet; an unreachable Redis leaves it to :meth:`run`."""
        # Calls beyond the pool's connections wait for one (instead of failing).
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=_CONNECTIONS,
            timeout=_TIMEOUT,
            socket_timeout=_TIMEOUT,
            socket_connect_timeout=_TIMEOUT,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        for name, source in (
            ("sync", SYNC),
            ("reserve", RESERVE),
            ("release", RELEASE),
            ("begin", BEGIN),
            ("finish", FINISH),
            ("leave", LEAVE),
        ):
            self._scripts[name] = self._redis.register_script(source)
        await self._sync("start")

    async def run(self) -> None:
        """Give reservations back, write answers, sync after each renewal; until cancelled."""
        while True:
            if not self.available:
                await anyio.sleep(RETRY_EVERY)
                await self._sync("resync" if self._started else "start")
                continue
            if not (self._releases or self._finishes or self._sync_due):
                await self._kick.wait()
                self._kick = anyio.Event()
            if not (self._finishes or self._sync_due):
                # The next reservation may carry them (one round trip less).
                await anyio.sleep(RELEASE_DELAY)
            await self._flush()
            if self.available and self._sync_due:
                await self._sync_after_renewal()

    async def _sync_after_renewal(self) -> None:
        """The sync a renewal of the liveness asked for: a resync when it had lapsed."""
        await self._sync("resync" if self._rewrite_due else "renew")

    def _renewed(self, lapsed: bool) -> None:
        """The liveness was renewed (:attr:`ControllerLiveness.on_renewed`): :meth:`run` syncs."""
        self._sync_due = True
        # Had it lapsed, the others may have deleted this process's hash.
        self._rewrite_due = self._rewrite_due or lapsed
        self._kick.set()

    async def aclose(self) -> None:
        """Leave the fleet (reservations and claims given up) and close the connection."""
        if self._redis is None:
            return
        keys, me = self.keys, self.controller_id
        with contextlib.suppress(*_NOT_CONNECTED), anyio.move_on_after(1, shield=True):
            if self.available:
                await self._scripts["leave"](
                    keys=[keys.gateways, keys.reservations(me), keys.claims(me)], args=[me]
                )
            await self._redis.aclose()
        self._redis = None
        self.available = False
        with contextlib.suppress(ValueError):
            self.liveness.on_renewed.remove(self._renewed)

    # -------------------------------------------------------- calls in flight

    async def reserve(self, worker_id: str, limit: int) -> bool:
        """Take a reservation of a call to ``worker_id``; ``False``: it has ``limit`` in flight.

        With Redis unreachable: one of this process's share,
        ``max(1, limit // live)``. Either way :meth:`release` gives it back.
        """
        if self.available:
            keys, me = self.keys, self.controller_id
            args: list[Any] = [me, worker_id, limit, keys.liveness(), keys.reservations()]
            given, self._releases = self._releases, {}
            for released, calls in given.items():
                args += [released, calls]
            try:
                # Shielded: a reservation Redis took is always counted here, so
                # that it is given back even when the call was cancelled meanwhile.
                with anyio.CancelScope(shield=True):
                    taken = await self._scripts["reserve"](
                        keys=[keys.reservations(me), keys.gateways], args=args
                    )
                    reserved: bool = taken == 1
                    if reserved:
                        self.held[worker_id] = self.held.get(worker_id, 0) + 1
                return reserved
            except _NOT_CONNECTED as error:
                self._lost(error)
        share = max(1, limit // self.live)
        held = self.held.get(worker_id, 0)
        if held >= share:
            return False
        self.held[worker_id] = held + 1
        return True

    def release(self, worker_id: str) -> None:
        """A call to ``worker_id`` has ended: give its reservation back.

        The next reservation this process takes gives it back first (in its
        script), else :meth:`run` does within :data:`RELEASE_DELAY`. With
        Redis unreachable only the local count changes (the resync writes it).
        """
        left = self.held[worker_id] - 1
        if left:
            self.held[worker_id] = left
        else:
            del self.held[worker_id]
        if self.available:
            self._releases[worker_id] = self._releases.get(worker_id, 0) + 1
            self._kick.set()

    # ------------------------------------------------------------ idempotency

    async def begin(
        self, key: tuple[str, str], fingerprint: str
    ) -> Claimed | Replay | Running | Reused:
        """What to do with a call of ``key`` whose body has ``fingerprint`` (see the module).

        :class:`Claimed`: this call runs, and must :meth:`finish`. Raises the
        503 ``store_unavailable`` :class:`ApiError` when Redis cannot be reached.
        """
        if not self.available:
            raise self.unavailable()
        token = secrets.token_hex(8)
        answer_key = self.keys.answer(key)
        try:
            # Shielded: a claim Redis took is always finished by this call's owner.
            with anyio.CancelScope(shield=True):
                reply = await self._scripts["begin"](
                    keys=[answer_key, self.keys.claims(self.controller_id)],
                    args=[
                        fingerprint,
                        self.controller_id,
                        token,
                        _milliseconds(self.answer_ttl),
                        self.keys.liveness(),
                    ],
                )
        except _NOT_CONNECTED as error:
            self._lost(error)
            raise self.unavailable() from None
        outcome = _text(reply[0])
        if outcome == "run":
            return Claimed(token)
        if outcome == "running":
            return Running()
        if outcome == "reused":
            return Reused()
        status, media_type, body, headers = reply[1:5]
        pairs = tuple((str(name), str(value)) for name, value in json.loads(headers))
        return Replay(KeptAnswer(int(status), _text(media_type), bytes(body), pairs))

    def finish(self, key: tuple[str, str], token: str, answer: KeptAnswer | None) -> None:
        """The claimed call of ``key`` ended with ``answer`` (``None``: without one).

        Written by :meth:`run` (kept when :func:`~crank_registry.is_kept`
        says so, else the key is forgotten), retried while Redis is away.
        """
        kept = answer if answer is not None and is_kept(answer, self.max_answer_bytes) else None
        self._finishes[self.keys.answer(key)] = (token, kept)
        self._kick.set()

    def unavailable(self) -> ApiError:
        """503 ``store_unavailable``: an idempotency key cannot be looked up."""
        return ApiError(
            503,
            "store_unavailable",
            "Redis cannot be reached, so the answer of this Idempotency-Key cannot be looked "
            "up; nothing was called, retry later",
            headers={"Retry-After": self.retry_after},
        )

    # ------------------------------------------------------------- writing

    async def _flush(self) -> None:
        """Give the reservations back, then write the answers; stop at an outage."""
        if self._releases:
            given, self._releases = self._releases, {}
            args: list[Any] = []
            for worker_id, calls in given.items():
                args += [worker_id, calls]
            try:
                await self._scripts["release"](
                    keys=[self.keys.reservations(self.controller_id)], args=args
                )
            except _NOT_CONNECTED as error:
                self._lost(error)  # the resync writes what is held
        claims = self.keys.claims(self.controller_id)
        for answer_key, entry in list(self._finishes.items()):
            if not self.available:
                return
            token, answer = entry
            args = [token, _milliseconds(self.answer_ttl)]
            if answer is not None:
                headers = json.dumps([list(pair) for pair in answer.headers])
                args += [answer.status, answer.media_type, answer.body, headers]
            try:
                await self._scripts["finish"](keys=[answer_key, claims], args=args)
            except _NOT_CONNECTED as error:
                self._lost(error)
                return
            if self._finishes.get(answer_key) is entry:
                del self._finishes[answer_key]

    async def _sync(self, mode: str) -> None:
        """Forget the dead processes, rewriting this one's reservations: see :data:`SYNC`."""
        if self._redis is None:
            return
        keys, me = self.keys, self.controller_id
        args: list[Any] = [me, mode, keys.liveness(), keys.reservations(), keys.claims()]
        for worker_id, calls in self.held.items():
            args += [worker_id, calls]
        # Reservations given back before this point are in what is held: if the
        # hash is rewritten from it, they must not be given back again.
        covered, self._releases = self._releases, {}
        # Renewals from here on ask for another sync (this one may predate them).
        self._sync_due = False
        self._rewrite_due = False
        try:
            rewritten = await self._scripts["sync"](
                keys=[keys.gateways, keys.reservations(me), keys.claims(me)], args=args
            )
        except _NOT_CONNECTED as error:
            self._lost(error)  # the next sync is a resync: it rewrites
            return
        if not self.available:
            logger.info(
                "fleet limits shared in redis controller_id=%s live_controllers=%d",
                me,
                self.live,
            )
        self.available = True
        self._started = True
        if not rewritten:
            for worker_id, calls in covered.items():
                self._releases[worker_id] = self._releases.get(worker_id, 0) + calls

    def _lost(self, error: BaseException) -> None:
        """Redis did not answer: local shares until a renewal reaches it again."""
        if self.available:
            logger.warning(
                "redis unreachable: each worker takes max_concurrency / %d calls from this "
                "controller, Idempotency-Key calls answer 503 store_unavailable error=%s",
                self.live,
                error,
            )
        self.available = False
        # What was to be given back is in what is held: the resync writes it.
        self._releases = {}
        self._kick.set()
