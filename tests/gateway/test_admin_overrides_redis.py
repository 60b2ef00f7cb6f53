"""The admin overrides in Redis survive a Redis restart that loses them (no persistence),
while an operator who removes the last override still empties them."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
import redis.asyncio as aioredis

from gateway.admin.overrides import KEY, Overrides, RedisStore
from gateway.admission.tenants import AdmissionSettings, TenantDirectory, new_api_key
from tests.gateway._async import run, wait_for
from tests.gateway.redis_server import RedisServer

POLL = 0.05
HOLD = 3.0
"""How long an override must stay in force after the restart: many polls."""
SECRET = b"overrides-redis-test-secret"


async def holds(cond: object, what: str, seconds: float = HOLD) -> None:
    """`cond()` stays true for `seconds` (checked every few ms)."""
    assert callable(cond)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert cond(), f"{what} no longer holds"
        await asyncio.sleep(0.01)


async def stored(url: str) -> dict[str, str]:
    client = aioredis.Redis.from_url(
        url, decode_responses=True, socket_timeout=10, socket_connect_timeout=10
    )
    try:
        return await client.hgetall("breakwater:admin:overrides")
    finally:
        await client.aclose()


async def started(url: str) -> Overrides:
    overrides = Overrides(RedisStore(url), poll_s=POLL)
    await overrides.start()
    return overrides


def in_force(o: Overrides, key_id: str) -> bool:
    return (
        o.blocked("w1")
        and not o.blocked("w2")
        and o.splits.get("chat") is not None
        and o.splits["chat"].weights == {"chat-v1": 9.0, "chat-v2": 1.0}
        and o.keys.get(key_id, {}).get("revoked") is True
    )


def test_overrides_survive_a_redis_restart_and_are_written_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Two gateways hold the overrides; Redis restarts empty (kill, start again on the same
    port); both keep them in force and write them back, and the hash ends up whole."""

    async def main() -> None:
        a, b = await started(redis_server.url), await started(redis_server.url)
        try:
            _, key_id, digest = new_api_key(SECRET)
            await a.act("drain", "w1", "op")
            await a.set_split("chat", {"chat-v1": 9, "chat-v2": 1}, "op")
            entry = {"tenant": "acme", "digest": digest, "created_at": 1.0, "revoked": False}
            await a.put(KEY, key_id, entry, {"action": "key_create"})
            await a.put(KEY, key_id, {"tenant": "acme", "revoked": True}, {"action": "revoke"})
            await wait_for(lambda: in_force(a, key_id) and in_force(b, key_id), "b follows a")
            before = await stored(redis_server.url)

            redis_server.restart()  # a real restart: empty, as with the shipped configs
            with caplog.at_level(logging.WARNING, logger="breakwater.admin"):
                await holds(lambda: in_force(a, key_id) and in_force(b, key_id), "overrides")
            assert await stored(redis_server.url) == before  # written back, whole, once
            lost = [r for r in caplog.records if "Redis lost them" in r.getMessage()]
            assert 1 <= len(lost) <= 2  # whoever wrote them back; once, not every poll

            # a gateway started after the restart reads them back too
            c = await started(redis_server.url)
            try:
                assert in_force(c, key_id)
            finally:
                await c.close()
        finally:
            await a.close()
            await b.close()

    run(main())


def test_an_act_right_after_the_restart_keeps_the_other_overrides(
    redis_server: RedisServer,
) -> None:
    """The first write after a restart (before any poll put the overrides back) restores
    them in the same script, and its own change still wins."""

    async def main() -> None:
        a = Overrides(RedisStore(redis_server.url), poll_s=3600)  # no poll: only the act
        await a.start()
        try:
            await a.act("drain", "w1", "op")
            await a.act("eject", "w2", "op")
            redis_server.restart()
            try:
                await a.act("readmit", "w2", "op")
            except aioredis.ConnectionError:  # the pooled connection died with the server:
                await a.act("readmit", "w2", "op")  # the operator's retry
            assert a.states == {"w1": "drained"}
            data = await stored(redis_server.url)
            assert data.pop(RedisStore.MARKER) == "1"
            assert data == {"worker:w1": "drained"}
        finally:
            await a.close()

    run(main())


