"""Limits that hold for a fleet of controllers on one Redis: liveness and shared rate limits.

With ``--redis``, each controller process announces that it lives
(:class:`ControllerLiveness`), and with ``--rate-limit`` too, the callers'
token buckets live in Redis, one per caller for the whole fleet
(:class:`SharedTokenBuckets`), so that N controllers admit the limit once,
not N times.

Keys (``P`` the registry's prefix; the same hash tag as the registry's,
:mod:`crank_registry_asgi.redis_store`)::

    {P}:controller:ID   exists while the controller process ID lives: SET PX
                        (LIVENESS_TTL), renewed every RENEW_PERIOD; its value
                        names the process instance (random at its start)
    {P}:controllers     sorted set: controller id -> when its liveness ends,
                        on Redis' clock (ms); expired members are pruned on
                        every renewal, which counts the rest

:class:`ControllerLiveness` is the only writer of both; the gateway's
fleet-wide calls in flight (:mod:`crank_registry_asgi.fleet_calls`) read the
liveness keys and are told of each renewal, and of a lapse (the key had
expired, so the others took the process for dead), through
:attr:`ControllerLiveness.on_renewed`. The rate limit's keys::

    {P}:rate:KEY        the shared bucket of caller KEY: the time it is full
                        again (µs, Redis' clock); it expires then, since a
                        full bucket and no key are the same

The bucket. :data:`TAKE_TOKENS` refills and takes in one script, on Redis'
clock (``TIME``; Redis 7 replicates a script's effects, so a script may read
it): the same GCRA as the core's :class:`~crank_registry.TokenBuckets`, one
number per caller. It takes up to ``want`` tokens (as many as there are), or
none and answers the wait until the next one.

Leases. A controller asks for a batch of tokens at once (at most a tenth of
the burst, :func:`default_lease`) and admits the rest of the batch locally,
for at most :data:`LEASE_LIFETIME`, without a round trip. With batches of
more than one token, one round trip per caller is in flight at a time in a
process, and the requests of that caller that come meanwhile wait for its
answer (with single tokens, each request makes its own: waiting would only
serialize them). So a process holds at most one unused batch per caller,
and over any interval ``t`` the fleet admits at most ``RATE x t + BURST``
plus one batch per process.

Refusals. The script's wait is exact: the bucket cannot have a token before
it (the other controllers only take). The controller answers 429 locally
until then, with that ``Retry-After``, without asking Redis again.

Memory. The leases and refusal windows kept per caller are bounded by the
limit's ``max_keys``, pruned as the core's buckets are (each new caller
looks at the two oldest, forgets an expired one and requeues the other);
a caller that finds no room is answered by Redis every time, which is
slower, never wrong.

Redis unreachable. A failed round trip, or a failed liveness renewal, puts
the limiter in fallback: this process applies local buckets of ``RATE / n``
and ``BURST / n`` (at least 1), ``n`` the live controller processes counted
at the last renewal, until a renewal succeeds again.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

import anyio

from crank_registry import MIN_RATE, RateLimit, RateLimitState, TokenBuckets

try:  # the optional extra crank-registry-asgi[redis]
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import RedisError
except ImportError:  # pragma: no cover - the store refuses to start first
    aioredis = None  # type: ignore[assignment]

__all__ = [
    "LEASE_LIFETIME",
    "LIVENESS_TTL",
    "RENEW_PERIOD",
    "ROUND_TRIP_TIMEOUT",
    "TAKE_TOKENS",
    "ControllerLiveness",
    "SharedTokenBuckets",
    "controllers_key",
    "default_lease",
    "fleet_client",
    "liveness_key",
    "rate_key",
]

logger = logging.getLogger("crank_registry_asgi.fleet")

#: Seconds a controller's liveness key lives without a renewal.
LIVENESS_TTL = 3.0
#: Seconds between two renewals of the liveness key (also: how soon a
#: controller in fallback sees Redis again).
RENEW_PERIOD = 1.0
#: Seconds a leased token may wait for a request before it is dropped.
LEASE_LIFETIME = 1.0
#: Seconds a round trip to Redis may take before it counts as unreachable
#: (a request waits that long at most, once, before the fallback).
ROUND_TRIP_TIMEOUT = 1.0
# Wall-clock times are about 1.7e9 s, where a float's step is 2.4e-7 s: a
# wait shorter than this is rounding, not a missing token (as in the core).
_ROUNDING = 1e-6
# Entries looked at for each new caller kept (module docstring, "Memory").
_LOOKED_AT_PER_NEW_KEY = 2

_NOT_CONNECTED = (OSError,) if aioredis is None else (RedisError, OSError)


def liveness_key(prefix: str, controller_id: str) -> str:
    """``{prefix}:controller:ID``: exists while controller process ``controller_id`` lives."""
    return f"{{{prefix}}}:controller:{controller_id}"


def controllers_key(prefix: str) -> str:
    """``{prefix}:controllers``: the live controllers, scored by when their liveness ends."""
    return f"{{{prefix}}}:controllers"


def rate_key(prefix: str, caller: str) -> str:
    """``{prefix}:rate:CALLER``: a caller's shared token bucket."""
    return f"{{{prefix}}}:rate:{caller}"


