"""Cluster-wide buckets against a real redis-server: sharing, the Lua math, outages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import statistics
import time
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.admission import Admission, AdmissionSettings, GlobalLimits, Quota, Tenant
from gateway.admission.buckets import BucketSpec
from gateway.admission.redis_buckets import RedisBuckets
from gateway.admission.tenants import hash_key
from proto.openai_compat import OpenAIError
from tests.gateway._async import DEADLINE, run, wait_for
from tests.gateway.redis_server import RedisServer

SECRET = b"redis-test-secret"
NO_DEADLINE = math.inf
PREFIX = "test:admission:"


def settings(burst: float, **kwargs: Any) -> AdmissionSettings:
    """Tenant ``acme`` (key ``k``) may send ``burst`` requests, then about nothing more."""
    quota = Quota(requests_per_second=0.001, request_burst=burst)
    return AdmissionSettings(
        tenants=(Tenant("acme", quota, (hash_key("k", SECRET),)),),
        key_secret=SECRET,
        redis_prefix=PREFIX,
        **kwargs,
    )


PATIENT = {"redis_socket_timeout_s": 2.0, "redis_op_timeout_s": 5.0}
"""For tests that check Redis's answers, not outages: a loaded machine must not fall back."""


async def try_admit(adm: Admission) -> tuple[bool, float]:
    """(admitted, seconds taken); any refusal other than 429 fails the test."""
    t0 = time.perf_counter()
    try:
        ticket = await adm.admit("Bearer k", 1, None, NO_DEADLINE)
    except OpenAIError as e:
        assert e.status == 429, e.message
        assert e.retry_after_ms is not None and e.retry_after_ms >= 1
        return False, time.perf_counter() - t0
    ticket.release()
    return True, time.perf_counter() - t0


async def redis_keys(url: str) -> list[str]:
    client = aioredis.Redis.from_url(url, decode_responses=True, protocol=2)
    try:
        return sorted(await client.keys(PREFIX + "*"))
    finally:
        await client.aclose()


def test_two_gateways_share_one_cluster_wide_limit(redis_server: RedisServer) -> None:
    async def main() -> None:
        a = Admission(settings(10, **PATIENT), redis_url=redis_server.url)
        b = Admission(settings(10, **PATIENT), redis_url=redis_server.url)
        await a.start()
        await b.start()
        try:
            # Interleaved and concurrent: with local buckets each gateway would admit 10.
            results = await asyncio.gather(*(try_admit(a if i % 2 else b) for i in range(40)))
            assert sum(ok for ok, _ in results) == 10
            assert a.counts["admitted"] > 0 and b.counts["admitted"] > 0
            assert a.redis is not None and b.redis is not None
            assert a.redis.failures == 0 and b.redis.failures == 0
            keys = await redis_keys(redis_server.url)
            assert PREFIX + "tenant:acme:requests" in keys
            # 40 at once on one core; a loaded machine's scheduling, not a timeout's wait
            assert statistics.median(t for _, t in results) < 2.0
            # Refusals through Redis are quick too.
            times = [(await try_admit(a))[1] for _ in range(100)]
            assert statistics.median(times) < 0.05
        finally:
            await a.close()
            await b.close()

    run(main())


def test_lua_refill_math_and_all_or_nothing(redis_server: RedisServer) -> None:
    async def main() -> None:
        rb = RedisBuckets(redis_server.url, prefix=PREFIX, socket_timeout=2.0, op_timeout=5.0)
        try:
            # 2/s: the three takes below may span a loaded machine's 100s of ms
            fast = BucketSpec("fast", rate=2.0, burst=2.0, cost=1.0)
            slow = BucketSpec("slow", rate=0.001, burst=100.0, cost=60.0)
            assert (await rb.take([fast])).allowed  # type: ignore[union-attr]
            assert (await rb.take([fast])).allowed  # type: ignore[union-attr]
            denied = await rb.take([fast])
            assert denied is not None and not denied.allowed and denied.limiting == 0
            assert 0 < denied.wait_s <= 0.5  # one token at 2/s
            # Refills at the configured rate (by Redis's clock): allowed again within 0.5 s.
            t0 = time.monotonic()
            while not (r := await rb.take([fast])) or not r.allowed:
                assert time.monotonic() - t0 < DEADLINE, "never refilled"
                await asyncio.sleep(0.005)
            # All or nothing: slow refuses the second charge, so fast is not charged for it.
            assert (await rb.take([slow])).allowed  # type: ignore[union-attr]
            await asyncio.sleep(1.5)  # let fast fill up to its burst of 2 (1.5x the need)
            denied = await rb.take([fast, slow])
            assert denied is not None and denied.limiting == 1
            assert denied.wait_s > 1000  # 20 tokens at 0.001/s
            assert (await rb.take([fast])).allowed  # type: ignore[union-attr]
            assert (await rb.take([fast])).allowed  # type: ignore[union-attr]
            client = aioredis.Redis.from_url(redis_server.url, decode_responses=True, protocol=2)
            level = float(await client.hget(PREFIX + "slow", "l"))  # type: ignore[arg-type]
            ttl = await client.pttl(PREFIX + "slow")
            await client.aclose()
            assert level == pytest.approx(40.0, abs=0.01)
            assert 0 < ttl <= 100 / 0.001 * 1000 + 1000  # expires once it would be full
            assert rb.failures == 0
        finally:
            await rb.close()

    run(main())


