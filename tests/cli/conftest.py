"""Fixtures for the command, the certificates and the TLS identity capture."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    # The certificate capture hooks hypercorn's asyncio worker.
    return "asyncio"
