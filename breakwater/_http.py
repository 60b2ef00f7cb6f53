"""One API call over HTTP without IO: the request it sends and what its answers mean.

A resource describes a call once (`Call`); a client prepares it (`Exchange`: headers,
request id, deadline) and does only the IO, so request building, Retry-After parsing and
error mapping are shared by the sync and async clients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Generic, TypeVar

import httpx

from breakwater._retry import Deadline
from breakwater._sse import ChunkDecoder
from breakwater.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    error_class,
    error_fields,
)

T = TypeVar("T")

Headers = Mapping[str, str]
Parse = Callable[[Any, str], T]


def retry_after_seconds(headers: Headers) -> float | None:
    """`retry-after-ms` (precise) over `Retry-After` (seconds or an HTTP date); None if absent."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            try:
                when = parsedate_to_datetime(value)
            except (TypeError, ValueError):
                continue
            if when.tzinfo is None:  # asctime or a "-0000" zone: HTTP dates are all GMT
                when = when.replace(tzinfo=UTC)
            seconds = when.timestamp() - time.time()
        if math.isfinite(seconds):
            return max(seconds, 0.0)
    return None


def status_error(response: httpx.Response, request_id: str) -> APIError:
    """The typed exception for a non-2xx answer (its body must have been read)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    info = error_fields(body)
    message = info.get("message") or response.text or response.reason_phrase or "HTTP error"
    return error_class(response.status_code)(
        str(message),
        status=response.status_code,
        type=info.get("type"),
        code=info.get("code"),
        param=info.get("param"),
        request_id=response.headers.get("x-request-id", request_id),
        retry_after=retry_after_seconds(response.headers),
        body=body,
        should_retry=_should_retry(response.headers),
    )


def _should_retry(headers: Headers) -> bool | None:
    """The server's `x-should-retry` (true/false), as the openai SDK reads it."""
    value = headers.get("x-should-retry")
    return {"true": True, "false": False}.get(value.lower()) if value else None


def failure(exc: BaseException, request_id: str) -> APIError:
    """The APIError a failed attempt or read amounts to. Anything else (a cancellation, a
    bug) is no failure of the call's and is raised again, never retried."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, httpx.TimeoutException):
        error: APIError = APITimeoutError(
            f"request timed out ({type(exc).__name__})", request_id=request_id
        )
    elif isinstance(exc, httpx.RequestError):
        error = APIConnectionError(f"{type(exc).__name__}: {exc}", request_id=request_id)
    else:
        raise exc
    error.__cause__ = exc
    return error


@contextmanager
def transport_errors(request_id: str) -> Iterator[None]:
    """Reading a stream's body: httpx's transport failures as the SDK's own."""
    try:
        yield
    except httpx.RequestError as exc:
        raise failure(exc, request_id) from exc


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call as data, built by a resource and carried out by either client."""

    method: str
    path: str
    parse: Parse[T]
    body: dict[str, Any] | None = None
    stream: bool = False
    timeout: float | None = None
    extra_headers: Headers | None = None
    query: Mapping[str, Any] | None = None
    """URL query parameters (`extra_query`)."""

    @classmethod
    def post(
        cls,
        path: str,
        parse: Parse[T],
        model: str,
        stream: bool,
        params: dict[str, Any],
        **fields: Any,
    ) -> Call[T]:
        """A completion call; `params` are `timeout`, `extra_headers`, `extra_query`,
        `extra_body` and the OpenAI body fields, of which None-valued ones are left out so
        the server applies its defaults. `extra_body`'s fields are merged into the body over
        all others, as the openai SDK does (e.g. `extra_body={"ignore_eos": True}`)."""
        timeout, headers = params.pop("timeout", None), params.pop("extra_headers", None)
        query, extra = params.pop("extra_query", None), params.pop("extra_body", None)
        body = {"model": model, **fields, **{k: v for k, v in params.items() if v is not None}}
        if stream:
            body["stream"] = True
        body.update(extra or {})
        return cls("POST", path, parse, body, stream, timeout, headers, query)


RETRY_COUNT_HEADER = "X-Retry-Count"
SSE = "text/event-stream"


def _content_type(response: httpx.Response) -> str:
    """The media type alone, lower-cased ("" if none)."""
    return response.headers.get("content-type", "").partition(";")[0].strip().lower()


@dataclass(frozen=True)
class Exchange(Generic[T]):
    """A call prepared for sending: what all its attempts share."""

    call: Call[T]
    url: str
    headers: httpx.Headers
    deadline: Deadline

    @property
    def request_id(self) -> str:
        return self.deadline.request_id

    def retried(self) -> None:
        """The next attempt is a retry: say so (`X-Retry-Count`, as the openai SDK's
        `x-stainless-retry-count`), so the gateway can hold retries to a budget."""
        n = int(self.headers.get(RETRY_COUNT_HEADER, "0")) + 1
        self.headers[RETRY_COUNT_HEADER] = str(n)

    def request(
        self, http: httpx.Client | httpx.AsyncClient, timeout: httpx.Timeout
    ) -> httpx.Request:
        """One attempt's request; `http` adds its own defaults (auth, cookies, ...)."""
        return http.build_request(
            self.call.method,
            self.url,
            params=self.call.query,
            json=self.call.body,
            headers=self.headers,
            timeout=timeout,
        )

    def streams(self, response: httpx.Response) -> bool:
        """Whether to read `response` as a stream of chunks rather than read it whole: only
        a streamed call's 2xx event stream. Anything else is read whole (which frees the
        connection) and `result` says what it amounts to."""
        return self.call.stream and response.is_success and _content_type(response) == SSE

    def result(self, response: httpx.Response) -> T:
        """The typed result of a response read whole, or the APIError it amounts to."""
        if not response.is_success:
            raise status_error(response, self.request_id)
        request_id = response.headers.get("x-request-id", self.request_id)
        try:
            data = response.json()
        except ValueError as exc:
            if self.call.stream:
                raise self._not_a_stream(response, request_id, None) from exc
            raise APIError(
                "response is not JSON", status=response.status_code, request_id=request_id
            ) from exc
        if self.call.stream:
            raise self._not_a_stream(response, request_id, data)
        return self.call.parse(data, request_id)

    def _not_a_stream(self, response: httpx.Response, request_id: str, body: Any) -> APIError:
        """A streamed call answered 2xx without an event stream (a server or proxy that
        ignored `"stream": true`). Read as a stream it would look empty, i.e. cut short,
        and be retried, regenerating the whole answer each time: it is not retryable."""
        kind = _content_type(response) or "no content type"
        return APIError(
            f"expected {SSE} in answer to a stream request, got {kind}",
            status=response.status_code,
            request_id=request_id,
            body=body,
        )

    def decoder(self, response: httpx.Response) -> ChunkDecoder[T]:
        request_id = response.headers.get("x-request-id", self.request_id)
        return ChunkDecoder(self.call.parse, request_id, self.deadline)
