"""Per-replica circuit breakers and passive outlier ejection.

pybreaker keeps the state machine (closed -> open after consecutive failures -> half-open
after the reset timeout -> closed on success). Its traps are handled here, not worked
around at call sites: we never wrap the awaited call (pybreaker 1.4's call_async needs
Tornado and call() of a coroutine records success without awaiting it); instead `allow()`
asks before an attempt and `record()` replays its outcome synchronously afterwards, so a
cancelled attempt records nothing. Half-open lets every concurrent caller through, so
probes are bounded here. A replica that keeps failing after readmission is ejected for
longer each time (flapping), and no more than a set share of the pool is ever ejected.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import pybreaker

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN


class _Failure(Exception):
    """The outcome replayed into pybreaker for a failed attempt."""


@dataclass
class BreakerConfig:
    fail_max: int = 5
    """Consecutive failures that open the breaker."""
    base_ejection_s: float = 2.0
    max_ejection_s: float = 60.0
    half_open_probes: int = 1
    max_ejection_share: float = 0.5
    """Never eject more than this share of the pool (Envoy's max_ejection_percent)."""
    slow_factor: float = 5.0
    """A replica whose fast answers (the `slow_quantile` of its last `slow_min_samples`
    TTFTs) are this many times slower than its peers' median of the same is ejected."""
    slow_min_samples: int = 20
    slow_quantile: float = 0.25
    slow_min_excess_s: float = 0.1
    """...and by at least this much: a few milliseconds' difference is no sickness (at a
    5 ms TTFT, one request ahead in a queue is 5x)."""
    ewma_alpha: float = 0.2
    """For the TTFT EWMA shown to operators (admin API); it does not judge."""


@dataclass
class ReplicaHealth:
    breaker: pybreaker.CircuitBreaker
    probes_in_flight: int = 0
    times_ejected: int = 0
    ejected_at: float | None = None
    ttft_ewma: float | None = None
    samples: int = 0
    recent: deque[float] = field(default_factory=deque)
    """The last TTFTs (BreakerBoard gives it the config's slow_min_samples as maxlen)."""
    ttft_low: float | None = None
    """The slow_quantile of `recent`: what the detector compares."""
    forced_until: float = 0.0
    """Open on another gateway's word (shared through Redis) until this monotonic time."""
    last_change: float = field(default_factory=time.monotonic)


class BreakerBoard:
    """All replicas' breakers, as seen by one gateway."""

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config or BreakerConfig()
        self._replicas: dict[str, ReplicaHealth] = {}
        self.ejections = 0

    def _get(self, worker_id: str) -> ReplicaHealth:
        r = self._replicas.get(worker_id)
        if r is None:
            b = pybreaker.CircuitBreaker(
                fail_max=self.config.fail_max,
                reset_timeout=self.config.base_ejection_s,
                name=worker_id,
                throw_new_error_on_trip=False,
            )
            window = deque[float](maxlen=max(1, self.config.slow_min_samples))
            r = self._replicas[worker_id] = ReplicaHealth(b, recent=window)
        return r

    def state(self, worker_id: str) -> str:
        r = self._get(worker_id)
        if r.forced_until:
            if r.forced_until > time.monotonic():
                return OPEN
            r.forced_until = 0.0
            if r.breaker.current_state == CLOSED:
                # Another's ejection ended: probe the replica here too, as its ejector
                # does, before full traffic (each process or gateway found a replica still
                # sick anew, fail_max attempts each, after every ejection)
                r.breaker.half_open()
        state = r.breaker.current_state
        if state == OPEN and self._timeout_elapsed(r):
            return HALF_OPEN
        return state

    def _timeout_elapsed(self, r: ReplicaHealth) -> bool:
        opened = r.ejected_at or time.monotonic()
        return time.monotonic() - opened >= r.breaker.reset_timeout

    def _ejected_share(self, pool: Iterable[str]) -> float:
        ids = list(pool)
        if not ids:
            return 0.0
        return sum(1 for w in ids if self.state(w) != CLOSED) / len(ids)

    def allow(self, worker_id: str) -> bool:
        """May an attempt go to this replica now? Takes a probe slot when half-open."""
        r = self._get(worker_id)
        state = self.state(worker_id)
        if state == CLOSED:
            return True
        if state == OPEN:
            return False
        if r.breaker.current_state == OPEN:
            r.breaker.half_open()
        if r.probes_in_flight >= self.config.half_open_probes:
            return False
        r.probes_in_flight += 1
        return True

    def release_probe(self, worker_id: str) -> None:
        r = self._get(worker_id)
        if r.probes_in_flight > 0:
            r.probes_in_flight -= 1

    def record(self, worker_id: str, ok: bool, pool: Iterable[str] = ()) -> None:
        """Replay an attempt's outcome; failures may open the breaker (within the share cap)."""
        r = self._get(worker_id)
        before = r.breaker.current_state
        if not ok and before == CLOSED:
            would_open = r.breaker.fail_counter + 1 >= self.config.fail_max
            if would_open and self._ejected_share(pool) >= self.config.max_ejection_share:
                return  # keep serving from it rather than empty the pool
        with contextlib.suppress(_Failure, pybreaker.CircuitBreakerError):
            r.breaker.call(_raise if not ok else _noop)
        after = r.breaker.current_state
        if after == OPEN and before != OPEN:
            self._on_open(r)
        elif after == CLOSED and before != CLOSED:
            r.ejected_at = None
            r.last_change = time.monotonic()

    def _on_open(self, r: ReplicaHealth) -> None:
        r.times_ejected += 1
        self.ejections += 1
        # Exponential ejection time for a flapping replica.
        r.breaker.reset_timeout = min(
            self.config.max_ejection_s,
            self.config.base_ejection_s * 2 ** (r.times_ejected - 1),
        )
        r.ejected_at = time.monotonic()
        r.last_change = r.ejected_at

    def eject(self, worker_id: str, pool: Iterable[str] = ()) -> bool:
        """Open a breaker now (outlier detection, operators); refused over the share cap."""
        r = self._get(worker_id)
        if r.breaker.current_state == OPEN:
            return True
        if self._ejected_share(pool) >= self.config.max_ejection_share:
            return False
        r.breaker.open()
        self._on_open(r)
        return True

    def force_open(
        self, worker_id: str, seconds: float, pools: Iterable[Iterable[str]] = ()
    ) -> bool:
        """Another gateway ejected this replica: honour it for the time it said, unless
        that would take any of its pools over the share cap (gateways ejecting different
        replicas of one pool would together empty it). Refused now, asked again next sync."""
        r = self._get(worker_id)
        if self.state(worker_id) == CLOSED and any(
            self._ejected_share(pool) >= self.config.max_ejection_share for pool in pools
        ):
            return False
        r.forced_until = max(r.forced_until, time.monotonic() + seconds)
        return True

    def observe_ttft(
        self, worker_id: str, ttft_s: float, pool: Iterable[str], judged: bool = True
    ) -> None:
        """Feed the slow-replica detector; ejects a replica far slower than its peers.

        It compares replicas' *fast* answers (a low quantile of recent TTFTs), not their
        averages: a replica's average TTFT also holds the queue routing gave it, and
        prefix-aware routing gives unequal queues on purpose (holders of hot prefixes get
        bursts), so averages ejected healthy replicas (one of two in every run of
        peer_bench's chat test, at 5x). A sick replica (slow steps) is slow even when its
        queue is empty, so its fast answers show it; a busy one still has some.

        Even the fast quantile ejected a healthy replica once (peer_bench's chat test,
        one fresh-clone CI run under the parallel suite; 0 of 40 reruns alone), when its
        bursts lasted the whole window. So the caller passes `judged=False` for an answer
        that started with the replica busier than a peer (from this gateway's view): it
        still moves the EWMA, but does not judge.
        """
        r = self._get(worker_id)
        a = self.config.ewma_alpha
        r.ttft_ewma = ttft_s if r.ttft_ewma is None else (1 - a) * r.ttft_ewma + a * ttft_s
        if not judged:
            return
        r.samples += 1
        r.recent.append(ttft_s)
        ordered = sorted(r.recent)  # <= slow_min_samples values: ~1 us
        r.ttft_low = ordered[int(self.config.slow_quantile * (len(ordered) - 1))]
        if r.samples < self.config.slow_min_samples:
            return
        peers = [
            p.ttft_low
            for w, p in self._replicas.items()
            if w != worker_id and p.ttft_low is not None and p.samples >= 3
        ]
        if not peers:
            return
        typical = statistics.median(peers)
        if r.ttft_low <= max(
            self.config.slow_factor * typical, typical + self.config.slow_min_excess_s
        ):
            return
        if self.eject(worker_id, list(pool)):
            r.ttft_ewma = r.ttft_low = None  # start afresh after readmission
            r.samples = 0
            r.recent.clear()

    def replicas(self) -> dict[str, ReplicaHealth]:
        return dict(self._replicas)

    def snapshot(self) -> dict[str, dict[str, float | str | int]]:
        out: dict[str, dict[str, float | str | int]] = {}
        for w, r in self._replicas.items():
            out[w] = {
                "state": self.state(w),
                "times_ejected": r.times_ejected,
                "ejection_s": r.breaker.reset_timeout,
                "ttft_ewma_ms": round((r.ttft_ewma or 0.0) * 1000, 2),
                "ttft_fast_ms": round((r.ttft_low or 0.0) * 1000, 2),
            }
        return out


def _noop() -> None:
    return None


def _raise() -> None:
    raise _Failure()
