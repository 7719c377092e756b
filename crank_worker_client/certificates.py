"""Certificate files on disk, loaded into a live TLS context and reloaded when they change.

Shared by the worker client (its own certificate, presented to the
controller) and the controller (``crank-registry serve``): both read a
certificate, its key and a CA bundle from files, and SPIFFE-style
certificates are short-lived, so the files are renewed while the process
runs.

:class:`CertificateFiles` owns one :class:`ssl.SSLContext`. Its
:meth:`~CertificateFiles.check`, called every few seconds, compares each
file's size, modification time and inode with the last look; once they
changed and then stayed the same for one more look (a renewal replaces the
key, then the certificate), it loads the new pair into the same context. ``load_cert_chain`` on
a live context affects the handshakes that start afterwards only: open
connections finish with the certificate they were made with. A pair that
does not load (half-written, key of another certificate) is logged with the
file names and the previous pair stays in use; the next change is tried
again. The CA bundle can only grow on a live context (OpenSSL has no way to
remove a CA from a context in use), so a CA that is removed from the bundle
stays trusted until the process restarts; the log says so.

:func:`tls_files_problem` turns OpenSSL's terse errors (``[SSL] PEM lib``,
``KEY_VALUES_MISMATCH``) into a sentence naming the file and the fix.

Expiry: each check also compares the certificate's ``notAfter`` with the
clock and logs a warning once when it is less than ``expiry_warning``
seconds away, and an error once when it has passed.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import tempfile
import textwrap
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import anyio

__all__ = [
    "DEFAULT_EXPIRY_WARNING",
    "DEFAULT_WATCH_INTERVAL",
    "CertificateFiles",
    "asks_for_client_certificate",
    "certificate_not_after",
    "tls_files_problem",
]

#: How often the files are looked at (seconds).
DEFAULT_WATCH_INTERVAL = 5.0
#: How long before its expiry a certificate is warned about (seconds: 7 days).
DEFAULT_EXPIRY_WARNING = 7 * 86400.0

_PEM_CERTIFICATE = "-----BEGIN CERTIFICATE-----"
_PEM_PRIVATE_KEY = "PRIVATE KEY-----"

# (size, mtime in ns, inode) of each file; None for a file that cannot be looked at.
_Signature = tuple[tuple[int, int, int] | None, ...]


def tls_files_problem(
    certfile: str | Path | None,
    keyfile: str | Path | None = None,
    ca_certs: str | Path | None = None,
) -> str | None:
    """What is wrong with these TLS files, naming the file and the fix; ``None`` if they load.

    ``keyfile`` ``None`` means the key is in ``certfile``. Checked in the
    order a person fixes them: a missing file, a file that is not PEM, a key
    that is not the certificate's.
    """
    if ca_certs is not None:
        problem = _unreadable(ca_certs, "CA certificates file")
        if problem is None and not _has_pem_certificate(ca_certs):
            problem = (
                f"CA certificates file {ca_certs} is not PEM: expected one or more "
                f"'{_PEM_CERTIFICATE}' blocks (the ca.pem written by 'crank-registry certs')"
            )
        if problem is None:
            try:
                ssl.create_default_context().load_verify_locations(cafile=os.fspath(ca_certs))
            except ssl.SSLError as error:
                problem = f"CA certificates file {ca_certs} cannot be read as PEM: {_reason(error)}"
        if problem is not None:
            return problem
    if certfile is None:
        return None
    problem = _unreadable(certfile, "certificate file")
    if problem is None and not _has_pem_certificate(certfile):
        problem = (
            f"certificate file {certfile} is not a PEM certificate: expected a "
            f"'{_PEM_CERTIFICATE}' block (convert a DER file with "
            "'openssl x509 -inform der -in FILE -out FILE.pem')"
        )
    if problem is not None:
        return problem
    key = certfile if keyfile is None else keyfile
    if keyfile is not None:
        problem = _unreadable(keyfile, "key file")
        if problem is not None:
            return problem
    if _PEM_PRIVATE_KEY not in _text(key):
        return (
            f"key file {key} is not a PEM private key: expected a "
            f"'-----BEGIN PRIVATE KEY-----' block (or EC/RSA PRIVATE KEY)"
        )
    try:
        ssl.create_default_context().load_cert_chain(
            os.fspath(certfile), os.fspath(key), password=_no_password
        )
    except ssl.SSLError as error:
        if "KEY_VALUES_MISMATCH" in str(error):
            return (
                f"key file {key} is not the key of certificate {certfile}: pass the key "
                "written together with that certificate (e.g. worker-NAME.key beside "
                "worker-NAME.pem)"
            )
        if "PEM" in str(error) or "PRIVATE KEY" in str(error) or "DECRYPT" in str(error).upper():
            return (
                f"certificate {certfile} or key {key} cannot be loaded ({_reason(error)}): "
                "the certificate must be PEM and the key PEM and unencrypted"
            )
        return f"certificate {certfile} with key {key} cannot be loaded: {_reason(error)}"
    except OSError as error:
        return f"cannot read {error.filename or certfile}: {error.strerror or error}"
    return None


def asks_for_client_certificate(host: str, port: int, *, timeout: float) -> bool:
    """Whether the TLS server at ``host:port`` asks for a client certificate in its handshake.

    Blocking (run it in a thread). A server that requires one and gets none
    may just close the connection (asyncio's servers send no alert), so a
    client without a certificate learns why only by looking at the
    handshake: this one offers no certificate and watches for the server's
    CertificateRequest. It verifies nothing and sends no request.
    """
    # The message callback is CPython's hook for watching handshake messages
    # (used by its own tests); it is the only way ssl shows them.
    message_type = getattr(ssl, "_TLSMessageType", None)
    context = ssl.create_default_context()
    if message_type is None or not hasattr(context, "_msg_callback"):
        return False
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    asked: list[bool] = []

    def watch(*args: Any) -> None:
        direction, message = args[1], args[4]
        if direction == "read" and message == message_type.CERTIFICATE_REQUEST:
            asked.append(True)

    context._msg_callback = watch
    try:
        # The request comes before the server's Finished message: the
        # handshake says all there is to know.
        with socket.create_connection((host, port), timeout=timeout) as raw:
            context.wrap_socket(raw, server_hostname=host).close()
    except OSError:
        pass  # refused or closed: what was seen of the handshake still counts
    return bool(asked)


def certificate_not_after(certfile: str | Path) -> float:
    """The expiry (``notAfter``) of the first certificate in a PEM file, in seconds since 1970.

    Raises ``ValueError`` when the file holds no certificate.
    """
    # Python's ssl decodes a certificate file into the same dictionary as
    # getpeercert() (used by CPython's own tests); the worker client has no
    # X.509 library of its own to depend on.
    decode = cast(Callable[[str], dict[str, Any]], ssl._ssl._test_decode_cert)  # type: ignore[attr-defined]
    try:
        decoded = decode(os.fspath(certfile))
    except ssl.SSLError as error:
        raise ValueError(f"{certfile}: not a PEM certificate ({_reason(error)})") from None
    return float(ssl.cert_time_to_seconds(decoded["notAfter"]))


class CertificateFiles:
    """A live :class:`ssl.SSLContext` and the files it was loaded from, reloaded on change.

    Build it with :meth:`open`, which looks at the files before ``build``
    loads them, so a change made meanwhile is seen by the first check.
    ``label`` names the certificate in the log ("controller certificate",
    "worker certificate"); ``clock`` gives wall-clock seconds for the expiry
    warning (tests pass a fixed one).
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        certfile: str | Path | None,
        keyfile: str | Path | None = None,
        ca_certs: str | Path | None = None,
        label: str,
        logger: logging.Logger,
        expiry_warning: float = DEFAULT_EXPIRY_WARNING,
        clock: Callable[[], float] = time.time,
        signature: _Signature | None = None,
    ) -> None:
        if keyfile is not None and certfile is None:
            raise ValueError("keyfile given without certfile")
        if not expiry_warning >= 0:
            raise ValueError(f"expiry_warning must be >= 0 seconds, got {expiry_warning!r}")
        self.context = context
        self.certfile = None if certfile is None else Path(certfile)
        self.keyfile = None if keyfile is None else Path(keyfile)
        self.ca_certs = None if ca_certs is None else Path(ca_certs)
        self.label = label
        self.expiry_warning = expiry_warning
        self._logger = logger
        self._clock = clock
        self._signature = signature if signature is not None else self._look()
        self._changing: _Signature | None = None
        self._ca_bundle = self._read_ca_bundle()
        self._not_after = None if self.certfile is None else certificate_not_after(self.certfile)
        self._warned: tuple[float, str] | None = None
        self.reloads = 0
        self.check_expiry()

    @classmethod
    def open(
        cls,
        build: Callable[[], ssl.SSLContext],
        *,
        certfile: str | Path | None,
        keyfile: str | Path | None = None,
        ca_certs: str | Path | None = None,
        label: str,
        logger: logging.Logger,
        expiry_warning: float = DEFAULT_EXPIRY_WARNING,
        clock: Callable[[], float] = time.time,
    ) -> CertificateFiles:
        """Look at the files, then ``build()`` the context from them."""
        paths = [p for p in (certfile, keyfile, ca_certs) if p is not None]
        signature = _signature_of([Path(p) for p in paths])
        return cls(
            build(),
            certfile=certfile,
            keyfile=keyfile,
            ca_certs=ca_certs,
            label=label,
            logger=logger,
            expiry_warning=expiry_warning,
            clock=clock,
            signature=signature,
        )

    @property
    def not_after(self) -> float | None:
        """When the certificate in use expires (seconds since 1970); ``None`` without one."""
        return self._not_after

    def expiry_times(self) -> Mapping[str, float]:
        """Expiry of the certificate in use (``"certificate"``) and of the trusted CAs (``"ca"``).

        ``"ca"`` is the first CA of the bundle to expire, of those loaded.
        """
        times: dict[str, float] = {}
        if self._not_after is not None:
            times["certificate"] = self._not_after
        if self._ca_bundle:
            times["ca"] = min(self._ca_bundle.values())
        return times

    async def watch(self, interval: float = DEFAULT_WATCH_INTERVAL) -> None:
        """Check the files every ``interval`` seconds, until cancelled."""
        while True:
            await anyio.sleep(interval)
            try:
                self.check()
            except Exception:
                # Watching goes on: the pair in use is still good.
                self._logger.exception("%s: checking %s failed", self.label, self._paths())

    def check(self) -> bool:
        """Reload the files if they changed, then check the expiry; whether a new pair is in use.

        A change is loaded when two looks in a row see the files the same
        (so within two watch intervals). Runs in the thread that serves the
        connections (the event loop), so no handshake sees the context
        half-changed.
        """
        signature = self._look()
        reloaded = False
        if signature == self._signature:
            self._changing = None
        elif signature != self._changing:
            # Changed since the last look: wait one more look, so that a
            # renewal replacing the key and then the certificate is read
            # whole, not between the two.
            self._changing = signature
        else:
            self._signature, self._changing = signature, None
            reloaded = self._reload()
        self.check_expiry()
        return reloaded

    def check_expiry(self) -> None:
        """Warn when the certificate expires within ``expiry_warning``; an error once expired.

        Each is logged once per certificate.
        """
        if self._not_after is None:
            return
        left = self._not_after - self._clock()
        stage = "expired" if left <= 0 else "expiring" if left <= self.expiry_warning else None
        if stage is None or self._warned == (self._not_after, stage):
            return
        self._warned = (self._not_after, stage)
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self._not_after))
        if stage == "expired":
            self._logger.error(
                "%s %s expired at %s: TLS peers refuse it; renew it "
                "(crank-registry certs --renew), it is reloaded without a restart",
                self.label,
                self.certfile,
                when,
            )
        else:
            self._logger.warning(
                "%s %s expires at %s, in %.1f days: renew it "
                "(crank-registry certs --renew), it is reloaded without a restart",
                self.label,
                self.certfile,
                when,
                left / 86400,
            )

    # -- reloading --------------------------------------------------------

    def _paths(self) -> list[Path]:
        return [p for p in (self.certfile, self.keyfile, self.ca_certs) if p is not None]

    def _look(self) -> _Signature:
        return _signature_of(self._paths())

    def _reload(self) -> bool:
        # A private copy is checked and then loaded, so that a file replaced
        # again between the two steps cannot put an unchecked pair in use.
        with tempfile.TemporaryDirectory(prefix="crank-tls-") as scratch:
            try:
                copies = {
                    path: _copy(path, Path(scratch) / f"{index}-{path.name}")
                    for index, path in enumerate(self._paths())
                }
            except OSError as error:
                self._keep(f"cannot read {error.filename}: {error.strerror or error}")
                return False
            certfile = None if self.certfile is None else copies[self.certfile]
            keyfile = None if self.keyfile is None else copies[self.keyfile]
            ca_certs = None if self.ca_certs is None else copies[self.ca_certs]
            problem = tls_files_problem(certfile, keyfile, ca_certs)
            if problem is not None:
                for path, copy in copies.items():
                    problem = problem.replace(str(copy), str(path))
                self._keep(problem)
                return False
            if certfile is not None:
                self.context.load_cert_chain(
                    os.fspath(certfile),
                    None if keyfile is None else os.fspath(keyfile),
                    password=_no_password,
                )
                self._not_after = certificate_not_after(certfile)
            if ca_certs is not None:
                self._reload_ca_bundle(ca_certs)
        self.reloads += 1
        self._warned = None
        self._logger.info(
            "%s reloaded from %s: new connections use it (expires %s)",
            self.label,
            ", ".join(str(path) for path in self._paths()),
            "-"
            if self._not_after is None
            else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self._not_after)),
        )
        return True

    def _reload_ca_bundle(self, ca_copy: Path) -> None:
        bundle = _ca_expiries(ca_copy)
        added = bundle.keys() - self._ca_bundle.keys()
        removed = self._ca_bundle.keys() - bundle.keys()
        if added:
            self.context.load_verify_locations(cadata="".join(sorted(added)))
        self._ca_bundle.update(bundle)
        if removed:
            self._logger.warning(
                "%d CA certificate(s) removed from %s stay trusted until the process restarts "
                "(a live TLS context can only add CAs)",
                len(removed),
                self.ca_certs,
            )

    def _read_ca_bundle(self) -> dict[str, float]:
        return {} if self.ca_certs is None else _ca_expiries(self.ca_certs)

    def _keep(self, problem: str) -> None:
        self._logger.error(
            "%s not reloaded, the previous one stays in use: %s", self.label, problem
        )


