"""One call from the gateway to a worker: its URL, its span, sending it, reading the answer.

The request path (:mod:`crank_registry_asgi.execute`) decides what happens;
this module does it and names the outcome. The gateway's own errors are made
here: ``worker_failed`` (502) and ``worker_timeout`` (504), as
:class:`~crank_registry_asgi.http.ApiError` (the table of every answer is in
:mod:`crank_registry_asgi.gateway`). :class:`Refused` is not an answer:
nothing reached the worker, so the next one may be tried; when none is left,
:func:`unreachable` is the answer.

Which outcomes are the worker failing, for outlier ejection
(:func:`failed`): :class:`Refused` (the connection was refused or not
accepted in time) and :class:`WorkerFault` (an answer that timed out, a
connection reset or cut off, a 5xx). Any other answer, the worker's 4xx or
one outside the convention included, is the worker answering.

Errors::

    Exception
    ├── Refused             nothing reached the worker: try the next one
    └── ApiError            the gateway's answer (502, 504)
        └── WorkerFault     ... and the worker failed the call
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import httpx
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.responses import Response, StreamingResponse

from crank_registry import NDJSON, FailedAttempt, WorkerEndpoint, invocation_path

from .http import ApiError
from .telemetry import tracer

__all__ = [
    "PassedStream",
    "Refused",
    "WorkerFault",
    "failed",
    "client_span",
    "ending_on_failure",
    "invocation_url",
    "media_type",
    "read_answer",
    "send",
    "stream_through",
    "unreachable",
    "unusable_url",
    "whole_answer",
]


class Refused(Exception):
    """Nothing reached the worker; the next one may be tried."""

    def __init__(self, endpoint: WorkerEndpoint, reason: str, *, timed_out: bool) -> None:
        super().__init__(reason)
        self.endpoint = endpoint
        self.reason = reason
        self.timed_out = timed_out


class WorkerFault(ApiError):
    """The worker failed the call (timed out, reset or cut the connection, answered 5xx)."""


def failed(error: BaseException) -> bool:
    """Whether ``error``, raised by a call, is the worker failing it (ejection counts it)."""
    return isinstance(error, (Refused, WorkerFault))


def invocation_url(worker_url: str, verb: str, capability: str) -> httpx.URL:
    """Where ``(verb, capability)`` is served by the worker registered at ``worker_url``.

    The convention's path goes after the URL's own path; a query stays after
    it (appending to the text would put the path inside the query or the
    fragment), and the fragment, which is never sent, is dropped.
    """
    base = httpx.URL(worker_url)
    path, _, query = base.raw_path.partition(b"?")
    raw_path = path.rstrip(b"/") + invocation_path(verb, capability).encode("ascii")
    if query:
        raw_path += b"?" + query
    return base.copy_with(raw_path=raw_path, fragment=None)


def unusable_url(endpoint: WorkerEndpoint, error: Exception) -> Refused:
    """A URL the registry accepts but httpx cannot use (an IDNA-invalid host, a control character).

    Nothing was sent, so the next worker may be tried.
    """
    return Refused(endpoint, f"unusable worker URL: {_describe(error)}", timed_out=False)


def client_span(
    url: httpx.URL, endpoint: WorkerEndpoint, verb: str, capability: str, attempt: int
) -> trace.Span:
    """The client span of one forward (a child of the current ``POST /execute`` span)."""
    return tracer().start_span(
        f"POST {verb} {capability}",
        kind=SpanKind.CLIENT,
        attributes={
            "http.request.method": "POST",
            "url.full": str(url),
            "crank.worker_id": endpoint.worker_id,
            "crank.verb": verb,
            "crank.capability": capability,
            "crank.attempt": attempt,
        },
    )


async def send(
    client: httpx.AsyncClient,
    endpoint: WorkerEndpoint,
    url: httpx.URL,
    content: bytes,
    span: trace.Span,
) -> httpx.Response:
    """Send the call; the answer's headers are in, its body is still to read.

    Raises :class:`Refused` (``span`` ended) when nothing reached the worker,
    or the :class:`ApiError` that names what went wrong once something may have.
    """
    headers = {"content-type": "application/json", "accept": f"application/json, {NDJSON}"}
    with trace.use_span(span, end_on_exit=False):
        propagate.inject(headers)
    worker = endpoint.worker_id
    try:
        request = client.build_request("POST", url, content=content, headers=headers)
    except (httpx.InvalidURL, ValueError) as error:
        _mark_failed(span, "invalid_url")
        span.end()
        raise unusable_url(endpoint, error) from None
    try:
        return await client.send(request, stream=True)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
        # Nothing was sent: safe to try another worker.
        _mark_failed(span, f"connect: {type(error).__name__}")
        span.end()
        timed_out = not isinstance(error, httpx.ConnectError)
        raise Refused(endpoint, _describe(error), timed_out=timed_out) from None
    except httpx.TimeoutException as error:
        raise _worker_timeout(worker, error) from None
    except httpx.TransportError as error:
        raise _worker_failed(
            worker, f"the connection failed: {_describe(error)}", fault=True
        ) from None


async def read_answer(response: httpx.Response, worker: str, limit: int) -> bytes:
    """The whole body of ``response``; an :class:`ApiError` if it is cut off or over ``limit``."""
    try:
        body = await _read_bounded(response, limit)
    except httpx.TimeoutException as error:
        raise _worker_timeout(worker, error) from None
    except httpx.TransportError as error:
        raise _worker_failed(
            worker, f"the answer was cut off: {_describe(error)}", fault=True
        ) from None
    if body is None:
        raise _worker_failed(worker, f"the answer is larger than {limit} bytes", fault=False)
    return body


def whole_answer(
    response: httpx.Response, body: bytes, worker: str, headers: Mapping[str, str]
) -> Response:
    """A worker's whole answer, passed on as it came, or the ``worker_failed`` it stands for.

    The invocation convention: 200 or 4xx with a JSON body is the worker's
    answer; a 5xx, or anything else, is the worker failing.
    """
    status, kind = response.status_code, media_type(response)
    json_body = kind == "application/json" and _is_json(body)
    if status >= 500:
        fields: dict[str, Any] = {"worker_status": status}
        if json_body:
            fields["worker_error"] = json.loads(body)
        raise _worker_failed(worker, f"the worker answered {status}", fault=True, **fields)
    if not json_body or status not in (200, *range(400, 500)):
        raise _worker_failed(
            worker,
            f"the worker answered {status} {kind or 'without a type'}, "
            "outside the invocation convention",
            fault=False,
            worker_status=status,
        )
    return Response(body, status_code=status, media_type="application/json", headers=headers)


class PassedStream(StreamingResponse):
    """A worker's NDJSON answer passed through; ``broke``: it ended with the gateway's error line.

    (It broke off: the worker went silent or the connection was cut.)
    """

    broke = False


def stream_through(
    response: httpx.Response,
    span: trace.Span,
    worker: str,
    headers: Mapping[str, str],
    *,
    on_end: Callable[[], None] | None = None,
    on_outcome: Callable[[bool], Awaitable[None]] | None = None,
) -> PassedStream:
    """Pass an NDJSON answer through as it arrives; ``span`` ends with it, then ``on_end`` runs.

    ``on_outcome`` is awaited with whether the worker sent the stream to its
    end (``False``: it went silent or the connection was cut); not when the
    caller left first.
    """

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.TimeoutException:
            # The status is sent already: the stream's last line says what happened.
            _mark_failed(span, "worker_timeout")
            passed.broke = True
            yield _error_line("worker_timeout", f"worker {worker!r} went silent mid-stream")
        except httpx.TransportError as error:
            _mark_failed(span, "worker_failed")
            passed.broke = True
            yield _error_line("worker_failed", f"the stream was cut off: {_describe(error)}")
        else:
            if on_outcome is not None:
                await on_outcome(True)
        finally:
            await response.aclose()
            span.end()
            if on_end is not None:
                on_end()
        if passed.broke and on_outcome is not None:
            await on_outcome(False)

    passed = PassedStream(lines(), media_type=NDJSON, headers=headers)
    return passed


@contextlib.contextmanager
def ending_on_failure(span: trace.Span) -> Iterator[None]:
    """End ``span`` when the forward fails, recording an :class:`ApiError`'s code on it."""
    try:
        yield
    except Refused:
        raise  # its span has ended already
    except ApiError as error:
        _mark_failed(span, error.code)
        span.end()
        raise
    except BaseException:
        span.end()
        raise


