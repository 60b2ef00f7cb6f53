"""Concurrency limits that come from the fleet, not from a constant.

A constant limit is wrong twice: too high, and requests pile into the workers' own queues
(TTFT climbs to minutes under overload, the failure this project exists to prevent); too
low, and a bigger fleet idles. So each replica gets a limit of its own, learnt the way
Netflix's gradient limiter and Envoy's adaptive-concurrency filter learn theirs: latency
(here TTFT, what a waiting user feels) against a baseline measured on the replica itself.

- The limit starts at the batch slots the replica reports (`max_running`: requests it runs
  at once; past that a request waits in the engine) and never exceeds them; a replica that
  does not say (a plain OpenAI server) starts at `UNKNOWN_START` and may grow to
  `UNKNOWN_CEILING`.
- Each first token updates it: gradient = clamp((tolerance x long-term TTFT + slack) /
  short-term TTFT, 0.5, 1); new = limit x gradient + sqrt(limit) (room to probe upward),
  smoothed; the slack is the gateway's own event-loop lag (`LoopLag`, x 3, at most
  50 ms), the part of a measured TTFT no replica caused. When
  TTFT rises (a queue forming in the engine, KV pressure, a slower replica, another gateway
  sending to it too), the limit falls; while it holds, the limit climbs back to the slots.
- The gateway admits at most the sum of its ready replicas' limits, and queues a request
  only if it will probably start within its wait budget: interactive requests, half a
  baseline TTFT, and a request still waiting at twice its budget is shed, so an admitted
  request's TTFT stays within about twice the unloaded one; batch requests,
  `BATCH_FACTOR` times that. Everything else is refused at once
  with Retry-After, which well-behaved clients (our SDK, the openai SDK) honour.

Gradient2's constants (tolerance 1.5, smoothing 0.2, the sqrt queue allowance, the 0.5
floor) are Netflix concurrency-limits' defaults; the long/short windows are EWMAs of
about 200 and 5 samples.

The slack is ours. A gateway process at 100% CPU reads every answer late: in front of
three zero-latency mocks (`loadtest.peer_bench`, 64 SSE connections, one process) TTFT
went from ~1 ms to ~15 ms, which the limiter took for queues in the replicas; it cut
their limits (3 x 32) to 26 in all and shed 2-3% of the streams with 503 in 2 runs of 8,
with the replicas idle. A fixed slack (50 ms) stopped that but let a real queue grow
(chaos overload scenario: admitted TTFT p90 1.3-1.9x unloaded, against 1.05-1.14x), so
the slack is what the loop is measured to add, and nothing while it keeps up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.registry.base import WorkerInfo

UNKNOWN_START = 32.0
"""A replica that does not report its batch slots starts here (vLLM's smallest common
max_num_seqs for one GPU is 256, but an unknown server may be much smaller)."""
UNKNOWN_CEILING = 512.0
TOLERANCE = 1.5
SMOOTHING = 0.2
LONG_ALPHA = 0.005
SHORT_ALPHA = 0.2
MIN_WAIT_S = 0.005
"""The shortest wait budget: below this, queueing buys nothing over a retry."""
DEFAULT_BASELINE_S = 0.5
"""Baseline TTFT assumed before any has been measured."""
INTERACTIVE_WAIT = 0.5
"""An interactive request's wait budget, in baseline TTFTs (shed at twice this)."""
BATCH_FACTOR = 10.0
LAG_PROBE_S = 0.05
"""How often the event loop's lag is sampled (a timer's lateness)."""
LAG_FACTOR = 3.0
"""Slack per second of loop lag: an answer waits for the iteration running when it
arrives, then its own handling, and a stream's first chunk crosses the loop twice."""
MAX_SLACK_S = 0.05
"""The most the loop lag excuses: a user does not feel 50 ms of TTFT, and a queue in a
replica (what the limits are for) adds far more, busy gateway or not."""
LAG_ALPHA = 0.2
"""The loop lag's EWMA weight per probe (~5 probes, a quarter second)."""
IDLE_RECOVERY_S = 5.0
"""A replica idle this long (no call in flight from this gateway) gets half its way back
to its slots, and again each such spell: a limit is learnt only from answers, so one cut
by a burst stayed cut (4 and 5 of 128 slots, after the burst and the workers' restart),
and the next burst was shed at a fraction of the fleet's capacity. A replica still slow
cuts it again within a few answers (the gradient's floor halves it)."""


