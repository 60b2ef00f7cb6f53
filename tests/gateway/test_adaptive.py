"""Adaptive concurrency: limits from the replicas' batch slots, moved by TTFT; a queue bounded
by time; and the door's retry budget."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from gateway.admission.adaptive import (
    LAG_ALPHA,
    LAG_FACTOR,
    MAX_SLACK_S,
    UNKNOWN_START,
    AdaptiveConcurrency,
    LoopLag,
    ReplicaLimit,
)
from gateway.admission.admission import Admission
from gateway.admission.queue import PriorityLimiter
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


def test_an_idle_replicas_limit_recovers_toward_its_slots() -> None:
    """A limit is learnt from answers only: cut by a burst, it stayed cut while nothing
    was sent (4 of 128 slots, after a burst and a restart), and the next burst was shed."""
    a = AdaptiveConcurrency()
    a.sync([worker("a", 128)], {}, now=0.0)
    r = a.replicas["a"]
    r.limit, r.samples = 4.0, 100
    a.sync([worker("a", 128)], {"a": 2}, now=1.0)  # busy: left as learnt
    a.sync([worker("a", 128)], {"a": 2}, now=20.0)
    assert a.limit("a") == 4
    a.sync([worker("a", 128)], {"a": 0}, now=21.0)  # idle from here
    a.sync([worker("a", 128)], {}, now=23.0)
    assert a.limit("a") == 4
    a.sync([worker("a", 128)], {}, now=26.0)
    assert a.limit("a") == 66  # half its way back to the slots
    a.sync([worker("a", 128)], {}, now=31.0)
    assert a.limit("a") == 97
    a.sync([worker("a", 128)], now=99.0)  # no loads given: no recovery
    assert a.limit("a") == 97


def test_an_unknown_replica_grows_while_ttft_holds() -> None:
    r = ReplicaLimit(limit=UNKNOWN_START, ceiling=512)
    for _ in range(100):
        r.observe(0.1)
    assert r.limit > 2 * UNKNOWN_START


def test_wait_budgets_follow_the_measured_ttft_and_batch_waits_longer() -> None:
    a = AdaptiveConcurrency()
    a.sync([worker("a", 4)])
    for _ in range(30):
        a.observe("a", 0.08)
    budgets = a.wait_budgets()
    assert math.isclose(budgets[0], 0.04, rel_tol=0.05)
    assert budgets[1] == pytest.approx(10 * budgets[0])


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
        assert adm.retry_advice["retry_arrived"] == 50
        ticket.release()

    asyncio.run(main())


def test_the_gateways_own_loop_lag_is_no_queue_in_the_replica() -> None:
    """A TTFT rise no bigger than what the gateway's busy event loop adds leaves the limit
    where it is (peer_bench: a saturated process shed streams to idle replicas); a rise
    past it still lowers the limit."""
    busy, queued = ReplicaLimit(limit=32, ceiling=32), ReplicaLimit(limit=32, ceiling=32)
    lowest = 32.0
    for i in range(300):
        ttft = 0.001 if i < 200 else 0.015
        busy.observe(ttft, slack_s=LAG_FACTOR * 0.005)  # 5 ms of loop lag: 15 ms slack
        queued.observe(ttft)  # the same rise with the loop keeping up: a queue
        lowest = min(lowest, queued.limit)
    assert busy.limit == 32
    assert lowest < 24


def test_the_loop_lag_probe_sees_a_blocked_loop_and_decays_once_it_keeps_up() -> None:
    async def main() -> None:
        lag = LoopLag()
        lag.start()
        try:
            await asyncio.sleep(0.2)
            time.sleep(0.5)  # the loop blocked: the probe's timer fires late
            await asyncio.sleep(0.02)
            assert lag.lag_s > 0.02  # a fifth of the stall, less a probe's decay or two
        finally:
            lag.stop()
        assert lag.lag_s == 0.0 and lag.slack_s() == 0.0  # a stopped probe excuses nothing

    asyncio.run(main())
    # The average itself: one stall counts a fifth and fades; a sustained lag shows whole.
    lag = LoopLag()
    lag.sample(0.3)
    assert lag.lag_s == pytest.approx(0.3 * LAG_ALPHA)
    assert lag.slack_s() == MAX_SLACK_S  # 3 x 60 ms, capped
    for _ in range(30):  # 1.5 s of probes on time
        lag.sample(0.0)
    assert lag.slack_s() < 0.001
    for _ in range(40):
        lag.sample(0.004)  # saturated: every timer 4 ms late
    assert lag.slack_s() == pytest.approx(LAG_FACTOR * 0.004, rel=0.01)


def test_one_tenants_flood_of_429s_leaves_the_door_budget_alone() -> None:
    """Quota refusals do not spend the door's shared budget: they did, and one tenant's
    flood told every other tenant's clients not to retry (x-should-retry: false)."""
    from gateway.admission.tenants import Quota, Tenant, hash_key

    async def main() -> None:
        secret = b"door-test"
        tenants = (
            Tenant(
                "flood", Quota(requests_per_second=0.001, request_burst=1), (hash_key("f", secret),)
            ),
            Tenant("calm", Quota(), (hash_key("c", secret),)),
        )
        adm = Admission(AdmissionSettings(tenants=tenants, key_secret=secret), processes=1)
        (await adm.admit("Bearer f", 1, None, math.inf)).release()
        for _ in range(300):
            with pytest.raises(OpenAIError) as refused:
                await adm.admit("Bearer f", 1, None, math.inf, retry=True)
            assert refused.value.status == 429 and refused.value.should_retry is None
        adm.limiter.set_max_in_flight(1)
        adm.limiter.max_queue = 0
        ticket = await adm.admit("Bearer c", 1, None, math.inf)
        with pytest.raises(OpenAIError) as overloaded:
            await adm.admit("Bearer c", 1, None, math.inf, retry=True)
        assert overloaded.value.status == 503 and overloaded.value.should_retry is True
        ticket.release()

    asyncio.run(main())
