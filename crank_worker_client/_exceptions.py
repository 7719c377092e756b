"""The client's errors.

One root, :class:`ClientError`; what went wrong decides the branch::

    ClientError
    ├── ConfigurationError          a bad URL, TLS setting or registration (also ValueError)
    │   └── ClientCertificateRequired  the controller requires a client certificate (mTLS)
    ├── ControllerUnavailable       network error, timeout, 5xx or 429 (.status .code .retry_after)
    │   └── RateLimited             429 rate_limited: the caller's rate limit (.retry_after)
    ├── ControllerError             the controller answered with an error: .code .status .body
    │   ├── NoWorkerAvailable       503 no_worker_available (.retry_after, .explain)
    │   ├── UnknownCapability       404 unknown_capability: no worker offers it at all
    │   ├── PolicyDenied            403 policy_denied: the access policy refuses it (.reason)
    │   ├── WorkerNotRegisteredError  404 worker_not_registered
    │   ├── ForbiddenError          403 forbidden (the mTLS identity is not this worker)
    │   ├── RevisionGone            410 revision_compacted or revision_reset: load /snapshot again
    │   ├── InvalidRequest          400/413/415/422: invalid_request, ... (.problems)
    │   └── UnexpectedResponse      an answer outside the protocol (wrong URL, bad body)
    └── RegistrationFailed          the agent could not register at start-up (deadline or refusal)

``ControllerUnavailable`` is the only transient error: the worker agent
retries it with backoff, and a caller may too. Everything under
``ControllerError`` is an answer the controller meant; repeating the same
request gets the same answer (except ``NoWorkerAvailable``, whose
``retry_after`` says when a worker may be back). ``UnknownCapability`` is
not an outage: no registered worker offers the pair (a typo, or nothing
deployed), so nothing here waits for it or retries it; nor ``PolicyDenied``:
the access policy's answer changes only when an operator changes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from crank_registry import Problem, RouteExplanation, ValidationError, structure

__all__ = [
    "ClientCertificateRequired",
    "ClientError",
    "ConfigurationError",
    "ControllerError",
    "ControllerUnavailable",
    "ForbiddenError",
    "InvalidRequest",
    "NoWorkerAvailable",
    "PolicyDenied",
    "RateLimited",
    "RegistrationFailed",
    "RevisionGone",
    "UnexpectedResponse",
    "UnknownCapability",
    "WorkerNotRegisteredError",
]


class ClientError(Exception):
    """Root of the errors raised by ``crank_worker_client``."""


class ConfigurationError(ClientError, ValueError):
    """An argument the client cannot work with, found at construction."""


class ClientCertificateRequired(ConfigurationError):
    """The controller requires a client certificate (mutual TLS) and this client has none.

    Raised by a request, not at construction: the controller closed the
    connection, and its TLS handshake asked for a certificate. Retrying does
    not help; pass ``TLSConfig(certfile=..., keyfile=...)``.
    """


class ControllerUnavailable(ClientError):
    """The controller could not be reached or failed (5xx); the request may be retried.

    ``status`` is the HTTP status of a 5xx answer, ``None`` for a network error
    or a timeout (then ``__cause__`` is the httpx exception). ``code`` is the
    answer's ``error`` field (``store_unavailable``...), ``None`` without one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        #: The answer's ``Retry-After`` in seconds (``None`` when it sent none).
        self.retry_after = retry_after


class RateLimited(ControllerUnavailable):
    """The controller refused the call for its caller's rate limit (429 ``rate_limited``).

    ``retry_after``: the seconds until the caller's next token. Another
    controller is not asked instead: the limit is the caller's, not one
    controller's trouble.
    """