@dataclass
class ReplicaLimit:
    limit: float
    ceiling: float
    long_ttft: float = 0.0
    short_ttft: float = 0.0
    samples: int = 0
    idle_since: float | None = None

    def observe(self, ttft_s: float, slack_s: float = 0.0) -> None:
        if self.samples == 0:
            self.long_ttft = self.short_ttft = ttft_s
        else:
            self.short_ttft += SHORT_ALPHA * (ttft_s - self.short_ttft)
            self.long_ttft += LONG_ALPHA * (ttft_s - self.long_ttft)
            if self.long_ttft > 2 * self.short_ttft:  # recovered from a long spell: follow
                self.long_ttft = 0.9 * self.long_ttft + 0.1 * self.short_ttft
        self.samples += 1
        if self.short_ttft <= 0:
            return
        allowed = TOLERANCE * self.long_ttft + slack_s
        gradient = max(0.5, min(1.0, allowed / self.short_ttft))
        proposed = self.limit * gradient + math.sqrt(self.limit)
        limit = (1 - SMOOTHING) * self.limit + SMOOTHING * proposed
        self.limit = max(1.0, min(self.ceiling, limit))


class LoopLag:
    """How late this process's event loop runs a timer: what a busy gateway adds to every
    latency it measures. An EWMA of ~5 probes (a quarter second): a saturated spell shows
    within it, and one stall (a collection, a long tokenize) adds a fifth of itself and is
    gone within a second."""

    def __init__(self) -> None:
        self.lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def sample(self, late_s: float) -> None:
        self.lag_s += LAG_ALPHA * (max(0.0, late_s) - self.lag_s)

    def slack_s(self) -> float:
        return min(MAX_SLACK_S, LAG_FACTOR * self.lag_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._probe())

    def stop(self) -> None:
        """No more probes, and no slack from the last ones (the drain still observes)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.lag_s = 0.0

    async def _probe(self) -> None:
        while True:
            due = time.monotonic() + LAG_PROBE_S
            await asyncio.sleep(LAG_PROBE_S)
            self.sample(time.monotonic() - due)


class AdaptiveConcurrency:
    """Per-replica limits and the fleet's admission figures derived from them."""

    def __init__(self) -> None:
        self.replicas: dict[str, ReplicaLimit] = {}
        self.loop_lag = LoopLag()
        """Started with the gateway (app.py); never started, it adds no slack."""

    def sync(
        self,
        workers: Iterable[WorkerInfo],
        outstanding: Mapping[str, float] | None = None,
        now: float | None = None,
    ) -> None:
        """Follow the pool: new replicas, reported batch slots, replicas gone, and (given
        this gateway's calls in flight per replica) idle ones' recovery."""
        now = time.monotonic() if now is None else now
        seen = set()
        for w in workers:
            seen.add(w.worker_id)
            slots = float(w.stats.get("max_running", 0) or 0)
            r = self.replicas.get(w.worker_id)
            if r is None:
                start = slots or UNKNOWN_START
                self.replicas[w.worker_id] = ReplicaLimit(start, slots or UNKNOWN_CEILING)
                continue
            if slots and slots != r.ceiling:  # restarted with other settings
                r.ceiling = slots
                r.limit = min(r.limit, slots) if r.samples else slots
            if outstanding is None or outstanding.get(w.worker_id, 0) > 0:
                r.idle_since = None
            elif r.idle_since is None:
                r.idle_since = now
            elif now - r.idle_since >= IDLE_RECOVERY_S and r.limit < r.ceiling:
                r.limit += (r.ceiling - r.limit) / 2
                r.idle_since = now
        for gone in set(self.replicas) - seen:
            del self.replicas[gone]

    def observe(self, worker_id: str, ttft_s: float) -> None:
        r = self.replicas.get(worker_id)
        if r is not None:
            r.observe(ttft_s, self.loop_lag.slack_s())

    def limit(self, worker_id: str) -> int:
        r = self.replicas.get(worker_id)
        return int(r.limit) if r is not None else int(UNKNOWN_START)

    def total(self, worker_ids: Iterable[str]) -> int:
        """What the replicas can take at once: the gateway's in-flight limit."""
        return sum(self.limit(w) for w in worker_ids)

    def baseline_ttft_s(self) -> float:
        """The fleet's typical uncongested TTFT: the median of the replicas' long EWMAs."""
        measured = sorted(r.long_ttft for r in self.replicas.values() if r.samples)
        return measured[len(measured) // 2] if measured else DEFAULT_BASELINE_S

    def wait_budgets(self) -> dict[int, float]:
        """Priority -> the longest a request should wait for a slot."""
        interactive = max(MIN_WAIT_S, INTERACTIVE_WAIT * self.baseline_ttft_s())
        return {0: interactive, 1: interactive * BATCH_FACTOR}