def _signature_of(paths: list[Path]) -> _Signature:
    looks: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            status = path.stat()
        except OSError:
            looks.append(None)
        else:
            looks.append((status.st_size, status.st_mtime_ns, status.st_ino))
    return tuple(looks)


def _copy(path: Path, copy: Path) -> Path:
    copy.write_bytes(path.read_bytes())
    return copy


def _ca_expiries(path: Path) -> dict[str, float]:
    """Each PEM certificate block of a bundle (normalised) and its expiry."""
    expiries: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="crank-tls-") as scratch:
        single = Path(scratch) / "ca.pem"
        for block in _pem_blocks(_text(path)):
            single.write_text(block)
            try:
                expiries[block] = certificate_not_after(single)
            except ValueError:
                continue  # not a certificate OpenSSL reads; loading the bundle says so
    return expiries


def _pem_blocks(text: str) -> set[str]:
    """The PEM certificate blocks of a bundle, normalised (for comparing bundles)."""
    blocks: set[str] = set()
    end = "-----END CERTIFICATE-----"
    start = text.find(_PEM_CERTIFICATE)
    while start != -1:
        stop = text.find(end, start)
        if stop == -1:
            break
        body = "".join(text[start + len(_PEM_CERTIFICATE) : stop].split())
        lines = "\n".join(textwrap.wrap(body, 64))
        blocks.add(f"{_PEM_CERTIFICATE}\n{lines}\n{end}\n")
        start = text.find(_PEM_CERTIFICATE, stop)
    return blocks


def _unreadable(path: str | Path, what: str) -> str | None:
    file = Path(path)
    if not file.exists():
        return f"{what} not found: {file}: check the path (absolute, or relative to {Path.cwd()})"
    if not file.is_file():
        return f"{what} {file} is not a file"
    try:
        file.read_bytes()
    except OSError as error:
        return f"cannot read {what} {file}: {error.strerror or error}"
    return None


def _text(path: str | Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _has_pem_certificate(path: str | Path) -> bool:
    return _PEM_CERTIFICATE in _text(path)


def _no_password() -> bytes:
    # An encrypted key fails to load rather than prompting on the terminal.
    return b""


def _reason(error: ssl.SSLError) -> str:
    return error.reason or error.strerror or str(error)
