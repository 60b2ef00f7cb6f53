"""Two gateways' breaker boards agree through a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gateway.resilience.breaker import CLOSED, OPEN, BreakerBoard, BreakerConfig
from gateway.resilience.breaker_sync import BreakerSync
from tests.gateway.redis_server import RedisServer


async def until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.02)


def test_ejection_on_one_gateway_is_honoured_by_another() -> None:
    async def main(url: str) -> None:
        # An ejection long enough to outlast any stall of a loaded machine: one of 5 s
        # expired in Redis before the other board read it, once, beside a busy suite.
        a, b = BreakerBoard(BreakerConfig(base_ejection_s=60.0)), BreakerBoard()
        sa, sb = BreakerSync(url, a, interval_s=0.1), BreakerSync(url, b, interval_s=0.1)
        await sa.start()
        await sb.start()
        try:
            assert b.state("w1") == CLOSED
            assert a.eject("w1", ["w1", "w2", "w3"])
            await until(lambda: b.state("w1") == OPEN)
            assert b.state("w2") == CLOSED
        finally:
            await sa.close()
            await sb.close()

    with RedisServer() as redis:
        asyncio.run(main(redis.url))
