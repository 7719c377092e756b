"""Where the controller is and how to trust it: the URL rule and TLS settings."""

from __future__ import annotations

import math
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard
from urllib.parse import urlsplit

from ._exceptions import ConfigurationError
from .certificates import tls_files_problem

__all__ = ["DEFAULT_CONTROLLER_URL", "TLSConfig", "resolve_controller_url"]


def is_positive_seconds(value: object) -> TypeGuard[int | float]:
    """A finite number > 0 (not a bool): a duration, interval or timeout."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


#: Used when no URL is given and ``CONTROLLER_URL`` is not set.
DEFAULT_CONTROLLER_URL = "https://localhost:9000"


@dataclass(frozen=True)
class TLSConfig:
    """How to verify the controller and, for mTLS, who this client is.

    ``ca_certs`` is a PEM bundle of the CAs that may sign the controller's
    certificate (``None``: the system trust store). ``certfile`` and
    ``keyfile`` are this client's certificate and key, presented when the
    controller requires client certificates; ``keyfile`` may be omitted when
    ``certfile`` holds the key too. Files are read when :meth:`ssl_context`
    is called, so a missing file is reported there, by name.
    """

    ca_certs: str | Path | None = None
    certfile: str | Path | None = None
    keyfile: str | Path | None = None

    def __post_init__(self) -> None:
        if self.keyfile is not None and self.certfile is None:
            raise ConfigurationError("TLSConfig: keyfile given without certfile")

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that verifies the controller's certificate and hostname.

        Raises :class:`ConfigurationError` naming the file that is missing,
        not PEM, or the key of another certificate.
        """
        problem = tls_files_problem(self.certfile, self.keyfile, self.ca_certs)
        if problem is not None:
            raise ConfigurationError(f"TLSConfig: {problem}")
        try:
            if self.ca_certs is None:
                context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            else:
                context = ssl.create_default_context(
                    ssl.Purpose.SERVER_AUTH, cafile=os.fspath(self.ca_certs)
                )
            if self.certfile is not None:
                context.load_cert_chain(
                    os.fspath(self.certfile),
                    None if self.keyfile is None else os.fspath(self.keyfile),
                )
        except (OSError, ssl.SSLError) as error:
            raise ConfigurationError(f"TLSConfig: cannot load certificates: {error}") from error
        return context


def resolve_controller_url(url: str | None, *, insecure: bool, tls_given: bool) -> str:
    """The controller's base URL: ``url``, else ``CONTROLLER_URL``, else the default.

    Only ``https://`` is accepted unless ``insecure=True``; TLS settings with
    an ``http://`` URL are refused rather than silently ignored.
    """
    chosen = url if url is not None else os.environ.get("CONTROLLER_URL") or DEFAULT_CONTROLLER_URL
    try:
        parts = urlsplit(chosen)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as error:
        raise ConfigurationError(f"controller URL {chosen!r} is not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"controller URL {chosen!r} must be an absolute https:// URL "
            "(or http:// with insecure=True)"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(f"controller URL {chosen!r} must not have a query or fragment")
    if parts.scheme == "http":
        if not insecure:
            raise ConfigurationError(
                f"controller URL {chosen!r} is plain HTTP; use https:// or pass insecure=True"
            )
        if tls_given:
            raise ConfigurationError(
                f"TLS settings were given but the controller URL {chosen!r} is plain HTTP"
            )
    return chosen.rstrip("/")
