"""The service's settings: frozen values handed to :func:`create_app` and the gateway.

The checks of a count and of a duration are defined here once; the
settings' validators and the command's flags (:mod:`crank_registry_asgi.cli`)
both apply them.
"""

from __future__ import annotations

import ipaddress
import math
import pathlib
import re
from collections.abc import Iterable
from typing import Any

import attrs
import httpx
from cryptography import x509

from crank_registry import (
    DEFAULT_FEED_WINDOW,
    DEFAULT_TRUST_DOMAIN,
    EjectionSettings,
    HealthPolicy,
    RateLimit,
    RoutingSettings,
    SelfPreservationSettings,
    identity_problem,
    is_trust_domain,
    operator_glob_problem,
)
from crank_worker_client.body import READ_TIMEOUT
from crank_worker_client.certificates import DEFAULT_WATCH_INTERVAL

from .identity import Network
from .journal import DEFAULT_COMPACT_MIN_BYTES
from .slos import DEFAULT_POLL_INTERVAL

__all__ = [
    "GatewayConfig",
    "ServiceConfig",
    "is_positive_int",
    "is_positive_number",
    "is_redis_prefix",
    "is_redis_url",
    "is_whole_number",
]


def is_whole_number(value: object, minimum: int) -> bool:
    """An int (not a bool) of at least ``minimum``: a count, a size in bytes."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_positive_int(value: object) -> bool:
    """A whole number >= 1 (not a bool)."""
    return is_whole_number(value, 1)


def is_positive_number(value: object) -> bool:
    """A finite number > 0 (not a bool): a duration in seconds."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:  # an int too large for a float
        return False


