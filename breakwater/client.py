"""Breakwater client SDK: `Client` (sync) and `AsyncClient` (async).

Shaped like the OpenAI SDK, so switching is mostly a change of import::

    from breakwater.client import Client

    with Client("http://127.0.0.1:8080") as client:
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        for chunk in client.completions.create(model="m", prompt="Hello", stream=True):
            print(chunk.text, end="")

Resilience: a call has one deadline (`timeout` seconds, overall: attempts, backoff sleeps
and a stream's whole body). 429, 503 and connection failures are retried under a
`RetryPolicy` (full-jitter exponential backoff that honours Retry-After, at most
`max_retries` times, never past the deadline), every attempt under the same X-Request-Id
so the gateway can recognise a retry. A stream is retried only until its first chunk
arrives: after that the caller has seen output and a retry would duplicate it.

Only httpx is imported: the SDK must stay light (no torch, nothing from worker/).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar, overload

import httpx

from breakwater import __version__
from breakwater.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    StreamError,
    error_class,
)
from breakwater.types import ChatCompletion, ChatCompletionChunk, Completion, ModelList

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "Client",
    "RetryPolicy",
    "Stream",
]

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 600.0
DEFAULT_MAX_RETRIES = 2
# Cap on connecting, whatever the deadline: a black-holed host should fail fast enough to
# leave time for a retry.
CONNECT_TIMEOUT = 5.0

Prompt = str | list[str] | list[int] | list[list[int]]
Headers = Mapping[str, str]
Parse = Callable[[Any, str], T]


# --------------------------------------------------------------------------- retry policy


@dataclass
class RetryPolicy:
    """Decides whether a failed attempt is retried, and after how long.

    One instance is shared by every call of a client, so it is the seam for the client-side
    retry budget and adaptive throttling to come: `observe` sees every attempt's outcome,
    `next_delay` is the single decision point.
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    retry_statuses: frozenset[int] = frozenset({429, 503})

    def retryable(self, error: APIError) -> bool:
        if isinstance(error, StreamError):
            return False
        if isinstance(error, APIConnectionError):
            return True
        return error.status in self.retry_statuses

    def backoff(self, retry: int) -> float:
        """Full jitter (uniform in [0, min(cap, base * 2**retry)]) so a crowd of clients
        that failed together does not come back together."""
        return random.uniform(0.0, min(self.max_backoff, self.initial_backoff * 2**retry))

    def next_delay(self, retry: int, error: APIError, remaining: float) -> float | None:
        """Seconds to wait before retry number `retry` (0-based), or None to give up.

        The server's Retry-After wins over our own backoff; a wait that would end past the
        deadline gives up now rather than fail later with less information.
        """
        if retry >= self.max_retries or not self.retryable(error):
            return None
        delay = error.retry_after if error.retry_after is not None else self.backoff(retry)
        return delay if delay < remaining else None

    def observe(self, error: APIError | None) -> None:
        """Called after every attempt (None: it succeeded). A hook for budgets; no-op now."""


# ------------------------------------------------------------------ shared, IO-free pieces


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
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                continue
        if math.isfinite(seconds):
            return max(seconds, 0.0)
    return None


class _Deadline:
    """One call's overall time limit, shared by its attempts, sleeps and stream reads."""

    def __init__(self, timeout: float | None, request_id: str) -> None:
        self._at = math.inf if timeout is None else time.monotonic() + timeout
        self._request_id = request_id

    def remaining(self) -> float:
        return self._at - time.monotonic()

    def check(self) -> None:
        if self.remaining() <= 0:
            raise APITimeoutError("deadline exceeded", request_id=self._request_id)

    def http_timeout(self) -> httpx.Timeout:
        """The timeout for the next attempt: whatever is left of the deadline."""
        self.check()
        left = self.remaining()
        if left == math.inf:
            return httpx.Timeout(None, connect=CONNECT_TIMEOUT)
        return httpx.Timeout(left, connect=min(left, CONNECT_TIMEOUT))


def _error_fields(body: Any) -> dict[str, Any]:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return err
    return {"message": err} if isinstance(err, str) else {}


