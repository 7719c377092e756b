"""Fixtures for the journal's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The journal uses anyio only: run its async tests under both backends."""
    return str(request.param)