class ControllerError(ClientError):
    """The controller answered with an error.

    ``code`` is the stable ``error`` field of the JSON body
    (``"unexpected_response"`` when the answer had none), ``status`` the HTTP
    status and ``body`` the decoded JSON object (empty when it was not one).
    """

    def __init__(self, code: str, status: int, body: Mapping[str, Any], message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.body: Mapping[str, Any] = body


class NoWorkerAvailable(ControllerError):
    """No routable worker offers the capability, or none meets the route's options (503).

    ``retry_after`` is the controller's ``Retry-After`` in seconds (``None``
    when it sent none): about when a worker may be routable again.
    ``explain``: why each worker was removed, for a route that asked
    ``explain=True`` (else ``None``).
    """

    def __init__(
        self,
        code: str,
        status: int,
        body: Mapping[str, Any],
        message: str,
        *,
        retry_after: float | None,
        explain: RouteExplanation | None = None,
    ) -> None:
        super().__init__(code, status, body, message)
        self.retry_after = retry_after
        self.explain = explain


class UnknownCapability(ControllerError):
    """No registered worker, in any state, offers the verb and capability (404).

    A typo or a capability never deployed: asking again gets the same
    answer until a worker offering it registers. ``verb`` and
    ``capability`` are what the controller says was asked for.
    """

    @property
    def verb(self) -> str | None:
        """The verb asked for, as the controller's answer names it."""
        value = self.body.get("verb")
        return value if isinstance(value, str) else None

    @property
    def capability(self) -> str | None:
        """The capability asked for, as the controller's answer names it."""
        value = self.body.get("capability")
        return value if isinstance(value, str) else None


class PolicyDenied(ControllerError):
    """The access policy does not let this caller route to the verb and capability (403).

    ``reason`` is the controller's account of the rule that decided (a
    worker's ``required_capabilities``, a ``--policy`` rule, its default);
    ``explain``, when the route asked for it, the workers the policy removed.
    Never retried: asking again gets the same answer.
    """

    def __init__(
        self,
        code: str,
        status: int,
        body: Mapping[str, Any],
        message: str,
        *,
        explain: RouteExplanation | None = None,
    ) -> None:
        super().__init__(code, status, body, message)
        self.explain = explain

    @property
    def reason(self) -> str | None:
        """Why the policy denied the route, as the controller's answer says."""
        value = self.body.get("reason")
        return value if isinstance(value, str) else None


class WorkerNotRegisteredError(ControllerError):
    """The controller does not know the worker (unknown, evicted or restored, 404)."""


class ForbiddenError(ControllerError):
    """The caller's certificate identity may not act on this worker record (403)."""


class RevisionGone(ControllerError):
    """``GET /watch`` cannot continue from the revision held (410): load ``/snapshot`` again.

    ``code`` says why: ``revision_compacted`` (the changes after it are no
    longer kept) or ``revision_reset`` (another history: another epoch, or
    a revision beyond the latest).
    """


class InvalidRequest(ControllerError):
    """The controller refused the request's content (400, 413, 415 or 422).

    ``problems`` lists the controller's ``detail`` entries as
    :class:`crank_registry.Problem` values (path and message), when it sent any.
    """

    @property
    def problems(self) -> tuple[Problem, ...]:
        """The controller's ``detail`` as ``Problem(path, message)`` values."""
        return problems_in(self.body)


def problems_in(body: Mapping[str, Any]) -> tuple[Problem, ...]:
    """The ``detail`` list of an error body as ``Problem(path, message)`` values.

    Read with the core's converter; a ``detail`` that is not a list of
    problems gives none.
    """
    try:
        return structure(body.get("detail", ()), tuple[Problem, ...])
    except ValidationError:
        return ()


class UnexpectedResponse(ControllerError):
    """An answer outside the protocol: not JSON, missing fields, an unknown path."""


class RegistrationFailed(ClientError):
    """The worker agent could not register when it started.

    Either the controller stayed unreachable until the registration deadline
    (``__cause__`` is the last :class:`ControllerUnavailable`) or it refused
    the registration (``__cause__`` is the :class:`ControllerError`, or
    :class:`ClientCertificateRequired` when it requires a client certificate).
    """
