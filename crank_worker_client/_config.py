"""Where the controllers are and how to trust them: the URL rules and TLS settings."""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias, TypeGuard
from urllib.parse import urlsplit

from ._exceptions import ConfigurationError
from .certificates import tls_files_problem

__all__ = [
    "DEFAULT_CONTROLLER_URL",
    "ControllerURLs",
    "TLSConfig",
    "resolve_controller_urls",
]


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


#: What ``WorkerAgent`` and ``ControllerClient`` take for the controllers' URLs:
#: one URL, several in one string separated by commas (as ``CONTROLLER_URL``),
#: a sequence of URLs, or ``None`` for ``CONTROLLER_URL``, then the default.
ControllerURLs: TypeAlias = str | Sequence[str] | None


def resolve_controller_urls(
    urls: ControllerURLs, *, insecure: bool, tls_given: bool
) -> tuple[str, ...]:
    """The controllers' base URLs: ``urls``, else ``CONTROLLER_URL``, else the default.

    A string lists one URL or several separated by commas (spaces around
    them are ignored); a sequence gives one URL per entry. Every entry must
    be an absolute ``https://`` URL (``http://`` only with ``insecure=True``),
    without query or fragment; TLS settings with an ``http://`` URL are
    refused rather than silently ignored. An empty entry or a URL listed
    twice is refused too. Errors name where the URLs came from
    (``CONTROLLER_URL`` or the argument) and the entry.
    """
    if urls is None:
        variable = os.environ.get("CONTROLLER_URL")
        source = "CONTROLLER_URL" if variable else "controller URL"
        entries = _split(variable or DEFAULT_CONTROLLER_URL, source)
    elif isinstance(urls, str):
        source = "controller URL"
        entries = _split(urls, source)
    else:
        source = "controller URL"
        entries = list(urls)
        if not entries:
            raise ConfigurationError("no controller URL given: the list is empty")
        for number, entry in enumerate(entries, 1):
            if not isinstance(entry, str):
                raise ConfigurationError(
                    f"controller URL {number} of the list is {type(entry).__name__}, not a str"
                )
            if "," in entry:
                raise ConfigurationError(
                    f"controller URL {entry!r}: one URL per list entry (a comma separates "
                    "URLs only in a string)"
                )
    resolved: list[str] = []
    for number, entry in enumerate(entries, 1):
        name = f"{source} {entry!r}"
        if len(entries) > 1:
            name = f"{source} entry {number} ({entry!r})"
        url = _checked(entry.strip(), name, insecure=insecure, tls_given=tls_given)
        if url in resolved:
            raise ConfigurationError(f"{source} lists {url} twice; give each controller once")
        resolved.append(url)
    return tuple(resolved)


def _split(text: str, source: str) -> list[str]:
    """The comma-separated entries of ``text``; an empty one is an error naming ``source``."""
    entries = [entry.strip() for entry in text.split(",")]
    for number, entry in enumerate(entries, 1):
        if not entry:
            raise ConfigurationError(
                f"{source} {text!r}: entry {number} is empty; separate URLs with single commas"
            )
    return entries


def _checked(url: str, name: str, *, insecure: bool, tls_given: bool) -> str:
    """One controller URL, checked, without its trailing slash; ``name`` says which in errors."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as error:
        raise ConfigurationError(f"{name} is not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"{name} must be an absolute https:// URL (or http:// with insecure=True)"
        )
    if any(char.isspace() or char == ";" for char in parts.netloc):
        # Likely several URLs run together: only commas separate them.
        raise ConfigurationError(
            f"{name} has a space or ';' in its host; separate several URLs with commas"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(f"{name} must not have a query or fragment")
    if parts.scheme == "http":
        if not insecure:
            raise ConfigurationError(f"{name} is plain HTTP; use https:// or pass insecure=True")
        if tls_given:
            raise ConfigurationError(f"TLS settings were given but the {name} is plain HTTP")
    return url.rstrip("/")