def default_lease(limit: RateLimit) -> int:
    """Tokens asked of Redis at once: a tenth of the burst (1, no leasing, below 20)."""
    return max(1, limit.burst // 10)


#: Renew a controller's liveness and count the live ones. KEYS: its liveness
#: key, the controllers set; ARGV: controller id, instance, time to live (ms).
#: Returns {the number of live controllers, this one included; 1 when the key
#: had lapsed (absent, or another instance's), else 0}.
RENEW_LIVENESS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
local lapsed = redis.call('GET', KEYS[1]) ~= ARGV[2]
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
-- The set goes when its last member's liveness ends.
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[2], math.max(1, tonumber(last[2]) - now))
return {redis.call('ZCARD', KEYS[2]), lapsed and 1 or 0}
"""

#: Leave: remove a controller's liveness, unless a newer instance of the same
#: id holds it. KEYS: its liveness key, the controllers set; ARGV: id, instance.
LEAVE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

#: Refill and take, on Redis' clock. KEYS: the caller's bucket; ARGV: the
#: interval between two tokens (µs), the burst, the most tokens wanted.
#: Returns {taken, 0}, or {0, the wait until the next token (µs, rounded up)}.
TAKE_TOKENS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local full_at = tonumber(redis.call('GET', KEYS[1]) or '0')
if full_at < now then full_at = now end
local available = math.floor(burst - (full_at - now) / interval + 1e-6)
if available < 1 then
  return {0, math.ceil(full_at - now - (burst - 1) * interval)}
end
local taken = math.min(tonumber(ARGV[3]), available)
full_at = full_at + taken * interval
redis.call('SET', KEYS[1], string.format('%.17g', full_at), 'PX',
  string.format('%.0f', math.ceil((full_at - now) / 1000)))
return {taken, 0}
"""


def fleet_client(url: str) -> Any:
    """A Redis client for the fleet's keys: short timeouts, one retry.

    Its own, not the store's: a round trip on the request path must fail
    within :data:`ROUND_TRIP_TIMEOUT` (the store's connections wait longer,
    for ``XREAD BLOCK``), and then the fallback applies.
    """
    return aioredis.Redis.from_url(
        url,
        socket_timeout=ROUND_TRIP_TIMEOUT,
        socket_connect_timeout=ROUND_TRIP_TIMEOUT,
        # One retry: a pooled connection that Redis closed (a restart) is replaced at once.
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
    )


