"""Admission without Redis: keys and tenants, bucket math, the priority queue, the facade."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from gateway.admission import Admission, AdmissionSettings, GlobalLimits, Quota, Tenant
from gateway.admission import tenants as tenants_mod
from gateway.admission.admission import Ticket, estimate_tokens
from gateway.admission.buckets import BucketSpec, LocalBuckets, TokenBucket, retry_after_ms
from gateway.admission.queue import PriorityLimiter
from gateway.admission.tenants import (
    KEY_SECRET_ENV,
    TenantDirectory,
    hash_key,
    load_settings,
    settings_from_dict,
)
from proto import inference_pb2 as pb
from proto.openai_compat import MAX_CLIENT_SALT, OpenAIError

DEADLINE = 20.0
"""Generous on purpose: conditions usually hold in milliseconds."""
SECRET = b"test-secret"
NO_DEADLINE = math.inf


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


async def wait_for(cond: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


async def refused(call: Awaitable[Any]) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        await call
    return info.value


def later(seconds: float) -> float:
    return time.monotonic() + seconds


def keyed(*tenants: Tenant, **kwargs: Any) -> AdmissionSettings:
    return AdmissionSettings(tenants=tenants, key_secret=SECRET, **kwargs)


def tenant(name: str, key: str, **quota: Any) -> Tenant:
    return Tenant(name, Quota(**quota), (hash_key(key, SECRET),))


# --- keys and tenants ----------------------------------------------------------------------


def test_hash_key_is_hmac_sha256_hex_of_the_secret() -> None:
    digest = hash_key("sk-abc", SECRET)
    assert digest == hmac.new(SECRET, b"sk-abc", hashlib.sha256).hexdigest()
    assert hash_key("sk-abc", SECRET.decode()) == digest
    assert hash_key("sk-abc", b"other-secret") != digest
    assert len(digest) == 64


def test_verify_compares_every_digest_with_compare_digest(
    compare_calls: list[tuple[bytes, bytes]],
) -> None:
    """No early exit: a match on the first digest costs as many comparisons as no match."""
    directory = TenantDirectory(
        keyed(
            Tenant("a", Quota(), (hash_key("ka1", SECRET), hash_key("ka2", SECRET))),
            Tenant("b", Quota(), (hash_key("kb", SECRET),)),
            Tenant("c", Quota(), (hash_key("kc", SECRET),)),
        )
    )
    calls = compare_calls
    assert directory.authenticate("Bearer ka1").name == "a"
    assert len(calls) == 4
    calls.clear()
    assert directory.authenticate("Bearer kc").name == "c"
    assert len(calls) == 4
    calls.clear()
    with pytest.raises(OpenAIError):
        directory.authenticate("Bearer nope")
    assert len(calls) == 4
    assert all(isinstance(a, bytes) and len(a) == 32 == len(b) for a, b in calls)


def test_good_key_resolves_its_tenant_and_scheme_is_case_insensitive() -> None:
    directory = TenantDirectory(keyed(tenant("acme", "k-acme"), tenant("zeta", "k-zeta")))
    assert directory.keys_required
    assert directory.authenticate("Bearer k-acme").name == "acme"
    assert directory.authenticate("bearer   k-zeta  ").name == "zeta"


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "Basic k-acme", "k-acme", "Bearer k-acmeX"]
)
def test_bad_or_missing_key_is_401_with_openai_body(header: str | None) -> None:
    async def main() -> None:
        adm = Admission(keyed(tenant("acme", "k-acme")))
        err = await refused(adm.admit(header, 10, None, NO_DEADLINE))
        assert err.status == 401
        assert err.body() == {
            "error": {
                "message": err.message,
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        assert "k-acme" not in err.message
        assert adm.limiter.in_flight == 0 and adm.counts["unauthorized"] == 1

    run(main())


def test_no_keys_configured_means_one_default_tenant() -> None:
    async def main() -> None:
        adm = Admission(AdmissionSettings(defaults=Quota(priority=1)))
        for header in (None, "Bearer anything", "garbage"):
            ticket = await adm.admit(header, 10, None, NO_DEADLINE)
            assert ticket.tenant == "default" and ticket.priority == 1
            ticket.release()
        assert not adm.tenants.keys_required

    run(main())


def test_keys_without_a_secret_are_refused() -> None:
    with pytest.raises(ValueError, match=KEY_SECRET_ENV):
        AdmissionSettings(tenants=(Tenant("a", Quota(), ("0" * 64,)),))


CONFIG_TOML = """
key_secret = "from-file"

