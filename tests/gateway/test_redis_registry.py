"""The Redis registry against a real redis-server: sharing, expiry, withdraw, outages."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time

import pytest
import redis.asyncio as aioredis

from gateway.registry.base import WorkerInfo, WorkerState, ready_workers
from gateway.registry.redis_backend import RedisRegistry
from tests.gateway._async import DEADLINE, run, wait_for
from tests.gateway.redis_server import RedisServer
from worker.registry_publisher import RedisPublisher

LOGGER = "serving.redis_client"


def worker(worker_id: str, **stats: float) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        address=f"10.0.0.1:{abs(hash(worker_id)) % 10000 + 5000}",
        models=["tiny"],
        state=WorkerState.SERVING,
        stats=dict(stats),
    )


def find(registry: RedisRegistry, worker_id: str) -> WorkerInfo | None:
    return next((w for w in registry.workers() if w.worker_id == worker_id), None)


def ids(registry: RedisRegistry) -> set[str]:
    return {w.worker_id for w in registry.workers()}


def stat(registry: RedisRegistry, worker_id: str, name: str) -> float | None:
    w = find(registry, worker_id)
    return None if w is None else w.stats.get(name)


def test_publish_then_registry_sees_worker_and_stats(redis_server: RedisServer) -> None:
    async def main() -> None:
        registry = RedisRegistry(redis_server.url)  # default poll interval and TTL
        publisher = RedisPublisher(redis_server.url)
        await registry.start()
        try:
            assert registry.workers() == []
            before = time.time()
            await publisher.publish(worker("w1", queue_depth=3, kv_cache_usage=0.25))
            took = await wait_for(lambda: find(registry, "w1") is not None, "w1 to appear")
            assert took < 5.0  # one poll interval (0.5 s) when the machine is idle
            seen = find(registry, "w1")
            assert seen is not None
            assert seen.address == worker("w1").address
            assert seen.models == ["tiny"] and seen.kind == "grpc"
            assert seen.state is WorkerState.SERVING
            assert seen.stats == {"queue_depth": 3, "kv_cache_usage": 0.25}
            assert seen.updated_at >= before  # stamped at heartbeat time
            assert [w.worker_id for w in ready_workers(registry, "tiny")] == ["w1"]

            await publisher.publish(worker("w1", queue_depth=7, kv_cache_usage=0.5))
            await wait_for(lambda: stat(registry, "w1", "queue_depth") == 7, "stats update")
            assert stat(registry, "w1", "kv_cache_usage") == 0.5

            draining = worker("w1", queue_depth=0)
            draining.state = WorkerState.DRAINING
            await publisher.publish(draining)
            await wait_for(lambda: registry.workers()[0].state is WorkerState.DRAINING, "drain")
            assert ready_workers(registry) == []  # still listed, no longer routable
            assert registry.healthy
        finally:
            await publisher.close()
            await registry.close()

    run(main())


def test_two_gateways_share_one_view(redis_server: RedisServer) -> None:
    async def main() -> None:
        gateways = [RedisRegistry(redis_server.url, poll_interval=0.1) for _ in range(2)]
        workers = {i: RedisPublisher(redis_server.url) for i in ("w1", "w2", "w3")}
        for g in gateways:
            await g.start()
        try:
            for i, p in workers.items():
                await p.publish(worker(i, running=1))
            for g in gateways:
                await wait_for(lambda g=g: ids(g) == {"w1", "w2", "w3"}, "the full pool")

            await workers["w2"].publish(worker("w2", running=4))
            for g in gateways:
                await wait_for(lambda g=g: stat(g, "w2", "running") == 4, "w2's update")

            await workers["w3"].withdraw("w3")
            for g in gateways:
                await wait_for(lambda g=g: ids(g) == {"w1", "w2"}, "w3 to leave")
            assert [w.worker_id for w in gateways[0].workers()] == ["w1", "w2"]

            # Another prefix is another fleet.
            other = RedisRegistry(redis_server.url, prefix="elsewhere:")
            await other.start()
            assert other.workers() == [] and other.healthy
            await other.close()
        finally:
            for p in workers.values():
                await p.close()
            for g in gateways:
                await g.close()

    run(main())


def test_worker_that_stops_heartbeating_disappears(redis_server: RedisServer) -> None:
    ttl, poll = 2.0, 0.1

    async def main() -> None:
        registry = RedisRegistry(redis_server.url, poll_interval=poll)
        dead = RedisPublisher(redis_server.url, ttl=ttl)
        alive = RedisPublisher(redis_server.url, ttl=10.0)  # slack for a stalled test loop
        raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        stop = asyncio.Event()

        async def heartbeat() -> None:  # a healthy neighbour, to show expiry is per worker
            n = 0
            while not stop.is_set():
                n += 1
                await alive.publish(worker("alive", seq=n))
                await asyncio.sleep(0.2)

        await registry.start()
        beating = asyncio.create_task(heartbeat())
        try:
            for seq in range(1, 4):
                await dead.publish(worker("dead", seq=seq))
                await asyncio.sleep(0.2)
            # The last heartbeat is seen: the worker is there, with its latest stats...
            await wait_for(lambda: stat(registry, "dead", "seq") == 3, "the last heartbeat")
            assert "dead" in ids(registry)
            # ... then, with no withdraw (as after SIGKILL), its key expires and it leaves.
            await wait_for(lambda: "dead" not in ids(registry), "dead to expire")
            await wait_for(
                lambda: "alive" in ids(registry), "alive to stay", timeout=1.0
            )  # never dropped: its TTL keeps being refreshed
            # A gateway removes the expired id from the index, so the set does not grow.
            members: set[str] = set()
            deadline = time.monotonic() + DEADLINE
            while time.monotonic() < deadline:
                members = await raw.smembers("breakwater:workers")
                if members == {"alive"}:
                    break
                await asyncio.sleep(0.05)
            assert members == {"alive"}
        finally:
            stop.set()
            await beating
            await raw.aclose()
            for p in (dead, alive):
                await p.close()
            await registry.close()

    run(main())


def test_withdraw_removes_promptly(redis_server: RedisServer) -> None:
    async def main() -> None:
        registry = RedisRegistry(redis_server.url, poll_interval=0.1)
        publisher = RedisPublisher(redis_server.url, ttl=60.0)  # expiry cannot explain it
        await registry.start()
        try:
            await publisher.publish(worker("w1"))
            await publisher.publish(worker("w2"))
            await wait_for(lambda: ids(registry) == {"w1", "w2"}, "both workers")
            await publisher.withdraw("w1")
            took = await wait_for(lambda: ids(registry) == {"w2"}, "w1 to leave")
            assert took < 10.0  # a poll interval (0.1 s) when idle, far below the 60 s TTL
        finally:
            await publisher.close()
            await registry.close()

    run(main())


def test_redis_outage_keeps_view_and_recovers(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        # a grace long enough for a loaded machine's restart, heartbeat and poll to fit in
        registry = RedisRegistry(redis_server.url, poll_interval=0.1, recovery_grace=10.0)
        publisher = RedisPublisher(redis_server.url, ttl=60.0)  # only w2 should go
        await registry.start()
        try:
            await publisher.publish(worker("w1", queue_depth=1))
            await publisher.publish(worker("w2", queue_depth=2))
            await wait_for(lambda: ids(registry) == {"w1", "w2"}, "both workers")

            redis_server.kill()
            await wait_for(lambda: registry.consecutive_failures >= 5, "several failed polls")
            assert ids(registry) == {"w1", "w2"}  # the last known view, not an empty pool

            # workers() does no I/O: fast even while refreshes are failing in the background.
            took = []
            for _ in range(200):
                t = time.perf_counter()
                assert len(registry.workers()) == 2
                took.append(time.perf_counter() - t)
                await asyncio.sleep(0)
            # one descheduling of a loaded machine may land in one call; I/O would be in all
            assert statistics.median(took) < 0.005 and max(took) < 0.2

            # A worker's heartbeat neither raises nor hangs while Redis is down.
            for n in range(3):
                t = time.monotonic()
                await publisher.publish(worker("w1", queue_depth=10 + n))
                assert time.monotonic() - t < 5.0  # a bounded try, not a hang
            t = time.monotonic()
            await publisher.withdraw("w3")
            assert time.monotonic() - t < 5.0
            assert ids(registry) == {"w1", "w2"}

            # One warning per component for the whole outage, not one per failed poll.
            warnings = [
                r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING
            ]
            assert len(warnings) == 2, [r.getMessage() for r in warnings]

            await asyncio.to_thread(redis_server.restart)  # same port, empty dataset
            await publisher.publish(worker("w1", queue_depth=42))
            await wait_for(lambda: stat(registry, "w1", "queue_depth") == 42, "updates resume")
            assert registry.healthy
            # w2 did not heartbeat after the restart: kept for the recovery grace (a restarted
            # Redis is empty until the fleet heartbeats again), then dropped like any expiry.
            assert "w2" in ids(registry)
            await wait_for(lambda: "w2" not in ids(registry), "w2 to leave after the grace", 30)
            assert ids(registry) == {"w1"}

            recovered = [r for r in caplog.records if "reachable again" in r.getMessage()]
            assert len(recovered) == 2  # the registry and the publisher, once each
        finally:
            await publisher.close()
            await registry.close()

    run(main())


def test_data_lost_between_two_polls_keeps_the_view_for_the_grace(
    redis_server: RedisServer,
) -> None:
    """A Redis that restarts empty (or fails over to an empty replica) between two polls
    fails none of them: the epoch marker's change starts the grace all the same."""

    async def main() -> None:
        registry = RedisRegistry(redis_server.url, poll_interval=0.1, recovery_grace=3.0)
        publisher = RedisPublisher(redis_server.url, ttl=60.0)
        admin = aioredis.Redis.from_url(redis_server.url)
        await registry.start()
        try:
            await publisher.publish(worker("w1"))
            await publisher.publish(worker("w2"))
            await wait_for(lambda: ids(registry) == {"w1", "w2"}, "both workers")
            await admin.flushall()
            # no poll failed, yet the view stays until the fleet could heartbeat again
            await wait_for(lambda: registry._epoch is not None and registry.healthy, "a poll")
            await asyncio.sleep(0.5)  # several polls of the empty Redis
            assert registry.consecutive_failures == 0
            assert ids(registry) == {"w1", "w2"}
            await publisher.publish(worker("w1"))
            await wait_for(lambda: "w2" not in ids(registry), "w2 to leave after the grace")
            assert ids(registry) == {"w1"}
        finally:
            await admin.aclose()
            await publisher.close()
            await registry.close()

    run(main())


