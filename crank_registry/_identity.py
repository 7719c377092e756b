"""Who may act on which worker record.

With mutual TLS the caller's identity is the SPIFFE ID in its client
certificate. A worker's is ``spiffe://TRUST-DOMAIN/.../worker/NAME``; it may
register, heartbeat and deregister only the worker whose ``worker_id`` is
``NAME``. Any other identity (a caller's, ``.../client/NAME``) may route and
list but act on no worker record.
"""

from __future__ import annotations

from ._errors import Forbidden

__all__ = ["authorize_worker", "worker_name_of"]


def worker_name_of(spiffe_id: str) -> str | None:
    """The worker name of a worker's SPIFFE ID (``.../worker/NAME``), else ``None``."""
    if not spiffe_id.startswith("spiffe://"):
        return None
    _, _, path = spiffe_id[len("spiffe://") :].partition("/")
    segments = path.split("/")
    if len(segments) < 2 or segments[-2] != "worker" or not segments[-1]:
        return None
    return segments[-1]


def authorize_worker(identity: str | None, worker_id: str, *, required: bool = False) -> None:
    """Raise :class:`Forbidden` unless ``identity`` may act on ``worker_id``.

    ``identity`` is ``None`` for a caller without one. ``required`` says
    that identities are in force (mutual TLS): such a caller acts on no
    worker record. Without it there are no identities, and no checks for a
    caller without one.
    """
    if identity is None:
        if required:
            raise Forbidden(None, worker_id)
        return
    if worker_name_of(identity) != worker_id:
        raise Forbidden(identity, worker_id)
