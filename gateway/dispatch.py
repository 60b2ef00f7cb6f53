"""Route a request to a worker and stream its answer, retrying elsewhere before the first token.

The commit point is the first delta: until it arrives nothing has reached the client, so a
failure can be retried on another replica (within the retry budget and the deadline, after
a full-jitter backoff); after it, an error ends the stream. Every attempt's outcome feeds the
replica's circuit breaker; cancellation feeds nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tenacity import RetryCallState, wait_random_exponential

from gateway.registry.base import Registry, WorkerInfo, WorkerState, ready_workers
from gateway.resilience.breaker import BreakerBoard, BreakerConfig
from gateway.resilience.retry_budget import RetryBudget
from gateway.routing.policy import RoutingPolicy
from gateway.upstream.base import Upstream
from proto import inference_pb2 as pb
from serving.calls import (
    DEADLINE_EXCEEDED,
    INTERNAL,
    NOT_FOUND,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    CallInfo,
    UpstreamError,
)

log = logging.getLogger(__name__)

# Outcomes that say the replica is unhealthy (its breaker counts them). RESOURCE_EXHAUSTED
# is a healthy replica that is busy, and client errors are the caller's fault.
_HEALTH_FAILURES = {UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED, "UNKNOWN", "ABORTED"}
_RETRYABLE = _HEALTH_FAILURES | {RESOURCE_EXHAUSTED}


@dataclass
class DispatchSettings:
    max_attempts: int = 3
    ttft_timeout_s: float = 60.0
    """Per attempt: no first delta by then counts as a failure and is retried elsewhere."""
    idle_timeout_s: float = 60.0
    """Between deltas once streaming."""
    backoff_base_s: float = 0.02
    backoff_max_s: float = 0.5
    retry_budget_ratio: float = 0.2
    retry_budget_floor: int = 10
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


class Dispatcher:
    def __init__(
        self,
        registry: Registry,
        policy: RoutingPolicy,
        make_upstream: Callable[[WorkerInfo], Upstream],
        settings: DispatchSettings | None = None,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self._make_upstream = make_upstream
        self._upstreams: dict[tuple[str, str, str], Upstream] = {}
        self.outstanding: Counter[str] = Counter()
        self.settings = s = settings or DispatchSettings()
        self.breakers = BreakerBoard(s.breaker)
        self.retry_budget = RetryBudget(s.retry_budget_ratio, s.retry_budget_floor)
        # tenacity computes the backoff; the loop is ours because an attempt is a stream
        # whose first delta is the commit point, which tenacity's retry loop cannot express.
        self._wait = wait_random_exponential(multiplier=s.backoff_base_s, max=s.backoff_max_s)
        self.counters: Counter[str] = Counter()

    def upstream_for(self, info: WorkerInfo) -> Upstream:
        key = (info.worker_id, info.address, info.kind)
        up = self._upstreams.get(key)
        if up is None:
            up = self._upstreams[key] = self._make_upstream(info)
        return up

    def models(self) -> list[str]:
        return sorted({m for w in self.registry.workers() for m in w.models})

    def workers(self) -> list[dict[str, Any]]:
        breakers = self.breakers.snapshot()
        out = []
        for w in self.registry.workers():
            d = asdict(w)
            d["state"] = str(w.state)
            d["outstanding"] = self.outstanding.get(w.worker_id, 0)
            d["breaker"] = breakers.get(w.worker_id, {"state": "closed"})
            out.append(d)
        return out

    def healthy(self, model: str | None = None) -> list[WorkerInfo]:
        return [
            w
            for w in ready_workers(self.registry, model)
            if self.breakers.state(w.worker_id) != "open"
        ]

    def is_ready(self, model: str | None = None) -> bool:
        return bool(self.healthy(model))

    def _backoff(self, retry_number: int) -> float:
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = retry_number
        return float(self._wait(state))

    async def generate(
        self,
        request: pb.GenerateRequest,
        timeout: float | None,
        info: CallInfo | None = None,
    ) -> AsyncIterator[pb.GenerateResponse]:
        s = self.settings
        info = info or CallInfo()
        deadline = time.monotonic() + (timeout if timeout is not None else 3600.0)
        model = request.model or None
        tried: set[str] = set()
        last: UpstreamError | None = None
        self.retry_budget.on_request()
        self.counters["requests"] += 1
        while info.attempts < s.max_attempts:
            if info.attempts > 0:
                if not self.retry_budget.try_spend():
                    self.counters["retry_budget_exhausted"] += 1
                    break
                pause = self._backoff(info.attempts)
                if time.monotonic() + pause >= deadline:
                    break
                await asyncio.sleep(pause)
            worker = self._pick(model, request, tried)
            if worker is None:
                break
            tried.add(worker.worker_id)
            info.attempts += 1
            info.worker_id = worker.worker_id
            self.counters["attempts"] += 1
            try:
                async for resp in self._attempt(worker, request, deadline, info):
                    yield resp
                return
            except _BeforeFirstToken as e:
                last = e.error
                log.info(
                    "attempt %d on %s failed before the first token: %s",
                    info.attempts,
                    worker.worker_id,
                    e.error,
                )
                if e.error.code not in _RETRYABLE:
                    raise e.error from None
        if last is not None:
            raise last
        if model is not None and model not in self.models():
            raise UpstreamError(NOT_FOUND, f"the model `{model}` does not exist")
        raise UpstreamError(UNAVAILABLE, f"no healthy replica for model `{model}`", 1000)

    def _pick(
        self, model: str | None, request: pb.GenerateRequest, tried: set[str]
    ) -> WorkerInfo | None:
        candidates = [w for w in ready_workers(self.registry, model) if w.worker_id not in tried]
        while candidates:
            worker = self.policy.choose(candidates, request, self.outstanding)
            if self.breakers.allow(worker.worker_id):
                return worker
            candidates.remove(worker)
        return None

    async def _attempt(
        self, worker: WorkerInfo, request: pb.GenerateRequest, deadline: float, info: CallInfo
    ) -> AsyncIterator[pb.GenerateResponse]:
        s = self.settings
        pool = [w.worker_id for w in ready_workers(self.registry, request.model or None)]
        self.outstanding[worker.worker_id] += 1
        started = time.monotonic()
        stream = self.upstream_for(worker).generate(request, max(0.001, deadline - started))
        first = True
        outcome: bool | None = None  # None: cancelled, records nothing
        try:
            while True:
                limit = s.ttft_timeout_s if first else s.idle_timeout_s
                limit = min(limit, deadline - time.monotonic())
                try:
                    resp = await asyncio.wait_for(anext(stream), max(0.0, limit))
                except StopAsyncIteration:
                    outcome = True
                    return
                except TimeoutError:
                    what = "time to first token" if first else "idle time between tokens"
                    err = UpstreamError(DEADLINE_EXCEEDED, f"{what} exceeded on {worker.worker_id}")
                    outcome = False
                    if first:
                        raise _BeforeFirstToken(err) from None
                    raise err from None
                except UpstreamError as e:
                    outcome = e.code not in _HEALTH_FAILURES
                    if e.code == UNAVAILABLE:
                        worker.state = WorkerState.NOT_SERVING  # until a probe says otherwise
                    if first:
                        raise _BeforeFirstToken(e) from None
                    raise
                if first:
                    first = False
                    self.breakers.observe_ttft(worker.worker_id, time.monotonic() - started, pool)
                yield resp
        finally:
            self.outstanding[worker.worker_id] -= 1
            self.breakers.release_probe(worker.worker_id)
            if outcome is not None:
                self.breakers.record(worker.worker_id, outcome, pool)
            await stream.aclose()

    async def close(self) -> None:
        for up in self._upstreams.values():
            await up.close()


class _BeforeFirstToken(Exception):
    def __init__(self, error: UpstreamError) -> None:
        super().__init__(str(error))
        self.error = error
