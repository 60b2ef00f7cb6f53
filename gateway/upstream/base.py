"""The upstream interface: one worker, whatever it speaks, seen as the Generate contract.

It raises `serving.calls.UpstreamError` with a status code from that module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from gateway.registry.base import WorkerInfo
from proto import inference_pb2 as pb


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
