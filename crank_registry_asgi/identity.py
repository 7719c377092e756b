"""Who is calling: the SPIFFE ID in the caller's client certificate.

The certificate comes from the ASGI TLS extension,
``scope["extensions"]["tls"]["client_cert_chain"]`` (PEM strings, the
client's own first), which the server integration fills in for connections
whose handshake verified it; or, only when the service is told to trust one,
from a header set by a TLS-terminating proxy holding the URL-encoded PEM
(like nginx's ``$ssl_client_escaped_cert``). No certificate, or one without
exactly one SPIFFE URI SAN, means no identity.

A header is not a handshake, so :class:`ProxyCertificateHeader` does what
the handshake would have done: it verifies the certificate against the
configured CA certificates (chain and validity period, with
``cryptography``'s verifier) and, when trusted proxies are configured,
takes the header only from a peer among them. A header that fails either
check refuses the request (:class:`IdentityRefused`) rather than being
ignored. Verification cannot tell a proxy's header from a client's carrying
another worker's (public) certificate: that is what the trusted proxies are
for.
"""

from __future__ import annotations

import collections
import datetime
import functools
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias
from urllib.parse import unquote

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

__all__ = [
    "IdentityRefused",
    "Network",
    "ProxyCertificateHeader",
    "caller_identity",
    "peer_address",
    "spiffe_id_of",
]

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

# Verified certificates remembered, so that a worker's heartbeats through the
# proxy are not each a chain verification (a few hundred microseconds).
_VERIFIED_CACHE_SIZE = 4096


class IdentityRefused(Exception):
    """The request carries a certificate header that may not be trusted; the message says why."""


def _spiffe_id_of_certificate(certificate: x509.Certificate) -> str | None:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, x509.ExtensionNotFound):
        return None
    uris = [
        uri
        for uri in names.value.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith("spiffe://")
    ]
    return uris[0] if len(uris) == 1 else None


@functools.lru_cache(maxsize=1024)
def spiffe_id_of(pem: str) -> str | None:
    """The SPIFFE ID (URI SAN ``spiffe://...``) of a PEM certificate, or ``None``.

    ``None`` as well for text that is not a certificate, and for a
    certificate with no or several SPIFFE IDs (SPIFFE allows exactly one).
    Cached: a connection presents the same certificate on every request.
    """
    try:
        certificate = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return None
    return _spiffe_id_of_certificate(certificate)


def peer_address(scope: Mapping[str, Any]) -> Address | None:
    """The IP address of the connection's peer (ASGI ``client``), or ``None`` if unknown.

    An IPv4 address seen through an IPv6 socket (``::ffff:10.0.0.1``) is
    the IPv4 address.
    """
    client = scope.get("client")
    if not client:
        return None
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ProxyCertificateHeader:
    """The client certificate header of a TLS-terminating proxy, trusted like a handshake.

    ``header``: the header's name. ``authorities``: the CA certificates a
    certificate in it must chain to (and be valid under, at the time given
    to :meth:`identity`). ``proxies``: the networks whose peers may send the
    header; empty, any peer may.
    """

    def __init__(
        self,
        header: str,
        authorities: Sequence[x509.Certificate],
        proxies: Sequence[Network] = (),
    ) -> None:
        if not authorities:
            raise ValueError(f"the certificate header {header} needs CA certificates to verify")
        self.header = header
        self.proxies = tuple(proxies)
        self._store = Store(list(authorities))
        # PEM text -> (SPIFFE ID, start and end of the chain's validity).
        self._verified: collections.OrderedDict[
            str, tuple[str | None, datetime.datetime, datetime.datetime]
        ] = collections.OrderedDict()

    def describe_proxies(self) -> str:
        """The trusted proxies as text, for messages."""
        return ", ".join(str(network) for network in self.proxies) or "any peer"

    def identity(self, scope: Mapping[str, Any], value: str, now: float) -> str | None:
        """The SPIFFE ID of the certificate in the header's ``value``, or ``None`` if it has none.

        Raises :class:`IdentityRefused` when the peer may not send the
        header, or the certificate does not verify at ``now`` (seconds since
        the epoch). ``value`` is the URL-encoded PEM of the client's
        certificate, optionally followed by intermediate CA certificates.
        """
        if self.proxies:
            peer = peer_address(scope)
            if peer is None or not any(peer in network for network in self.proxies):
                raise IdentityRefused(
                    f"the peer {peer if peer is not None else 'of unknown address'} may not send "
                    f"the client certificate header {self.header}: only trusted proxies "
                    f"({self.describe_proxies()}) may (--trusted-proxy)"
                )
        pem = unquote(value)
        at = datetime.datetime.fromtimestamp(now, datetime.UTC)
        known = self._verified.get(pem)
        if known is not None and known[1] <= at <= known[2]:
            self._verified.move_to_end(pem)
            return known[0]
        return self._verify(pem, at)

    def _verify(self, pem: str, at: datetime.datetime) -> str | None:
        try:
            leaf, *intermediates = x509.load_pem_x509_certificates(pem.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise IdentityRefused(
                f"the client certificate header {self.header} does not hold a URL-encoded "
                "PEM certificate"
            ) from None
        verifier = PolicyBuilder().store(self._store).time(at).build_client_verifier()
        try:
            verified = verifier.verify(leaf, intermediates)
        except VerificationError as error:
            raise IdentityRefused(
                f"the certificate in header {self.header} does not verify against the CA "
                f"certificates (--ca-certs): {error}"
            ) from None
        spiffe_id = _spiffe_id_of_certificate(leaf)
        start = max(certificate.not_valid_before_utc for certificate in verified.chain)
        end = min(certificate.not_valid_after_utc for certificate in verified.chain)
        self._verified[pem] = (spiffe_id, start, end)
        if len(self._verified) > _VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return spiffe_id


def caller_identity(
    scope: Mapping[str, Any],
    headers: Mapping[str, str],
    proxy_header: ProxyCertificateHeader | None,
    now: float,
) -> str | None:
    """The caller's SPIFFE ID, or ``None`` when it has none.

    When ``proxy_header`` is configured and the request carries it, the
    header is the identity (the proxy's own certificate, if it made a TLS
    connection with one, is not the caller's); :class:`IdentityRefused`
    when it may not be trusted. Otherwise the TLS extension's certificate.
    """
    if proxy_header is not None:
        value = headers.get(proxy_header.header)
        if value:
            return proxy_header.identity(scope, value, now)
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or ()
    if chain and isinstance(chain[0], str):
        return spiffe_id_of(chain[0])
    return None
