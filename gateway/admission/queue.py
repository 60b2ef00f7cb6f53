"""A global concurrency limit with a bounded, priority-ordered waiting queue.

Why bounded: an unbounded queue turns a burst into minutes of latency for everyone, and the
clients time out and retry into it. Here a full queue answers 503 with Retry-After at once,
a queued request leaves when its deadline passes (it would be served late, to nobody), and
interactive requests (priority 0) are admitted before batch ones (1), first come first
served within a class. Slots are handed directly from a releasing request to the next
waiter, so a newcomer can never overtake the queue.

Without a configured `max_queue` the bound is time, not a count: a request joins the queue
only if, at the measured rate slots free up, it will probably get one within its
priority's wait budget (`wait_budgets`, from adaptive.py); otherwise it hears 503 with
Retry-After at once, not after waiting for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque

from proto.openai_compat import OpenAIError

MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 30.0
INITIAL_HOLD_S = 1.0
"""Assumed mean time a request holds a slot, until some have been measured."""
AUTO_QUEUE_CAP = 10_000
"""A time-bounded queue still holds at most this many (memory stays bounded)."""


def overloaded(message: str, retry_after_s: float) -> OpenAIError:
    return OpenAIError(
        503,
        message,
        type_="overloaded_error",
        code="overloaded",
        retry_after_ms=max(1, math.ceil(retry_after_s * 1000)),
    )


def deadline_exceeded(message: str) -> OpenAIError:
    return OpenAIError(504, message, type_="timeout", code="deadline_exceeded")


class PriorityLimiter:
    """At most ``max_in_flight`` holders; up to ``max_queue`` waiters, lowest priority first.

    ``deadline`` values are ``time.monotonic()`` instants. Single event loop only.
    """

    def __init__(self, max_in_flight: int, max_queue: int | None, max_queue_wait_s: float) -> None:
        if max_in_flight < 1 or (max_queue is not None and max_queue < 0) or max_queue_wait_s <= 0:
            raise ValueError("need max_in_flight >= 1, max_queue >= 0, max_queue_wait_s > 0")
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        """None: bounded by `wait_budgets` (and AUTO_QUEUE_CAP) instead of a count."""
        self.max_queue_wait_s = max_queue_wait_s
        self.wait_budgets: dict[int, float] = {}
        """Priority -> longest expected wait worth queueing for (absent: max_queue_wait_s)."""
        self.in_flight = 0
        self.queued = 0
        self.rejected_full = 0
        self.expired = 0
        self.mean_hold_s = INITIAL_HOLD_S
        """EWMA of how long an admitted request holds its slot; sizes Retry-After."""
        self._queues: dict[int, deque[asyncio.Future[None]]] = {}

    @property
    def full(self) -> bool:
        """Whether ``acquire`` would answer 503 right now, whatever the priority."""
        if self._free_now():
            return False
        if self.max_queue is not None:
            return self.queued >= self.max_queue
        budget = max(self.wait_budgets.values(), default=self.max_queue_wait_s)
        return self.queued >= AUTO_QUEUE_CAP or self.expected_wait_s(self.queued + 1) > budget

    def expected_wait_s(self, position: int) -> float:
        """How long the `position`-th in line probably waits: slots free up at about
        max_in_flight / mean_hold_s per second."""
        return position * self.mean_hold_s / self.max_in_flight

    def _no_room(self, priority: int) -> bool:
        if self.max_queue is not None:
            return self.queued >= self.max_queue
        if self.queued >= AUTO_QUEUE_CAP:
            return True
        ahead = sum(len(q) for p, q in self._queues.items() if p <= priority)
        budget = self.wait_budgets.get(priority, self.max_queue_wait_s)
        return self.expected_wait_s(ahead + 1) > budget

    def set_max_in_flight(self, n: int) -> None:
        """A new limit (the fleet grew or shrank); waiters take the room it makes now."""
        self.max_in_flight = max(1, n)
        while self.queued and self.in_flight < self.max_in_flight:
            self.in_flight += 1
            self.release(None)  # hands the new slot to the first waiter

    def _free_now(self) -> bool:
        return self.in_flight < self.max_in_flight and self.queued == 0

    def retry_after_s(self) -> float:
        """About how long the current queue takes to drain at the measured service rate."""
        drain = self.mean_hold_s * (self.queued + 1) / self.max_in_flight
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, drain))

    async def acquire(self, priority: int, deadline: float) -> float:
        """Take a slot, waiting in the queue if need be; returns the seconds spent waiting.

        Raises 503 (queue full, or waited ``max_queue_wait_s``) or 504 (``deadline`` passed).
        """
        if self._free_now():
            self.in_flight += 1
            return 0.0
        if self._no_room(priority):
            self.rejected_full += 1
            raise overloaded(
                f"The gateway is overloaded: {self.in_flight} requests in flight and "
                f"{self.queued} queued. Retry later.",
                self.retry_after_s(),
            )
        start = time.monotonic()
        wait_s = self.max_queue_wait_s
        if self.max_queue is None and priority in self.wait_budgets:
            # an estimate, not a promise: a request kept past twice its budget is shed
            wait_s = min(wait_s, 2 * self.wait_budgets[priority])
        limit = start + wait_s
        by_deadline = deadline <= limit
        give_up = min(deadline, limit)
        if give_up <= start:
            raise deadline_exceeded("The request's deadline passed before it was admitted.")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queues.setdefault(priority, deque()).append(fut)
        self.queued += 1
        try:
            async with asyncio.timeout_at(loop.time() + (give_up - start)):
                await fut
        except BaseException as exc:  # TimeoutError or cancellation: leave the queue
            if fut.done() and not fut.cancelled():
                self.release(None)  # granted in the same instant: pass the slot on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):  # else release() dropped it already
                    self._queues[priority].remove(fut)
                    self.queued -= 1
            if not isinstance(exc, TimeoutError):
                raise
            self.expired += 1
            waited_ms = round((time.monotonic() - start) * 1000)
            if by_deadline:
                raise deadline_exceeded(
                    f"The request waited {waited_ms} ms in the admission queue and its "
                    "deadline passed; it was dropped rather than served late."
                ) from None
            raise overloaded(
                f"The gateway is overloaded: the request waited {waited_ms} ms in the "
                "admission queue without getting a slot. Retry later.",
                self.retry_after_s(),
            ) from None
        return time.monotonic() - start

    def release(self, hold_s: float | None) -> None:
        """Free a slot (handing it to the first waiter); ``hold_s`` feeds the Retry-After EWMA."""
        if hold_s is not None:
            self.mean_hold_s += 0.1 * (hold_s - self.mean_hold_s)
        while self.queued:
            prio = min(p for p, q in self._queues.items() if q)
            fut = self._queues[prio].popleft()
            self.queued -= 1
            if not fut.done():
                fut.set_result(None)  # the slot moves to the waiter: in_flight unchanged
                return
        self.in_flight -= 1
