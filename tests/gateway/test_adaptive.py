"""Adaptive concurrency: limits from the replicas' batch slots, moved by TTFT; a queue bounded
by time; and the door's retry budget."""

from __future__ import annotations

import asyncio
import math

import pytest

from gateway.admission.adaptive import (
    MIN_WAIT_S,
    TTFT_SLACK_S,
    UNKNOWN_START,
    AdaptiveConcurrency,
    ReplicaLimit,
)
from gateway.admission.admission import Admission
from gateway.admission.queue import MIN_RETRY_AFTER_S, PriorityLimiter
from gateway.admission.tenants import AdmissionSettings
from gateway.registry.base import WorkerInfo
from proto.openai_compat import OpenAIError


def worker(wid: str, slots: int = 0) -> WorkerInfo:
    return WorkerInfo(wid, wid, stats={"max_running": slots} if slots else {})


def test_limits_start_at_the_reported_slots_and_unknown_replicas_at_a_default() -> None:
    a = AdaptiveConcurrency()
    a.sync([worker("a", 16), worker("b")])
    assert a.limit("a") == 16 and a.limit("b") == UNKNOWN_START
    assert a.total(["a", "b"]) == 16 + UNKNOWN_START
    a.sync([worker("a", 8)])  # restarted smaller; b left
    assert a.limit("a") == 8 and "b" not in a.replicas


def test_rising_ttft_lowers_the_limit_and_steady_ttft_restores_it_to_the_slots() -> None:
    r = ReplicaLimit(limit=16, ceiling=16)
    for _ in range(50):
        r.observe(0.05)
    assert r.limit == 16  # steady: never above the slots
    for _ in range(40):
        r.observe(0.5)  # a queue forms in the engine: 10x the TTFT
    low = r.limit
    assert low < 8
    for _ in range(200):
        r.observe(0.05)
    assert r.limit == 16 and low < r.limit


def test_an_unknown_replica_grows_while_ttft_holds() -> None:
    r = ReplicaLimit(limit=UNKNOWN_START, ceiling=512)
    for _ in range(100):
        r.observe(0.1)
    assert r.limit > 2 * UNKNOWN_START


def test_wait_budgets_follow_the_measured_ttft_and_batch_waits_longer() -> None:
    a = AdaptiveConcurrency()
    a.sync([worker("a", 4)])
    for _ in range(30):
        a.observe("a", 0.3)
    budgets = a.wait_budgets()
    assert math.isclose(budgets[0], 0.15, rel_tol=0.05)
    assert budgets[1] == pytest.approx(10 * budgets[0])
    b = AdaptiveConcurrency()
    b.sync([worker("b", 4)])
    for _ in range(30):
        b.observe("b", 0.002)  # a fast replica: never less than the Retry-After it would hear
    assert b.wait_budgets()[0] == MIN_WAIT_S == MIN_RETRY_AFTER_S


def test_a_rise_of_a_few_milliseconds_is_no_queue() -> None:
    """Against a fast replica, TTFT from ~1 ms to ~20 ms is the gateway's own event loop
    (a saturated gateway's), not a queue: the limit holds; a rise past the slack lowers it."""
    r = ReplicaLimit(limit=32, ceiling=32)
    for _ in range(200):
        r.observe(0.001)
    for _ in range(100):
        r.observe(0.001 + TTFT_SLACK_S * 0.8)
    assert r.limit == 32
    for _ in range(20):
        r.observe(0.3)
    assert r.limit < 20


def test_the_time_bounded_queue_takes_only_what_will_start_within_its_budget() -> None:
    async def main() -> None:
        lim = PriorityLimiter(max_in_flight=2, max_queue=None, max_queue_wait_s=30)
        lim.mean_hold_s = 1.0  # a slot frees every 0.5 s
        lim.wait_budgets = {0: 1.0, 1: 10.0}
        assert await lim.acquire(0, math.inf) == 0.0
        assert await lim.acquire(0, math.inf) == 0.0
        waiters = [asyncio.create_task(lim.acquire(0, math.inf)) for _ in range(2)]
        await asyncio.sleep(0)
        assert lim.queued == 2  # 0.5 s and 1.0 s away: within 1 s
        with pytest.raises(OpenAIError) as refused:
            await lim.acquire(0, math.inf)  # 1.5 s away: refused at once
        assert refused.value.status == 503 and refused.value.retry_after_ms
        batch = asyncio.create_task(lim.acquire(1, math.inf))  # batch may wait 10 s
        await asyncio.sleep(0)
        assert lim.queued == 3
        lim.set_max_in_flight(5)  # the fleet grew: the waiters start now
        await asyncio.gather(*waiters, batch)
        assert lim.in_flight == 5 and lim.queued == 0

    asyncio.run(main())


def test_the_door_tells_clients_to_stop_retrying_once_its_budget_is_spent() -> None:
    async def main() -> None:
        adm = Admission(AdmissionSettings(), processes=1)
        adm.limiter.set_max_in_flight(1)
        adm.limiter.max_queue = 0
        ticket = await adm.admit(None, 10, None, math.inf)
        told = []
        for i in range(100):
            with pytest.raises(OpenAIError) as refused:
                await adm.admit(None, 10, None, math.inf, retry=i % 2 == 1)
            told.append(refused.value.should_retry)
        # 51 new requests earn max(10, 0.2 x 51 = 10.2) retries: 11 hear "retry", 89 "don't"
        assert told.count(True) == 11 and told.count(False) == 89
        assert adm.counts["retry_arrived"] == 50
        ticket.release()

    asyncio.run(main())
