"""Who may act on which worker record.

With mutual TLS the caller's identity is the SPIFFE ID in its client
certificate, and it must be exactly one of

- ``spiffe://TRUST-DOMAIN/worker/NAME``: worker ``NAME``, which may register,
  heartbeat and deregister the worker whose ``worker_id`` is ``NAME`` only;
- ``spiffe://TRUST-DOMAIN/client/NAME``: a caller that routes and lists but
  acts on no worker record.

Drain is the one act on a worker record open to others: an *operator*, an
identity matching one of the service's ``--operator`` globs (shell-style,
:func:`fnmatch.fnmatchcase` over the whole SPIFFE ID), may drain and
undrain any worker (:func:`authorize_drain`).

Any other SPIFFE ID (another trust domain, a longer or shorter path, another
kind, a name that is not a worker id) is refused with the reason, even where
it ends in ``/worker/NAME``. The trust domain is the caller's to give: the
service passes the one it was configured with.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from ._errors import Forbidden
from ._models import is_worker_id

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "authorize_drain",
    "operator_glob_problem",
    "authorize_worker",
    "identity_problem",
    "is_trust_domain",
    "worker_name_of",
]

#: The trust domain of the development certificates (``crank-registry certs``).
DEFAULT_TRUST_DOMAIN = "crank.local"
_SCHEME = "spiffe://"
_KINDS = ("worker", "client")
# The SPIFFE specification's trust domain characters (lowercase only).
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")


def is_trust_domain(value: object) -> bool:
    """Whether ``value`` is a SPIFFE trust domain (lowercase letters, digits, ``._-``)."""
    return isinstance(value, str) and _TRUST_DOMAIN.fullmatch(value) is not None


def _parse(spiffe_id: str, trust_domain: str) -> tuple[str, str] | str:
    """``(kind, name)`` of an identity of ``trust_domain``, else why it is not one."""
    if not spiffe_id.startswith(_SCHEME):
        return "it is not a SPIFFE ID (spiffe://...)"
    domain, slash, path = spiffe_id[len(_SCHEME) :].partition("/")
    if domain != trust_domain:
        return f"its trust domain {domain!r} is not the trusted {trust_domain!r}"
    segments = path.split("/") if slash else []
    if len(segments) != 2 or segments[0] not in _KINDS:
        return f"its path {'/' + path if slash else ''!r} is not /worker/NAME or /client/NAME"
    kind, name = segments
    if not is_worker_id(name) or name in (".", ".."):
        return f"its name {name!r} is not 1 to 128 letters, digits, '.', '_' and '-'"
    return kind, name


def identity_problem(spiffe_id: str, trust_domain: str) -> str | None:
    """Why ``spiffe_id`` is not a caller's identity in ``trust_domain``, or ``None`` if it is."""
    parsed = _parse(spiffe_id, trust_domain)
    return parsed if isinstance(parsed, str) else None


def worker_name_of(spiffe_id: str, trust_domain: str) -> str | None:
    """``NAME`` of exactly ``spiffe://TRUST_DOMAIN/worker/NAME``, else ``None``."""
    parsed = _parse(spiffe_id, trust_domain)
    if isinstance(parsed, str) or parsed[0] != "worker":
        return None
    return parsed[1]


def authorize_worker(
    identity: str | None, worker_id: str, *, trust_domain: str, required: bool = False
) -> None:
    """Raise :class:`Forbidden`, with the reason, unless ``identity`` may act on ``worker_id``.

    ``identity`` is ``None`` for a caller without one. ``required`` says
    that identities are in force (mutual TLS): such a caller acts on no
    worker record. Without it there are no identities, and no checks for a
    caller without one; an identity that is presented is always checked.
    """
    if identity is None:
        if required:
            raise Forbidden(None, worker_id)
        return
    parsed = _parse(identity, trust_domain)
    if isinstance(parsed, str):
        raise Forbidden(
            identity,
            worker_id,
            reason=(
                f"identity {identity!r} is refused: {parsed}; a caller's identity is "
                f"spiffe://{trust_domain}/worker/NAME or spiffe://{trust_domain}/client/NAME"
            ),
        )
    kind, name = parsed
    if kind != "worker":
        raise Forbidden(
            identity,
            worker_id,
            reason=(
                f"identity {identity!r} may not act on worker {worker_id!r}: it is a "
                "client's, which may route and list only"
            ),
        )
    if name != worker_id:
        raise Forbidden(
            identity,
            worker_id,
            reason=f"identity {identity!r} may not act on worker {worker_id!r}: it is {name!r}",
        )


def operator_glob_problem(glob: object) -> str | None:
    """Why ``glob`` is not an operator glob (``--operator``), or ``None`` if it is one.

    A shell-style glob over whole SPIFFE IDs: it starts with ``spiffe://``
    (so that it names identities, not any string), holds no whitespace,
    and closes every ``[``.
    """
    if not isinstance(glob, str) or not glob.startswith(_SCHEME):
        return "is not a glob over SPIFFE IDs: it must start with spiffe://"
    if any(character.isspace() for character in glob):
        return "holds whitespace, which no SPIFFE ID does"
    if glob.count("[") != glob.count("]"):
        return "has a [ without its ] (or a ] without its [)"
    return None


def authorize_drain(
    identity: str | None,
    worker_id: str,
    *,
    trust_domain: str,
    required: bool = False,
    operators: Iterable[str] = (),
) -> None:
    """Raise :class:`Forbidden` unless ``identity`` may drain or undrain ``worker_id``.

    The worker itself may (as :func:`authorize_worker` rules), and so may an
    identity of the trust domain that matches one of the ``operators`` globs.
    """
    if (
        identity is not None
        and isinstance(_parse(identity, trust_domain), tuple)
        and any(fnmatch.fnmatchcase(identity, glob) for glob in operators)
    ):
        return
    try:
        authorize_worker(identity, worker_id, trust_domain=trust_domain, required=required)
    except Forbidden as refused:
        raise Forbidden(
            identity,
            worker_id,
            reason=f"{refused}; only the worker itself, or an identity matching the "
            "controller's --operator globs, may drain or undrain it",
        ) from None
