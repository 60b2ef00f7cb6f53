"""The retry loop without IO: policy, deadline, and one client's retry state.

`RetryState.plan` is one call's whole retry loop as a generator, so retry timing,
Retry-After, the retry budget and adaptive throttling exist once for both clients. It
yields what its driver must do next: an `httpx.Timeout` (make an attempt with it, then send
back the result or the `APIError` it failed with), a float (sleep that many seconds), or
`Done` with the call's result; giving up, it raises the last error.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Generator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import httpx

from breakwater._shedding import AdaptiveThrottle, RetryBudget
from breakwater.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    ClientThrottledError,
    StreamError,
)
from breakwater.types import ClientStats

DEFAULT_MAX_RETRIES = 2
# Cap on connecting, whatever the deadline: a black-holed host should fail fast enough to
# leave time for a retry.
CONNECT_TIMEOUT = 5.0
# Seconds: a retry that would start with less of the deadline left could only time out, and
# its bare "deadline exceeded" would hide the 429/503 that caused it.
MIN_ATTEMPT_TIME = 0.05


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries and sheds: configuration only.

    The state it configures (retry budget, adaptive throttle, stats) lives in each client,
    so clients sharing a policy never share a budget. `budget_ratio=None` turns the retry
    budget off (only `max_retries` caps retries); `throttle_k=None` turns adaptive
    throttling off. `seed` makes jitter and throttling draws reproducible (tests).

    A Retry-After longer than `max_retry_after` seconds gives up at once, raising the error
    (its `retry_after` says when the server wants us back): without a deadline nothing else
    would stop a server's "come back tomorrow" from holding the call that long.
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
    max_retry_after: float = 60.0
    """Seconds: the longest Retry-After we wait out (see above)."""
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.budget_window <= 0 or self.throttle_window <= 0:
            raise ValueError("budget_window and throttle_window must be positive")
        if (self.budget_ratio is not None and self.budget_ratio < 0) or self.budget_floor < 0:
            raise ValueError("budget_ratio and budget_floor must not be negative")
        if self.throttle_k is not None and self.throttle_k <= 0:
            raise ValueError("throttle_k must be positive")
        if not self.max_retry_after > 0:  # also refuses NaN
            raise ValueError("max_retry_after must be positive")

    def retryable(self, error: APIError) -> bool:
        if isinstance(error, StreamError | ClientThrottledError):
            return False
        if error.should_retry is False:  # the server's retry budget is spent: obey it
            return False
        if error.should_retry is True:  # the server vouches a retry is safe (e.g. a 502)
            return True
        if isinstance(error, APIConnectionError):
            return True
        return error.status in self.retry_statuses

    def overloaded(self, error: APIError | None) -> bool | None:
        """Whether an attempt's outcome says the backend did not accept it (429, 503, no
        connection): what adaptive throttling counts against `accepts`. None for an attempt
        cut by the caller's own deadline, which says nothing about the backend: counted as
        refused, a client with a short timeout to a slow gateway went on refusing calls
        locally, 28 of 30, after the gateway was well again."""
        if error is None:
            return False
        if isinstance(error, APITimeoutError) and not isinstance(
            error.__cause__, httpx.ConnectTimeout
        ):
            return None
        return isinstance(error, APIConnectionError) or error.status in self.retry_statuses

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Full jitter (uniform in [0, min(cap, base * 2**retry)]) so a crowd of clients
        that failed together does not come back together."""
        return rng.uniform(0.0, min(self.max_backoff, self.initial_backoff * 2**retry))

    def next_delay(
        self, retry: int, error: APIError, remaining: float, rng: random.Random
    ) -> float | None:
        """Seconds to wait before retry number `retry` (0-based), or None to give up.

        The server's Retry-After wins over our own backoff, up to `max_retry_after`; a wait
        that would end past the deadline, or too near it for an attempt
        (`MIN_ATTEMPT_TIME`), gives up now rather than fail later with less information.
        The client's budget and throttle have the last word (`RetryState.plan`).
        """
        if retry >= self.max_retries or not self.retryable(error):
            return None
        if error.retry_after is not None and error.retry_after > self.max_retry_after:
            return None
        delay = error.retry_after if error.retry_after is not None else self.backoff(retry, rng)
        return delay if remaining - delay >= MIN_ATTEMPT_TIME else None


class Deadline:
    """One call's overall time limit, shared by its attempts, sleeps and stream reads."""

    def __init__(self, timeout: float | None, request_id: str) -> None:
        self._at = math.inf if timeout is None else time.monotonic() + timeout
        self.request_id = request_id

    def remaining(self) -> float:
        return self._at - time.monotonic()

    def exceeded(self, request_id: str | None = None) -> APITimeoutError:
        """The error a call past its deadline fails with (`request_id`: the server's)."""
        return APITimeoutError("deadline exceeded", request_id=request_id or self.request_id)

    def check(self, request_id: str | None = None) -> None:
        if self.remaining() <= 0:
            raise self.exceeded(request_id)

    def http_timeout(self) -> httpx.Timeout:
        """The timeout for the next attempt: whatever is left of the deadline."""
        self.check()
        left = self.remaining()
        if left == math.inf:
            return httpx.Timeout(None, connect=CONNECT_TIMEOUT)
        return httpx.Timeout(left, connect=min(left, CONNECT_TIMEOUT))


@dataclass(frozen=True)
class Done:
    """A plan's last step: the result of the attempt that succeeded."""

    result: Any


Plan = Generator[httpx.Timeout | float | Done, Any, None]


class RetryState:
    """One client's retry state (budget, throttle, rng, stats) and the plan of its calls.

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

    def plan(self, deadline: Deadline) -> Plan:
        """One call's retry loop (see the module docstring). A small loop rather than
        tenacity: each attempt needs the deadline's remainder as its HTTP timeout. Only an
        APIError is sent back, so a cancelled or interrupted call ends at once, with no
        retry and no outcome recorded against the backend."""
        with self._lock:
            self._stats["calls"] += 1
            if not self._admit(time.monotonic()):
                raise ClientThrottledError(
                    "request rejected locally by adaptive throttling: the gateway has been "
                    "refusing most requests",
                    request_id=deadline.request_id,
                )
        for retry in itertools.count():
            timeout = deadline.http_timeout()  # past the deadline: no attempt at all
            with self._lock:
                self._stats["attempts"] += 1
                if retry:
                    self._stats["retries"] += 1
                elif self._budget is not None:
                    self._budget.record_call(time.monotonic())
            outcome = yield timeout
            error = outcome if isinstance(outcome, APIError) else None
            refused = self.policy.overloaded(error)
            if self._throttle is not None and refused is not None:
                with self._lock:
                    self._throttle.record(time.monotonic(), not refused)
            if error is None:
                yield Done(outcome)
                return
            yield self._retry_delay(retry, error, deadline)

    def _admit(self, now: float) -> bool:
        if self._throttle is None or self._throttle.admit(now, self._rng.random()):
            return True
        self._stats["throttled"] += 1
        return False

    def _retry_delay(self, retry: int, error: APIError, deadline: Deadline) -> float:
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
