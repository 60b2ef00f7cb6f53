"""Routing policies behind one interface (prefix-cache-aware routing comes in its own issue)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Protocol

from gateway.registry.base import WorkerInfo
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


POLICIES = {"round-robin": RoundRobin, "least-outstanding": LeastOutstanding}


def make_policy(name: str) -> RoutingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown routing policy {name!r}; choose from {sorted(POLICIES)}"
        ) from None