def _positive_int(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not is_positive_int(value):
        raise ValueError(f"{attribute.name} must be an integer >= 1, got {value!r}")


def _non_negative_int(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not is_whole_number(value, 0):
        raise ValueError(f"{attribute.name} must be an integer >= 0, got {value!r}")


def _positive_number(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not is_positive_number(value):
        raise ValueError(f"{attribute.name} must be a finite number > 0, got {value!r}")


# RFC 9110 token characters: what an HTTP header name may be made of.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def is_header_name(value: object) -> bool:
    """An HTTP header name (an RFC 9110 token)."""
    return isinstance(value, str) and _HEADER_NAME.fullmatch(value) is not None


def _header_name(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not is_header_name(value):
        raise ValueError(f"{attribute.name} must be an HTTP header name, got {value!r}")


def _trust_domain(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not is_trust_domain(value):
        raise ValueError(
            f"{attribute.name} must be a SPIFFE trust domain (lowercase letters, digits, "
            f"'.', '_' and '-'), got {value!r}"
        )


def is_redis_url(value: object) -> bool:
    """A URL redis-py opens: ``redis://``, ``rediss://`` or ``unix://``."""
    return isinstance(value, str) and value.split("://", 1)[0] in ("redis", "rediss", "unix")


def _redis_url(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not is_redis_url(value):
        raise ValueError(
            f"{attribute.name} must be a redis://, rediss:// or unix:// URL, got {value!r}"
        )


#: What a key prefix may hold: it sits inside the hash tag ``{...}``.
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def is_redis_prefix(value: object) -> bool:
    """1 to 64 letters, digits, ``_ . : -`` (no braces: it is the keys' hash tag)."""
    return isinstance(value, str) and _PREFIX.fullmatch(value) is not None


def _redis_prefix(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not is_redis_prefix(value):
        raise ValueError(
            f"{attribute.name} must be 1 to 64 letters, digits, '_', '.', ':' or '-', got {value!r}"
        )


def _certificates(value: Iterable[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    return tuple(value)


def _networks(value: Iterable[Network]) -> tuple[Network, ...]:
    return tuple(value)


@attrs.frozen
class ServiceConfig:
    """How the controller behaves.

    ``state_dir`` ``None`` keeps the registry in memory only (no journal,
    no SLO files); else the journal and the SLO files (``STATE_DIR/slos``,
    :mod:`crank_registry_asgi.slos`) are read from it. ``routing`` are the
    registry's routing settings (the idempotency keys' TTL and bound).
    A caller that presents an identity (the SPIFFE ID of its client
    certificate) may register, heartbeat and deregister only its own worker
    record; ``require_identity``, for mutual TLS, also refuses those calls
    from a caller without one (403 ``forbidden``). ``proxy_cert_header`` names a
    header carrying the client certificate (URL-encoded PEM, like nginx's
    ``$ssl_client_escaped_cert``); it is trusted only when named here, and
    its certificate is verified against ``proxy_cert_authorities`` (CA
    certificates, required with it) like a handshake: chain and validity
    period. ``trusted_proxies`` (networks) limits which peers may send it;
    empty, any peer may, so set the header only behind a proxy that strips
    it from client requests.
    ``trust_domain``: an identity is exactly ``spiffe://TRUST_DOMAIN/worker/NAME``
    or ``spiffe://TRUST_DOMAIN/client/NAME``; any other is refused (403
    ``forbidden``, with the reason) where an identity is checked.
    ``policy_file``: the access policy's TOML rules (``crank_registry.parse_policy``),
    read when the app is made and re-read every ``policy_watch_interval``
    seconds while it serves. ``trusted_gateways``: the SPIFFE IDs that may
    route for another identity (a body ``requester_identity``).
    ``operators``: globs over SPIFFE IDs (``fnmatch``): a caller whose
    identity matches one may drain and undrain any worker, besides the
    worker itself.
    """

    policy: HealthPolicy = attrs.field(factory=HealthPolicy)
    state_dir: pathlib.Path | None = None
    routing: RoutingSettings = attrs.field(factory=RoutingSettings)
    #: Seconds between two looks at the SLO files for a change.
    slo_poll_interval: float = attrs.field(
        default=DEFAULT_POLL_INTERVAL, validator=_positive_number
    )
    require_identity: bool = False
    proxy_cert_header: str | None = attrs.field(default=None, validator=_header_name)
    proxy_cert_authorities: tuple[x509.Certificate, ...] = attrs.field(
        default=(), converter=_certificates
    )
    trusted_proxies: tuple[Network, ...] = attrs.field(default=(), converter=_networks)
    trust_domain: str = attrs.field(default=DEFAULT_TRUST_DOMAIN, validator=_trust_domain)
    #: Larger request bodies are refused with 413 ``request_too_large``.
    max_body_bytes: int = attrs.field(default=1_048_576, validator=_positive_int)
    #: Names this controller in its start-up log line and on its spans (``crank.controller_id``).
    controller_id: str = "controller"
    #: Deepest nesting of arrays and objects accepted in a request body.
    max_json_depth: int = attrs.field(default=64, validator=_positive_int)
    #: Seconds a request body may take to arrive whole; later is 408 ``request_timeout``.
    request_read_timeout: float = attrs.field(default=READ_TIMEOUT, validator=_positive_number)
    #: Keep the cyclic garbage collector from running while the journal is
    #: replayed, or the shared registry loaded from Redis at start (it would
    #: walk the growing registry again and again: a quarter of the recovery
    #: time of 100 000 workers). The process's owner decides:
    #: ``crank-registry serve`` sets it; an application that embeds the
    #: service leaves its collector alone by default.
    pause_gc_during_recovery: bool = False
    #: Freeze (``gc.freeze()``) every object once the journal is replayed (or,
    #: with ``redis_url``, the shared registry loaded at start):
    #: the collector then never walks the recovered registry again (at
    #: 100 000 workers a full collection took 0.16-0.21 s, under 1 ms frozen).
    #: Freezes the whole process's objects, so its owner decides, as for
    #: the pause: ``crank-registry serve`` sets it.
    freeze_gc_after_recovery: bool = False
    #: How many recent changes the change feed keeps (``GET /watch``); a
    #: follower further behind reads ``GET /snapshot`` again.
    feed_window: int = attrs.field(default=DEFAULT_FEED_WINDOW, validator=_positive_int)
    #: The journal is not compacted while it is smaller than this (bytes).
    journal_compact_min_bytes: int = attrs.field(
        default=DEFAULT_COMPACT_MIN_BYTES, validator=_non_negative_int
    )
    policy_file: pathlib.Path | None = None
    policy_watch_interval: float = attrs.field(
        default=DEFAULT_WATCH_INTERVAL, validator=_positive_number
    )
    trusted_gateways: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    operators: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: ``POST /route`` and ``POST /execute`` per caller (its identity, else its
    #: address): over it 429 ``rate_limited``. ``None``: no limit. Worker writes
    #: (register, heartbeat, deregister) are never limited. With ``redis_url``,
    #: the limit holds for all controllers together
    #: (:mod:`crank_registry_asgi.fleet_limits`).
    rate_limit: RateLimit | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(RateLimit))
    )
    #: When the registry takes it that it is cut off from its workers (DESIGN,
    #: "Admission"): threshold, longest duration, fewest workers.
    self_preservation: SelfPreservationSettings = attrs.field(factory=SelfPreservationSettings)
    #: When the gateway's failed calls eject a worker (DESIGN, "Outlier ejection"):
    #: failures in a row, and the most of a capability's workers ejected at once.
    ejection: EjectionSettings = attrs.field(factory=EjectionSettings)
    #: The shared registry: a Redis URL (``redis://HOST:PORT/DB``). Set, the
    #: registry's changes go to Redis (:mod:`crank_registry_asgi.redis_store`)
    #: instead of the journal; ``state_dir`` then holds only the SLO files.
    redis_url: str | None = attrs.field(default=None, validator=_redis_url)
    #: The registry's keys in Redis are ``{redis_prefix}:...`` (one hash tag).
    redis_prefix: str = attrs.field(default="crank", validator=_redis_prefix)
    #: Seconds within which another controller takes the sweeper lease of a dead holder.
    redis_lease_period: float = attrs.field(default=10.0, validator=_positive_number)
    #: Stream entries past the last snapshot after which the lease holder writes another.
    redis_snapshot_every: int = attrs.field(default=10_000, validator=_positive_int)
    #: One of the processes of ``serve --processes N``: the directory where all
    #: of them write their metrics (prometheus_client's multiprocess mode, so
    #: the process must have started with ``PROMETHEUS_MULTIPROC_DIR`` naming
    #: it), and ``GET /metrics`` adds them up. ``None``: this process's alone.
    metrics_directory: pathlib.Path | None = None

    def __attrs_post_init__(self) -> None:
        if self.proxy_cert_header is not None and not self.proxy_cert_authorities:
            raise ValueError(
                "proxy_cert_header needs proxy_cert_authorities: the CA certificates its "
                "certificate is verified against (the command's --ca-certs)"
            )
        for certificate in self.proxy_cert_authorities:
            if not isinstance(certificate, x509.Certificate):
                raise ValueError(
                    f"proxy_cert_authorities must be x509 certificates, got {certificate!r}"
                )
        if self.proxy_cert_header is None and self.proxy_cert_authorities:
            raise ValueError("proxy_cert_authorities are used only with proxy_cert_header")
        if self.trusted_proxies and self.proxy_cert_header is None:
            raise ValueError("trusted_proxies limit who may send proxy_cert_header; name it")
        for gateway in self.trusted_gateways:
            if not isinstance(gateway, str):
                raise ValueError(f"trusted_gateways must be SPIFFE IDs, got {gateway!r}")
            # A gateway that is not an identity of the trust domain could never be matched.
            problem = identity_problem(gateway, self.trust_domain)
            if problem is not None:
                raise ValueError(f"trusted_gateways: {gateway!r} {problem}")
        for glob in self.operators:
            problem = operator_glob_problem(glob)
            if problem is not None:
                raise ValueError(f"operators: {glob!r} {problem}")
        for network in self.trusted_proxies:
            if not isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                raise ValueError(f"trusted_proxies must be IP networks, got {network!r}")


@attrs.frozen
class GatewayConfig:
    """How the gateway (``POST /execute``) forwards.

    ``max_attempts``: how many workers to try when connections are refused
    (1: no failover). ``timeout``: seconds a worker may stay silent while
    answering (between any two reads; also the write timeout).
    ``connect_timeout``: seconds to establish the connection, TLS included
    (capped at ``timeout``). ``max_response_bytes``: a larger JSON answer is
    a ``worker_failed`` (a stream is passed through without a limit).
    ``queue_limit``: the most calls waiting per ``(verb, capability)`` when
    every worker has ``max_concurrency`` calls in flight (0: none wait);
    more are 503 ``overloaded``. ``idempotency_answers`` and
    ``idempotency_bytes``: the bounds of the answers kept per
    ``Idempotency-Key`` (how long: the service's ``routing.idempotency_ttl``).
    """

    max_attempts: int = attrs.field(default=3, validator=_positive_int)
    timeout: float = attrs.field(default=30.0, validator=_positive_number)
    connect_timeout: float = attrs.field(default=5.0, validator=_positive_number)
    max_response_bytes: int = attrs.field(default=16 * 1_048_576, validator=_positive_int)
    queue_limit: int = attrs.field(default=100, validator=_non_negative_int)
    idempotency_answers: int = attrs.field(default=10_000, validator=_positive_int)
    idempotency_bytes: int = attrs.field(default=64 * 1_048_576, validator=_positive_int)

    def httpx_timeout(self) -> httpx.Timeout:
        """The per-request httpx timeouts."""
        return httpx.Timeout(self.timeout, connect=min(self.connect_timeout, self.timeout))
