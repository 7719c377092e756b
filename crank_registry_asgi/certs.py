"""Development certificates: a private CA, a controller certificate, worker certificates.

``crank-registry certs`` writes these files with :func:`write_development_certificates`
(``--san`` adds the hosts' real names) and renews one worker's with
:func:`renew_worker_certificate`; every file is replaced atomically, so the
processes that reload them (:mod:`crank_worker_client.certificates`) never
read half of one. Tests and examples build certificates in memory with the
functions below, including ones that must be refused (expired, or signed by
another authority).

A worker certificate is an X.509 SVID in the SPIFFE sense: its only URI SAN is
``spiffe://crank.local/worker/NAME``, the identity the controller checks against the
``worker_id`` of the record being changed. It is also valid for serving HTTPS on
localhost, so a worker can use one certificate for both directions.

Keys are ECDSA P-256: fast to generate and accepted by every TLS stack in use.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crank_registry import is_worker_id

__all__ = [
    "CONTROLLER_HOSTS",
    "DEFAULT_VALIDITY",
    "IDENTITY_KINDS",
    "TRUST_DOMAIN",
    "CertifiedKey",
    "check_host",
    "check_name",
    "make_authority",
    "make_controller_certificate",
    "make_identity_certificate",
    "make_worker_certificate",
    "read_authority",
    "renew_worker_certificate",
    "replace_file",
    "spiffe_id",
    "write_development_certificates",
    "write_private_key",
]

TRUST_DOMAIN = "crank.local"
#: The names the controller certificate is valid for.
CONTROLLER_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_VALIDITY = datetime.timedelta(days=365)
# Certificates start a little in the past so that a clock running slightly
# behind on another machine does not reject a certificate made a second ago.
_BACKDATE = datetime.timedelta(minutes=5)


@attrs.frozen
class CertifiedKey:
    """A certificate and its private key."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    def certificate_pem(self) -> bytes:
        """The certificate, PEM-encoded."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def private_key_pem(self) -> bytes:
        """The private key, PEM-encoded (PKCS#8, unencrypted)."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, certificate_path: Path, key_path: Path) -> None:
        """Write the key (mode 0600) and the certificate, each replacing its file atomically.

        A process watching the files sees the old file or the new one, never
        a half-written one; both new files are on disk before the first
        rename, and the renames follow each other (key first).
        """
        with (
            _prepared(key_path, self.private_key_pem(), mode=0o600) as key,
            _prepared(certificate_path, self.certificate_pem(), mode=0o644) as certificate,
        ):
            os.replace(key, key_path)
            os.replace(certificate, certificate_path)


def spiffe_id(kind: str, name: str, *, trust_domain: str = TRUST_DOMAIN) -> str:
    """The SPIFFE ID ``spiffe://TRUST_DOMAIN/KIND/NAME``."""
    return f"spiffe://{trust_domain}/{kind}/{name}"


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid worker or client name, else raise ``ValueError``.

    The registry's worker-id rule; names also become file names, and the
    rule keeps them free of path separators.
    """
    if not is_worker_id(name):
        raise ValueError(f"invalid name {name!r}: use 1 to 128 letters, digits, '.', '_' and '-'")
    return name


def make_authority(
    common_name: str = "crank development CA",
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> CertifiedKey:
    """A self-signed certificate authority that may sign leaf certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start, end = _validity(not_before, not_after)
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return CertifiedKey(certificate, key)


def make_controller_certificate(
    authority: CertifiedKey,
    *,
    hosts: Sequence[str] = CONTROLLER_HOSTS,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> CertifiedKey:
    """A server certificate for the controller, valid for ``hosts`` (names or IPs).

    It is a client certificate too: the gateway presents it to workers,
    which require one from every caller.
    """
    return _make_leaf(
        authority,
        common_name="crank controller",
        uris=(),
        hosts=hosts,
        usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        not_before=not_before,
        not_after=not_after,
    )


#: The kinds of identity certificate: what the SPIFFE path says, and what the certificate may do.
IDENTITY_KINDS = ("worker", "client")


def make_identity_certificate(
    authority: CertifiedKey,
    kind: str,
    name: str,
    *,
    trust_domain: str = TRUST_DOMAIN,
    hosts: Sequence[str] = CONTROLLER_HOSTS,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> CertifiedKey:
    """A certificate whose URI SAN is ``spiffe://TRUST_DOMAIN/KIND/NAME``.

    A ``"worker"`` certificate is a client identity and also serves HTTPS on
    ``hosts`` (names or IP addresses), so a worker can use one certificate
    for both directions. A ``"client"`` certificate is for a caller that
    routes and lists but is no worker: client use only, ``hosts`` ignored.
    Pass ``not_after`` in the past to make an expired one.
    """
    if kind not in IDENTITY_KINDS:
        raise ValueError(f"kind must be one of {', '.join(IDENTITY_KINDS)}, got {kind!r}")
    worker = kind == "worker"
    return _make_leaf(
        authority,
        common_name=check_name(name),
        uris=(spiffe_id(kind, name, trust_domain=trust_domain),),
        hosts=hosts if worker else (),
        usages=(ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH)
        if worker
        else (ExtendedKeyUsageOID.CLIENT_AUTH,),
        not_before=not_before,
        not_after=not_after,
    )


def make_worker_certificate(
    authority: CertifiedKey,
    name: str,
    *,
    hosts: Sequence[str] = CONTROLLER_HOSTS,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> CertifiedKey:
    """:func:`make_identity_certificate` for worker ``name``."""
    return make_identity_certificate(
        authority, "worker", name, hosts=hosts, not_before=not_before, not_after=not_after
    )


def read_authority(certificate_path: Path, key_path: Path) -> CertifiedKey:
    """Load a CA written earlier (PEM certificate and unencrypted PEM key)."""
    certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: expected an EC private key")
    if certificate.public_key() != key.public_key():
        raise ValueError(f"{key_path} is not the key of {certificate_path}")
    return CertifiedKey(certificate, key)


def write_private_key(path: Path, pem: bytes) -> None:
    """Write a private key readable by its owner only (0600), atomically replacing ``path``."""
    replace_file(path, pem, mode=0o600)


def replace_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to a new file beside ``path`` (``mode`` from the start), then rename it.

    The rename is atomic: readers see the old content or the new, and the
    file is on disk (fsync) before it replaces the old one.
    """
    with _prepared(path, data, mode=mode) as temporary:
        os.replace(temporary, path)


@contextlib.contextmanager
def _prepared(path: Path, data: bytes, *, mode: int) -> Iterator[Path]:
    """A new file beside ``path`` holding ``data``, on disk; removed unless renamed."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        yield Path(temporary)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def check_host(host: str) -> str:
    """Return ``host`` if it is a DNS name or an IP address for a certificate, else raise.

    IP addresses are recognised with :mod:`ipaddress` (and written as IP
    SANs); anything else must be a DNS name: dot-separated labels of
    letters, digits and '-', optionally starting with the wildcard ``*.``.
    """
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host[2:] if host.startswith("*.") else host
    labels = name.rstrip(".").split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"--san {host!r} is neither an IP address nor a DNS name: use a name such as "
            "controller.example.com or an address such as 10.0.0.5"
        )
    return host.lower()


_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def write_development_certificates(
    out_dir: Path,
    *,
    workers: Iterable[str],
    clients: Iterable[str] = (),
    sans: Iterable[str] = (),
    validity: datetime.timedelta = DEFAULT_VALIDITY,
    trust_domain: str = TRUST_DOMAIN,
) -> list[Path]:
    """Write a development PKI to ``out_dir`` and return the paths written.

    An existing ``ca.pem``/``ca.key`` pair in ``out_dir`` is reused, so that
    certificates for more workers can be added later without invalidating the
    ones already handed out; otherwise a new CA is made. The controller
    certificate is (re)written every time. ``sans`` (DNS names or IP
    addresses) are added to the controller's and the workers' certificates,
    after localhost, 127.0.0.1 and ::1. Worker and client identities are
    in ``trust_domain`` (the controller's ``--trust-domain``). Every file is
    replaced atomically.
    """
    worker_names = [check_name(name) for name in workers]
    client_names = [check_name(name) for name in clients]
    hosts = _hosts_with(CONTROLLER_HOSTS, sans)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - _BACKDATE, now + validity
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    ca_pem, ca_key = out_dir / "ca.pem", out_dir / "ca.key"
    if ca_pem.exists() and ca_key.exists():
        authority = read_authority(ca_pem, ca_key)
    else:
        authority = make_authority(not_before=not_before, not_after=not_after)
        authority.write(ca_pem, ca_key)
        written += [ca_pem, ca_key]

    issued: list[tuple[str, CertifiedKey]] = [
        (
            "controller",
            make_controller_certificate(
                authority, hosts=hosts, not_before=not_before, not_after=not_after
            ),
        )
    ]
    issued += [
        (
            f"{kind}-{name}",
            make_identity_certificate(
                authority,
                kind,
                name,
                trust_domain=trust_domain,
                hosts=hosts,
                not_before=not_before,
                not_after=not_after,
            ),
        )
        for kind, names in (("worker", worker_names), ("client", client_names))
        for name in names
    ]
    for stem, certified in issued:
        certificate_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
        certified.write(certificate_path, key_path)
        written += [certificate_path, key_path]
    return written


def renew_worker_certificate(
    out_dir: Path,
    name: str,
    *,
    sans: Iterable[str] = (),
    validity: datetime.timedelta = DEFAULT_VALIDITY,
) -> list[Path]:
    """Renew ``worker-NAME.pem``/``.key`` in ``out_dir``: same CA, new key, new validity.

    The new certificate keeps the trust domain, DNS names and IP addresses
    of the old one and adds ``sans``. Both files are replaced atomically (key first), so a
    worker watching them picks up the new pair without a restart. Raises
    ``ValueError`` when the CA or the certificate to renew is missing.
    """
    check_name(name)
    ca_pem, ca_key = out_dir / "ca.pem", out_dir / "ca.key"
    missing = [str(path) for path in (ca_pem, ca_key) if not path.is_file()]
    if missing:
        raise ValueError(
            f"cannot renew worker {name!r}: the CA is missing ({', '.join(missing)}); the "
            "renewed certificate must be signed by the CA its peers trust. Pass the --out "
            "directory that holds ca.pem and ca.key"
        )
    certificate_path = out_dir / f"worker-{name}.pem"
    key_path = out_dir / f"worker-{name}.key"
    try:
        old = x509.load_pem_x509_certificate(certificate_path.read_bytes())
    except FileNotFoundError:
        raise ValueError(
            f"cannot renew worker {name!r}: {certificate_path} does not exist; issue it with "
            f"--worker {name} (without --renew)"
        ) from None
    except ValueError:
        raise ValueError(
            f"cannot renew worker {name!r}: {certificate_path} is not a PEM certificate; "
            f"issue a new one with --worker {name} (without --renew)"
        ) from None
    authority = read_authority(ca_pem, ca_key)
    now = datetime.datetime.now(datetime.UTC)
    renewed = make_identity_certificate(
        authority,
        "worker",
        name,
        trust_domain=_trust_domain_of(old),
        hosts=_hosts_with(_hosts_of(old), sans),
        not_before=now - _BACKDATE,
        not_after=now + validity,
    )
    renewed.write(certificate_path, key_path)
    return [certificate_path, key_path]


def _hosts_with(hosts: Iterable[str], sans: Iterable[str]) -> tuple[str, ...]:
    """``hosts`` then ``sans``, each checked, without repeats."""
    return tuple(dict.fromkeys(check_host(host) for host in (*hosts, *sans)))


def _trust_domain_of(certificate: x509.Certificate) -> str:
    """The trust domain of a certificate's SPIFFE ID (``TRUST_DOMAIN`` without one)."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return TRUST_DOMAIN
    for uri in names.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri.removeprefix("spiffe://").split("/", 1)[0]
    return TRUST_DOMAIN


def _hosts_of(certificate: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *names.get_values_for_type(x509.DNSName),
        *(str(address) for address in names.get_values_for_type(x509.IPAddress)),
    ]


def _validity(
    not_before: datetime.datetime | None, not_after: datetime.datetime | None
) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    start = not_before if not_before is not None else now - _BACKDATE
    end = not_after if not_after is not None else now + DEFAULT_VALIDITY
    if end <= start:
        raise ValueError("not_after must be later than not_before")
    return start, end


def _make_leaf(
    authority: CertifiedKey,
    *,
    common_name: str,
    uris: Sequence[str],
    hosts: Sequence[str],
    usages: Sequence[x509.ObjectIdentifier],
    not_before: datetime.datetime | None,
    not_after: datetime.datetime | None,
) -> CertifiedKey:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(not_before, not_after)
    alternative_names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(uri) for uri in uris
    ]
    alternative_names += [_host_name(host) for host in hosts]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.private_key.public_key()),
            critical=False,
        )
    )
    if alternative_names:
        # Non-critical: the subject is not empty (RFC 5280, 4.2.1.6).
        builder = builder.add_extension(
            x509.SubjectAlternativeName(alternative_names), critical=False
        )
    certificate = builder.sign(authority.private_key, hashes.SHA256())
    return CertifiedKey(certificate, key)


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
