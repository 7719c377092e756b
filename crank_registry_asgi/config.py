"""The service's settings, one frozen value handed to :func:`create_app`."""

from __future__ import annotations

import pathlib
import re
from typing import Any

import attrs

from crank_registry import HealthPolicy

from .journal import DEFAULT_COMPACT_MIN_BYTES

__all__ = ["ServiceConfig"]


def _positive_int(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, got {value!r}")


def _non_negative_int(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{attribute.name} must be an integer >= 0, got {value!r}")


# RFC 9110 token characters: what an HTTP header name may be made of.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def is_header_name(value: object) -> bool:
    """An HTTP header name (an RFC 9110 token)."""
    return isinstance(value, str) and _HEADER_NAME.fullmatch(value) is not None


def _header_name(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not is_header_name(value):
        raise ValueError(f"{attribute.name} must be an HTTP header name, got {value!r}")


@attrs.frozen
class ServiceConfig:
    """How the controller behaves.

    ``state_dir`` ``None`` keeps the registry in memory only (no journal).
    A caller that presents an identity (the SPIFFE ID of its client
    certificate) may register, heartbeat and deregister only its own worker
    record; ``require_identity``, for mutual TLS, also refuses those calls
    from a caller without one (403 ``forbidden``). ``proxy_cert_header`` names a
    header carrying the client certificate (URL-encoded PEM, like nginx's
    ``$ssl_client_escaped_cert``); it is trusted only when named here, so set
    it only behind a proxy that strips the header from client requests.
    """

    policy: HealthPolicy = attrs.field(factory=HealthPolicy)
    state_dir: pathlib.Path | None = None
    require_identity: bool = False
    proxy_cert_header: str | None = attrs.field(default=None, validator=_header_name)
    #: Larger request bodies are refused with 413 ``request_too_large``.
    max_body_bytes: int = attrs.field(default=1_048_576, validator=_positive_int)
    #: Names this controller in its start-up log line and on its spans (``crank.controller_id``).
    controller_id: str = "controller"
    #: Deepest nesting of arrays and objects accepted in a request body.
    max_json_depth: int = attrs.field(default=64, validator=_positive_int)
    #: The journal is not compacted while it is smaller than this (bytes).
    journal_compact_min_bytes: int = attrs.field(
        default=DEFAULT_COMPACT_MIN_BYTES, validator=_non_negative_int
    )
