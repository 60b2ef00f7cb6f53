"""Share ejections between gateways through Redis, off the request path.

Each gateway publishes the replicas it has ejected (with the time left) and honours the
others' ejections, so one gateway's discovery that a replica is sick protects the whole
fleet. Redis being down only means each gateway decides alone until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

from gateway.resilience.breaker import OPEN, BreakerBoard
from serving.redis_client import make_client

log = logging.getLogger(__name__)


class BreakerSync:
    def __init__(
        self, url: str, board: BreakerBoard, prefix: str = "breakwater:", interval_s: float = 0.5
    ) -> None:
        self.board = board
        self.redis = make_client(url)
        self.prefix = f"{prefix}ejected:"
        self.interval_s = interval_s
        self.gateway_id = uuid.uuid4().hex[:12]
        self._task: asyncio.Task[None] | None = None
        self._healthy = True

    async def sync_once(self) -> None:
        now = time.monotonic()
        async with asyncio.timeout(1.0):
            pipe = self.redis.pipeline(transaction=False)
            for worker_id, r in self.board.replicas().items():
                if r.breaker.current_state == OPEN and r.ejected_at is not None:
                    left = r.ejected_at + r.breaker.reset_timeout - now
                    if left > 0.05:
                        key = f"{self.prefix}{worker_id}"
                        pipe.set(key, json.dumps({"by": self.gateway_id}), px=int(left * 1000))
            await pipe.execute()
            keys = [k async for k in self.redis.scan_iter(match=self.prefix + "*", count=200)]
            if keys:
                pipe = self.redis.pipeline(transaction=False)
                for k in keys:
                    pipe.get(k)
                    pipe.pttl(k)
                values = await pipe.execute()
                for i, key in enumerate(keys):
                    raw, ttl_ms = values[2 * i], values[2 * i + 1]
                    if raw is None or ttl_ms is None or ttl_ms <= 0:
                        continue
                    if json.loads(raw).get("by") != self.gateway_id:
                        self.board.force_open(key[len(self.prefix) :], ttl_ms / 1000.0)

    async def _loop(self) -> None:
        while True:
            try:
                await self.sync_once()
                if not self._healthy:
                    log.info("breaker sync: Redis reachable again")
                self._healthy = True
            except Exception as e:
                if self._healthy:
                    log.warning("breaker sync: Redis unavailable (%s); deciding alone", e)
                self._healthy = False
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.redis.aclose()
