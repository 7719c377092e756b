"""``ControllerClient``: the controller's HTTP API as async methods.

Callers use :meth:`ControllerClient.route` and the listings; the worker agent
uses :meth:`~ControllerClient.register`, :meth:`~ControllerClient.heartbeat`
and :meth:`~ControllerClient.deregister`. Every failure is one of the errors
in :mod:`crank_worker_client._exceptions`. Answers are read into the core's
answer models with its converter: leniently (extra fields are ignored), but
a missing, mistyped or invalid field is :class:`UnexpectedResponse`, never a
``KeyError``.

Several controllers may share one registry (DESIGN, "Shared registry on
Redis"): given several URLs, a request goes to the controller that answered
last, and on to the next (each at most once per request) when one cannot be
reached, does not answer in time or fails with a 5xx answer other than
``store_unavailable`` and ``journal_unavailable``: those say the registry's
shared store is down, which every controller shares, so another would answer
the same. Any other answer is the registry's, from whichever controller.

The listings (:meth:`ControllerClient.workers`, :meth:`ControllerClient.capabilities`)
read every page: while an answer carries ``next_cursor`` they ask again with
``cursor=`` that value, and they send no ``cursor`` on the first request,
so they read a controller that pages and one that answers all at once.
"""

from __future__ import annotations

import email.utils
import functools
import logging
import ssl
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import httpx

from crank_registry import (
    CapabilitiesAnswer,
    CapabilityKey,
    CapabilityView,
    DeregisterAnswer,
    DrainAnswer,
    HealthAnswer,
    HealthState,
    HeartbeatAnswer,
    LoadReport,
    RegisterAnswer,
    Registration,
    RouteExplanation,
    SnapshotAnswer,
    ValidationError,
    WatchAnswer,
    WorkerEndpoint,
    WorkerEntry,
    WorkerLoad,
    WorkersAnswer,
    WorkerState,
    is_worker_id,
    parse_capability_label,
    structure,
    unstructure,
)

from ._config import ControllerURLs, TLSConfig, is_positive_seconds, resolve_controller_urls
from ._exceptions import (
    ClientCertificateRequired,
    ClientError,
    ConfigurationError,
    ControllerError,
    ControllerUnavailable,
    ForbiddenError,
    InvalidRequest,
    NoWorkerAvailable,
    PolicyDenied,
    RateLimited,
    RevisionGone,
    UnexpectedResponse,
    UnknownCapability,
    WorkerNotRegisteredError,
    problems_in,
)
from ._tracing import inject_into_request
from .certificates import DEFAULT_EXPIRY_WARNING, CertificateFiles, asks_for_client_certificate

__all__ = [
    "ControllerClient",
    "ControllerHealth",
    "HeartbeatAck",
    "RegistrationAck",
    "WorkerInfo",
]

logger = logging.getLogger("crank_worker_client")

T = TypeVar("T")

_REFUSAL_STATUSES = frozenset({400, 413, 415, 422})

#: 503 codes that say the shared store is down: every controller would answer the same.
STORE_OUTAGE_CODES = frozenset({"store_unavailable", "journal_unavailable"})


def another_controller_may_answer(error: ControllerUnavailable) -> bool:
    """Whether a failed request is worth sending to the next controller.

    Yes after a network error, a timeout or a 5xx answer; not after a store
    outage (:data:`STORE_OUTAGE_CODES`) nor a 429, which are the shared
    registry's answers.
    """
    if error.status is None:
        return True
    return error.status >= 500 and error.code not in STORE_OUTAGE_CODES


@dataclass(frozen=True)
class RegistrationAck:
    """The controller accepted a registration; heartbeat every ``heartbeat_interval`` s.

    Read from the core's :class:`~crank_registry.RegisterAnswer`.
    """

    worker_id: str
    heartbeat_interval: float
    #: What the controller accepts beyond the base protocol (``load_reports``...);
    #: empty from a controller older than the list.
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class HeartbeatAck:
    """The controller acknowledged a heartbeat at ``timestamp`` (UTC).

    Read from the core's :class:`~crank_registry.HeartbeatAnswer`.
    """

    timestamp: datetime
    heartbeat_interval: float


