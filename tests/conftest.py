"""Fixtures for every test."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _collector_reaches_every_object() -> Iterator[None]:
    """Undo a journal recovery's ``gc.freeze``: one test's objects must not outlive it."""
    yield
    gc.unfreeze()
