"""Routing policies behind one interface: round-robin, least-outstanding, prefix-aware."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from gateway.registry.base import WorkerInfo
from gateway.routing.prefix_index import PrefixIndex, block_keys, prompt_bytes
from proto import inference_pb2 as pb


class RoutingPolicy(Protocol):
    name: str

    def choose(
        self,
        candidates: Sequence[WorkerInfo],
        request: pb.GenerateRequest,
        outstanding: Mapping[str, int],
    ) -> WorkerInfo:
        """Pick one of a non-empty list of ready workers."""
        ...

    def routed(self, worker: WorkerInfo, request: pb.GenerateRequest) -> None:
        """The request was sent to `worker` (called once per attempt, after `choose`)."""
        ...


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(
        self,
        candidates: Sequence[WorkerInfo],
        request: pb.GenerateRequest,
        outstanding: Mapping[str, int],
    ) -> WorkerInfo:
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        return ordered[next(self._counter) % len(ordered)]

    def routed(self, worker: WorkerInfo, request: pb.GenerateRequest) -> None:
        pass


class LeastOutstanding:
    """Fewest requests in flight from this gateway, then the worker's own reported queue."""

    name = "least-outstanding"

    def __init__(self) -> None:
        self._tiebreak = itertools.count()

    def choose(
        self,
        candidates: Sequence[WorkerInfo],
        request: pb.GenerateRequest,
        outstanding: Mapping[str, int],
    ) -> WorkerInfo:
        n = next(self._tiebreak)
        return min(
            candidates,
            key=lambda w: (
                outstanding.get(w.worker_id, 0),
                w.stats.get("queue_depth", 0),
                (hash(w.worker_id) + n) % 997,
            ),
        )

    def routed(self, worker: WorkerInfo, request: pb.GenerateRequest) -> None:
        pass


class PrefixAware:
    """The replica most likely to hold the prompt's prefix in its KV cache, within a load bound.

    Scored as llm-d's scorer weighs its signals (prefix 3, queue 2, KV usage 2), but only
    among replicas whose load is within `rel` x the least loaded + `abs` requests: SGLang's
    router switches to least-loaded only once the pool is already imbalanced (defaults
    abs 64, rel 1.5), and its users report collapse onto one worker under a popular prefix
    before that trips; bounding every decision keeps a hot prefix from piling up at all.
    A request that matches nothing goes to the least loaded replica, which also spreads
    new prefixes. The index is approximate (see PrefixIndex): it learns from the routing
    decisions themselves, so it needs no cooperation from the upstream.
    """

    name = "prefix-aware"

    def __init__(
        self,
        index: PrefixIndex | None = None,
        rel: float = 1.5,
        abs_: float = 4.0,
        weights: tuple[float, float, float] = (3.0, 2.0, 2.0),
    ) -> None:
        self.index = index or PrefixIndex()
        self.rel = rel
        self.abs = abs_
        self.weights = weights
        self._memo: tuple[int, list[int]] = (0, [])
        self._tiebreak = itertools.count()
        self.share: Callable[[str, list[int]], None] | None = None
        """Tells sibling processes or other gateways of each decision (see decision_share)."""

    def _keys(self, request: pb.GenerateRequest) -> list[int]:
        """Block keys, computed once per request even when it is retried."""
        if self._memo[0] != id(request):
            self._memo = (id(request), block_keys(prompt_bytes(request)))
        return self._memo[1]

    def choose(
        self,
        candidates: Sequence[WorkerInfo],
        request: pb.GenerateRequest,
        outstanding: Mapping[str, int],
    ) -> WorkerInfo:
        if len(candidates) == 1:
            return candidates[0]
        keys = self._keys(request)
        # This gateway's own in-flight count: exact now, where the workers' reports are up to
        # a probe interval old (routing on those piled requests onto a worker that had
        # looked idle, and its batch overflowed: the overload scenario caught it).
        loads = {w.worker_id: outstanding.get(w.worker_id, 0) for w in candidates}
        bound = min(loads.values()) * self.rel + self.abs
        eligible = [w for w in candidates if loads[w.worker_id] <= bound]
        matched = self.index.match(keys, {w.worker_id for w in eligible}) if keys else {}
        turn = next(self._tiebreak)
        if not any(matched.values()):  # nothing to gain from a cache: least loaded
            return min(
                eligible,
                key=lambda w: (
                    loads[w.worker_id],
                    w.stats.get("queue_depth", 0),
                    (hash(w.worker_id) + turn) % 997,
                ),
            )
        n = max(1, len(keys))
        top = max(1.0, max(loads.values()))
        wp, wq, wk = self.weights

        def score(w: WorkerInfo) -> tuple[float, int]:
            s = (
                wp * matched.get(w.worker_id, 0) / n
                - wq * loads[w.worker_id] / top
                - wk * w.stats.get("kv_cache_usage", 0.0)
            )
            return s, (hash(w.worker_id) + turn) % 997

        return max(eligible, key=score)

    def learn(self, worker_id: str, keys: list[int]) -> None:
        """Another process or gateway sent a request with these block keys to `worker_id`."""
        self.index.insert(keys, worker_id)

    def routed(self, worker: WorkerInfo, request: pb.GenerateRequest) -> None:
        keys = self._keys(request)
        if keys:
            self.index.insert(keys, worker.worker_id)
            if self.share is not None:
                self.share(worker.worker_id, keys)


POLICIES: dict[str, type[RoutingPolicy]] = {
    "round-robin": RoundRobin,
    "least-outstanding": LeastOutstanding,
    "prefix-aware": PrefixAware,
}


def make_policy(name: str) -> RoutingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown routing policy {name!r}; choose from {sorted(POLICIES)}"
        ) from None
