"""Who is calling: the SPIFFE ID in the caller's client certificate.

The certificate comes from the ASGI TLS extension,
``scope["extensions"]["tls"]["client_cert_chain"]`` (PEM strings, the
client's own first), which the server integration fills in for verified
connections; or, only when the service is told to trust one, from a header
set by a TLS-terminating proxy holding the URL-encoded PEM (like nginx's
``$ssl_client_escaped_cert``). No certificate, or one without exactly one
SPIFFE URI SAN, means no identity.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from cryptography import x509

__all__ = ["caller_identity", "client_certificate", "spiffe_id_of"]


@functools.lru_cache(maxsize=1024)
def spiffe_id_of(pem: str) -> str | None:
    """The SPIFFE ID (URI SAN ``spiffe://...``) of a PEM certificate, or ``None``.

    ``None`` as well for text that is not a certificate, and for a
    certificate with no or several SPIFFE IDs (SPIFFE allows exactly one).
    Cached: a connection presents the same certificate on every request.
    """
    try:
        certificate = x509.load_pem_x509_certificate(pem.encode("ascii"))
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, UnicodeEncodeError, x509.ExtensionNotFound):
        return None
    uris = [
        uri
        for uri in names.value.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith("spiffe://")
    ]
    return uris[0] if len(uris) == 1 else None


def client_certificate(
    scope: Mapping[str, Any], headers: Mapping[str, str], proxy_cert_header: str | None
) -> str | None:
    """The caller's certificate as PEM, or ``None`` when it presented none.

    The TLS extension wins; the proxy header is read only when
    ``proxy_cert_header`` names it.
    """
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or ()
    if chain and isinstance(chain[0], str):
        return chain[0]
    if proxy_cert_header is not None:
        value = headers.get(proxy_cert_header)
        if value:
            return unquote(value)
    return None


def caller_identity(
    scope: Mapping[str, Any], headers: Mapping[str, str], proxy_cert_header: str | None
) -> str | None:
    """The caller's SPIFFE ID, or ``None`` when it has none."""
    pem = client_certificate(scope, headers, proxy_cert_header)
    return None if pem is None else spiffe_id_of(pem)
