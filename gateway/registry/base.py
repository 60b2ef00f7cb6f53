"""The registry interface shared by the embedded and Redis backends.

A registry answers "which workers are there and how loaded are they" from memory, with no
I/O on the request path: backends refresh their view in the background, and when their
source (Redis) is unreachable they keep serving the last known view.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

UpstreamKind = Literal["grpc", "openai-http"]


class WorkerState(enum.StrEnum):
    STARTING = "STARTING"
    SERVING = "SERVING"
    DRAINING = "DRAINING"
    NOT_SERVING = "NOT_SERVING"


@dataclass
class WorkerInfo:
    """One worker as the gateway sees it; also the JSON a worker publishes to Redis."""

    worker_id: str
    address: str
    """host:port for gRPC workers; a base URL (http://host:port) for OpenAI HTTP servers."""
    kind: UpstreamKind = "grpc"
    models: list[str] = field(default_factory=list)
    state: WorkerState = WorkerState.STARTING
    stats: dict[str, float] = field(default_factory=dict)
    """queue_depth, running, kv_cache_usage, prefix_cache_hit_rate, ... (worker's Stats)."""
    updated_at: float = field(default_factory=time.time)
    """Wall-clock time of the last heartbeat or health check."""

    @property
    def ready(self) -> bool:
        return self.state == WorkerState.SERVING

    def serves(self, model: str | None) -> bool:
        return model is None or not self.models or model in self.models

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: str | bytes) -> WorkerInfo:
        d: dict[str, Any] = json.loads(data)
        d["state"] = WorkerState(d.get("state", "STARTING"))
        return cls(**d)


class Registry(Protocol):
    """Gateway side: a live view of the pool."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def workers(self) -> list[WorkerInfo]:
        """The last known view, every worker in any state (no I/O)."""
        ...


class Publisher(Protocol):
    """Worker side: announce this worker and its stats; a no-op for the embedded registry."""

    async def publish(self, info: WorkerInfo) -> None: ...

    async def withdraw(self, worker_id: str) -> None: ...

    async def close(self) -> None: ...


def ready_workers(registry: Registry, model: str | None = None) -> list[WorkerInfo]:
    return [w for w in registry.workers() if w.ready and w.serves(model)]