def _mark_failed(span: trace.Span, reason: str) -> None:
    """Record on ``span`` that the forward failed, and why."""
    span.set_status(Status(StatusCode.ERROR, reason))
    span.set_attribute("error.type", reason)


async def _read_bounded(response: httpx.Response, limit: int) -> bytes | None:
    """The whole body of ``response``, or ``None`` once it grows past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(response: httpx.Response) -> str:
    """The media type of ``response``, lower case, without parameters (``""`` if none)."""
    content_type: str = response.headers.get("content-type", "")
    return content_type.partition(";")[0].strip().lower()


def _is_json(body: bytes) -> bool:
    """Whether ``body`` parses as JSON."""
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _describe(error: Exception) -> str:
    """An exception as a caller reads it: its type, and its message if it has one."""
    detail = str(error)
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def _worker_timeout(worker: str, error: Exception) -> WorkerFault:
    """504 ``worker_timeout``: ``worker`` was sent the call and stayed silent."""
    return WorkerFault(
        504,
        "worker_timeout",
        f"worker {worker!r} did not answer in time ({type(error).__name__})",
        worker_id=worker,
    )


def _worker_failed(worker: str, message: str, *, fault: bool, **fields: Any) -> ApiError:
    """502 ``worker_failed``: ``worker`` was sent the call and did not answer by the convention.

    ``fault``: the worker failed the call (a :class:`WorkerFault`), rather
    than answering outside the convention.
    """
    return (WorkerFault if fault else ApiError)(
        502, "worker_failed", message, worker_id=worker, **fields
    )


def unreachable(verb: str, capability: str, refusals: Sequence[Refused]) -> ApiError:
    """The answer when every worker tried refused: 504 if the last one timed out, else 502."""
    last = refusals[-1]
    attempts = tuple(
        FailedAttempt(worker_id=r.endpoint.worker_id, error=r.reason) for r in refusals
    )
    if last.timed_out:
        return ApiError(
            504,
            "worker_timeout",
            f"worker {last.endpoint.worker_id!r} did not accept the connection in time",
            worker_id=last.endpoint.worker_id,
            attempts=attempts,
        )
    return ApiError(
        502,
        "worker_failed",
        f"no worker for {verb!r} on {capability!r} could be reached ({len(refusals)} tried)",
        worker_id=last.endpoint.worker_id,
        attempts=attempts,
    )


def _error_line(code: str, message: str) -> bytes:
    """The last line of a stream that broke after its status was sent: ``{"error", "message"}``."""
    return json.dumps({"error": code, "message": message}).encode() + b"\n"
