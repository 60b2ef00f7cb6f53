"""Client-side load shedding: a retry budget and adaptive throttling.

Both count events over a sliding window, per client, so that a fleet of clients cannot turn
an outage into a retry storm. `RetryPolicy` configures them; `_retry.RetryState` uses them.
"""

from __future__ import annotations

import math
from collections import deque


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

    def __init__(self, k: float, window: float, min_requests: int = 5) -> None:
        self.k = k
        self.min_requests = min_requests
        """Below this many requests in the window nothing is shed (gRPC's retry throttle
        likewise lets about five failures through before it stops retries; Envoy's
        admission control waits for `rps_threshold`). Without it one 503 to a fresh client
        made p = 0.5, which shed its first retry half the time and, each refusal counting as
        a request, refused calls to a healthy gateway afterwards, dozens in a row now and
        then. Five leaves a few calls' retries free and still stops a storm early."""
        self._window = _Window(window, 2)

    def reject_probability(self, now: float) -> float:
        requests, accepts = self._window.totals(now)
        if requests < self.min_requests:
            return 0.0
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
