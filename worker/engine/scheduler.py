"""Iteration-level scheduler: each step, a token budget shared by decodes and prefill chunks.

As in vLLM v1 there is no prefill or decode phase: every request has tokens it has
computed and tokens it still needs, and a step hands out up to `max_num_batched_tokens`
of those, running requests first. When blocks run out the lowest-priority, latest
request is preempted and recomputed later (its full blocks usually come back as prefix
cache hits).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from worker.engine.kv_cache_manager import KVCacheManager
from worker.engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    """What one step computes: requests and how many new tokens each."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[tuple[Request, str]] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        long_prefill_token_threshold: int = 0,
    ) -> None:
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.waiting: list[Request] = []
        """Kept sorted by (priority, arrival)."""
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    def finish(self, request: Request) -> None:
        """Remove a request wherever it is and free its blocks (finish or abort)."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        self.kv.free(request)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    def _cap(self, request: Request, num_new: int, budget: int) -> int:
        num_new = min(num_new, budget)
        if self.long_prefill_token_threshold > 0:
            num_new = min(num_new, self.long_prefill_token_threshold)
        return num_new

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens

        # Running requests first, in priority order so that the victims come from the tail.
        self.running.sort(key=lambda r: r.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._cap(request, request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running[-1]
                if victim is request:
                    # Alone and still out of blocks: it could only fit in a larger pool.
                    if len(self.running) == 1 and not batch.requests:
                        self.running.remove(request)
                        self.kv.free(request)
                        request.status = RequestStatus.FINISHED
                        batch.failed.append(
                            (request, "request needs more KV cache blocks than the pool holds")
                        )
                    else:
                        self._preempt(request)
                        batch.preempted.append(request)
                    request = None
                    break
                self._preempt(victim)
                batch.preempted.append(victim)
            if request is None:
                break
            batch.requests.append(request)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            i += 1

        # Then waiting ones, unless this step already had to preempt.
        if not batch.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                request = self.waiting[0]
                hits: list = []
                num_hit_tokens = 0
                if request.num_computed_tokens == 0:
                    hits, num_hit_tokens = self.kv.get_computed_blocks(request)
                num_new = self._cap(
                    request,
                    request.num_tokens - request.num_computed_tokens - num_hit_tokens,
                    budget,
                )
                if not self.kv.allocate_slots(request, num_new, hits):
                    if not self.running and not batch.requests:
                        # Nothing else holds blocks, so this request can never fit.
                        self.waiting.pop(0)
                        self.kv.free(request)
                        request.status = RequestStatus.FINISHED
                        batch.failed.append(
                            (request, "request needs more KV cache blocks than the pool holds")
                        )
                        continue
                    break
                self.waiting.pop(0)
                if request.num_cached_tokens < 0:
                    request.num_cached_tokens = num_hit_tokens
                request.num_computed_tokens += num_hit_tokens
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                batch.requests.append(request)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
        return batch

    def on_step_done(self, batch: ScheduledBatch) -> None:
        for request, n in zip(batch.requests, batch.num_new_tokens, strict=True):
            request.num_computed_tokens += n
