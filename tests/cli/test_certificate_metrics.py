"""The certificate expiry collector, and the hypercorn config that serves the live context."""

from __future__ import annotations

import datetime
import logging
import ssl
from pathlib import Path

from cryptography import x509
from prometheus_client import CollectorRegistry, generate_latest

from crank_registry_asgi import certs
from crank_registry_asgi.rotation import (
    CertificateExpiryCollector,
    RotationSettings,
    load_server_certificates,
    serving_config,
)
from crank_registry_asgi.server import ServerSettings, hypercorn_config


def not_after(path: Path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def test_the_collector_reports_the_certificate_in_use_and_the_ca(tmp_path: Path) -> None:
    certs.write_development_certificates(tmp_path, workers=[], validity=datetime.timedelta(days=30))
    settings = ServerSettings(
        certfile=tmp_path / "controller.pem",
        keyfile=tmp_path / "controller.key",
        ca_certs=tmp_path / "ca.pem",
    )
    files = load_server_certificates(hypercorn_config(settings), RotationSettings(watch_interval=1))
    registry = CollectorRegistry()
    registry.register(CertificateExpiryCollector(files))

    def samples() -> dict[str, float]:
        return {
            labels: value
            for labels, value in (
                (dict(sample.labels)["certificate"], sample.value)
                for metric in registry.collect()
                for sample in metric.samples
            )
        }

    assert samples() == {
        "controller": not_after(tmp_path / "controller.pem"),
        "ca": not_after(tmp_path / "ca.pem"),
    }
    text = generate_latest(registry).decode()
    assert "# TYPE crank_certificate_expiry_timestamp_seconds gauge" in text
    assert 'crank_certificate_expiry_timestamp_seconds{certificate="controller"}' in text

    # A renewal shows at the next scrape, once the server has loaded it.
    certs.write_development_certificates(tmp_path, workers=[], validity=datetime.timedelta(days=90))
    files.check()
    files.check()
    assert samples()["controller"] == not_after(tmp_path / "controller.pem")
    assert samples()["controller"] > samples()["ca"]


def test_the_serving_config_keeps_every_setting_and_serves_the_live_context(
    tmp_path: Path,
) -> None:
    certs.write_development_certificates(tmp_path, workers=[])
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        certfile=tmp_path / "controller.pem",
        keyfile=tmp_path / "controller.key",
        ca_certs=tmp_path / "ca.pem",
    )
    config = hypercorn_config(settings)
    files = load_server_certificates(config)
    live = serving_config(config, files.context)
    assert live.create_ssl_context() is files.context
    assert live.bind == config.bind
    assert (live.certfile, live.keyfile, live.ca_certs) == (
        config.certfile,
        config.keyfile,
        config.ca_certs,
    )
    assert live.verify_mode is ssl.CERT_REQUIRED
    assert live.accesslog is None and live.errorlog is logging.getLogger("hypercorn.error")
    assert live.ssl_enabled
