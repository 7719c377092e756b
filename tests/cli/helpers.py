"""Helpers for tests that talk to real servers over real sockets."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def client_context(
    ca_file: Path, certificate: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A client TLS context trusting ``ca_file``, presenting a certificate if given."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if certificate is not None:
        context.load_cert_chain(str(certificate), str(key) if key is not None else None)
    return context


def wait_for_health(
    url: str, *, verify: ssl.SSLContext | bool = True, deadline_s: float = 30.0
) -> httpx.Response:
    """Poll ``url`` + ``/health`` until it answers 200; fail after ``deadline_s``."""
    deadline = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/health", verify=verify, timeout=2.0)
        except httpx.HTTPError as error:
            last_error = error
        else:
            if response.status_code == 200:
                return response
        time.sleep(0.05)
    raise AssertionError(f"{url} did not become ready in {deadline_s} s: {last_error!r}")
