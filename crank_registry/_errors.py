"""The library's errors.

Every error the core raises derives from :class:`RegistryError`, carries a
stable machine-readable ``code`` and a hint of the HTTP status that an I/O
layer should answer with (the h11 ``error_status_hint`` idea)::

    RegistryError
    ├── ValidationError       invalid_request        422
    ├── Forbidden             forbidden              403
    ├── PolicyDenied          policy_denied          403
    ├── WorkerNotRegistered   worker_not_registered  404
    ├── UnknownCapability     unknown_capability     404
    ├── RevisionCompacted     revision_compacted     410
    └── RevisionReset         revision_reset         410
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ._models import RouteExplanation

__all__ = [
    "Forbidden",
    "PolicyDenied",
    "Problem",
    "RegistryError",
    "RevisionCompacted",
    "RevisionReset",
    "UnknownCapability",
    "ValidationError",
    "WorkerNotRegistered",
]


class RegistryError(Exception):
    """Root of the library's errors.

    ``code`` is stable and meant for machines; ``status_hint`` is the HTTP
    status a service should answer with.
    """

    code: str = "registry_error"
    status_hint: int = 400


@attrs.frozen
class Problem:
    """One thing wrong with an input: where (``path``) and what (``message``).

    ``path`` uses attribute and index notation relative to the input's root,
    e.g. ``capabilities[2].max_concurrency``; the empty string is the root.
    """

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ValidationError(RegistryError):
    """An input that is not a valid model; ``problems`` lists every fault."""

    code = "invalid_request"
    status_hint = 422

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems))

    @classmethod
    def single(cls, path: str, message: str) -> ValidationError:
        """An error with one problem."""
        return cls([Problem(path, message)])

    def prefixed(self, prefix: str) -> ValidationError:
        """The same problems, with ``prefix`` put before every path."""
        return ValidationError(Problem(_join(prefix, p.path), p.message) for p in self.problems)


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


class WorkerNotRegistered(RegistryError):
    """The worker is unknown here, evicted, or restored but not re-registered.

    A worker that receives this for a heartbeat re-registers at once.
    """

    code = "worker_not_registered"
    status_hint = 404

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        super().__init__(f"worker {worker_id!r} is not registered")


class Forbidden(RegistryError):
    """A caller acted on a worker record that is not its own.

    ``identity`` is ``None`` for a caller that presented none where one is
    required (mutual TLS). ``reason``, when given, is the message: why the
    caller may not (its identity is malformed, a client's, another
    worker's, or its certificate was refused).
    """

    code = "forbidden"
    status_hint = 403

    def __init__(self, identity: str | None, worker_id: str, *, reason: str | None = None) -> None:
        self.identity = identity
        self.worker_id = worker_id
        if reason is not None:
            message = reason
        elif identity is None:
            message = (
                f"a client certificate with a SPIFFE ID is required to act on worker {worker_id!r}"
            )
        else:
            message = f"identity {identity!r} may not act on worker {worker_id!r}"
        super().__init__(message)


class UnknownCapability(RegistryError):
    """No registered worker, in any state, offers ``(verb, capability)``.

    A typo or a capability never deployed, not an outage: asking again will
    not help until a worker offering it registers (no ``Retry-After``). A
    known pair with no routable worker is not this error: ``route`` answers
    ``None`` for it.
    """

    code = "unknown_capability"
    status_hint = 404

    def __init__(self, verb: str, capability: str) -> None:
        self.verb = verb
        self.capability = capability
        super().__init__(
            f"no registered worker offers verb {verb!r} on capability {capability!r}; "
            "check the spelling against GET /capabilities"
        )


class PolicyDenied(RegistryError):
    """The access policy does not let ``requester`` route to ``(verb, capability)``.

    ``requester`` is ``None`` for an anonymous caller; ``reason`` is the
    rule that decided, in words. Asking again will not help (never
    retried). ``explain``: the route's explanation when it asked for one
    (the workers the policy removed have the reason ``policy``).
    """

    code = "policy_denied"
    status_hint = 403

    def __init__(
        self,
        requester: str | None,
        verb: str,
        capability: str,
        reason: str,
        *,
        explain: RouteExplanation | None = None,
    ) -> None:
        self.requester = requester
        self.verb = verb
        self.capability = capability
        self.reason = reason
        self.explain = explain
        who = "an anonymous caller" if requester is None else repr(requester)
        super().__init__(
            f"the access policy does not let {who} route to {verb}:{capability}: {reason}"
        )


class RevisionCompacted(RegistryError):
    """The changes after ``since`` are no longer kept: read the snapshot again.

    ``oldest`` is the lowest revision the feed still answers.
    """

    code = "revision_compacted"
    status_hint = 410

    def __init__(self, since: int, oldest: int) -> None:
        self.since = since
        self.oldest = oldest
        super().__init__(
            f"since={since} is older than the oldest change kept (the feed answers since >= "
            f"{oldest}): load GET /snapshot again and follow from its revision"
        )


class RevisionReset(RegistryError):
    """``since`` (or the epoch) is not of this registry's history: read the snapshot again.

    ``latest`` is the registry's revision.
    """

    code = "revision_reset"
    status_hint = 410

    def __init__(self, since: int, latest: int, reason: str | None = None) -> None:
        self.since = since
        self.latest = latest
        super().__init__(
            reason
            if reason is not None
            else f"since={since} is beyond the latest revision {latest}: this is another "
            "history of the registry; load GET /snapshot again and follow from its revision"
        )
