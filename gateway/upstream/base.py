"""The upstream interface: one worker, whatever it speaks, seen as the Generate contract."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from gateway.registry.base import WorkerInfo
from proto import inference_pb2 as pb

# Status codes follow gRPC's names whatever the transport, so callers map them once.
UNAVAILABLE = "UNAVAILABLE"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
INVALID_ARGUMENT = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
INTERNAL = "INTERNAL"
CANCELLED = "CANCELLED"


class UpstreamError(Exception):
    def __init__(
        self,
        code: str,
        message: str,
        retry_after_ms: int | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.param = param

    @property
    def retryable(self) -> bool:
        """Safe to try on another replica (before the first token only)."""
        return self.code in (UNAVAILABLE, RESOURCE_EXHAUSTED, INTERNAL, DEADLINE_EXCEEDED)


class Upstream(Protocol):
    worker_id: str

    def generate(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream deltas; raises UpstreamError. Closing the iterator cancels the call."""
        ...

    async def probe(self, info: WorkerInfo) -> WorkerInfo:
        """Active health check: the worker's state, models and load, refreshed."""
        ...

    async def close(self) -> None: ...
