"""Two gateways' breaker boards agree through a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from gateway.resilience.breaker import CLOSED, HALF_OPEN, OPEN, BreakerBoard, BreakerConfig
from gateway.resilience.breaker_sync import BreakerSync, SiblingBreakerSync
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


def test_another_gateways_ejection_keeps_within_the_share_cap() -> None:
    """Gateways that each eject a different replica of one pool must not together empty
    it: another gateway's word is honoured only while the pool stays under the cap."""
    pool = ["w1", "w2", "w3"]

    async def main(url: str) -> None:
        a = BreakerBoard(BreakerConfig(base_ejection_s=60.0))
        b = BreakerBoard(BreakerConfig(base_ejection_s=60.0))
        sa = BreakerSync(url, a, interval_s=0.1, pools=lambda _w: [pool])
        sb = BreakerSync(url, b, interval_s=0.1, pools=lambda _w: [pool])
        await sa.start()
        await sb.start()
        try:
            assert b.eject("w3", pool)  # b's own: 1 of 3
            assert a.eject("w1", pool) and a.eject("w2", pool)  # a's own: 2 of 3
            await until(lambda: b.state("w1") == OPEN or b.state("w2") == OPEN)
            for _ in range(5):  # several syncs later, each still serves from one replica
                await sa.sync_once()
                await sb.sync_once()
                assert sum(b.state(w) == OPEN for w in pool) == 2
                assert a.state("w3") == CLOSED  # a is at its cap with its own two
        finally:
            await sa.close()
            await sb.close()

    with RedisServer() as redis:
        asyncio.run(main(redis.url))


def test_unreadable_entries_are_dropped_and_block_nothing() -> None:
    async def main(url: str) -> None:
        a, b = BreakerBoard(BreakerConfig(base_ejection_s=60.0)), BreakerBoard()
        sa, sb = BreakerSync(url, a), BreakerSync(url, b)
        try:
            await sb.redis.hset(sb.key, mapping={"wx": "not an entry", "wy": "g 12ab"})
            assert a.eject("w1", ["w1", "w2", "w3"])
            await sa.sync_once()
            await sb.sync_once()
            assert b.state("w1") == OPEN
            assert sorted(await sb.redis.hkeys(sb.key)) == ["w1"]
            # no key per replica: a sync reads one hash, not a SCAN of a shared keyspace
            assert await sb.redis.keys("*") == [sb.key]
            ttl = await sb.redis.pttl(sb.key)
            assert 0 < ttl <= 61_000 + 1000
        finally:
            await sa.close()
            await sb.close()

    with RedisServer() as redis:
        asyncio.run(main(redis.url))


def test_without_redis_a_gateways_processes_share_ejections_through_their_directory(
    tmp_path: Path,
) -> None:
    """Each process found a dead replica alone (21 failed attempts at three processes
    against 7 at one): one's ejection now opens the replica in its siblings for as long,
    not echoed back, and ends with it; a torn or foreign file blocks nothing."""

    async def main() -> None:
        a = BreakerBoard(BreakerConfig(base_ejection_s=4.0))  # outlasts a loaded box's stalls
        b, c = BreakerBoard(), BreakerBoard()
        syncs = [
            SiblingBreakerSync(str(tmp_path), i, 3, board, interval_s=0.05)
            for i, board in enumerate((a, b, c))
        ]
        (tmp_path / "ejections-9.json").write_bytes(b'{"w2": 1e300}')  # not this run's
        (tmp_path / "ejections-2.json").write_bytes(b'{"w2": null}')  # torn: c rewrites it
        # another boot's clock (an operator's directory outlives runs): ignored
        (tmp_path / "ejections-1.json").write_bytes(b'{"w3": %f}' % (time.monotonic() + 1e5))
        for s in syncs:
            await s.start()
        try:
            assert a.eject("w1", ["w1", "w2", "w3"])
            await until(lambda: b.state("w1") == OPEN and c.state("w1") == OPEN)
            assert b.state("w2") == CLOSED and c.state("w2") == CLOSED
            assert all(x.state("w3") == CLOSED for x in (a, b, c))
            assert syncs[1].own() == {} and syncs[2].own() == {}  # honoured, not echoed
            await until(lambda: a.state("w1") != OPEN)  # a's ejection ends: so do theirs,
            # each with a probe first, as a's own (a sick replica fails it and is ejected)
            await until(lambda: b.state("w1") == HALF_OPEN and c.state("w1") == HALF_OPEN)
            assert b.allow("w1") and not b.allow("w1")  # one probe at a time
            b.record("w1", True)
            c.record("w1", False, ["w1", "w2", "w3"])
            assert b.state("w1") == CLOSED and c.state("w1") == OPEN
        finally:
            for s in syncs:
                await s.close()
        assert not list(tmp_path.glob("ejections-[0-2].json"))  # each removes its own

    asyncio.run(main())