def _status_error(response: httpx.Response, request_id: str) -> APIError:
    """The typed exception for a non-2xx answer (its body must have been read)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    info = _error_fields(body)
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
    )


def _transport_error(exc: httpx.RequestError, request_id: str) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request timed out ({type(exc).__name__})", request_id=request_id)
    return APIConnectionError(f"{type(exc).__name__}: {exc}", request_id=request_id)


def _parse_json(response: httpx.Response, parse: Parse[T], request_id: str) -> T:
    if not response.is_success:
        raise _status_error(response, request_id)
    try:
        data = response.json()
    except ValueError as exc:
        raise APIError(
            "response is not JSON", status=response.status_code, request_id=request_id
        ) from exc
    return parse(data, request_id)


class _SSEDecoder:
    """Assembles server-sent-event lines into (event, data) pairs; a blank line ends one."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            return self.flush()
        if line.startswith(":"):  # comment / keep-alive
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None

    def flush(self) -> tuple[str, str] | None:
        event, data = self._event, self._data
        self._event, self._data = "", []
        return (event, "\n".join(data)) if data else None


def _decode_event(event: str, data: str, parse: Parse[T], request_id: str) -> T | None:
    """The typed chunk an SSE event carries; None at `[DONE]`; StreamError on an error event."""
    if data.strip() == "[DONE]":
        return None
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise StreamError(f"malformed stream event: {data[:200]!r}", request_id=request_id) from exc
    if event == "error" or (isinstance(obj, dict) and obj.get("error") is not None):
        info = _error_fields(obj)
        raise StreamError(
            str(info.get("message") or "error in stream"),
            type=info.get("type"),
            code=info.get("code"),
            param=info.get("param"),
            request_id=request_id,
            body=obj,
        )
    return parse(obj, request_id)


def _truncated(request_id: str) -> APIConnectionError:
    return APIConnectionError("stream ended before [DONE]", request_id=request_id)


def _iter_chunks(
    lines: Iterator[str], parse: Parse[T], request_id: str, deadline: _Deadline
) -> Iterator[T]:
    decoder = _SSEDecoder()
    try:
        for line in lines:
            deadline.check()
            event = decoder.feed(line)
            if event is None:
                continue
            chunk = _decode_event(*event, parse, request_id)
            if chunk is None:
                for _ in lines:  # read to the end so the connection goes back to the pool
                    deadline.check()
                return
            yield chunk
    except httpx.RequestError as exc:
        raise _transport_error(exc, request_id) from exc
    event = decoder.flush()
    if event is not None and _decode_event(*event, parse, request_id) is None:
        return
    raise _truncated(request_id)


async def _aiter_chunks(
    lines: AsyncIterator[str], parse: Parse[T], request_id: str, deadline: _Deadline
) -> AsyncIterator[T]:
    decoder = _SSEDecoder()
    try:
        async for line in lines:
            deadline.check()
            event = decoder.feed(line)
            if event is None:
                continue
            chunk = _decode_event(*event, parse, request_id)
            if chunk is None:
                async for _ in lines:  # read to the end so the connection goes back to the pool
                    deadline.check()
                return
            yield chunk
    except httpx.RequestError as exc:
        raise _transport_error(exc, request_id) from exc
    event = decoder.flush()
    if event is not None and _decode_event(*event, parse, request_id) is None:
        return
    raise _truncated(request_id)


def _body(model: str, params: Mapping[str, Any], stream: bool, **fields: Any) -> dict[str, Any]:
    """The JSON body; None-valued params are left out so the server applies its defaults."""
    body = {"model": model, **fields, **{k: v for k, v in params.items() if v is not None}}
    if stream:
        body["stream"] = True
    return body