@dataclass(frozen=True)
class ControllerHealth:
    """``GET /health``: the controller's status and worker counts.

    ``self_preservation``: the controller takes it that it is cut off from
    its workers (an older controller's answer says nothing: ``False``).
    """

    status: str
    total_workers: int
    healthy_workers: int
    self_preservation: bool = False


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as ``GET /workers`` lists it and ``GET /workers/{worker_id}`` answers.

    Read from the core's :class:`~crank_registry.WorkerEntry`.
    ``is_healthy`` means routable now; ``state`` is the first that applies
    of ``draining``, ``ejected`` (until ``ejected_until``, for failing
    calls), then ``health``, the health state alone; ``draining``: it takes
    no new routes; ``capabilities`` are ``(verb, name)`` pairs; ``load`` its
    latest load report (``None``: it sent none).
    """

    worker_id: str
    worker_url: str
    last_heartbeat: datetime
    is_healthy: bool
    state: WorkerState
    capabilities: tuple[CapabilityKey, ...]
    load: WorkerLoad | None = None
    health: HealthState | None = None
    draining: bool = False
    ejected_until: datetime | None = None


class ControllerClient:
    """An async client of the controller's HTTP API.

    ``controller_url`` is one URL, several separated by commas, or a list of
    URLs of controllers that share one registry; it defaults to
    ``CONTROLLER_URL`` from the environment (also comma-separated), then
    ``https://localhost:9000``. With several, a request that fails on one
    controller (network error, timeout, 5xx other than a store outage) is
    sent to the next, each at most once, and the one that answered is asked
    first from then on (:attr:`controller_url`). Only ``https://`` URLs are
    accepted unless ``insecure=True`` is passed. ``tls`` is a
    :class:`TLSConfig` (CA bundle, client certificate and key for mTLS) or a ready
    :class:`ssl.SSLContext`; without it the system trust store verifies the
    controller. With a :class:`TLSConfig`, :attr:`certificates` holds the
    files it was loaded from: its ``check()`` or ``watch()`` loads renewed
    files into the live context (the worker agent watches them), and a
    warning is logged when the client certificate expires within
    ``certificate_expiry_warning`` seconds (7 days). ``transport`` replaces
    httpx's network transport (tests pass ``httpx.MockTransport`` or
    ``httpx.ASGITransport``). ``timeout`` bounds each request to one
    controller, from sending it to reading the whole answer.

    Use it as ``async with ControllerClient() as client:``, or without a
    ``with``: the HTTP connection pool opens on the first request and
    :meth:`aclose` closes it.
    """

    def __init__(
        self,
        controller_url: ControllerURLs = None,
        *,
        tls: TLSConfig | ssl.SSLContext | None = None,
        insecure: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
        certificate_expiry_warning: float = DEFAULT_EXPIRY_WARNING,
    ) -> None:
        if not is_positive_seconds(timeout):
            raise ConfigurationError(f"timeout must be a finite number > 0, got {timeout!r}")
        if not (certificate_expiry_warning == 0 or is_positive_seconds(certificate_expiry_warning)):
            raise ConfigurationError(
                "certificate_expiry_warning must be a finite number of seconds >= 0, "
                f"got {certificate_expiry_warning!r}"
            )
        #: Every controller's base URL, in the order given.
        self.controller_urls = resolve_controller_urls(
            controller_url, insecure=insecure, tls_given=tls is not None
        )
        self._current = 0
        # Certificates are loaded now, so that a missing file fails at construction.
        self.certificates: CertificateFiles | None = None
        if isinstance(tls, TLSConfig) and (tls.certfile is not None or tls.ca_certs is not None):
            self.certificates = CertificateFiles.open(
                tls.ssl_context,
                certfile=tls.certfile,
                keyfile=tls.keyfile,
                ca_certs=tls.ca_certs,
                label="client certificate",
                logger=logger,
                expiry_warning=certificate_expiry_warning,
            )
            self._verify: ssl.SSLContext | bool = self.certificates.context
        else:
            self._verify = (
                tls.ssl_context()
                if isinstance(tls, TLSConfig)
                else tls
                if tls is not None
                else True
            )
        # A ready SSLContext may hold a certificate: only a TLSConfig tells.
        self._lacks_certificate = tls is None or (
            isinstance(tls, TLSConfig) and tls.certfile is None
        )
        self._transport = transport
        self._timeout = timeout
        self._http: httpx.AsyncClient | None = None

    @property
    def controller_url(self) -> str:
        """The controller asked first: the last one that answered (at first, the first given)."""
        return self.controller_urls[self._current]

    async def __aenter__(self) -> ControllerClient:
        self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool; a later request opens a new one."""
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    def _open(self) -> httpx.AsyncClient:
        if self._http is None:
            # No base_url: each request names its controller.
            self._http = httpx.AsyncClient(
                verify=self._verify,
                transport=self._transport,
                timeout=self._timeout,
                event_hooks={"request": [inject_into_request]},
            )
        return self._http

    # -- the caller's API -------------------------------------------------

    async def route(
        self,
        verb: str,
        capability: str,
        *,
        version: str | None = None,
        exclude: Collection[str] | None = None,
        slo_constraints: Mapping[str, float] | None = None,
        budget_tokens: float | None = None,
        strategy: str | None = None,
        affinity_key: str | None = None,
        idempotency_key: str | None = None,
        requester_identity: str | None = None,
        explain: bool = False,
    ) -> WorkerEndpoint:
        """Ask which worker should serve ``verb`` on ``capability``, under the routing options.

        The options (DESIGN, "Routing options") are sent only when given:
        ``version`` a PEP 440 specifier set (``">=1.2,<2"``), ``exclude``
        worker ids not to return, ``slo_constraints``
        (``{"latency_p95_ms": 100, "availability": 0.99}``), ``budget_tokens``,
        ``strategy`` (``"round_robin"``, ``"least_loaded"``, or ``"affinity"``
        with ``affinity_key``), ``idempotency_key``, ``requester_identity``
        (the SPIFFE ID to route for, accepted only from a
        ``--trusted-gateway`` identity). With ``explain`` the endpoint's
        ``explain`` says why each worker was or was not a candidate.

        Raises :class:`NoWorkerAvailable` (with the controller's
        ``retry_after``, and its ``explain`` when asked) when workers offer
        it but none is routable now or meets the options, and
        :class:`UnknownCapability` when no registered worker offers it at all
        (a typo is not an outage: nothing to wait for), :class:`PolicyDenied`
        (with the ``reason``) when the access policy does not let this
        caller route there, and :class:`ForbiddenError` for a
        ``requester_identity`` from a caller that is not a trusted gateway.
        An invalid option is :class:`InvalidRequest` naming it.
        """
        if isinstance(exclude, str):
            raise TypeError("exclude: a collection of worker ids, not one string")
        optional: dict[str, Any] = {
            "version": version,
            "exclude": list(exclude) if exclude is not None else None,
            "slo_constraints": dict(slo_constraints) if slo_constraints is not None else None,
            "budget_tokens": budget_tokens,
            "strategy": strategy,
            "affinity_key": affinity_key,
            "idempotency_key": idempotency_key,
            "requester_identity": requester_identity,
            "explain": explain or None,
        }
        body: dict[str, Any] = {"verb": verb, "capability": capability}
        body.update({key: value for key, value in optional.items() if value is not None})
        return await self._call("POST", "/route", WorkerEndpoint, body)

    async def capabilities(
        self,
        *,
        verb: str | None = None,
        capability: str | None = None,
        state: WorkerState | HealthState | None = None,
        page_size: int | None = None,
    ) -> list[CapabilityView]:
        """``GET /capabilities``: one entry per ``(verb, capability, version)``, every page.

        ``verb`` and ``capability`` choose entries, ``state`` keeps in each
        the workers in that state; ``page_size`` is the ``limit`` of each
        request (the controller's default: 500).
        """
        filters = _listing_params(verb, capability, state, page_size)
        pages = await self._listing("/capabilities", CapabilitiesAnswer, filters)
        return [view for page in pages for view in page.capabilities]

    async def workers(
        self,
        *,
        state: WorkerState | HealthState | None = None,
        verb: str | None = None,
        capability: str | None = None,
        page_size: int | None = None,
    ) -> list[WorkerInfo]:
        """``GET /workers``: the registered workers and their health, every page.

        Filters as the controller's: workers in ``state``, offering a
        capability with that ``verb`` and/or name ``capability``. A worker
        present throughout is listed once, in registration order.
        """
        filters = _listing_params(verb, capability, state, page_size)
        pages = await self._listing("/workers", WorkersAnswer, filters)
        return [_worker_info(entry) for page in pages for entry in page.workers]

    async def get_worker(self, worker_id: str) -> WorkerInfo:
        """``GET /workers/{worker_id}``: one worker, as :meth:`workers` lists it.

        Raises :class:`WorkerNotRegisteredError` when the controller does not
        hold it (never registered, deregistered or evicted), and
        :class:`ConfigurationError` for a ``worker_id`` that is none (it is
        not sent).
        """
        entry = await self._call("GET", _worker_path(worker_id), WorkerEntry)
        return _worker_info(entry)

    async def health(self) -> ControllerHealth:
        """``GET /health``: the controller's status and worker counts."""
        answer = await self._call("GET", "/health", HealthAnswer)
        return ControllerHealth(
            answer.status,
            answer.total_workers,
            answer.healthy_workers,
            answer.self_preservation,
        )

    # -- the change feed --------------------------------------------------

    async def snapshot(self) -> SnapshotAnswer:
        """``GET /snapshot``: the whole registry at one revision of its history (epoch).

        Follow it with :meth:`watch` from its ``epoch`` and ``revision``.
        """
        return await self._call("GET", "/snapshot", SnapshotAnswer)

    async def watch(self, *, since: int, epoch: str | None = None, timeout: float) -> WatchAnswer:
        """``GET /watch``: the changes after ``since``, waiting up to ``timeout`` s for one.

        No change by then: an answer with no events and the current
        revision (a bookmark). The request may take ``timeout`` plus the
        client's own timeout. Raises :class:`RevisionGone` (410) when the
        controller no longer answers from ``since`` of ``epoch``: load
        :meth:`snapshot` again.
        """
        params = {"since": str(since), "timeout": repr(float(timeout))}
        if epoch is not None:
            params["epoch"] = epoch
        return await self._call(
            "GET", "/watch", WatchAnswer, timeout=timeout + self._timeout, params=params
        )

    # -- the worker's API -------------------------------------------------

    async def register(
        self, registration: Registration, *, timeout: float | None = None
    ) -> RegistrationAck:
        """``POST /register``: announce (or replace) a worker and its capabilities.

        ``timeout`` (seconds) replaces the client's request timeout for this call
        (for each controller it is sent to).
        """
        body = unstructure(registration)
        answer = await self._call("POST", "/register", RegisterAnswer, body, timeout)
        return RegistrationAck(answer.worker_id, answer.heartbeat_interval_s, answer.features)

    async def heartbeat(
        self, worker_id: str, *, timeout: float | None = None, load: LoadReport | None = None
    ) -> HeartbeatAck:
        """``POST /heartbeat``; :class:`WorkerNotRegisteredError` means register again.

        ``load``: the worker's load, for a controller that lists the
        ``load_reports`` feature (an older one refuses the field). ``timeout``
        as for :meth:`register`.
        """
        body: dict[str, Any] = {"worker_id": worker_id}
        if load is not None:
            body["load"] = unstructure(load)
        answer = await self._call("POST", "/heartbeat", HeartbeatAnswer, body, timeout)
        return HeartbeatAck(datetime.fromisoformat(answer.timestamp), answer.heartbeat_interval_s)

    async def deregister(self, worker_id: str, *, timeout: float | None = None) -> None:
        """``POST /deregister``: the worker leaves and stops receiving traffic at once.

        ``timeout`` (seconds) replaces the client's request timeout for this call.
        """
        body = {"worker_id": worker_id}
        await self._call("POST", "/deregister", DeregisterAnswer, body, timeout)

    async def drain(self, worker_id: str, *, timeout: float | None = None) -> DrainAnswer:
        """``POST /workers/{worker_id}/drain``: the controller routes no new calls to the worker.

        The worker keeps its registration (and heartbeats) while its calls
        in flight finish; :meth:`undrain` returns it, and so does its next
        registration. Allowed to the worker itself and to the controller's
        operators (``serve --operator``). The answer's ``changed`` is false
        when it was draining already. Raises
        :class:`WorkerNotRegisteredError` for a worker the controller does
        not hold, :class:`ForbiddenError` for a caller that may not, and
        :class:`UnexpectedResponse` (404 ``not_found``) from a controller
        that predates drain (its ``/register`` answer lists no ``drain``
        feature). ``timeout`` replaces the request timeout for this call.
        """
        path = _worker_path(worker_id, "drain")
        return await self._call("POST", path, DrainAnswer, None, timeout)

    async def undrain(self, worker_id: str, *, timeout: float | None = None) -> DrainAnswer:
        """``POST /workers/{worker_id}/undrain``: it takes routes again; raises as :meth:`drain`."""
        path = _worker_path(worker_id, "undrain")
        return await self._call("POST", path, DrainAnswer, None, timeout)

    # -- plumbing ---------------------------------------------------------

    async def _listing(self, path: str, answer: type[T], filters: Mapping[str, str]) -> list[T]:
        """Every page of the listing at ``path``, following ``next_cursor`` until it is absent."""
        pages: list[T] = []
        cursors: set[str] = set()
        params: Mapping[str, str] = filters  # no cursor until the controller gives one
        while True:
            data = await self._fetch("GET", path, params=params)
            pages.append(_read_answer(data, answer, f"GET {path}"))
            cursor = data.get("next_cursor")
            if cursor is None:
                return pages
            if not isinstance(cursor, str) or not cursor or cursor in cursors:
                # A cursor seen before would loop for ever.
                raise UnexpectedResponse(
                    "unexpected_response",
                    200,
                    data,
                    f"GET {path}: the controller's next_cursor {cursor!r} is not a new, "
                    "non-empty string",
                )
            cursors.add(cursor)
            params = {**filters, "cursor": cursor}

    async def _call(
        self,
        method: str,
        path: str,
        answer: type[T],
        body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        *,
        params: Mapping[str, str] | None = None,
    ) -> T:
        """Send the request; its 200 answer read into the model ``answer``."""
        data = await self._fetch(method, path, body, timeout, params)
        return _read_answer(data, answer, f"{method} {path}")

    async def _fetch(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Send the request; its 2xx answer's JSON object, or the error it means.

        With several controllers: to the current one first, then to each of
        the others in turn (at most once) while another may answer.
        """
        what = f"{method} {path}"
        count = len(self.controller_urls)
        first = self._current
        failures: list[ControllerUnavailable] = []
        for step in range(count):
            index = (first + step) % count
            url = self.controller_urls[index]
            try:
                data = await self._fetch_from(
                    url, method, path, body=body, timeout=timeout, params=params
                )
            except ControllerUnavailable as error:
                if another_controller_may_answer(error):
                    failures.append(error)
                    continue
                self._answered(index, failures)
                raise
            except ControllerError:
                self._answered(index, failures)
                raise
            self._answered(index, failures)
            return data
        if count == 1:
            raise failures[0]
        last = failures[-1]
        raise ControllerUnavailable(
            f"{what}: none of the {count} controllers answered: "
            + "; ".join(str(failure) for failure in failures),
            status=last.status,
            code=last.code,
        ) from last

    def _answered(self, index: int, failures: Sequence[ControllerUnavailable]) -> None:
        """Controller ``index`` answered: ask it first from now on, and say so when it changed."""
        if index != self._current:  # so the current one failed first
            logger.warning(
                "controller %s failed (%s); %s answered and is asked first from now on",
                self.controller_url,
                failures[0],
                self.controller_urls[index],
            )
            self._current = index

    async def _fetch_from(
        self,
        url: str,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None,
        timeout: float | None,
        params: Mapping[str, str] | None,
    ) -> dict[str, Any]:
        """Send the request to the controller at ``url``, within the timeout."""
        what = f"{method} {path}"
        http = self._open()
        limit = self._timeout if timeout is None else timeout
        try:
            # httpx times each read and write; this bounds the whole exchange
            # (a controller that trickles its answer, a transport without timeouts).
            with anyio.fail_after(limit):
                response = await http.request(
                    method, url + path, json=body, params=params, timeout=limit
                )
        except TimeoutError:
            raise ControllerUnavailable(
                f"{what}: the controller at {url} did not answer within {limit:g} s"
            ) from None
        except httpx.TransportError as error:
            if await self._refused_for_lack_of_certificate(error, url):
                raise ClientCertificateRequired(
                    f"the controller at {url} requires a client certificate "
                    "(mutual TLS) and closed the connection: this client has none; pass "
                    "tls=TLSConfig(ca_certs=..., certfile=..., keyfile=...) with a certificate "
                    "signed by the controller's CA (crank-registry certs --worker NAME)"
                ) from error
            raise ControllerUnavailable(
                f"cannot reach the controller at {url}: {_reason(error)}"
            ) from error
        if len(self.controller_urls) > 1:
            what = f"{what} at {url}"
        if response.is_success:
            data = _json_object(response)
            if data is None:
                raise UnexpectedResponse(
                    "unexpected_response",
                    response.status_code,
                    {},
                    f"{what}: the controller answered {response.status_code} without a JSON object",
                )
            return data
        raise error_from_response(response, what)

    async def _refused_for_lack_of_certificate(
        self, error: httpx.TransportError, controller_url: str
    ) -> bool:
        """Whether a connection closed during or right after the handshake was a refusal.

        A controller that requires a client certificate and gets none may
        close the connection without a TLS alert; only its handshake tells.
        Looked at only when this client presents no certificate over HTTPS.
        """
        if not self._lacks_certificate or self._transport is not None:
            return False
        if not isinstance(error, httpx.RemoteProtocolError) and not (
            _closed_by_the_server_in_handshake(error)
        ):
            return False
        url = httpx.URL(controller_url)
        if url.scheme != "https":
            return False
        port = url.port or 443
        return await anyio.to_thread.run_sync(
            functools.partial(asks_for_client_certificate, url.host, port, timeout=self._timeout)
        )


def _closed_by_the_server_in_handshake(error: BaseException) -> bool:
    """Whether the server ended the TLS handshake: it closed or reset it, or sent an alert.

    Under TLS 1.3 the server checks the client's certificate after the client
    has finished its side of the handshake, so a refusal may also arrive as a
    reset on the first read. A certificate this client does not trust is not
    that: it says so itself.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return False
        if isinstance(current, (ssl.SSLEOFError, ConnectionResetError)) or (
            isinstance(current, ssl.SSLError) and "ALERT" in (current.reason or "")
        ):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _read_answer(data: dict[str, Any], answer: type[T], what: str) -> T:
    """A 2xx answer's JSON object read into the core's model ``answer`` (unknown fields ignored)."""
    try:
        return structure(data, answer)
    except ValidationError as error:
        raise UnexpectedResponse(
            "unexpected_response",
            200,
            data,
            f"{what}: the controller's answer is not valid: {error}",
        ) from None


def _explanation(data: Any) -> RouteExplanation | None:
    """An error answer's ``explain`` (503 ``no_worker_available``, 403 ``policy_denied``).

    ``None`` unless it carries a valid one (an error answer is read leniently).
    """
    if data is None:
        return None
    try:
        return structure(data, RouteExplanation)
    except ValidationError:
        return None


def error_from_response(response: httpx.Response, what: str) -> ClientError:
    """The :class:`ClientError` for an error answer to ``what`` (e.g. ``"POST /route"``)."""
    status = response.status_code
    body = _json_object(response) or {}
    raw_code = body.get("error")
    code = raw_code if isinstance(raw_code, str) else None
    if code == "no_worker_available":
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        wait = "" if retry_after is None else f"; retry after {retry_after:g} s"
        target = f"{body.get('verb', '?')}:{body.get('capability', '?')}"
        return NoWorkerAvailable(
            code,
            status,
            body,
            f"{what}: no worker available for {target}{wait}",
            retry_after=retry_after,
            explain=_explanation(body.get("explain")),
        )
    if code == "policy_denied":
        target = f"{body.get('verb', '?')}:{body.get('capability', '?')}"
        why = body.get("reason")
        return PolicyDenied(
            code,
            status,
            body,
            f"{what}: the access policy denies routing to {target}"
            + (f": {why}" if isinstance(why, str) else _controller_reason(body)),
            explain=_explanation(body.get("explain")),
        )
    if code == "unknown_capability":
        target = f"{body.get('verb', '?')}:{body.get('capability', '?')}"
        return UnknownCapability(
            code,
            status,
            body,
            f"{what}: no registered worker offers {target} (unknown capability: "
            "check the verb and capability names)",
        )
    reason = _controller_reason(body)
    if status >= 500 or status == 429:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        unavailable = RateLimited if code == "rate_limited" else ControllerUnavailable
        return unavailable(
            f"{what}: the controller answered {status}{f' {code}' if code else ''}{reason}"
            + ("" if retry_after is None else f"; retry after {retry_after:g} s"),
            status=status,
            code=code,
            retry_after=retry_after,
        )
    if code is None:
        return UnexpectedResponse(
            "unexpected_response",
            status,
            body,
            f"{what}: the controller answered {status} without an error code",
        )
    message = f"{what}: the controller answered {status} {code}{reason}"
    if code == "worker_not_registered":
        return WorkerNotRegisteredError(code, status, body, message)
    if code == "forbidden":
        return ForbiddenError(code, status, body, message)
    if status == 410 and code in ("revision_compacted", "revision_reset"):
        return RevisionGone(code, status, body, message)
    if status in _REFUSAL_STATUSES:
        return InvalidRequest(code, status, body, message)
    return UnexpectedResponse(code, status, body, message)


def _controller_reason(body: Mapping[str, Any]) -> str:
    """``": "`` and the controller's own account of an error answer, or ``""``.

    A ``detail`` list of problems says the most (every ``path: message``);
    otherwise the ``message`` field, which the controller sends with every error.
    """
    problems = problems_in(body)
    if problems:
        return ": " + "; ".join(str(problem) for problem in problems)
    text = body.get("message")
    if isinstance(text, str) and text.strip():
        return ": " + text.strip()
    return ""


def _reason(error: BaseException) -> str:
    """The error's type and the first non-empty message down its chain of causes.

    Some network errors carry no message of their own (an httpx ``ConnectError``
    wrapping a TLS failure under trio); the cause says what happened.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if str(current):
            return f"{type(error).__name__}: {current}"
        current = current.__cause__ or current.__context__
    return type(error).__name__


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date; ``None`` if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return data if isinstance(data, dict) else None


def _health_of(entry: WorkerEntry) -> HealthState | None:
    """An entry's health state; a controller from before drain lists none: its state is it."""
    if entry.health is not None or entry.state in (WorkerState.DRAINING, WorkerState.EJECTED):
        return entry.health
    return HealthState(entry.state.value)


def _worker_info(entry: WorkerEntry) -> WorkerInfo:
    """A ``/workers`` entry (or the ``/workers/{worker_id}`` answer) as the client's value."""
    return WorkerInfo(
        worker_id=entry.worker_id,
        worker_url=entry.worker_url,
        last_heartbeat=datetime.fromisoformat(entry.last_heartbeat),
        is_healthy=entry.is_healthy,
        state=entry.state,
        capabilities=tuple(parse_capability_label(label) for label in entry.capabilities),
        load=entry.load,
        health=_health_of(entry),
        draining=entry.draining,
        ejected_until=(
            None if entry.ejected_until is None else datetime.fromisoformat(entry.ejected_until)
        ),
    )


def _worker_path(worker_id: str, action: str | None = None) -> str:
    """The path of ``worker_id`` (and of its ``action``); a worker id that is none is refused here.

    (``.`` and ``..`` are worker ids a path would not carry: they are
    path segments of their own.)
    """
    if not is_worker_id(worker_id) or worker_id in (".", ".."):
        raise ConfigurationError(
            f"worker_id must be 1 to 128 letters, digits, '.', '_' and '-', got {worker_id!r}"
        )
    path = f"/workers/{worker_id}"
    return path if action is None else f"{path}/{action}"


def _listing_params(
    verb: str | None,
    capability: str | None,
    state: WorkerState | HealthState | None,
    page_size: int | None,
) -> dict[str, str]:
    """The query of a listing: only the parameters given."""
    given = {
        "verb": verb,
        "capability": capability,
        "state": None if state is None else state.value,
        "limit": None if page_size is None else str(page_size),
    }
    return {name: value for name, value in given.items() if value is not None}
