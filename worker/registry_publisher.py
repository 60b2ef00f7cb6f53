"""Heartbeats this worker's registry record into Redis, so every gateway sees it.

A worker keeps serving when it cannot heartbeat: an outage is logged once, and the next
heartbeat after Redis returns puts the worker back in the fleet's view.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

from serving.redis_client import OP_TIMEOUT, REDIS_ERRORS, SOCKET_TIMEOUT, OutageLog, make_client
from serving.registry_record import DEFAULT_PREFIX, DEFAULT_TTL, RegistryKeys, WorkerInfo


class RedisPublisher:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = DEFAULT_TTL,
        socket_timeout: float = SOCKET_TIMEOUT,
        op_timeout: float = OP_TIMEOUT,
    ) -> None:
        self.url = url
        self.ttl = ttl
        self.op_timeout = op_timeout
        self._keys = RegistryKeys(prefix)
        self._client = make_client(url, socket_timeout)
        self._outage = OutageLog("registry publisher")

    async def publish(self, info: WorkerInfo) -> None:
        """Write ``info`` with a fresh TTL and index it; never raises on Redis errors.

        ``updated_at`` is stamped here so that it always means "time of this heartbeat".
        """
        info = dataclasses.replace(info, updated_at=time.time())
        try:
            async with asyncio.timeout(self.op_timeout):
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.set(
                        self._keys.worker(info.worker_id),
                        info.to_json(),
                        px=max(1, round(self.ttl * 1000)),
                    )
                    pipe.sadd(self._keys.index, info.worker_id)
                    await pipe.execute()
        except REDIS_ERRORS as exc:
            self._outage.failed(exc)
        else:
            self._outage.ok()

    async def withdraw(self, worker_id: str) -> None:
        """Remove the worker now (drain or clean exit) rather than waiting for its TTL."""
        try:
            async with asyncio.timeout(self.op_timeout):
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.delete(self._keys.worker(worker_id))
                    pipe.srem(self._keys.index, worker_id)
                    await pipe.execute()
        except REDIS_ERRORS as exc:
            self._outage.failed(exc)
        else:
            self._outage.ok()

    async def close(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            await self._client.aclose()