def test_idle_clients_survive_a_restart(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Pooled connections the old server closed are replaced, not failed on, after a restart."""

    async def main() -> None:
        registry = RedisRegistry(redis_server.url, poll_interval=0.1)
        publisher = RedisPublisher(redis_server.url, ttl=60.0)
        await registry.start()
        try:
            await publisher.publish(worker("w1", seq=1))
            await wait_for(lambda: stat(registry, "w1", "seq") == 1, "w1")
            await registry.close()  # idle too: only pooled connections are left

            await asyncio.to_thread(redis_server.restart)
            await publisher.publish(worker("w1", seq=2))  # the first heartbeat must land
            registry = RedisRegistry(redis_server.url)
            await registry.start()
            assert stat(registry, "w1", "seq") == 2
            assert not [r for r in caplog.records if r.name == LOGGER], caplog.text
        finally:
            await publisher.close()
            await registry.close()

    run(main())


def test_start_and_publish_with_redis_down(redis_server: RedisServer) -> None:
    """A gateway or worker that boots before Redis still starts, and catches up later."""

    async def main() -> None:
        redis_server.kill()
        registry = RedisRegistry(redis_server.url, poll_interval=0.1)
        publisher = RedisPublisher(redis_server.url)
        try:
            t = time.monotonic()
            await registry.start()
            await publisher.publish(worker("w1"))
            assert time.monotonic() - t < 3.0
            assert registry.workers() == [] and not registry.healthy

            await asyncio.to_thread(redis_server.start)
            await publisher.publish(worker("w1"))
            await wait_for(lambda: ids(registry) == {"w1"}, "w1 once Redis is up")
        finally:
            await publisher.close()
            await registry.close()

    run(main())


def test_hung_redis_fails_fast(redis_server: RedisServer) -> None:
    """SIGSTOPped Redis accepts connections but never answers: timeouts, not hangs."""

    async def main() -> None:
        registry = RedisRegistry(redis_server.url, poll_interval=0.1)
        publisher = RedisPublisher(redis_server.url)
        await registry.start()
        try:
            await publisher.publish(worker("w1", queue_depth=1))
            await wait_for(lambda: ids(registry) == {"w1"}, "w1")

            redis_server.pause()
            for n in range(3):
                t = time.monotonic()
                await publisher.publish(worker("w1", queue_depth=10 + n))
                assert time.monotonic() - t < 5.0  # 0.25 s socket timeout, 1 s at most
            await wait_for(lambda: registry.consecutive_failures >= 2, "failed polls")
            assert ids(registry) == {"w1"}
            took = []
            for _ in range(100):  # any I/O here would block for the 0.25 s socket timeout
                t = time.perf_counter()
                assert len(registry.workers()) == 1
                took.append(time.perf_counter() - t)
                await asyncio.sleep(0)
            assert statistics.median(took) < 0.005 and max(took) < 0.2

            redis_server.resume()
            await publisher.publish(worker("w1", queue_depth=5))
            await wait_for(lambda: stat(registry, "w1", "queue_depth") == 5, "recovery")
            assert registry.healthy
        finally:
            await publisher.close()
            await registry.close()

    run(main())
