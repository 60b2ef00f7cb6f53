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
  smoothed. When
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
about 200 and 5 samples. The slack (`TTFT_SLACK_S`) is ours: TTFT as a gateway measures
it carries the gateway's own scheduling, and against fast replicas that was all the rise
there was (Envoy's filter adds a buffer to its minimum RTT for the same reason).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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
TTFT_SLACK_S = 0.05
"""A TTFT rise this small is no queue in the replica: a saturated gateway's own event
loop adds that much. Without it, a one-process gateway at 100% CPU in front of three
zero-latency mocks (`loadtest.peer_bench`, 64 SSE connections) saw TTFT go from ~1 ms to
~15 ms, cut the limits of 3 x 32 to 26 in all and shed 2-3% of the streams with 503,
where the replicas were idle; a user does not feel 50 ms of TTFT, and a real queue (the
failure this guards against) adds seconds."""
MIN_WAIT_S = 0.05
"""The shortest wait budget: a request refused sooner is told to retry in 50 ms anyway
(queue.MIN_RETRY_AFTER_S), so waiting that long costs it nothing a retry would not."""
DEFAULT_BASELINE_S = 0.5
"""Baseline TTFT assumed before any has been measured."""
INTERACTIVE_WAIT = 0.5
"""An interactive request's wait budget, in baseline TTFTs (shed at twice this)."""
BATCH_FACTOR = 10.0


@dataclass
class ReplicaLimit:
    limit: float
    ceiling: float
    long_ttft: float = 0.0
    short_ttft: float = 0.0
    samples: int = 0

    def observe(self, ttft_s: float) -> None:
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
        allowed = TOLERANCE * self.long_ttft + TTFT_SLACK_S
        gradient = max(0.5, min(1.0, allowed / self.short_ttft))
        proposed = self.limit * gradient + math.sqrt(self.limit)
        limit = (1 - SMOOTHING) * self.limit + SMOOTHING * proposed
        self.limit = max(1.0, min(self.ceiling, limit))


class AdaptiveConcurrency:
    """Per-replica limits and the fleet's admission figures derived from them."""

    def __init__(self) -> None:
        self.replicas: dict[str, ReplicaLimit] = {}

    def sync(self, workers: Iterable[WorkerInfo]) -> None:
        """Follow the pool: new replicas, reported batch slots, replicas gone."""
        seen = set()
        for w in workers:
            seen.add(w.worker_id)
            slots = float(w.stats.get("max_running", 0) or 0)
            r = self.replicas.get(w.worker_id)
            if r is None:
                start = slots or UNKNOWN_START
                self.replicas[w.worker_id] = ReplicaLimit(start, slots or UNKNOWN_CEILING)
            elif slots and slots != r.ceiling:  # restarted with other settings
                r.ceiling = slots
                r.limit = min(r.limit, slots) if r.samples else slots
        for gone in set(self.replicas) - seen:
            del self.replicas[gone]

    def observe(self, worker_id: str, ttft_s: float) -> None:
        r = self.replicas.get(worker_id)
        if r is not None:
            r.observe(ttft_s)

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
