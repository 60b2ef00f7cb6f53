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
and reading a body or a stream's whole body). 429, 503, connection failures and any answer
with `x-should-retry: true` are retried under a `RetryPolicy` (full-jitter exponential
backoff that honours Retry-After up to `max_retry_after`, at most `max_retries` times, never
past the deadline; `x-should-retry: false` is never retried), every attempt under the same
X-Request-Id so the gateway can recognise a retry. A stream is retried only until its first chunk
arrives: after that the caller has seen output and a retry would duplicate it. A cancelled
call is never retried.

So that a fleet of clients cannot turn an outage into a retry storm, each client also keeps
a retry budget (retries add at most 20% extra attempts over a sliding window, with a floor
of 10 per window; past it a call fails fast with its last error) and throttles itself
adaptively (the SRE book's max(0, (requests - K*accepts) / (requests + 1)), K=2, once 5
requests are in its window; an attempt cut by the caller's own deadline is not counted):
once the gateway refuses most requests, most calls fail locally with
`ClientThrottledError`, without touching the network. Both are per client and set on
`RetryPolicy`; `client.stats()` counts calls, attempts, retries and local rejections.

Both clients are thin faces over one IO-free implementation (`_resources`, `_http`, `_retry`,
`_sse`): a face only sends, reads and sleeps. Only httpx is imported: the SDK must stay light
(no torch, nothing from worker/).
"""

from __future__ import annotations

import asyncio
import math
import socket
import ssl
import threading
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterator,
)
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import Any, Generic, Self, TypeVar

import httpx

from breakwater import __version__
from breakwater._http import Call, Exchange, Headers, failure, transport_errors
from breakwater._http import Parse as Parse
from breakwater._http import retry_after_seconds as retry_after_seconds
from breakwater._resources import Chat, ChatCompletions, Completions, Models
from breakwater._resources import Prompt as Prompt
from breakwater._retry import CONNECT_TIMEOUT as CONNECT_TIMEOUT
from breakwater._retry import DEFAULT_MAX_RETRIES, Deadline, Done, RetryPolicy, RetryState
from breakwater._shedding import AdaptiveThrottle, RetryBudget
from breakwater._sse import ChunkDecoder
from breakwater.errors import APIConnectionError as APIConnectionError
from breakwater.errors import APIError
from breakwater.errors import APITimeoutError as APITimeoutError
from breakwater.errors import ClientThrottledError as ClientThrottledError
from breakwater.errors import StreamError as StreamError
from breakwater.errors import error_class as error_class
from breakwater.types import ChatCompletion, ChatCompletionChunk, ClientStats, Completion, ModelList

__all__ = [
    "AdaptiveThrottle",
    "AsyncClient",
    "AsyncStream",
    "Client",
    "ClientStats",
    "RetryBudget",
    "RetryPolicy",
    "Stream",
]
# Names this module had before the faces shared one implementation stay importable: these
# and the `import X as X` re-exports above.
AsyncCompletions, AsyncChatCompletions = Completions, ChatCompletions
AsyncChat, AsyncModels = Chat, Models

T = TypeVar("T")
H = TypeVar("H", httpx.Client, httpx.AsyncClient)
G = TypeVar("G")
Co = Coroutine[Any, Any, T]

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 600.0


class _BaseClient(Generic[H]):
    """Configuration and retry state; a face adds its httpx client, lock and IO."""

    _new_http: Callable[..., H]
    _new_lock: Callable[[], AbstractContextManager[Any]]
    _call: Callable[[Call[Any]], Any]  # the face's IO: a result, or (async) a coroutine of one
    completions: Completions[Any, Any]
    chat: Chat[Any, Any]
    models: Models[Any]

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        retry_policy: RetryPolicy | None = None,
        default_headers: Headers | None = None,
        http_client: H | None = None,
        verify: bool | str | ssl.SSLContext = True,
    ) -> None:
        """`timeout` is each call's overall deadline in seconds (None: no deadline).
        `retry_policy`, when given, replaces `max_retries`; it also sets the retry budget
        and adaptive throttling (e.g. `RetryPolicy(budget_ratio=0.1, throttle_k=None)`),
        whose state belongs to this client alone. `verify` applies to https:// gateways:
        True (the system's CAs), a CA bundle file for a private CA, or an SSLContext (e.g.
        with a client certificate loaded, for mTLS); ignored with `http_client`."""
        # Accept OpenAI-style ".../v1" base URLs too; paths carry the /v1 themselves.
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key
        self.timeout = timeout
        policy = retry_policy or RetryPolicy(max_retries=max_retries)
        self._guard = RetryState(policy, self._new_lock())
        self._headers = httpx.Headers(
            {"User-Agent": f"breakwater-python/{__version__}", "Accept": "application/json"}
        )
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._headers.update(default_headers or {})
        self._owns_http = http_client is None
        if isinstance(verify, str):
            verify = ssl.create_default_context(cafile=verify)
        self._http: H = http_client or self._new_http(verify=verify)
        self.completions = Completions(self)
        self.chat = Chat(self)
        self.models = Models(self)

    def _prepare(self, call: Call[T]) -> Exchange[T]:
        """Headers, request id and deadline of one call (shared by all its attempts)."""
        headers = self._headers.copy()
        headers["X-Request-Id"] = uuid.uuid4().hex
        headers.update(call.extra_headers or {})
        if call.stream:
            headers["Accept"] = "text/event-stream"
        timeout = self.timeout if call.timeout is None else call.timeout
        deadline = Deadline(timeout, headers["X-Request-Id"])
        return Exchange(call, self.base_url + call.path, headers, deadline)

    @property
    def retry_policy(self) -> RetryPolicy:
        """Read-only: the client's budget and throttle were built from it."""
        return self._guard.policy

    def stats(self) -> ClientStats:
        """Retry accounting since this client was made (e.g. its retry amplification)."""
        return self._guard.stats()


class _BaseStream(Generic[T, G]):
    """A streamed call's response, and its first chunk: the attempt that opened the stream
    read it, so that failures before it are retried and failures after it never are."""

    def __init__(self, response: httpx.Response, first: T | None, rest: G) -> None:
        self.response = response
        self.request_id: str = (
            response.headers.get("x-request-id") or response.request.headers["X-Request-Id"]
        )
        self._first = [] if first is None else [first]
        self._rest = rest


class Stream(_BaseStream[T, Generator[T, None, None]]):
    """The typed chunks of a streamed call. Iterate it; `close()` it (or use `with`) to stop
    early and free the connection."""

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        try:
            return self._first.pop() if self._first else next(self._rest)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._rest.close()  # run the generator's cleanup now
        self.response.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(_BaseStream[T, AsyncGenerator[T, None]]):
    """The typed chunks of a streamed call, asynchronously. `async for` over it; `close()` it
    (or use `async with`) to stop early and free the connection."""

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return self._first.pop() if self._first else await anext(self._rest)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await self._rest.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Watchdog:
    """Ends a body's reads at the call's deadline (sync client).

    httpx applies its read timeout to each read, fixed when the attempt began, so a body
    that trickles, or a stream that falls silent after a late chunk, would hold the call
    past its deadline (up to twice it, or without end), and httpx cannot shorten it
    mid-body. At the deadline this shuts the response's socket down, which wakes a blocked
    recv (closing it would not, on Linux), and `reading` turns the read's failure into
    "deadline exceeded". A threading.Timer per response read under a deadline: simpler
    than one shared thread keeping a heap of deadlines, and its thread, gone with the body,
    costs little next to an inference call.
    """

    def __init__(self, response: httpx.Response, deadline: Deadline) -> None:
        self._response = response
        self._deadline = deadline
        self.fired = False
        self.done = False
        left = deadline.remaining()
        self._timer: threading.Timer | None = None
        if left != math.inf:  # no deadline, no watchdog
            self._timer = threading.Timer(max(left, 0.0), self._fire)
            self._timer.name = "breakwater-deadline"
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        if self._response.is_closed:  # read whole, its connection perhaps already reused
            return
        stream = self._response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        # No socket (a mock transport), or one that HTTP/2 shares with other calls: httpx's
        # timeouts only.
        if sock is None or not self._response.http_version.startswith("HTTP/1"):
            return
        self.fired = True
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def finishing(self, grace: float) -> bool:
        """The stream said `[DONE]`: from now the watchdog ends the body's reads within
        `grace` seconds (or at the deadline, if sooner), and a read it ends is no failure.
        False where it cannot end a read (no socket of its own): stop reading at once."""
        stream = self._response.extensions.get("network_stream")
        if stream is None or stream.get_extra_info("socket") is None:
            return False
        self.cancel()
        self.done = True
        self._timer = threading.Timer(max(0.0, min(grace, self._deadline.remaining())), self._fire)
        self._timer.name = "breakwater-deadline"
        self._timer.daemon = True
        self._timer.start()
        return True

    @contextmanager
    def reading(self, request_id: str) -> Iterator[None]:
        """Reading the body: its transport failures as the SDK's own, and any end of it
        (failed or seemingly complete) after the watchdog fired as the deadline's, unless
        the stream had already said `[DONE]`."""
        try:
            yield
        except httpx.RequestError as exc:
            if self.done:
                return
            raise (
                self._deadline.exceeded(request_id) if self.fired else failure(exc, request_id)
            ) from exc
        if self.fired and not self.done:
            raise self._deadline.exceeded(request_id)


DONE_GRACE_S = 1.0
"""Seconds a stream's body may take to end after `[DONE]`. Reading it to its end gives the
connection back for the next call (closed before its end, httpx drops it); a server that
keeps the body open after `[DONE]` (keep-alive comments) held the stream to the deadline,
or without end, where the openai SDK returns at once."""


# The decoder does all the work; these only read the lines, each its own way.
def _chunks(
    lines: Iterator[str], decoder: ChunkDecoder[T], watchdog: _Watchdog
) -> Generator[T, None, None]:
    try:
        with watchdog.reading(decoder.request_id):
            for line in lines:
                if (chunk := decoder.feed(line)) is not None:
                    yield chunk
                elif decoder.done:
                    if watchdog.finishing(DONE_GRACE_S):
                        for _ in lines:  # the body's end, normally already read
                            pass
                    break
        decoder.end()
    finally:  # read to the end, failed, or closed early
        watchdog.cancel()


async def _within(aw: Awaitable[T], deadline: Deadline, request_id: str) -> T:
    """`aw`, bounded by what is left of the deadline: httpx's read timeout applies to each
    read and was fixed when the attempt began. Never wraps a yield (it would time out the
    caller's code)."""
    left = deadline.remaining()
    if left == math.inf:
        return await aw
    scope = asyncio.timeout(left)
    try:
        async with scope:
            return await aw
    except TimeoutError as exc:
        if not scope.expired():
            raise
        raise deadline.exceeded(request_id) from exc


async def _achunks(
    lines: AsyncIterator[str], decoder: ChunkDecoder[T], deadline: Deadline
) -> AsyncGenerator[T, None]:
    with transport_errors(decoder.request_id):
        while (line := await _within(anext(lines, None), deadline, decoder.request_id)) is not None:
            if (chunk := decoder.feed(line)) is not None:
                yield chunk
            elif decoder.done:
                await _drain(lines, min(DONE_GRACE_S, deadline.remaining()))
                break
    decoder.end()


async def _drain(lines: AsyncIterator[str], within: float) -> None:
    """Read what is left of a body that said `[DONE]`, for at most `within` seconds
    (see `DONE_GRACE_S`); its failures are no longer the call's."""
    with suppress(TimeoutError, httpx.RequestError):
        async with asyncio.timeout(max(0.0, within)):
            async for _ in lines:
                pass


class Client(_BaseClient[httpx.Client]):
    """Synchronous Breakwater client; thread-safe, reuse one per process."""

    _new_http = httpx.Client
    _new_lock = threading.Lock
    completions: Completions[Completion, Stream[Completion]]
    chat: Chat[ChatCompletion, Stream[ChatCompletionChunk]]
    models: Models[ModelList]

    def _call(self, call: Call[T]) -> T | Stream[T]:
        """Carry out the call's retry plan with blocking IO."""
        exchange = self._prepare(call)
        plan = self._guard.plan(exchange.deadline)
        step = next(plan)
        while not isinstance(step, Done):
            if isinstance(step, httpx.Timeout):
                step = plan.send(self._attempt(exchange, step))
            else:
                time.sleep(step)
                exchange.retried()
                step = next(plan)
        return step.result

    def _attempt(self, exchange: Exchange[T], timeout: httpx.Timeout) -> T | Stream[T] | APIError:
        """One attempt: its result, or the APIError it failed with, for the plan to judge."""
        response: httpx.Response | None = None
        watchdog: _Watchdog | None = None
        try:
            response = self._http.send(exchange.request(self._http, timeout), stream=True)
            watchdog = _Watchdog(response, exchange.deadline)
            if not exchange.streams(response):
                with watchdog.reading(exchange.request_id):
                    response.read()
                watchdog.cancel()
                return exchange.result(response)
            chunks = _chunks(response.iter_lines(), exchange.decoder(response), watchdog)
            return Stream(response, next(chunks, None), chunks)
        except BaseException as exc:
            if watchdog is not None:
                watchdog.cancel()
            if response is not None:
                response.close()
            return failure(exc, exchange.request_id)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_BaseClient[httpx.AsyncClient]):
    """Asynchronous Breakwater client; reuse one per event loop. Its retry state needs no
    lock: one event loop runs each critical section at once."""

    _new_http = httpx.AsyncClient
    _new_lock = nullcontext
    completions: Completions[Co[Completion], Co[AsyncStream[Completion]]]
    chat: Chat[Co[ChatCompletion], Co[AsyncStream[ChatCompletionChunk]]]
    models: Models[Co[ModelList]]

    async def _call(self, call: Call[T]) -> T | AsyncStream[T]:
        """Carry out the call's retry plan with asyncio."""
        exchange = self._prepare(call)
        plan = self._guard.plan(exchange.deadline)
        step = next(plan)
        while not isinstance(step, Done):
            if isinstance(step, httpx.Timeout):
                step = plan.send(await self._attempt(exchange, step))
            else:
                await asyncio.sleep(step)
                exchange.retried()
                step = next(plan)
        return step.result

    async def _attempt(
        self, exchange: Exchange[T], timeout: httpx.Timeout
    ) -> T | AsyncStream[T] | APIError:
        """As `Client._attempt`."""
        response = None
        try:
            # Bounded as a whole: httpx's read timeout applies to each read, so a head sent a
            # line at a time held the call for as long as it trickled.
            response = await _within(
                self._http.send(exchange.request(self._http, timeout), stream=True),
                exchange.deadline,
                exchange.request_id,
            )
            if not exchange.streams(response):
                await _within(response.aread(), exchange.deadline, exchange.request_id)
                return exchange.result(response)
            chunks = _achunks(response.aiter_lines(), exchange.decoder(response), exchange.deadline)
            return AsyncStream(response, await anext(chunks, None), chunks)
        except BaseException as exc:
            if response is not None:
                await response.aclose()
            return failure(exc, exchange.request_id)

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