class ControllerLiveness:
    """A controller process' liveness key, renewed, and the count of live controllers.

    ``redis``: a client (:func:`fleet_client`). Use: :meth:`renew` once
    (start-up), :meth:`run` in a task group while serving, :meth:`aclose`
    at shutdown (it closes ``redis`` too). :attr:`live` is the count of the
    last successful renewal; :attr:`reachable` whether the last round trip
    to Redis succeeded; :attr:`renewals` counts successful renewals (a
    fallback ends at the next one). It is the only writer of the liveness
    key and of the controllers set: the gateway's
    :class:`~crank_registry_asgi.fleet_calls.FleetCalls` learns of each
    renewal through :attr:`on_renewed`.
    """

    def __init__(
        self,
        redis: Any,
        *,
        prefix: str,
        controller_id: str,
        ttl: float = LIVENESS_TTL,
        period: float = RENEW_PERIOD,
    ) -> None:
        self.redis = redis
        self.controller_id = controller_id
        #: ``{prefix}:controller:ID`` (:func:`liveness_key`).
        self.key = liveness_key(prefix, controller_id)
        self.controllers_key = controllers_key(prefix)
        #: This process' instance: the key's value, so that a restart under
        #: the same id is told apart (and not removed by the old one's leave).
        self.instance = secrets.token_hex(8)
        self.ttl_ms = max(1, round(ttl * 1000))
        self.period = period
        #: Live controller processes at the last renewal (this one included).
        self.live = 1
        #: Whether Redis answered the last round trip (renewal or rate limit).
        self.reachable = False
        #: Successful renewals so far.
        self.renewals = 0
        #: Successful renewals that found the key lapsed (absent, or another
        #: instance's): meanwhile other processes took this one for dead.
        self.lapses = 0
        #: Called after each successful renewal with whether the key had
        #: lapsed (the first renewal of a process always finds it so). Called
        #: synchronously on the renewal's task: a callback must not block;
        #: one that has Redis work to do hands it to its own task.
        self.on_renewed: list[Callable[[bool], None]] = []
        self._renew = redis.register_script(RENEW_LIVENESS)
        self._leave = redis.register_script(LEAVE)

    async def renew(self) -> bool:
        """Renew the key and count the live controllers; whether Redis answered."""
        try:
            live, lapsed = await self._renew(
                keys=[self.key, self.controllers_key],
                args=[self.controller_id, self.instance, self.ttl_ms],
            )
        except _NOT_CONNECTED as error:
            self.lost(error)
            return False
        self.live = max(1, int(live))
        self.renewals += 1
        if lapsed:
            self.lapses += 1
        if not self.reachable:
            self.reachable = True
            logger.info(
                "controller liveness renewed controller_id=%s live_controllers=%d",
                self.controller_id,
                self.live,
            )
        for renewed in self.on_renewed:
            renewed(bool(lapsed))
        return True

    def lost(self, error: BaseException) -> None:
        """A round trip to Redis failed (here or in the rate limiter)."""
        if self.reachable:
            logger.warning(
                "redis unreachable for the fleet's limits: each process applies its share "
                "controller_id=%s live_controllers=%d error=%s",
                self.controller_id,
                self.live,
                error or type(error).__name__,
            )
        self.reachable = False

    async def run(self) -> None:
        """Renew every :attr:`period` until cancelled."""
        while True:
            await anyio.sleep(self.period)
            await self.renew()

    async def aclose(self) -> None:
        """Remove this process' liveness and close the client (a dead process' key expires)."""
        with anyio.move_on_after(ROUND_TRIP_TIMEOUT, shield=True):
            with contextlib.suppress(*_NOT_CONNECTED):  # it expires within the TTL
                await self._leave(
                    keys=[self.key, self.controllers_key], args=[self.controller_id, self.instance]
                )
            await self.redis.aclose()
        self.reachable = False


