"""Fixtures for the controller application's tests."""

from __future__ import annotations

import pytest

from tests.service.helpers import CertificateAuthority


@pytest.fixture(scope="session")
def authority() -> CertificateAuthority:
    """A development CA that issues client certificates with SPIFFE IDs."""
    return CertificateAuthority()