def test_removing_the_last_override_empties_them_everywhere(redis_server: RedisServer) -> None:
    async def main() -> None:
        a, b = await started(redis_server.url), await started(redis_server.url)
        try:
            await a.act("drain", "w1", "op")
            await wait_for(lambda: b.blocked("w1"), "b sees the drain")
            await a.act("undrain", "w1", "op")
            await wait_for(lambda: not b.blocked("w1"), "b sees the undrain")
            await holds(lambda: a.states == b.states == {} and not a.blocked("w1"), "empty")
            assert await stored(redis_server.url) == {RedisStore.MARKER: "1"}
            # and a restart now has nothing to bring back
            redis_server.restart()
            await holds(lambda: a.states == b.states == {}, "still empty", 1.0)
            assert await stored(redis_server.url) == {}
        finally:
            await a.close()
            await b.close()

    run(main())


def test_overrides_written_before_the_marker_existed_are_read() -> None:
    """Data without the marker and nothing known here (an older gateway wrote it, or a
    brand-new deployment) is taken as it is."""

    async def main() -> None:
        with RedisServer() as server:
            client = aioredis.Redis.from_url(server.url, decode_responses=True)
            try:
                await client.hset(
                    "breakwater:admin:overrides", "split:chat", json.dumps({"chat-v2": 1})
                )
            finally:
                await client.aclose()
            o = await started(server.url)
            try:
                assert o.resolve("chat") == "chat-v2"
                await holds(lambda: o.resolve("chat") == "chat-v2", "the split", 0.5)
            finally:
                await o.close()

    run(main())


def test_run_time_keys_that_vanish_do_not_open_the_gateway() -> None:
    """Without require_keys: a key made at run time closes the gateway; the store losing
    it (emptied, unreadable) keeps it closed, as revoking does."""
    d = TenantDirectory(AdmissionSettings(key_secret=SECRET))
    assert not d.keys_required
    _, key_id, digest = new_api_key(SECRET)
    d.set_runtime_keys({key_id: {"tenant": "default", "digest": digest, "revoked": False}})
    assert d.keys_required
    d.set_runtime_keys({})
    assert d.keys_required and d.default is None


def test_the_registry_drops_bad_records_and_survives_a_deep_one(
    redis_server: RedisServer,
) -> None:
    """Null or string stats, and JSON nested past the recursion limit, are dropped at the
    read (not crashing the request path or ending the refresh loop); good records stay."""
    from gateway.registry.redis_backend import RedisRegistry
    from serving.registry_record import RegistryKeys, WorkerInfo

    async def main() -> None:
        keys = RegistryKeys()
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        good = WorkerInfo("good", "10.0.0.1:5000", stats={"queue_depth": 1})
        bad = {
            "good": good.to_json(),
            "null": json.dumps({"worker_id": "null", "address": "a:1", "stats": None}),
            "text": json.dumps({"worker_id": "text", "address": "a:1", "stats": "x"}),
            "deep": '{"worker_id": "deep", "address": "a:1", "stats": ' + "[" * 100_000,
        }
        registry = RedisRegistry(redis_server.url, poll_interval=POLL)
        try:
            for worker_id, blob in bad.items():
                await client.set(keys.worker(worker_id), blob, ex=60)
                await client.sadd(keys.index, worker_id)
            await registry.start()
            await wait_for(lambda: [w.worker_id for w in registry.workers()] == ["good"], "good")
            await asyncio.sleep(10 * POLL)
            assert registry._task is not None and not registry._task.done()
            # healthy again by the next polls: one poll may time out on a loaded machine
            await wait_for(
                lambda: registry.healthy and [w.worker_id for w in registry.workers()] == ["good"],
                "healthy with the good record only",
            )
        finally:
            await registry.close()
            await client.aclose()

    run(main())