class SharedTokenBuckets:
    """``--rate-limit`` for the whole fleet: a token bucket per caller in Redis (module docstring).

    ``limit``: the fleet's limit; ``liveness``: this process' (its client
    is the one used, its count sizes the fallback); ``clock``: the
    service's. ``lease``: tokens asked at once, from 1 to a tenth of the
    burst (:func:`default_lease` when ``None``). :attr:`round_trips`
    counts the script's calls.
    """

    def __init__(
        self,
        limit: RateLimit,
        liveness: ControllerLiveness,
        clock: Callable[[], float],
        *,
        prefix: str,
        lease: int | None = None,
    ) -> None:
        most = default_lease(limit)
        if lease is None:
            lease = most
        if not 1 <= lease <= most:
            raise ValueError(
                f"lease must be from 1 to a tenth of the burst ({most} for {limit}), got {lease!r}"
            )
        self.limit = limit
        self.liveness = liveness
        self.clock = clock
        self.prefix = prefix
        self.lease = lease
        #: Calls of the script so far.
        self.round_trips = 0
        self._interval_us = 1e6 / limit.rate
        self._take = liveness.redis.register_script(TAKE_TOKENS)
        # caller -> (until, tokens): tokens > 0, leased tokens usable until
        # then; 0, refused until then (the script's wait).
        self._local: dict[str, tuple[float, int]] = {}
        # caller -> set when its round trip in flight is answered.
        self._asking: dict[str, anyio.Event] = {}
        # The local buckets of the fallback (None: shared), and the renewals
        # counted when it began (the next one ends it).
        self._fallback: TokenBuckets | None = None
        self._fallback_renewals = 0

    def state(self) -> RateLimitState:
        """The limit in effect, for ``GET /ready``."""
        self._follow_redis()
        if self._fallback is None:
            return RateLimitState(
                mode="shared",
                rate=self.limit.rate,
                burst=self.limit.burst,
                controllers=self.liveness.live,
            )
        share = self._fallback.limit
        return RateLimitState(
            mode="local_fallback",
            rate=share.rate,
            burst=share.burst,
            controllers=self.liveness.live,
        )

    def describe(self) -> str:
        """The limit in effect, in words (the 429's message)."""
        limit = self.limit
        text = f"{limit.rate:g} requests per second in bursts of {limit.burst}"
        if self._fallback is None:
            return f"{text}, shared by all controllers"
        share = self._fallback.limit
        return (
            f"{share.rate:g} requests per second in bursts of {share.burst} on this controller "
            f"(its share of {text} among {self.liveness.live} while Redis is unreachable)"
        )

    async def admit(self, caller: str) -> float:
        """Take a token of ``caller``'s bucket: ``0.0``, or the seconds until it has one."""
        self._follow_redis()
        while self._fallback is None:
            decided = self._admit_locally(caller, self.clock())
            if decided is not None:
                return decided
            asking = self._asking.get(caller)
            if asking is None:
                return await self._ask(caller)
            await asking.wait()  # then look again: a lease or a refusal, or ask
        return self._fallback.admit(caller, now=self.clock())

    def _admit_locally(self, caller: str, now: float) -> float | None:
        """A leased token (0.0), a refusal's remaining wait, or ``None``: ask Redis."""
        kept = self._local.get(caller)
        if kept is None:
            return None
        until, tokens = kept
        if until - now <= _ROUNDING:
            del self._local[caller]
            return None
        if tokens == 0:
            return until - now
        if tokens == 1:
            del self._local[caller]
        else:
            self._local[caller] = (until, tokens - 1)
        return 0.0

    async def _ask(self, caller: str) -> float:
        """One round trip: take up to a lease of tokens, or learn the wait."""
        answered = None
        if self.lease > 1:  # the caller's next requests wait for this batch
            answered = self._asking[caller] = anyio.Event()
        try:
            self.round_trips += 1
            taken, wait_us = await self._take(
                keys=[rate_key(self.prefix, caller)],
                args=[repr(self._interval_us), self.limit.burst, self.lease],
            )
        except _NOT_CONNECTED as error:
            self.liveness.lost(error)
            self._follow_redis()
            assert self._fallback is not None
            return self._fallback.admit(caller, now=self.clock())
        finally:
            if answered is not None:
                del self._asking[caller]
                answered.set()
        now = self.clock()
        if taken == 0:
            wait = int(wait_us) / 1e6
            self._keep(caller, now + wait, 0)
            return wait
        if taken > 1:
            self._keep(caller, now + LEASE_LIFETIME, int(taken) - 1)
        return 0.0

    def _keep(self, caller: str, until: float, tokens: int) -> None:
        """Keep a lease or a refusal window, within ``max_keys`` callers (module docstring)."""
        local = self._local
        if caller not in local:
            now = self.clock()
            for _ in range(min(_LOOKED_AT_PER_NEW_KEY, len(local))):
                oldest = next(iter(local))
                kept = local.pop(oldest)
                if kept[0] > now:
                    local[oldest] = kept  # to the back
            if len(local) >= self.limit.max_keys:
                return  # no room: Redis answers this caller every time
        local[caller] = (until, tokens)

    def _follow_redis(self) -> None:
        """Enter the fallback when Redis was lost; leave it after a renewal since."""
        liveness = self.liveness
        if self._fallback is None:
            if not liveness.reachable:
                self._fallback = TokenBuckets(self.share(liveness.live))
                self._fallback_renewals = liveness.renewals
                logger.warning(
                    "rate limit: local fallback while Redis is unreachable %s",
                    self.describe(),
                )
        elif liveness.reachable and liveness.renewals > self._fallback_renewals:
            self._fallback = None
            logger.info("rate limit: shared again in Redis live_controllers=%d", liveness.live)

    def share(self, controllers: int) -> RateLimit:
        """One process' share of the limit among ``controllers``: ``RATE / n``, ``BURST / n``."""
        n = max(1, controllers)
        limit = self.limit
        return RateLimit(
            max(limit.rate / n, MIN_RATE), max(1, limit.burst // n), max_keys=limit.max_keys
        )
