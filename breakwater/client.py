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
arrives: after that the caller has seen output and a retry would duplicate it. A cancelled
call is never retried.

So that a fleet of clients cannot turn an outage into a retry storm, each client also keeps
a retry budget (retries add at most 20% extra attempts over a sliding window, with a floor
of 10 per window; past it a call fails fast with its last error) and throttles itself
adaptively (the SRE book's max(0, (requests - K*accepts) / (requests + 1)), K=2: once the
gateway refuses most requests, most calls fail locally with `ClientThrottledError`, without
touching the network). Both are per client and set on `RetryPolicy`; `client.stats()` counts
calls, attempts, retries and local rejections.

Only httpx is imported: the SDK must stay light (no torch, nothing from worker/).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
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
    ClientThrottledError,
    StreamError,
    error_class,
)
from breakwater.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ClientStats,
    Completion,
    ModelList,
)

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


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries and sheds: configuration only.

    The state it configures (retry budget, adaptive throttle, stats) lives in each client,
    so clients sharing a policy never share a budget. `budget_ratio=None` turns the retry
    budget off (only `max_retries` caps retries); `throttle_k=None` turns adaptive
    throttling off. `seed` makes jitter and throttling draws reproducible (tests).
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    retry_statuses: frozenset[int] = frozenset({429, 503})
    budget_ratio: float | None = 0.2
    """Retries may add at most this share of extra attempts over `budget_window`..."""
    budget_floor: int = 10
    """...but at least this many retries per window, so a quiet client can ride out a blip."""
    budget_window: float = 10.0
    """Seconds."""
    throttle_k: float | None = 2.0
    """The SRE book's K: local rejection starts once fewer than 1/K of requests are accepted."""
    throttle_window: float = 120.0
    """Seconds: how long the memory of a refusing backend lasts."""
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.budget_window <= 0 or self.throttle_window <= 0:
            raise ValueError("budget_window and throttle_window must be positive")
        if (self.budget_ratio is not None and self.budget_ratio < 0) or self.budget_floor < 0:
            raise ValueError("budget_ratio and budget_floor must not be negative")
        if self.throttle_k is not None and self.throttle_k <= 0:
            raise ValueError("throttle_k must be positive")

    def retryable(self, error: APIError) -> bool:
        if isinstance(error, StreamError | ClientThrottledError):
            return False
        if isinstance(error, APIConnectionError):
            return True
        return error.status in self.retry_statuses

    def overloaded(self, error: APIError | None) -> bool:
        """Whether an attempt's outcome says the backend did not accept it (429, 503, no
        answer): what adaptive throttling counts against `accepts`."""
        return error is not None and (
            isinstance(error, APIConnectionError) or error.status in self.retry_statuses
        )

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Full jitter (uniform in [0, min(cap, base * 2**retry)]) so a crowd of clients
        that failed together does not come back together."""
        return rng.uniform(0.0, min(self.max_backoff, self.initial_backoff * 2**retry))

    def next_delay(
        self, retry: int, error: APIError, remaining: float, rng: random.Random
    ) -> float | None:
        """Seconds to wait before retry number `retry` (0-based), or None to give up.

        The server's Retry-After wins over our own backoff; a wait that would end past the
        deadline gives up now rather than fail later with less information. The client's
        budget and throttle have the last word (`_Guard.retry_delay`).
        """
        if retry >= self.max_retries or not self.retryable(error):
            return None
        delay = error.retry_after if error.retry_after is not None else self.backoff(retry, rng)
        return delay if delay < remaining else None


class _Window:
    """Event counts over the last `span` seconds, kept in `buckets` fixed-width slots: O(1)
    per event and bounded memory at any rate; events age out a slot at a time."""

    def __init__(self, span: float, counters: int, buckets: int = 40) -> None:
        self._width = span / buckets
        self._buckets = buckets
        self._slots: deque[list[int]] = deque()  # [slot number, *counts]
        self._totals = [0] * counters

    def totals(self, now: float) -> list[int]:
        """The counts within the window ending at `now` (a live view: do not mutate)."""
        slot = math.floor(now / self._width)
        while self._slots and self._slots[0][0] <= slot - self._buckets:
            for i, n in enumerate(self._slots.popleft()[1:]):
                self._totals[i] -= n
        if not self._slots or self._slots[-1][0] != slot:
            self._slots.append([slot] + [0] * len(self._totals))
        return self._totals

    def add(self, now: float, counter: int) -> None:
        self.totals(now)
        self._slots[-1][counter + 1] += 1
        self._totals[counter] += 1


class RetryBudget:
    """Retries may add at most `ratio` extra attempts over the first attempts sent in the
    last `window` seconds (at least `floor` per window): the bound that keeps a client in
    trouble from multiplying its own load, whatever `max_retries` says."""

    _CALLS, _RETRIES = 0, 1

    def __init__(self, ratio: float, floor: int, window: float) -> None:
        self.ratio = ratio
        self.floor = floor
        self._window = _Window(window, 2)

    def record_call(self, now: float) -> None:
        self._window.add(now, self._CALLS)

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget; False (and nothing taken) when it is spent."""
        calls, retries = self._window.totals(now)
        if retries >= max(self.floor, self.ratio * calls):
            return False
        self._window.add(now, self._RETRIES)
        return True


