"""Route a request to a worker and stream its answer, retrying elsewhere before the first token.

The commit point is the first delta: until it arrives nothing has reached the client, so a
failure can be retried on another replica; after it, an error ends the stream.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

from gateway.registry.base import Registry, WorkerInfo, WorkerState, ready_workers
from gateway.routing.policy import RoutingPolicy
from gateway.upstream.base import NOT_FOUND, UNAVAILABLE, Upstream, UpstreamError
from proto import inference_pb2 as pb

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self,
        registry: Registry,
        policy: RoutingPolicy,
        make_upstream: Callable[[WorkerInfo], Upstream],
        max_attempts: int = 2,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self._make_upstream = make_upstream
        self._upstreams: dict[tuple[str, str, str], Upstream] = {}
        self.outstanding: Counter[str] = Counter()
        self.max_attempts = max_attempts

    def upstream_for(self, info: WorkerInfo) -> Upstream:
        key = (info.worker_id, info.address, info.kind)
        up = self._upstreams.get(key)
        if up is None:
            up = self._upstreams[key] = self._make_upstream(info)
        return up

    def models(self) -> list[str]:
        return sorted({m for w in self.registry.workers() for m in w.models})

    def workers(self) -> list[dict[str, Any]]:
        out = []
        for w in self.registry.workers():
            d = asdict(w)
            d["state"] = str(w.state)
            d["outstanding"] = self.outstanding.get(w.worker_id, 0)
            out.append(d)
        return out

    def is_ready(self, model: str | None = None) -> bool:
        return bool(ready_workers(self.registry, model))

    async def generate(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[pb.GenerateResponse]:
        model = request.model or None
        tried: set[str] = set()
        last: UpstreamError | None = None
        for _ in range(self.max_attempts):
            candidates = [
                w for w in ready_workers(self.registry, model) if w.worker_id not in tried
            ]
            if not candidates:
                break
            worker = self.policy.choose(candidates, request, self.outstanding)
            tried.add(worker.worker_id)
            self.outstanding[worker.worker_id] += 1
            started = False
            try:
                async for resp in self.upstream_for(worker).generate(request, timeout):
                    started = True
                    yield resp
                return
            except UpstreamError as e:
                if e.code == UNAVAILABLE:
                    # Passive check: stop routing here until a probe says otherwise.
                    worker.state = WorkerState.NOT_SERVING
                if started or not e.retryable:
                    raise
                log.info("attempt on %s failed before the first token: %s", worker.worker_id, e)
                last = e
            finally:
                self.outstanding[worker.worker_id] -= 1
        if last is not None:
            raise last
        if model is not None and model not in self.models():
            raise UpstreamError(NOT_FOUND, f"the model `{model}` does not exist")
        raise UpstreamError(UNAVAILABLE, f"no ready worker for model `{model}`", 1000)

    async def close(self) -> None:
        for up in self._upstreams.values():
            await up.close()