class _BaseClient:
    """Configuration shared by the sync and async clients."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float | None,
        max_retries: int,
        retry_policy: RetryPolicy | None,
        default_headers: Headers | None,
    ) -> None:
        # Accept OpenAI-style ".../v1" base URLs too; paths below carry the /v1 themselves.
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key
        self.timeout = timeout
        self.retry_policy = retry_policy or RetryPolicy(max_retries=max_retries)
        self._headers = httpx.Headers(
            {"User-Agent": f"breakwater-python/{__version__}", "Accept": "application/json"}
        )
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._headers.update(default_headers or {})

    def _prepare(
        self, timeout: float | None, extra_headers: Headers | None
    ) -> tuple[httpx.Headers, str, _Deadline]:
        """Headers, request id and deadline of one call (shared by all its attempts)."""
        headers = self._headers.copy()
        headers["X-Request-Id"] = uuid.uuid4().hex
        headers.update(extra_headers or {})
        request_id = headers["X-Request-Id"]
        return (
            headers,
            request_id,
            _Deadline(self.timeout if timeout is None else timeout, request_id),
        )

    def _give_up_or_wait(self, retry: int, error: APIError, deadline: _Deadline) -> float:
        self.retry_policy.observe(error)
        delay = self.retry_policy.next_delay(retry, error, deadline.remaining())
        if delay is None:
            raise error
        return delay


# --------------------------------------------------------------------------------- sync


class Stream(Generic[T]):
    """The typed chunks of a streamed call. Iterate it; `close()` it (or use `with`) to stop
    early and free the connection."""

    def __init__(self, response: httpx.Response, first: T | None, rest: Iterator[T]) -> None:
        self.response = response
        self.request_id: str = (
            response.headers.get("x-request-id") or response.request.headers["X-Request-Id"]
        )
        self._rest = rest
        self._chunks = itertools.chain(() if first is None else (first,), rest)

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        close = getattr(self._rest, "close", None)  # a generator: run its cleanup now
        if close is not None:
            close()
        self.response.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client(_BaseClient):
    """Synchronous Breakwater client; thread-safe, reuse one per process."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        retry_policy: RetryPolicy | None = None,
        default_headers: Headers | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        """`timeout` is each call's overall deadline in seconds (None: no deadline).
        `retry_policy`, when given, replaces `max_retries`."""
        super().__init__(base_url, api_key, timeout, max_retries, retry_policy, default_headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client()
        self.completions = Completions(self)
        self.chat = Chat(self)
        self.models = Models(self)

    def _retrying(self, attempt: Callable[[httpx.Timeout], R], deadline: _Deadline) -> R:
        # A small loop rather than tenacity: each attempt needs the deadline's remainder as
        # its HTTP timeout, and the only timing left (Retry-After or jitter) is a few lines
        # in RetryPolicy, shared by the sync and async clients.
        for retry in itertools.count():
            try:
                result = attempt(deadline.http_timeout())
            except APIError as error:
                time.sleep(self._give_up_or_wait(retry, error, deadline))
            else:
                self.retry_policy.observe(None)
                return result
        raise AssertionError("unreachable")

    def _request(
        self,
        method: str,
        path: str,
        parse: Parse[T],
        *,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
        extra_headers: Headers | None = None,
    ) -> T:
        headers, request_id, deadline = self._prepare(timeout, extra_headers)

        def attempt(t: httpx.Timeout) -> T:
            try:
                response = self._http.request(
                    method, self.base_url + path, json=body, headers=headers, timeout=t
                )
            except httpx.RequestError as exc:
                raise _transport_error(exc, request_id) from exc
            return _parse_json(response, parse, response.headers.get("x-request-id", request_id))

        return self._retrying(attempt, deadline)

    def _stream(
        self,
        path: str,
        parse: Parse[T],
        body: dict[str, Any],
        timeout: float | None,
        extra_headers: Headers | None,
    ) -> Stream[T]:
        headers, request_id, deadline = self._prepare(timeout, extra_headers)
        headers["Accept"] = "text/event-stream"

        def attempt(t: httpx.Timeout) -> Stream[T]:
            request = self._http.build_request(
                "POST", self.base_url + path, json=body, headers=headers, timeout=t
            )
            try:
                response = self._http.send(request, stream=True)
            except httpx.RequestError as exc:
                raise _transport_error(exc, request_id) from exc
            try:
                if not response.is_success:
                    response.read()
                    raise _status_error(response, request_id)
                rid = response.headers.get("x-request-id", request_id)
                chunks = _iter_chunks(response.iter_lines(), parse, rid, deadline)
                # Read the first chunk inside the attempt: failures before it are retried,
                # failures after it never are.
                first = next(chunks, None)
            except httpx.RequestError as exc:
                response.close()
                raise _transport_error(exc, request_id) from exc
            except BaseException:
                response.close()
                raise
            return Stream(response, first, chunks)

        return self._retrying(attempt, deadline)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Completions:
    """`POST /v1/completions`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @overload
    def create(
        self,
        *,
        model: str,
        prompt: Prompt,
        stream: Literal[False] = False,
        timeout: float | None = None,
        extra_headers: Headers | None = None,
        **params: Any,
    ) -> Completion: ...

    @overload
    def create(
        self,
        *,
        model: str,
        prompt: Prompt,
        stream: Literal[True],
        timeout: float | None = None,
        extra_headers: Headers | None = None,
        **params: Any,
    ) -> Stream[Completion]: ...

    def create(
        self,
        *,
        model: str,
        prompt: Prompt,
        stream: bool = False,
        timeout: float | None = None,
        extra_headers: Headers | None = None,
        **params: Any,
    ) -> Completion | Stream[Completion]:
        """`params` are the OpenAI body fields (max_tokens, temperature, stop, seed, ...);
        `timeout` overrides the client's deadline for this call."""
        body = _body(model, params, stream, prompt=prompt)
        if stream:
            return self._client._stream(
                "/v1/completions", Completion.from_dict, body, timeout, extra_headers
            )
        return self._client._request(
            "POST",
            "/v1/completions",
            Completion.from_dict,
            body=body,
            timeout=timeout,
            extra_headers=extra_headers,
        )


class ChatCompletions:
    """`POST /v1/chat/completions`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @overload
    def create(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        stream: Literal[False] = False,
        timeout: float | None = None,
        extra_headers: Headers | None = None,
        **params: Any,
    ) -> ChatCompletion: ...

    @overload
    def create(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        stream: Literal[True],
        timeout: float | None = None,
        extra_headers: Headers | None = None,
        **params: Any,
    ) -> Stream[ChatCompletionChunk]: ...

    def create(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        stream: bool = False,
        timeout: float | None = None,
        extra_headers: Headers | None = None,
        **params: Any,
    ) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """`params` are the OpenAI body fields; `timeout` overrides the client's deadline."""
        body = _body(model, params, stream, messages=[dict(m) for m in messages])
        if stream:
            return self._client._stream(
                "/v1/chat/completions", ChatCompletionChunk.from_dict, body, timeout, extra_headers
            )
        return self._client._request(
            "POST",
            "/v1/chat/completions",
            ChatCompletion.from_dict,
            body=body,
            timeout=timeout,
            extra_headers=extra_headers,
        )


class Chat:
    def __init__(self, client: Client) -> None:
        self.completions = ChatCompletions(client)


class Models:
    """`GET /v1/models`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self, *, timeout: float | None = None) -> ModelList:
        return self._client._request("GET", "/v1/models", ModelList.from_dict, timeout=timeout)


# -------------------------------------------------------------------------------- async


class AsyncStream(Generic[T]):
    """The typed chunks of a streamed call, asynchronously. `async for` over it; `close()` it
    (or use `async with`) to stop early and free the connection."""

    def __init__(self, response: httpx.Response, first: T | None, rest: AsyncIterator[T]) -> None:
        self.response = response
        self.request_id: str = (
            response.headers.get("x-request-id") or response.request.headers["X-Request-Id"]
        )
        self._first = first
        self._rest = rest

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        try:
            return await anext(self._rest)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        aclose = getattr(self._rest, "aclose", None)
        if aclose is not None:
            await aclose()
        await self.response.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncClient(_BaseClient):
    """Asynchronous Breakwater client; reuse one per event loop."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        retry_policy: RetryPolicy | None = None,
        default_headers: Headers | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        """Same arguments as `Client`."""
        super().__init__(base_url, api_key, timeout, max_retries, retry_policy, default_headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient()
        self.completions = AsyncCompletions(self)
        self.chat = AsyncChat(self)
        self.models = AsyncModels(self)

    async def _retrying(
        self, attempt: Callable[[httpx.Timeout], Awaitable[R]], deadline: _Deadline
    ) -> R:
        # See Client._retrying for why this is a loop and not tenacity.
        for retry in itertools.count():
            try:
                result = await attempt(deadline.http_timeout())
            except APIError as error:
                await asyncio.sleep(self._give_up_or_wait(retry, error, deadline))
            else:
                self.retry_policy.observe(None)
                return result
        raise AssertionError("unreachable")

    async def _request(
        self,
        method: str,
        path: str,
        parse: Parse[T],
        *,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
        extra_headers: Headers | None = None,
    ) -> T:
        headers, request_id, deadline = self._prepare(timeout, extra_headers)

        async def attempt(t: httpx.Timeout) -> T:
            try:
                response = await self._http.request(
                    method, self.base_url + path, json=body, headers=headers, timeout=t
                )
            except httpx.RequestError as exc:
                raise _transport_error(exc, request_id) from exc
            return _parse_json(response, parse, response.headers.get("x-request-id", request_id))

        return await self._retrying(attempt, deadline)

    async def _stream(
        self,
        path: str,
        parse: Parse[T],
        body: dict[str, Any],
        timeout: float | None,
        extra_headers: Headers | None,
    ) -> AsyncStream[T]:
        headers, request_id, deadline = self._prepare(timeout, extra_headers)
        headers["Accept"] = "text/event-stream"

        async def attempt(t: httpx.Timeout) -> AsyncStream[T]:
            request = self._http.build_request(
                "POST", self.base_url + path, json=body, headers=headers, timeout=t
            )
            try:
                response = await self._http.send(request, stream=True)
            except httpx.RequestError as exc:
                raise _transport_error(exc, request_id) from exc
            try:
                if not response.is_success:
                    await response.aread()
                    raise _status_error(response, request_id)
                rid = response.headers.get("x-request-id", request_id)
                chunks = _aiter_chunks(response.aiter_lines(), parse, rid, deadline)
                # See Client._stream: the first chunk decides whether a retry is still safe.
                first = await anext(chunks, None)
            except httpx.RequestError as exc:
                await response.aclose()
                raise _transport_error(exc, request_id) from exc
            except BaseException:
                await response.aclose()
                raise
            return AsyncStream(response, first, chunks)

        return await self._retrying(attempt, deadline)

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncCompletions:
    """`POST /v1/completions`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    @overload
    async def create(
        self,
        *,
        model: str,
        prompt: Prompt,
        stream: Literal[False] = False,
        timeout: float | None = None,
        extra_headers: Headers | None = None,
        **params: Any,
    ) -> Completion: ...

    @overload
    async def create(
        self,
        *,
        model: str,
        prompt: Prompt,
        stream: Literal[True],
        timeout: float | None = None,
        extra_headers: Headers | None = None,
        **params: Any,
    ) -> AsyncStream[Completion]: ...

    async def create(
        self,
        *,
        model: str,
        prompt: Prompt,
        stream: bool = False,
        timeout: float | None = None,
        extra_headers: Headers | None = None,
        **params: Any,
    ) -> Completion | AsyncStream[Completion]:
        """As `Completions.create`."""
        body = _body(model, params, stream, prompt=prompt)
        if stream:
            return await self._client._stream(
                "/v1/completions", Completion.from_dict, body, timeout, extra_headers
            )
        return await self._client._request(
            "POST",
            "/v1/completions",
            Completion.from_dict,
            body=body,
            timeout=timeout,
            extra_headers=extra_headers,
        )


class AsyncChatCompletions:
    """`POST /v1/chat/completions`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    @overload
    async def create(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        stream: Literal[False] = False,
        timeout: float | None = None,
        extra_headers: Headers | None = None,
        **params: Any,
    ) -> ChatCompletion: ...

    @overload
    async def create(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        stream: Literal[True],
        timeout: float | None = None,
        extra_headers: Headers | None = None,
        **params: Any,
    ) -> AsyncStream[ChatCompletionChunk]: ...

    async def create(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        stream: bool = False,
        timeout: float | None = None,
        extra_headers: Headers | None = None,
        **params: Any,
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        """As `ChatCompletions.create`."""
        body = _body(model, params, stream, messages=[dict(m) for m in messages])
        if stream:
            return await self._client._stream(
                "/v1/chat/completions", ChatCompletionChunk.from_dict, body, timeout, extra_headers
            )
        return await self._client._request(
            "POST",
            "/v1/chat/completions",
            ChatCompletion.from_dict,
            body=body,
            timeout=timeout,
            extra_headers=extra_headers,
        )


class AsyncChat:
    def __init__(self, client: AsyncClient) -> None:
        self.completions = AsyncChatCompletions(client)


class AsyncModels:
    """`GET /v1/models`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self, *, timeout: float | None = None) -> ModelList:
        return await self._client._request(
            "GET", "/v1/models", ModelList.from_dict, timeout=timeout
        )
