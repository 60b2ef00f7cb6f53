"""The SDK's defences against retry storms: retry budget, adaptive throttling, cancellation.

Randomness is seeded (`RetryPolicy(seed=...)`) and ratios are asserted with wide margins;
the pieces with a clock (`RetryBudget`, `AdaptiveThrottle`) are also tested on their own
with explicit times, so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Callable

import pytest

from breakwater.client import AdaptiveThrottle, AsyncClient, Client, RetryBudget, RetryPolicy
from breakwater.errors import (
    APIError,
    APITimeoutError,
    BadRequestError,
    ClientThrottledError,
    RateLimitError,
    ServiceUnavailableError,
)
from breakwater.types import ClientStats
from tests.sdk.openai_fake import MODEL, FakeGateway, Reply, error_reply

OUTAGE = error_reply(503, retry_after=0)  # retry at once: the tests measure counts, not time


def policy(**overrides: object) -> RetryPolicy:
    """The default policy with zero backoff and a fixed seed, plus `overrides`."""
    knobs: dict[str, object] = {"initial_backoff": 0.0, "max_backoff": 0.0, "seed": 1}
    return RetryPolicy(**(knobs | overrides))  # type: ignore[arg-type]


def outcome(call: Callable[[], object]) -> type[BaseException] | None:
    """The exception class a call raised (None: it succeeded)."""
    try:
        call()
    except APIError as exc:
        return type(exc)
    return None


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------- the pieces, on a clock


def test_adaptive_throttle_follows_the_sre_formula_over_its_window() -> None:
    throttle = AdaptiveThrottle(k=2.0, window=120.0, min_requests=0)
    assert throttle.reject_probability(0.0) == 0.0
    for i in range(10):
        throttle.record(float(i), accepted=i < 2)
    assert throttle.reject_probability(10.0) == pytest.approx((10 - 2 * 2) / 11)
    assert not throttle.admit(10.0, draw=0.0)  # refused, and counted as a request
    assert throttle.reject_probability(10.0) == pytest.approx((11 - 2 * 2) / 12)
    assert throttle.admit(10.0, draw=0.99)
    assert throttle.reject_probability(200.0) == 0.0  # all of it has aged out


def test_adaptive_throttle_never_rejects_while_half_is_accepted() -> None:
    throttle = AdaptiveThrottle(k=2.0, window=120.0)
    for i in range(1000):
        throttle.record(i * 0.01, accepted=i % 2 == 0)
        assert throttle.reject_probability(i * 0.01) <= 1 / (i + 2)


def test_retry_budget_has_a_floor_and_a_ratio_and_a_window() -> None:
    budget = RetryBudget(ratio=0.2, floor=3, window=10.0)
    assert [budget.try_spend(0.0) for _ in range(4)] == [True, True, True, False]
    for _ in range(20):
        budget.record_call(1.0)
    assert budget.try_spend(1.0)  # 20% of 20 calls = 4 retries
    assert not budget.try_spend(1.0)
    assert budget.try_spend(12.0)  # the window has moved on: the floor again


def test_policy_rejects_nonsense() -> None:
    bads = [{"budget_window": 0}, {"throttle_k": 0}, {"budget_ratio": -1}]
    for bad in [*bads, {"max_retry_after": 0}, {"max_retry_after": math.nan}]:
        with pytest.raises(ValueError):
            RetryPolicy(**bad)  # type: ignore[arg-type]


def test_a_retry_that_would_start_at_the_deadline_gives_up_with_its_error() -> None:
    """A retry left a few ms would only fail as "deadline exceeded", hiding the 429."""
    knobs, rng = policy(), random.Random(0)
    busy = RateLimitError("busy", status=429, retry_after=1.0)
    assert knobs.next_delay(0, busy, remaining=1.01, rng=rng) is None
    assert knobs.next_delay(0, busy, remaining=1.5, rng=rng) == 1.0
    assert knobs.next_delay(0, busy, remaining=math.inf, rng=rng) == 1.0


def test_retry_after_is_waited_out_only_up_to_max_retry_after() -> None:
    knobs, rng = policy(max_retry_after=5.0), random.Random(0)
    for asked, delay in ((5.0, 5.0), (5.1, None), (1e300, None)):
        busy = RateLimitError("busy", status=429, retry_after=asked)
        assert knobs.next_delay(0, busy, remaining=math.inf, rng=rng) == delay


# ------------------------------------------------------------------------ retry budget


def test_retry_budget_bounds_amplification_in_an_outage(fake: FakeGateway) -> None:
    fake.default = OUTAGE
    n, floor = 50, 10
    with Client(fake.url, retry_policy=policy(max_retries=5, throttle_k=None)) as c:
        assert all(
            outcome(lambda: c.completions.create(model=MODEL, prompt="Hi"))
            is ServiceUnavailableError
            for _ in range(n)
        )
        stats = c.stats()
    assert n < len(fake.seen) == stats.attempts <= 1.2 * n + floor
    assert stats.retries == stats.attempts - n and stats.budget_exhausted > 0
    assert len(set(fake.request_ids)) == n  # each call's retries kept its request id

    fake.seen.clear()  # the same outage without a budget: max_retries alone
    unbounded = policy(max_retries=5, throttle_k=None, budget_ratio=None)
    with Client(fake.url, retry_policy=unbounded) as c:
        for _ in range(10):
            outcome(lambda: c.completions.create(model=MODEL, prompt="Hi"))
    assert len(fake.seen) == 60


# ----------------------------------------------------------------- adaptive throttling


def test_throttling_sheds_a_growing_share_then_recovers(fake: FakeGateway) -> None:
    fake.default = OUTAGE
    knobs = policy(max_retries=0, budget_ratio=None, throttle_window=1.0)
    with Client(fake.url, retry_policy=knobs) as c:

        def call() -> type[BaseException] | None:
            return outcome(lambda: c.chat.completions.create(model=MODEL, messages=[]))

        down = [call() for _ in range(100)]
        assert set(down) == {ServiceUnavailableError, ClientThrottledError}
        assert down[0] is ServiceUnavailableError  # nothing known yet: no local rejection
        shed = [o is ClientThrottledError for o in down]
        assert sum(shed[:10]) / 10 < sum(shed[50:]) / 50  # the share grows...
        assert sum(shed[50:]) >= 45  # ...to nearly all while nothing is accepted
        assert len(fake.seen) == c.stats().attempts == 100 - sum(shed) <= 25
        assert c.stats().throttled == sum(shed)

        fake.default = Reply()  # the backend recovers; its failures age out of the window
        time.sleep(1.1)
        assert [call() for _ in range(50)] == [None] * 50
        assert c.stats().throttled == sum(shed)


def test_a_fresh_client_retries_a_blip(fake: FakeGateway) -> None:
    """One 503 made p = 0.5 in a fresh client's throttle: its first retry was shed half the
    time (48 calls of 100 failed), though `max_retries` promised two."""
    for seed in range(50):
        fake.script(OUTAGE)
        with Client(fake.url, retry_policy=policy(seed=seed)) as c:
            assert c.completions.create(model=MODEL, prompt="Hi").text
            assert (c.stats().attempts, c.stats().throttled) == (2, 0)


def test_the_callers_own_deadlines_do_not_throttle_it(fake: FakeGateway) -> None:
    """An attempt cut by the caller's timeout says nothing about the backend: counted as
    refused, they left the client refusing calls to a healthy gateway (28 of 30)."""
    fake.default = Reply(delay=2.0)
    with Client(fake.url, timeout=0.2, retry_policy=policy()) as c:
        for _ in range(10):
            with pytest.raises(APITimeoutError):
                c.completions.create(model=MODEL, prompt="Hi")
        fake.default = Reply()
        for _ in range(20):
            assert c.completions.create(model=MODEL, prompt="Hi", timeout=30).text
        assert c.stats().throttled == 0


def test_a_healthy_backend_is_never_throttled(fake: FakeGateway) -> None:
    with Client(fake.url) as c:  # the default policy
        for _ in range(200):
            assert c.completions.create(model=MODEL, prompt="Hi").text
        assert c.stats() == ClientStats(calls=200, attempts=200)


def test_answers_that_are_not_overload_count_as_accepted(fake: FakeGateway) -> None:
    fake.default = error_reply(400)  # the backend answered: retrying is pointless, not harmful
    with Client(fake.url, retry_policy=policy()) as c:
        for _ in range(50):
            with pytest.raises(BadRequestError):
                c.completions.create(model=MODEL, prompt="Hi")
        assert c.stats().throttled == 0


def test_throttled_error_is_a_rate_limit_without_a_request(fake: FakeGateway) -> None:
    fake.default = OUTAGE
    with Client(fake.url, retry_policy=policy(max_retries=0, seed=3)) as c:
        errors: list[APIError] = []
        while not any(isinstance(e, ClientThrottledError) for e in errors):
            with pytest.raises((RateLimitError, ServiceUnavailableError)) as info:
                c.completions.create(model=MODEL, prompt="Hi")
            errors.append(info.value)
    throttled = errors[-1]
    assert isinstance(throttled, RateLimitError) and throttled.status is None
    assert throttled.request_id not in fake.request_ids
    assert len(fake.seen) == len(errors) - 1


# ------------------------------------------------------------------------ concurrency


def test_sync_client_state_is_thread_safe(fake: FakeGateway) -> None:
    with Client(fake.url) as c:

        def work() -> None:
            for _ in range(25):
                c.completions.create(model=MODEL, prompt="Hi")

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert c.stats() == ClientStats(calls=200, attempts=200)


@pytest.mark.anyio
async def test_retry_storm_of_50_clients_stays_under_1_2x(fake: FakeGateway) -> None:
    """The chaos suite's `retry-storm` in small: every call fails, 50 clients keep calling;
    the default budget and throttle hold upstream attempts to <= 1.2 per call."""
    fake.default = OUTAGE

    async def user(seed: int) -> ClientStats:
        async with AsyncClient(fake.url, retry_policy=policy(seed=seed)) as c:
            for _ in range(6):
                with pytest.raises((ServiceUnavailableError, ClientThrottledError)):
                    await c.completions.create(model=MODEL, prompt="Hi")
            return c.stats()

    total = sum(await asyncio.gather(*(user(i) for i in range(50))), ClientStats())
    assert total.calls == 300 and total.attempts == len(fake.seen)
    assert total.retry_amplification <= 1.2
    assert total.throttled > 0


# ------------------------------------------------------------------------ cancellation


@pytest.mark.anyio
@pytest.mark.parametrize(
    "first", [Reply(delay=5), error_reply(503, retry_after=5)], ids=["mid-attempt", "mid-backoff"]
)
async def test_cancellation_is_never_retried(fake: FakeGateway, first: Reply) -> None:
    fake.script(first)
    async with AsyncClient(fake.url, timeout=30, retry_policy=policy(throttle_k=None)) as c:
        task = asyncio.create_task(c.completions.create(model=MODEL, prompt="Hi"))
        await wait_until(lambda: len(fake.seen) == 1)
        await asyncio.sleep(0.05)  # mid-backoff: let the 503 arrive and the sleep begin
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)  # time for a (wrong) retry to show up
        assert len(fake.seen) == 1
        assert c.stats() == ClientStats(calls=1, attempts=1)
