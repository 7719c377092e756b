"""The controller's certificate files, reloaded while it serves; their expiry as a metric.

``crank-registry serve`` loads its certificate, key and CA bundle into one
:class:`ssl.SSLContext` through
:class:`crank_worker_client.certificates.CertificateFiles` (shared with the
worker client), hands that context to hypercorn, and checks the files every
``watch_interval`` seconds: renewed files are loaded into the same context,
so new handshakes use the new pair and open connections finish with the old
one, without a restart. hypercorn 0.18 builds its context once, in
``worker_serve``, from ``Config.create_ssl_context()``; :func:`serving_config`
gives it a config whose method returns the live context instead.

One limit comes with reloading into a live context: a CA removed from the
bundle stays trusted until the controller restarts (OpenSSL can add CAs to a
context in use, not remove them). Added CAs, as in a CA rollover, are
trusted from the next handshake.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Iterator

import attrs
from hypercorn.config import Config
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from crank_worker_client.certificates import (
    DEFAULT_EXPIRY_WARNING,
    DEFAULT_WATCH_INTERVAL,
    CertificateFiles,
    tls_files_problem,
)

from .limits import LimitedConfig

__all__ = [
    "DEFAULT_ROTATION",
    "CertificateExpiryCollector",
    "CertificateFileError",
    "RotationSettings",
    "load_server_certificates",
    "serving_config",
]

logger = logging.getLogger("crank_registry_asgi.rotation")


class CertificateFileError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names it and the fix."""


@attrs.frozen
class RotationSettings:
    """How often the certificate files are looked at, and how early expiry is warned about."""

    watch_interval: float = DEFAULT_WATCH_INTERVAL
    expiry_warning: float = DEFAULT_EXPIRY_WARNING

    def __attrs_post_init__(self) -> None:
        if not self.watch_interval > 0:
            raise ValueError(f"watch_interval must be > 0 seconds, got {self.watch_interval!r}")
        if not self.expiry_warning >= 0:
            raise ValueError(f"expiry_warning must be >= 0 seconds, got {self.expiry_warning!r}")


#: Watch every 5 seconds, warn 7 days before expiry.
DEFAULT_ROTATION = RotationSettings()


def load_server_certificates(
    config: Config,
    settings: RotationSettings = DEFAULT_ROTATION,
    *,
    clock: Callable[[], float] = time.time,
) -> CertificateFiles:
    """The server context of ``config`` (hypercorn's settings), with its files watched.

    Raises :class:`CertificateFileError` naming the file that is missing, not
    PEM, or the key of another certificate. Logs a warning when the
    certificate expires within ``settings.expiry_warning`` seconds.
    """
    problem = tls_files_problem(config.certfile, config.keyfile, config.ca_certs)
    if problem is not None:
        raise CertificateFileError(problem)

    def build() -> ssl.SSLContext:
        context = config.create_ssl_context()
        if context is None:
            raise CertificateFileError("a TLS server needs a certificate and its key")
        return context

    return CertificateFiles.open(
        build,
        certfile=config.certfile,
        keyfile=config.keyfile,
        ca_certs=config.ca_certs,
        label="controller certificate",
        logger=logger,
        expiry_warning=settings.expiry_warning,
        clock=clock,
    )


class _LiveContextConfig(LimitedConfig):
    """A hypercorn config whose server context is one built (and reloaded) elsewhere.

    A :class:`~crank_registry_asgi.limits.LimitedConfig`, so that its
    connections still report their requests to the connection cap.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self._live_context = context

    def create_ssl_context(self) -> ssl.SSLContext:
        """The live context: hypercorn builds none of its own."""
        return self._live_context


def serving_config(config: Config, context: ssl.SSLContext) -> LimitedConfig:
    """A copy of ``config`` whose server TLS context is ``context``."""
    live = _LiveContextConfig(context)
    # hypercorn's Config keeps every setting as an instance attribute over a
    # class default, so copying the instance's attributes copies the settings.
    live.__dict__.update({k: v for k, v in vars(config).items() if k != "_live_context"})
    return live


class CertificateExpiryCollector(Collector):
    """``crank_certificate_expiry_timestamp_seconds{certificate="controller"|"ca"}``.

    When the controller's certificate in use expires, and the first CA of
    the trusted bundle to expire, in seconds since 1970, read from the
    :class:`CertificateFiles` the server reloads (so a renewal shows at the
    next scrape). Register it in a ``prometheus_client`` registry.
    """

    def __init__(self, certificates: CertificateFiles, *, name: str = "controller") -> None:
        self._certificates = certificates
        self._name = name

    def collect(self) -> Iterator[Metric]:
        """One sample for the certificate in use and one for the CA bundle."""
        family = GaugeMetricFamily(
            "crank_certificate_expiry_timestamp_seconds",
            "When a certificate in use expires (notAfter), in seconds since 1970.",
            labels=["certificate"],
        )
        for kind, expiry in self._certificates.expiry_times().items():
            family.add_metric([self._name if kind == "certificate" else kind], expiry)
        yield family