class AdaptiveThrottle:
    """Client-side adaptive throttling (Google SRE book, "Handling Overload"): reject
    locally with probability max(0, (requests - k*accepts) / (requests + 1)) over the last
    `window` seconds. A backend that accepts nothing then costs its clients almost no
    traffic, yet every client keeps probing it; requests rejected here count as requests,
    which is what makes the share shed grow while accepts stay low."""

    _REQUESTS, _ACCEPTS = 0, 1

    def __init__(self, k: float, window: float) -> None:
        self.k = k
        self._window = _Window(window, 2)

    def reject_probability(self, now: float) -> float:
        requests, accepts = self._window.totals(now)
        return max(0.0, (requests - self.k * accepts) / (requests + 1))

    def admit(self, now: float, draw: float) -> bool:
        """Whether to send (`draw` uniform in [0, 1)); a refusal is recorded as a request."""
        if draw >= self.reject_probability(now):
            return True
        self._window.add(now, self._REQUESTS)
        return False

    def record(self, now: float, accepted: bool) -> None:
        """The outcome of a request that was sent."""
        self._window.add(now, self._REQUESTS)
        if accepted:
            self._window.add(now, self._ACCEPTS)


class _Guard:
    """One client's retry state: budget, throttle, rng and stats.

    Its critical sections are a few lines of arithmetic and never span IO or an await, so
    the sync client guards them with a threading.Lock and the async one needs none (one
    event loop runs them atomically).
    """

    def __init__(self, policy: RetryPolicy, lock: AbstractContextManager[Any]) -> None:
        self.policy = policy
        self._lock = lock
        self._rng = random.Random(policy.seed)
        self._budget = (
            None
            if policy.budget_ratio is None
            else RetryBudget(policy.budget_ratio, policy.budget_floor, policy.budget_window)
        )
        self._throttle = (
            None
            if policy.throttle_k is None
            else AdaptiveThrottle(policy.throttle_k, policy.throttle_window)
        )
        self._stats = dict.fromkeys(ClientStats.__dataclass_fields__, 0)

    def _admit(self, now: float) -> bool:
        if self._throttle is None or self._throttle.admit(now, self._rng.random()):
            return True
        self._stats["throttled"] += 1
        return False

    def start_call(self, request_id: str) -> None:
        """Before a call's first attempt: ClientThrottledError if shed locally."""
        with self._lock:
            self._stats["calls"] += 1
            if not self._admit(time.monotonic()):
                raise ClientThrottledError(
                    "request rejected locally by adaptive throttling: the gateway has been "
                    "refusing most requests",
                    request_id=request_id,
                )

    def sent(self, retry: int) -> None:
        """An attempt is about to go upstream."""
        with self._lock:
            self._stats["attempts"] += 1
            if retry:
                self._stats["retries"] += 1
            elif self._budget is not None:
                self._budget.record_call(time.monotonic())

    def answered(self, error: APIError | None) -> None:
        """An attempt's outcome (None: success). A cancelled attempt has none."""
        if self._throttle is None:
            return
        with self._lock:
            self._throttle.record(time.monotonic(), not self.policy.overloaded(error))

    def retry_delay(self, retry: int, error: APIError, deadline: _Deadline) -> float:
        """Seconds to wait before retrying, or raise `error`: the policy gives up, the
        budget is spent, or the throttle sheds the retry."""
        with self._lock:
            delay = self.policy.next_delay(retry, error, deadline.remaining(), self._rng)
            if delay is None:
                raise error
            now = time.monotonic()
            # Throttle first: a retry it sheds leaves the budget untouched.
            if not self._admit(now):
                raise error
            if self._budget is not None and not self._budget.try_spend(now):
                self._stats["budget_exhausted"] += 1
                raise error
        return delay

    def stats(self) -> ClientStats:
        with self._lock:
            return ClientStats(**self._stats)


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
        self.request_id = request_id

    def remaining(self) -> float:
        return self._at - time.monotonic()

    def check(self) -> None:
        if self.remaining() <= 0:
            raise APITimeoutError("deadline exceeded", request_id=self.request_id)

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
        lock: AbstractContextManager[Any],
    ) -> None:
        # Accept OpenAI-style ".../v1" base URLs too; paths below carry the /v1 themselves.
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key
        self.timeout = timeout
        self._guard = _Guard(retry_policy or RetryPolicy(max_retries=max_retries), lock)
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

    @property
    def retry_policy(self) -> RetryPolicy:
        """Read-only: the client's budget and throttle were built from it."""
        return self._guard.policy

    def stats(self) -> ClientStats:
        """Retry accounting since this client was made (e.g. its retry amplification)."""
        return self._guard.stats()


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
        `retry_policy`, when given, replaces `max_retries`; it also sets the retry budget
        and adaptive throttling (e.g. `RetryPolicy(budget_ratio=0.1, throttle_k=None)`),
        whose state belongs to this client alone."""
        super().__init__(
            base_url,
            api_key,
            timeout,
            max_retries,
            retry_policy,
            default_headers,
            threading.Lock(),
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client()
        self.completions = Completions(self)
        self.chat = Chat(self)
        self.models = Models(self)

    def _retrying(self, attempt: Callable[[httpx.Timeout], R], deadline: _Deadline) -> R:
        # A small loop rather than tenacity: each attempt needs the deadline's remainder as
        # its HTTP timeout, and the only timing left (Retry-After or jitter) is a few lines
        # in RetryPolicy, shared by the sync and async clients.
        # Only APIError is retried: KeyboardInterrupt and friends end the call at once.
        self._guard.start_call(deadline.request_id)
        for retry in itertools.count():
            http_timeout = deadline.http_timeout()  # past the deadline: no attempt at all
            self._guard.sent(retry)
            try:
                result = attempt(http_timeout)
            except APIError as error:
                self._guard.answered(error)
                time.sleep(self._guard.retry_delay(retry, error, deadline))
            else:
                self._guard.answered(None)
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
        super().__init__(
            base_url, api_key, timeout, max_retries, retry_policy, default_headers, nullcontext()
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient()
        self.completions = AsyncCompletions(self)
        self.chat = AsyncChat(self)
        self.models = AsyncModels(self)

    async def _retrying(
        self, attempt: Callable[[httpx.Timeout], Awaitable[R]], deadline: _Deadline
    ) -> R:
        # See Client._retrying for why this is a loop and not tenacity.
        # CancelledError is no APIError: a cancelled call, mid-attempt or mid-sleep, ends
        # there, with no retry and no outcome recorded against the backend.
        self._guard.start_call(deadline.request_id)
        for retry in itertools.count():
            http_timeout = deadline.http_timeout()
            self._guard.sent(retry)
            try:
                result = await attempt(http_timeout)
            except APIError as error:
                self._guard.answered(error)
                await asyncio.sleep(self._guard.retry_delay(retry, error, deadline))
            else:
                self._guard.answered(None)
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
