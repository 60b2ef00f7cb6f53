"""A static worker list with active health checks: a single gateway, no other process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from gateway.registry.base import UpstreamKind, WorkerInfo
from gateway.upstream.base import Upstream

log = logging.getLogger(__name__)


def parse_worker_spec(spec: str) -> tuple[UpstreamKind, str]:
    """'127.0.0.1:50051' or 'grpc://host:port' is a gRPC worker; http(s)://... an OpenAI server."""
    if spec.startswith(("http://", "https://")):
        return "openai-http", spec
    return "grpc", spec.removeprefix("grpc://")


class EmbeddedRegistry:
    def __init__(
        self,
        specs: list[str],
        upstream_for: Callable[[WorkerInfo], Upstream],
        interval_s: float = 1.0,
    ) -> None:
        self._workers: dict[str, WorkerInfo] = {}
        for spec in specs:
            kind, address = parse_worker_spec(spec)
            self._workers[address] = WorkerInfo(worker_id=address, address=address, kind=kind)
        self._upstream_for = upstream_for
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def workers(self) -> list[WorkerInfo]:
        return list(self._workers.values())

    async def probe_all(self) -> None:
        async def one(info: WorkerInfo) -> None:
            try:
                await self._upstream_for(info).probe(info)
            except Exception as e:  # a probe must never kill the loop
                log.debug("probe of %s failed: %s", info.address, e)

        await asyncio.gather(*(one(w) for w in self.workers()))

    async def _loop(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        await self.probe_all()
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
