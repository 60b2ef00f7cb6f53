"""A retry budget: retries may add at most a share of extra attempts over a sliding window.

Without it, every failed attempt becomes another attempt and a struggling fleet gets
multiplied load (a retry storm). With a 20% budget the worst case is 1.2x.
"""

from __future__ import annotations

import time
from collections import deque


class RetryBudget:
    def __init__(self, ratio: float = 0.2, floor: int = 10, window_s: float = 10.0) -> None:
        self.ratio = ratio
        self.floor = floor
        self.window_s = window_s
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        cutoff = now - self.window_s
        for q in (self._requests, self._retries):
            while q and q[0] < cutoff:
                q.popleft()

    def on_request(self) -> None:
        self._requests.append(time.monotonic())

    def try_spend(self) -> bool:
        """Take one retry from the budget if any is left."""
        now = time.monotonic()
        self._trim(now)
        allowed = max(self.floor, self.ratio * len(self._requests))
        if len(self._retries) >= allowed:
            return False
        self._retries.append(now)
        return True

    @property
    def retries_in_window(self) -> int:
        self._trim(time.monotonic())
        return len(self._retries)
