"""Token buckets kept in this process: the fallback when Redis is absent or down.

A request is charged to several buckets at once (its tenant's and the global one, in requests
and in LLM tokens). The charge is all or nothing: a request refused by one bucket takes
nothing from the others, so a refusal never spends quota that was not used.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class BucketSpec:
    """One bucket to charge: ``key`` names it (per tenant and kind), ``cost`` is the charge."""

    key: str
    rate: float
    """Refill, units per second (> 0)."""
    burst: float
    """Capacity: the most that can be taken at once after a quiet period."""
    cost: float


class TakeResult(NamedTuple):
    wait_s: float
    """0 when taken; else how long until every bucket could pay (if nobody else takes)."""
    limiting: int
    """Index of the spec that needs the longest wait, or -1 when taken."""

    @property
    def allowed(self) -> bool:
        return self.wait_s <= 0


ALLOWED = TakeResult(0.0, -1)


class TokenBucket:
    """Classic token bucket; time is passed in so the math is testable without sleeping."""

    __slots__ = ("burst", "level", "rate", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:  # a clock that steps back must not mint tokens
            self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_s(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` is available (0 if it is now)."""
        self.refill(now)
        short = cost - self.level
        return 0.0 if short <= 0 else short / self.rate

    def take(self, cost: float, now: float) -> float:
        """Take ``cost`` and return 0, or take nothing and return the wait in seconds."""
        wait = self.wait_s(cost, now)
        if wait == 0:
            self.level -= cost
        return wait


class LocalBuckets:
    """Buckets by key, created full on first use. Not thread-safe; one event loop only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, specs: Sequence[BucketSpec], scale: float = 1.0) -> TakeResult:
        """Charge every spec or none. ``scale`` shrinks rate and burst (fallback share)."""
        now = self._clock()
        buckets = [self._bucket(s, scale, now) for s in specs]
        # A cost above a (scaled-down, or per-process) burst could never be paid at once:
        # it waits for a full bucket and then takes the whole cost, leaving a debt the
        # rate repays before the next. Charging only the burst instead admitted rate/burst
        # requests a second (30/s at 1/s with a burst of 0.01; 2/s at 1/s over 2 processes).
        wait, limiting = 0.0, -1
        for i, (spec, bucket) in enumerate(zip(specs, buckets, strict=True)):
            w = bucket.wait_s(min(spec.cost, bucket.burst), now)
            if w > wait:
                wait, limiting = w, i
        if wait > 0:
            return TakeResult(wait, limiting)
        for spec, bucket in zip(specs, buckets, strict=True):
            bucket.level -= spec.cost
        return ALLOWED

    def adjust(self, specs: Sequence[BucketSpec], scale: float = 1.0) -> None:
        """Take each spec's cost whatever the level (a debt the rate repays), or give it
        back where negative (never past the burst): a charge settled once its real size
        is known, or refunded for a request refused after it was charged."""
        now = self._clock()
        for spec in specs:
            b = self._bucket(spec, scale, now)
            b.refill(now)
            b.level = min(b.burst, b.level - spec.cost)

    def _bucket(self, spec: BucketSpec, scale: float, now: float) -> TokenBucket:
        rate, burst = spec.rate * scale, spec.burst * scale
        b = self._buckets.get(spec.key)
        if b is None:
            b = self._buckets[spec.key] = TokenBucket(rate, burst, now)
        elif b.rate != rate or b.burst != burst:
            b.refill(now)
            b.rate, b.burst = rate, burst
            b.level = min(b.level, burst)
        return b

    def level(self, key: str) -> float | None:
        """Current level of a bucket (for tests and the admin view)."""
        b = self._buckets.get(key)
        if b is None:
            return None
        b.refill(self._clock())
        return b.level


def retry_after_ms(wait_s: float) -> int:
    """Whole milliseconds, rounded up, at least 1: a client retrying then will be served."""
    return max(1, math.ceil(wait_s * 1000))