def test_lua_costs_above_the_burst_are_paid_in_full(redis_server: RedisServer) -> None:
    """As LocalBuckets: a full bucket admits it, the debt delays the next; and a burst as
    large as the config allows (1e15) is no script error (its TTL was written "1e+18")."""

    async def main() -> None:
        rb = RedisBuckets(redis_server.url, prefix=PREFIX, socket_timeout=2.0, op_timeout=5.0)
        try:
            small = BucketSpec("small", rate=1.0, burst=0.5, cost=1.0)
            assert (await rb.take([small])).allowed  # type: ignore[union-attr]
            denied = await rb.take([small])
            assert denied is not None and not denied.allowed
            # from -0.5 back to a full 0.5, at 1/s, less what refilled between the takes
            assert 0.5 < denied.wait_s <= 1.0
            huge = BucketSpec("huge", rate=1.0, burst=1e15, cost=1.0)
            assert (await rb.take([huge])).allowed  # type: ignore[union-attr]
            assert rb.failures == 0
        finally:
            await rb.close()

    run(main())


def test_redis_killed_falls_back_to_local_fast_and_recovers(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.admission.redis_buckets")

    async def main() -> None:
        # Default (fail-fast) timeouts; a short probe interval keeps the test quick.
        adm = Admission(settings(5, redis_probe_interval_s=0.05), redis_url=redis_server.url)
        await adm.start()
        try:
            assert adm.redis is not None
            assert (await try_admit(adm))[0]
            assert PREFIX + "tenant:acme:requests" in await redis_keys(redis_server.url)

            redis_server.kill()
            results = [await try_admit(adm) for _ in range(30)]
            times = sorted(t for _, t in results)
            assert not adm.redis.available and adm.redis.failures >= 1
            # Local buckets took over: a fresh local burst of 5, then 429s; no exception.
            assert sum(ok for ok, _ in results) == 5
            assert times[len(times) * 9 // 10] < 0.2, times  # p90 < 200 ms, loaded or not
            assert times[-1] < 3.0, times  # not redis-py's 5 s timeouts with retries

            redis_server.start()  # same port, empty dataset
            await wait_for(lambda: adm.redis is not None and adm.redis.available, "recovery")
            # Back on Redis: its restarted (empty) bucket grants a burst again, which the
            # exhausted local bucket could not.
            results = [await try_admit(adm) for _ in range(10)]
            assert sum(ok for ok, _ in results) == 5
            assert PREFIX + "tenant:acme:requests" in await redis_keys(redis_server.url)
        finally:
            await adm.close()

    run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Redis unavailable" in m for m in messages) == 1  # once per outage, not per call
    assert any("reachable again" in m for m in messages)


def test_hung_redis_costs_one_timeout_then_local(redis_server: RedisServer) -> None:
    """SIGSTOP: connections are accepted but nothing answers; only the first call waits."""

    async def main() -> None:
        adm = Admission(settings(1000, redis_probe_interval_s=0.05), redis_url=redis_server.url)
        await adm.start()
        try:
            assert (await try_admit(adm))[0]
            redis_server.pause()
            first_ok, first = await try_admit(adm)
            assert first_ok and first < 1.0  # the op timeout (0.1 s), with slack for load
            assert adm.redis is not None and not adm.redis.available
            results = [await try_admit(adm) for _ in range(50)]
            assert all(ok for ok, _ in results)
            times = sorted(t for _, t in results)
            assert times[len(times) // 2] < 0.02 and times[len(times) * 9 // 10] < 0.05, times
            redis_server.resume()
            await wait_for(lambda: adm.redis is not None and adm.redis.available, "recovery")
            assert (await try_admit(adm))[0]
        finally:
            await adm.close()

    run(main())


def test_gateway_started_while_redis_is_down(redis_server: RedisServer) -> None:
    async def main() -> None:
        url = redis_server.url
        redis_server.kill()
        adm = Admission(settings(3, redis_probe_interval_s=0.05), redis_url=url)
        t0 = time.monotonic()
        await adm.start()
        assert time.monotonic() - t0 < 3.0  # not a connect timeout's wait per try
        try:
            assert adm.redis is not None and not adm.redis.available
            results = [await try_admit(adm) for _ in range(6)]
            assert sum(ok for ok, _ in results) == 3
            redis_server.start()
            await wait_for(lambda: adm.redis is not None and adm.redis.available, "recovery")
        finally:
            await adm.close()

    run(main())


def test_fallback_share_shrinks_local_buckets(redis_server: RedisServer) -> None:
    """With N gateways each falling back to 1/N, the cluster total holds during an outage."""

    async def main() -> None:
        url = redis_server.url
        redis_server.kill()
        base = settings(10, redis_probe_interval_s=0.05)
        adm = Admission(replace(base, fallback_share=0.5), redis_url=url)
        await adm.start()
        try:
            results = [await try_admit(adm) for _ in range(20)]
            assert sum(ok for ok, _ in results) == 5
        finally:
            await adm.close()
        # Without Redis configured at all, the share does not apply.
        local_only = Admission(replace(base, fallback_share=0.5))
        results = [await try_admit(local_only) for _ in range(20)]
        assert sum(ok for ok, _ in results) == 10

    run(main())


def test_global_bucket_is_shared_too(redis_server: RedisServer) -> None:
    async def main() -> None:
        limits = GlobalLimits(tokens_per_second=0.001, token_burst=100)
        a = Admission(settings(1000, global_limits=limits, **PATIENT), redis_url=redis_server.url)
        b = Admission(settings(1000, global_limits=limits, **PATIENT), redis_url=redis_server.url)
        try:
            admitted = 0
            for i in range(10):
                try:
                    adm = a if i % 2 else b
                    (await adm.admit("Bearer k", 30, None, NO_DEADLINE)).release()
                    admitted += 1
                except OpenAIError as e:
                    assert e.status == 429 and "the gateway" in e.message and "tokens" in e.message
            assert admitted == 3  # 100 tokens / 30 per request, across both gateways
        finally:
            await a.close()
            await b.close()

    run(main())


def test_settlements_and_refunds_reach_the_shared_buckets(redis_server: RedisServer) -> None:
    async def main() -> None:
        quota = Quota(tokens_per_second=0.001, token_burst=1000)
        config = AdmissionSettings(
            tenants=(Tenant("acme", quota, (hash_key("k", SECRET),)),),
            key_secret=SECRET,
            redis_prefix=PREFIX + "settle:",
            **PATIENT,
        )
        a = Admission(config, redis_url=redis_server.url)
        b = Admission(config, redis_url=redis_server.url)
        await a.start()
        await b.start()
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True, protocol=2)
        key = PREFIX + "settle:tenant:acme:tokens"
        try:
            (await a.admit("Bearer k", 257, None, NO_DEADLINE)).release(used_tokens=900)

            async def level() -> float:
                return float(await client.hget(key, "l") or "nan")  # type: ignore[arg-type]

            await wait_for_async(lambda: level(), lambda v: v < 101, "settled in Redis")
            with pytest.raises(OpenAIError) as refused:
                await b.admit("Bearer k", 257, None, NO_DEADLINE)  # the other gateway sees it
            assert refused.value.status == 429
            (await b.admit("Bearer k", 50, None, NO_DEADLINE)).release(used_tokens=0)
            await wait_for_async(lambda: level(), lambda v: v > 99, "refunded in Redis")
            assert a.redis is not None and a.redis.failures == 0
        finally:
            await client.aclose()
            await a.close()
            await b.close()

    run(main())


async def wait_for_async(read: Any, good: Any, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not good(await read()):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


def test_a_request_cancelled_while_redis_charges_it_gets_its_quota_back(
    redis_server: RedisServer,
) -> None:
    """The script charges the buckets whether or not the caller still waits: a client that
    left while it ran spent its tenant's quota on nothing. Redis is held with CLIENT PAUSE,
    the waiting request cancelled, then Redis let go."""

    async def main() -> None:
        adm = Admission(settings(2, **PATIENT), redis_url=redis_server.url)
        await adm.start()
        admin = aioredis.Redis.from_url(redis_server.url, protocol=2)
        try:
            await admin.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
            waiting = asyncio.create_task(adm.admit("Bearer k", 1, None, NO_DEADLINE))
            # counted active just before its take is sent, then held by the pause
            await wait_for(lambda: adm.active("acme") == 1, "the take sent")
            await asyncio.sleep(0.1)
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            await admin.execute_command("CLIENT", "UNPAUSE")
            assert adm.counts["cancelled"] == 1
            key = PREFIX + "tenant:acme:requests"
            level: list[float] = [0.0]

            async def refunded() -> bool:
                level[0] = float(await admin.hget(key, "l") or 0)
                return level[0] >= 1.99

            deadline = time.monotonic() + DEADLINE
            while not await refunded():  # charged by the script, then given back
                assert time.monotonic() < deadline, f"never given back: level {level[0]}"
                await asyncio.sleep(0.02)
            results = [await try_admit(adm) for _ in range(3)]
            assert [ok for ok, _ in results] == [True, True, False]  # the whole burst of 2
        finally:
            with contextlib.suppress(Exception):
                await admin.execute_command("CLIENT", "UNPAUSE")
            await admin.aclose()
            await adm.close()

    run(main())