[global]
max_in_flight = 8
max_queue = 4
max_queue_wait_s = 2.5
requests_per_second = 100
tokens_per_second = 5000
token_burst = 20000

[redis]
url = "redis://127.0.0.1:1/0"
fallback_share = 0.5

[defaults]
requests_per_second = 10
request_burst = 20
max_concurrent = 3
priority = "batch"

[tenants.acme]
key_digests = ["{acme}"]
requests_per_second = 50
priority = "interactive"

[tenants.zeta]
key_digests = ["{zeta1}", "{zeta2}"]
max_concurrent = 1
"""


def _config_digests(secret: str) -> dict[str, str]:
    return {
        "acme": hash_key("k-acme", secret),
        "zeta1": hash_key("k-zeta1", secret),
        "zeta2": hash_key("k-zeta2", secret).upper(),  # case does not matter
    }


def _check_loaded(s: AdmissionSettings) -> None:
    g = s.global_limits
    assert (g.max_in_flight, g.max_queue, g.max_queue_wait_s) == (8, 4, 2.5)
    assert g.request_bucket() == (100, 100)  # burst defaults to one second's worth
    assert g.token_bucket() == (5000, 20000)
    assert s.redis_url == "redis://127.0.0.1:1/0" and s.fallback_share == 0.5
    acme, zeta = s.tenants
    assert acme.name == "acme" and zeta.name == "zeta"
    # acme sets its rate but not its burst: the burst follows its own rate, not [defaults]
    assert acme.quota.request_bucket() == (50, 50)
    assert acme.quota.max_concurrent == 3 and acme.quota.priority == 0
    assert zeta.quota.request_bucket() == (10, 20)  # inherited
    assert zeta.quota.max_concurrent == 1 and zeta.quota.priority == 1
    assert len(zeta.key_digests) == 2
    directory = TenantDirectory(s)
    assert directory.authenticate("Bearer k-zeta2").name == "zeta"


def test_config_file_toml_and_json(tmp_path: Path) -> None:
    toml_path = tmp_path / "admission.toml"
    toml_path.write_text(CONFIG_TOML.format(**_config_digests("from-file")))
    settings = load_settings(toml_path, env={})
    assert settings.key_secret == b"from-file"
    _check_loaded(settings)

    # The environment's secret wins over the file's.
    toml_path.write_text(CONFIG_TOML.format(**_config_digests("from-env")))
    _check_loaded(load_settings(toml_path, env={KEY_SECRET_ENV: "from-env"}))

    import tomllib

    data = tomllib.loads(CONFIG_TOML.format(**_config_digests("from-file")))
    json_path = tmp_path / "admission.json"
    json_path.write_text(json.dumps(data))
    _check_loaded(load_settings(json_path, env={}))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"tenants": {"a": {"key_digests": ["sk-raw-key"]}}, "key_secret": "s"}, "64-hex"),
        ({"tenants": {"a": {"key_digests": ["0" * 64]}}}, KEY_SECRET_ENV),
        ({"defaults": {"request_per_second": 1}}, "unknown"),
        ({"global": {"max_in_flight": 0}}, "max_in_flight"),
        ({"defaults": {"tokens_per_second": -1}}, "positive"),
        ({"defaults": {"token_burst": 10}}, "without"),
        ({"defaults": {"priority": "urgent"}}, "priority"),
        ({"tenants": {"bad name": {}}}, "tenant name"),
        ({"redis": {"fallback_share": 2}}, "fallback_share"),
    ],
)
def test_config_errors_are_explicit(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        settings_from_dict(data, env={})


def test_cli_hash_key_and_new_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(KEY_SECRET_ENV, "cli-secret")
    assert tenants_mod.main(["hash-key", "sk-123"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("sk-123", "cli-secret")
    assert tenants_mod.main(["new-key"]) == 0
    out = [line for line in capsys.readouterr().out.splitlines() if ": " in line]
    lines = dict(line.split(":", 1) for line in out[:3])
    secret_part = lines["key"].strip().partition(".")[2]  # bw_<id>.<secret>
    assert hash_key(secret_part, "cli-secret") == lines["digest"].strip()
    monkeypatch.delenv(KEY_SECRET_ENV)
    with pytest.raises(SystemExit):
        tenants_mod.main(["hash-key", "sk-123"])


# --- buckets -------------------------------------------------------------------------------


def test_token_bucket_refill_math() -> None:
    b = TokenBucket(rate=2.0, burst=4.0, now=100.0)
    for _ in range(4):
        assert b.take(1, 100.0) == 0
    assert b.take(1, 100.0) == pytest.approx(0.5)
    assert b.take(1, 100.25) == pytest.approx(0.25)  # half refilled
    assert b.take(1, 100.5) == 0
    assert b.take(3, 110.0) == 0  # capped at burst: 4, not 20
    assert b.take(2, 110.0) == pytest.approx(0.5)
    assert b.take(1, 109.0) == 0  # a clock stepping back mints nothing...
    assert b.level == pytest.approx(0.0)
    assert b.take(1, 109.0) == pytest.approx(0.5)  # ...and costs nothing either


def test_local_buckets_charge_all_or_nothing() -> None:
    now = [0.0]
    local = LocalBuckets(clock=lambda: now[0])
    a = BucketSpec("a", rate=1.0, burst=10.0, cost=1.0)
    b = BucketSpec("b", rate=100.0, burst=100.0, cost=60.0)
    assert local.take([a, b]).allowed
    refused_ = local.take([a, b])
    assert not refused_.allowed and refused_.limiting == 1
    assert refused_.wait_s == pytest.approx(0.2)  # (60 - 40) / 100
    assert local.level("a") == pytest.approx(9.0)  # not charged for the refused request
    now[0] = 0.2
    assert local.take([a, b]).allowed
    # A fallback share shrinks rate and burst; a cost above the scaled burst needs a full
    # one, and pays in full: the debt delays the next (charging only the burst let a
    # request bucket's rate be exceeded by 1/burst).
    c = BucketSpec("c", 10.0, 100.0, 80.0)
    assert local.take([c], scale=0.5).allowed
    assert local.level("c") == pytest.approx(-30.0)
    refused_ = local.take([c], scale=0.5)
    assert not refused_.allowed and refused_.wait_s == pytest.approx(16.0)  # (50 + 30) / 5


def test_a_request_bucket_below_one_keeps_its_rate() -> None:
    """1 request/s with a burst of 0.01 (or 1/s split over two processes, 0.5 each):
    each request costs 1 whatever the burst."""
    for burst, per_s in ((0.01, 1.0), (0.5, 0.5)):
        now = [0.0]
        local = LocalBuckets(clock=lambda now=now: now[0])
        spec = BucketSpec("r", rate=per_s, burst=burst, cost=1.0)
        admitted = 0
        for step in range(1000):  # 10 s in steps of 10 ms, a request offered each step
            now[0] = step * 0.01
            admitted += local.take([spec]).allowed
        assert admitted <= 10 * per_s + 1, (burst, admitted)


def test_retry_after_ms_rounds_up() -> None:
    assert retry_after_ms(0.0001) == 1
    assert retry_after_ms(0.1) == 100
    assert retry_after_ms(0.1001) == 101


def test_429_retry_after_comes_from_the_refill_rate() -> None:
    async def main() -> None:
        adm = Admission(
            keyed(
                tenant(
                    "acme",
                    "k",
                    requests_per_second=10,
                    request_burst=2,
                    tokens_per_second=1000,
                    token_burst=1000,
                )
            )
        )
        now = [50.0]
        adm.local = LocalBuckets(clock=lambda: now[0])
        for _ in range(2):
            (await adm.admit("Bearer k", 1, None, NO_DEADLINE)).release()
        err = await refused(adm.admit("Bearer k", 1, None, NO_DEADLINE))
        assert (err.status, err.type, err.code) == (429, "rate_limit_error", "rate_limit_exceeded")
        assert err.retry_after_ms == 100  # one request at 10/s
        assert "requests" in err.message and "acme" in err.message
        now[0] += 1.0
        (await adm.admit("Bearer k", 600, None, NO_DEADLINE)).release()
        err = await refused(adm.admit("Bearer k", 600, None, NO_DEADLINE))
        assert err.retry_after_ms == 200  # (600 - 400) / 1000 tokens per second
        assert "tokens" in err.message
        # Larger than the burst: can never pass, so 400 rather than a 429 worth retrying.
        err = await refused(adm.admit("Bearer k", 1001, None, NO_DEADLINE))
        assert (err.status, err.code, err.param) == (400, "request_too_large", "max_tokens")
        assert adm.active("acme") == 0 and adm.limiter.in_flight == 0

    run(main())


def test_global_bucket_applies_across_tenants() -> None:
    async def main() -> None:
        limits = GlobalLimits(requests_per_second=0.001, request_burst=3)
        adm = Admission(keyed(tenant("a", "ka"), tenant("b", "kb"), global_limits=limits))
        got = []
        for i in range(6):
            try:
                (
                    await adm.admit("Bearer ka" if i % 2 else "Bearer kb", 1, None, NO_DEADLINE)
                ).release()
                got.append(i)
            except OpenAIError as e:
                assert e.status == 429 and "the gateway" in e.message
        assert len(got) == 3

    run(main())


def test_estimate_tokens() -> None:
    assert estimate_tokens("abcdefgh", 10) == 12
    assert estimate_tokens("a", 0) == 1
    assert estimate_tokens([1, 2, 3], 5) == 8
    assert estimate_tokens("你好", 0) == 2  # 6 bytes


# --- the priority queue --------------------------------------------------------------------


def test_interactive_passes_queued_batch_fcfs_within_class() -> None:
    async def main() -> None:
        limiter = PriorityLimiter(max_in_flight=1, max_queue=10, max_queue_wait_s=60)
        await limiter.acquire(1, NO_DEADLINE)  # the slot is busy
        order: list[str] = []

        async def request(name: str, priority: int) -> None:
            await limiter.acquire(priority, NO_DEADLINE)
            order.append(name)
            await asyncio.sleep(0)
            limiter.release(0.01)

        tasks = []
        for i, (name, prio) in enumerate(
            [("b1", 1), ("b2", 1), ("i1", 0), ("b3", 1), ("i2", 0), ("i3", 0)]
        ):
            tasks.append(asyncio.create_task(request(name, prio)))
            await wait_for(lambda n=i + 1: limiter.queued == n, f"{name} queued")
        assert order == []  # batch waits while the slot is busy
        limiter.release(0.01)
        await asyncio.gather(*tasks)
        assert order == ["i1", "i2", "i3", "b1", "b2", "b3"]
        assert limiter.in_flight == 0 and limiter.queued == 0

    run(main())


def test_facade_priority_defaults_to_the_tenant_and_can_be_overridden() -> None:
    async def main() -> None:
        adm = Admission(
            keyed(
                tenant("batchy", "kb", priority=1),
                tenant("chatty", "kc"),
                global_limits=GlobalLimits(max_in_flight=1),
            )
        )
        holder = await adm.admit("Bearer kc", 1, None, NO_DEADLINE)
        assert holder.priority == 0
        order: list[str] = []

        async def request(name: str, key: str, priority: int | None) -> None:
            async with await adm.admit(key, 1, priority, NO_DEADLINE) as ticket:
                order.append(f"{name}:{ticket.tenant}:{ticket.priority}")

        specs = [("x", "Bearer kb", None), ("y", "Bearer kc", 1), ("z", "Bearer kb", 0)]
        tasks = []
        for i, spec in enumerate(specs):
            tasks.append(asyncio.create_task(request(*spec)))
            await wait_for(lambda n=i + 1: adm.limiter.queued == n, f"{spec[0]} queued")
        holder.release()
        holder.release()  # idempotent
        await asyncio.gather(*tasks)
        assert order == ["z:batchy:0", "x:batchy:1", "y:chatty:1"]
        assert adm.limiter.in_flight == 0
        err = await refused(adm.admit("Bearer kc", 1, 2, NO_DEADLINE))
        assert err.status == 400 and err.param == "priority"

    run(main())


def test_full_queue_answers_503_at_once_with_retry_after() -> None:
    async def main() -> None:
        adm = Admission(AdmissionSettings(global_limits=GlobalLimits(max_in_flight=1, max_queue=2)))
        holder = await adm.admit(None, 1, None, NO_DEADLINE)
        waiting = [asyncio.create_task(adm.admit(None, 1, 1, NO_DEADLINE)) for _ in range(2)]
        await wait_for(lambda: adm.limiter.queued == 2, "two queued")
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            err = await refused(adm.admit(None, 1, 0, NO_DEADLINE))
            times.append(time.perf_counter() - t0)
            assert (err.status, err.type, err.code) == (503, "overloaded_error", "overloaded")
            assert err.retry_after_ms is not None and err.retry_after_ms >= 1
        assert statistics.median(times) < 0.02
        assert adm.limiter.queued == 2 and adm.active("default") == 3
        holder.release()
        for waiter in waiting:  # each gets the slot when the one before releases it
            (await waiter).release()
        assert adm.limiter.in_flight == 0 and adm.active("default") == 0

    run(main())


def test_queued_request_past_its_deadline_is_dropped_not_served_late() -> None:
    async def main() -> None:
        adm = Admission(AdmissionSettings(global_limits=GlobalLimits(max_in_flight=1)))
        holder = await adm.admit(None, 1, None, NO_DEADLINE)
        t0 = time.monotonic()
        err = await refused(adm.admit(None, 1, 0, later(0.3)))
        assert time.monotonic() - t0 >= 0.25
        assert (err.status, err.code) == (504, "deadline_exceeded")
        assert "deadline" in err.message and "dropped" in err.message
        assert adm.limiter.queued == 0 and adm.active("default") == 1
        holder.release()  # the slot is not handed to the dropped request
        assert adm.limiter.in_flight == 0
        # A deadline already past is refused without queueing.
        err = await refused(adm.admit(None, 1, 0, time.monotonic() - 1))
        assert err.status == 504
        assert adm.counts["deadline"] == 2

    run(main())


def test_queue_wait_cap_answers_503_before_a_far_deadline() -> None:
    async def main() -> None:
        limits = GlobalLimits(max_in_flight=1, max_queue_wait_s=0.2)
        adm = Admission(AdmissionSettings(global_limits=limits))
        holder = await adm.admit(None, 1, None, NO_DEADLINE)
        err = await refused(adm.admit(None, 1, 0, later(60)))
        assert (err.status, err.code) == (503, "overloaded")
        assert err.retry_after_ms is not None
        holder.release()
        assert adm.limiter.in_flight == 0 and adm.limiter.queued == 0

    run(main())


def test_cancelled_waiter_leaves_the_queue_clean() -> None:
    async def main() -> None:
        adm = Admission(AdmissionSettings(global_limits=GlobalLimits(max_in_flight=1)))
        holder = await adm.admit(None, 1, None, NO_DEADLINE)
        waiter = asyncio.create_task(adm.admit(None, 1, 0, NO_DEADLINE))
        await wait_for(lambda: adm.limiter.queued == 1, "queued")
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert adm.limiter.queued == 0 and adm.active("default") == 1
        holder.release()
        assert adm.limiter.in_flight == 0

    run(main())


def test_grant_racing_a_cancel_passes_the_slot_on() -> None:
    """Released and cancelled in the same tick: the slot must not leak."""

    async def main() -> None:
        limiter = PriorityLimiter(max_in_flight=1, max_queue=10, max_queue_wait_s=60)
        await limiter.acquire(0, NO_DEADLINE)
        first = asyncio.create_task(limiter.acquire(0, NO_DEADLINE))
        await wait_for(lambda: limiter.queued == 1, "first queued")
        second = asyncio.create_task(limiter.acquire(0, NO_DEADLINE))
        await wait_for(lambda: limiter.queued == 2, "second queued")
        limiter.release(None)  # grants `first`...
        first.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, DEADLINE)  # got the slot `first` gave back
        assert limiter.in_flight == 1 and limiter.queued == 0
        limiter.release(None)
        assert limiter.in_flight == 0

    run(main())


def test_limiter_invariants_under_random_churn() -> None:
    """Arrivals, releases, deadlines and cancellations at random: never over the limit,
    never a leaked slot or queue place, and classes served in priority order."""

    async def main() -> None:
        rng = random.Random(4)
        limiter = PriorityLimiter(max_in_flight=3, max_queue=8, max_queue_wait_s=60)
        peak = 0
        outcomes: dict[str, int] = {"ok": 0, "503": 0, "504": 0, "cancelled": 0}

        async def request(priority: int, deadline: float) -> None:
            nonlocal peak
            try:
                await limiter.acquire(priority, deadline)
            except OpenAIError as e:
                outcomes[str(e.status)] += 1
                return
            try:
                peak = max(peak, limiter.in_flight)
                assert limiter.in_flight <= limiter.max_in_flight
                outcomes["ok"] += 1
                await asyncio.sleep(rng.random() * 0.004)
            finally:
                limiter.release(0.002)

        tasks = []
        for i in range(400):
            deadline = later(rng.choice([0.001, 0.01, 0.05, 60.0]))
            tasks.append(asyncio.create_task(request(rng.randint(0, 1), deadline)))
            if rng.random() < 0.1:
                victim = rng.choice(tasks)
                if victim.cancel():
                    outcomes["cancelled"] += 1
            if i % 20 == 19:  # bursts of 20 against 3 slots and 8 queue places
                await asyncio.sleep(rng.random() * 0.01)
        await asyncio.gather(*tasks, return_exceptions=True)
        assert limiter.in_flight == 0 and limiter.queued == 0
        assert peak == 3 and outcomes["ok"] > 50 and outcomes["503"] > 0, outcomes

    run(main())


def test_per_tenant_concurrency() -> None:
    async def main() -> None:
        adm = Admission(keyed(tenant("a", "ka", max_concurrent=2), tenant("b", "kb")))
        held = [await adm.admit("Bearer ka", 1, None, NO_DEADLINE) for _ in range(2)]
        err = await refused(adm.admit("Bearer ka", 1, None, NO_DEADLINE))
        assert (err.status, err.type, err.code) == (429, "rate_limit_error", "rate_limit_exceeded")
        assert err.retry_after_ms is not None and "a'" in err.message
        other = await adm.admit("Bearer kb", 1, None, NO_DEADLINE)  # another tenant is fine
        other.release()
        held.pop().release()
        async with await adm.admit("Bearer ka", 1, None, NO_DEADLINE) as ticket:
            assert ticket.tenant == "a" and adm.active("a") == 2
        assert ticket.released and adm.active("a") == 1
        held.pop().release()
        assert adm.active("a") == 0 and adm.limiter.in_flight == 0

    run(main())


def test_queued_requests_count_toward_tenant_concurrency() -> None:
    async def main() -> None:
        limits = GlobalLimits(max_in_flight=1)
        adm = Admission(keyed(tenant("a", "ka", max_concurrent=2), global_limits=limits))
        holder = await adm.admit("Bearer ka", 1, None, NO_DEADLINE)
        queued = asyncio.create_task(adm.admit("Bearer ka", 1, None, NO_DEADLINE))
        await wait_for(lambda: adm.limiter.queued == 1, "queued")
        err = await refused(adm.admit("Bearer ka", 1, None, NO_DEADLINE))
        assert err.status == 429
        assert adm.limiter.queued == 1  # the refused request never took a queue place
        holder.release()
        (await queued).release()
        assert adm.active("a") == 0

    run(main())


def test_rejections_are_fast() -> None:
    """Every refusal is decided without waiting: median well under 5 ms (20 ms bound)."""

    async def main() -> None:
        limits = GlobalLimits(max_in_flight=1, max_queue=0)
        adm = Admission(keyed(tenant("a", "ka", requests_per_second=0.001), tenant("b", "kb")))
        busy = Admission(AdmissionSettings(global_limits=limits))
        (await adm.admit("Bearer ka", 1, None, NO_DEADLINE)).release()
        holder = await busy.admit(None, 1, None, NO_DEADLINE)
        cases: list[tuple[int, Admission, str]] = [
            (401, adm, "Bearer bad"),
            (429, adm, "Bearer ka"),
            (503, busy, "Bearer any"),
        ]
        for status, admission, header in cases:
            times = []
            for _ in range(200):
                t0 = time.perf_counter()
                err = await refused(admission.admit(header, 1, None, NO_DEADLINE))
                times.append(time.perf_counter() - t0)
                assert err.status == status
            assert statistics.median(times) < 0.02, (status, statistics.median(times))
        holder.release()


def test_ticket_is_an_async_context_manager_even_on_error() -> None:
    async def main() -> None:
        adm = Admission()
        with pytest.raises(RuntimeError):
            async with await adm.admit(None, 1, None, NO_DEADLINE) as ticket:
                assert isinstance(ticket, Ticket) and adm.limiter.in_flight == 1
                raise RuntimeError("request failed")
        assert adm.limiter.in_flight == 0
        stats = adm.stats()
        assert stats["counts"]["admitted"] == 1 and stats["redis"] is None

    run(main())


def test_token_charges_are_settled_with_the_real_use() -> None:
    """The estimate counts 256 for an unset max_tokens, where a worker generates up to its
    context: charged only the estimate, a tenant at 100 tokens/s ran at 2,137."""

    async def main() -> None:
        quota = {"tokens_per_second": 0.001, "token_burst": 1000}
        adm = Admission(keyed(tenant("acme", "k", **quota)))
        now = [50.0]
        adm.local = LocalBuckets(clock=lambda: now[0])
        (await adm.admit("Bearer k", 257, None, NO_DEADLINE)).release(used_tokens=900)
        assert adm.local.level("tenant:acme:tokens") == pytest.approx(100)  # 1000 - 900
        err = await refused(adm.admit("Bearer k", 257, None, NO_DEADLINE))
        assert err.status == 429 and "tokens" in err.message
        # Less than estimated: the rest goes back (never past the burst).
        (await adm.admit("Bearer k", 100, None, NO_DEADLINE)).release(used_tokens=10)
        assert adm.local.level("tenant:acme:tokens") == pytest.approx(90)
        (await adm.admit("Bearer k", 50, None, NO_DEADLINE)).release()  # no usage: estimate
        assert adm.local.level("tenant:acme:tokens") == pytest.approx(40)

    run(main())


def test_a_request_refused_after_its_charge_gets_it_back() -> None:
    """Charged, then refused by the queue (full: 503; its deadline passed: 504): a tenant
    never served was told 429 for quota it never used."""

    async def main() -> None:
        quota = {"requests_per_second": 0.001, "request_burst": 2}
        limits = GlobalLimits(max_in_flight=1, max_queue=1)
        adm = Admission(
            keyed(tenant("acme", "k", **quota), tenant("b", "kb"), global_limits=limits)
        )
        holder = await adm.admit("Bearer kb", 1, None, NO_DEADLINE)
        late = await refused(adm.admit("Bearer k", 1, None, later(0.05)))
        assert late.status == 504
        queued = asyncio.create_task(adm.admit("Bearer kb", 1, None, NO_DEADLINE))
        await wait_for(lambda: adm.limiter.queued == 1, "one queued")
        full = await refused(adm.admit("Bearer k", 1, None, NO_DEADLINE))
        assert full.status == 503
        holder.release()
        (await queued).release()
        for _ in range(2):  # both of acme's requests are still there to spend
            (await adm.admit("Bearer k", 1, None, NO_DEADLINE)).release()
        assert (await refused(adm.admit("Bearer k", 1, None, NO_DEADLINE))).status == 429

    run(main())


def test_a_tenants_concurrency_429_waits_for_its_own_requests() -> None:
    """Its Retry-After comes from how long the tenant's own requests hold a slot: the
    gateway-wide mean (others' short calls) said 240 ms while a 3 s stream held it."""

    async def main() -> None:
        adm = Admission(keyed(tenant("slow", "ks", max_concurrent=1), tenant("b", "kb")))
        for _ in range(50):  # the gateway is busy with short calls
            (await adm.admit("Bearer kb", 1, None, NO_DEADLINE)).release()
        ticket = await adm.admit("Bearer ks", 1, None, NO_DEADLINE)
        ticket._granted -= 3.0  # a 3 s stream
        ticket.release()
        held = await adm.admit("Bearer ks", 1, None, NO_DEADLINE)
        err = await refused(adm.admit("Bearer ks", 1, None, NO_DEADLINE))
        assert err.status == 429 and err.retry_after_ms is not None
        assert err.retry_after_ms >= 2900, err.retry_after_ms
        held.release()

    run(main())


def test_processes_split_a_limit_into_parts_that_sum_to_it() -> None:
    """Each process took the limit divided and rounded up: a tenant's 3 concurrent over two
    processes admitted 4 at once, 5 over three admitted 6. Split unevenly by process index,
    the parts sum to the limit (a limit below the process count still gives each 1)."""
    from gateway.admission.tenants import (
        AdmissionSettings,
        GlobalLimits,
        Quota,
        Tenant,
        per_process,
    )

    config = AdmissionSettings(
        tenants=(Tenant("beta", Quota(max_concurrent=3)), Tenant("one", Quota(max_concurrent=1))),
        defaults=Quota(max_concurrent=5),
        global_limits=GlobalLimits(max_in_flight=7, max_queue=5),
    )
    for processes in (2, 3):
        parts = [per_process(config, processes, i) for i in range(processes)]
        assert sum(p.tenants[0].quota.max_concurrent or 0 for p in parts) == 3
        assert sum(p.defaults.max_concurrent or 0 for p in parts) == 5
        assert sum(p.global_limits.max_in_flight or 0 for p in parts) == 7
        assert sum(p.global_limits.max_queue or 0 for p in parts) == 5
        assert all(p.tenants[1].quota.max_concurrent == 1 for p in parts)


def test_isolate_cache_is_inherited_and_salts_are_the_tenants_own() -> None:
    data = {
        "key_secret": "s1",
        "defaults": {"isolate_cache": True},
        "tenants": {"a": {}, "b": {"isolate_cache": False}},
    }
    settings = settings_from_dict(data, env={})
    quotas = {t.name: t.quota.isolate_cache for t in settings.tenants}
    assert quotas == {"a": True, "b": False}
    with pytest.raises(ValueError, match="isolate_cache must be true or false"):
        settings_from_dict({"defaults": {"isolate_cache": "yes"}}, env={})
    one = tenants_mod.TenantDirectory(settings)
    other = tenants_mod.TenantDirectory(settings_from_dict({**data, "key_secret": "s2"}, env={}))
    assert one.cache_salt("a") == one.cache_salt("a") != one.cache_salt("b")
    assert one.cache_salt("a") != other.cache_salt("a")  # unguessable without the secret
    req = pb.GenerateRequest(cache_salt="mine")
    Admission.salt(req, None)
    assert req.cache_salt == "mine"
    ticket = Ticket.__new__(Ticket)
    ticket.cache_salt = one.cache_salt("a")
    Admission.salt(req, ticket)
    mine = hashlib.blake2b(b"mine", digest_size=16).hexdigest()
    assert req.cache_salt == one.cache_salt("a") + ":" + mine
    assert len(req.cache_salt) <= MAX_CLIENT_SALT  # what a worker takes


def test_a_client_that_leaves_the_queue_is_counted_as_cancelled() -> None:
    async def main() -> None:
        adm = Admission(AdmissionSettings(global_limits=GlobalLimits(max_in_flight=1)))
        holder = await adm.admit(None, 1, None, NO_DEADLINE)
        waiting = asyncio.create_task(adm.admit(None, 1, None, NO_DEADLINE))
        await wait_for(lambda: adm.limiter.queued == 1, "queued")
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        holder.release()
        assert adm.stats()["counts"] == {"admitted": 1, "cancelled": 1}

    run(main())
