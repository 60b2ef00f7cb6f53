"""Breaker state machine, ejection caps and the retry budget (pure logic, no processes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import pytest

from gateway.dispatch import Dispatcher
from gateway.registry.base import WorkerInfo, WorkerState
from gateway.resilience.breaker import CLOSED, HALF_OPEN, OPEN, BreakerBoard, BreakerConfig
from gateway.resilience.retry_budget import RetryBudget
from gateway.routing.policy import Router
from proto import inference_pb2 as pb
from serving.calls import UpstreamError

POOL = ["a", "b", "c", "d"]


def board(**kw: float) -> BreakerBoard:
    return BreakerBoard(BreakerConfig(fail_max=3, base_ejection_s=0.05, **kw))  # type: ignore[arg-type]


def wait_state(b: BreakerBoard, w: str, state: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while b.state(w) != state:
        assert time.monotonic() < deadline, f"{w} never reached {state}"
        time.sleep(0.01)


def test_opens_after_consecutive_failures_and_half_open_bounds_probes() -> None:
    b = board()
    for _ in range(2):
        b.record("a", False, POOL)
    b.record("a", True, POOL)  # a success resets the count
    for _ in range(2):
        b.record("a", False, POOL)
    assert b.state("a") == CLOSED
    b.record("a", False, POOL)
    assert b.state("a") == OPEN and not b.allow("a")
    wait_state(b, "a", HALF_OPEN)
    assert b.allow("a")  # one probe
    assert not b.allow("a")  # concurrent probes are bounded
    b.release_probe("a")
    b.record("a", True, POOL)
    assert b.state("a") == CLOSED and b.allow("a")


def test_flapping_replica_is_ejected_for_longer_each_time() -> None:
    b = board()
    times = []
    for _ in range(3):
        for _ in range(3):
            b.record("a", False, POOL)
        times.append(b.snapshot()["a"]["ejection_s"])
        wait_state(b, "a", HALF_OPEN)
        assert b.allow("a")
        b.release_probe("a")
        b.record("a", False, POOL)  # the probe fails: straight back to open
        assert b.state("a") == OPEN
        wait_state(b, "a", HALF_OPEN)
        assert b.allow("a")
        b.release_probe("a")
        b.record("a", True, POOL)
    assert times[0] < times[1] < times[2]


def test_never_ejects_more_than_the_share_cap() -> None:
    b = board(max_ejection_share=0.5)
    for w in POOL:
        for _ in range(3):
            b.record(w, False, POOL)
    assert sum(1 for w in POOL if b.state(w) == OPEN) == 2


def test_slow_replica_is_ejected() -> None:
    b = BreakerBoard(BreakerConfig(slow_min_samples=5, slow_factor=3.0))
    for _ in range(10):
        for w in ("a", "b", "c"):
            b.observe_ttft(w, 0.05, POOL)
        b.observe_ttft("d", 1.0, POOL)
    assert b.state("d") == OPEN
    assert all(b.state(w) == CLOSED for w in ("a", "b", "c"))


def test_a_replica_with_a_queue_is_not_taken_for_a_slow_one() -> None:
    """Prefix-aware routing sends bursts to the holder of a hot prefix: its average TTFT
    grows with its queue (5x its peer's was seen), yet its answers with no queue ahead
    stay fast. It must not be ejected; one slow at every answer still is."""
    b = BreakerBoard(BreakerConfig())
    queued = [0.02, 0.03, 0.15, 0.25, 0.35] * 8  # a fast answer, then a burst queues up
    for t in queued:
        b.observe_ttft("a", 0.02, POOL)
        b.observe_ttft("b", t, POOL)
    assert b.replicas()["b"].ttft_ewma > 5 * b.replicas()["a"].ttft_ewma  # the old judge
    assert b.state("b") == CLOSED and b.ejections == 0
    for _ in range(20):
        b.observe_ttft("c", 0.15, POOL)
    assert b.state("c") == OPEN
    assert b.snapshot()["a"]["ttft_fast_ms"] == 20.0
    tiny = BreakerBoard(BreakerConfig())  # 6x slower, but by 25 ms: no sickness
    for _ in range(30):
        tiny.observe_ttft("a", 0.005, POOL)
        tiny.observe_ttft("b", 0.03, POOL)
    assert tiny.ejections == 0


def test_retry_budget_caps_retries_at_a_share_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, floor=3, window_s=60)
    for _ in range(100):
        budget.on_request()
    granted = sum(budget.try_spend() for _ in range(100))
    assert granted == 20
    small = RetryBudget(ratio=0.2, floor=3, window_s=60)
    small.on_request()
    assert sum(small.try_spend() for _ in range(10)) == 3  # the floor


def test_a_replica_at_its_limit_still_beats_an_ejected_one_with_room() -> None:
    """Replicas under their learnt limit come first, but only first: an ejected replica
    has room because nothing is sent to it, and must not leave the request with nowhere
    to go (it did: "no healthy replica" with a healthy one in the pool)."""
    from gateway.admission.adaptive import AdaptiveConcurrency

    pool = [
        WorkerInfo(worker_id=w, address=w, state=WorkerState.SERVING, stats={"max_running": 4})
        for w in ("busy", "ejected")
    ]

    class Fixed:
        def workers(self) -> list[WorkerInfo]:
            return pool

    d = Dispatcher(Fixed(), Router("least-outstanding"), lambda w: None)  # type: ignore[arg-type, return-value]
    d.concurrency = AdaptiveConcurrency()
    d.concurrency.sync(pool)
    d.outstanding["busy"] = 4  # at its limit
    assert d.breakers.eject("ejected", ["busy", "ejected"])
    picked = d._pick("sim", pb.GenerateRequest(model="sim"), set())
    assert picked is not None and picked[0].worker_id == "busy"
    d.outstanding["busy"] = 1  # with room again: still the only one allowed
    picked = d._pick("sim", pb.GenerateRequest(model="sim"), set())
    assert picked is not None and picked[0].worker_id == "busy"


def test_answers_that_started_behind_a_burst_do_not_judge() -> None:
    """A burst that outlasts the detector's window (a hot prefix's holder, every answer
    queued) must not eject it: the dispatcher marks such answers unjudged. They still
    move the EWMA operators see."""
    b = BreakerBoard(BreakerConfig())
    for _ in range(40):
        b.observe_ttft("a", 0.02, POOL)
        b.observe_ttft("b", 0.5, POOL, judged=False)
    assert b.state("b") == CLOSED and b.ejections == 0
    assert b.replicas()["b"].ttft_ewma > 0.4 and b.replicas()["b"].samples == 0
    for _ in range(20):
        b.observe_ttft("b", 0.5, POOL)  # slow with no queue ahead: sick
    assert b.state("b") == OPEN


def test_a_body_generate_cannot_carry_goes_only_where_it_is_relayed() -> None:
    """Tools (or JSON output) in a mixed fleet: only to replicas that get the body as is
    (OpenAI-compatible upstreams; Breakwater workers' own ports for streams), a 400 up
    front where the model has none, and an alias's version keeps the refusal."""
    from gateway.app import make_upstream
    from gateway.dispatch import RawRequest
    from proto.openai_compat import parse_chat

    pool = [
        WorkerInfo("openai", "http://127.0.0.1:9", "openai-http", ["m"], state=WorkerState.SERVING),
        WorkerInfo("grpc", "127.0.0.1:9", models=["m"], state=WorkerState.SERVING),
        WorkerInfo(
            "port",
            "127.0.0.1:9",
            models=["m"],
            state=WorkerState.SERVING,
            openai_url="http://127.0.0.1:9",
        ),
    ]

    class Fixed:
        def __init__(self, workers: list[WorkerInfo]) -> None:
            self.pool = workers

        def workers(self) -> list[WorkerInfo]:
            return self.pool

    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}
    unsupported = parse_chat(body).unsupported
    assert unsupported is not None

    def picks(d: Dispatcher, stream: bool) -> set[str]:
        out = set()
        raw = RawRequest(b"/v1/chat/completions", b"{}", stream, unsupported)
        for _ in range(12):
            picked = d._pick("m", pb.GenerateRequest(model="m"), set(), raw)
            assert picked is not None
            out.add(picked[0].worker_id)
        return out

    async def main() -> None:
        d = Dispatcher(Fixed(pool), Router("round-robin"), make_upstream)  # type: ignore[arg-type]
        try:
            assert picks(d, False) == picks(d, True) == {"openai"}  # a worker's port refuses
            only_grpc = Dispatcher(Fixed(pool[1:2]), Router("round-robin"), make_upstream)  # type: ignore[arg-type]
            raw = RawRequest(b"/v1/chat/completions", json.dumps(body).encode(), False, unsupported)
            with pytest.raises(UpstreamError) as e:
                await only_grpc.open(pb.GenerateRequest(model="m"), 5.0, None, raw)
            assert (e.value.code, e.value.param) == ("INVALID_ARGUMENT", "tools")
            assert only_grpc.outstanding.total() == 0  # refused before any attempt
            # an OpenAI replica that is down for a moment: a 503 to retry, not a 400
            down = WorkerInfo("openai", "http://127.0.0.1:9", "openai-http", ["m"])
            flaky = Dispatcher(Fixed([pool[1], down]), Router("round-robin"), make_upstream)  # type: ignore[arg-type]
            with pytest.raises(UpstreamError) as e:
                await flaky.open(pb.GenerateRequest(model="m"), 5.0, None, raw)
            assert e.value.code == "UNAVAILABLE"
            await flaky.close()
            only_grpc.resolve_model = lambda model: "m" if model == "alias" else model
            aliased = RawRequest(
                raw.path, json.dumps({**body, "model": "alias"}).encode(), False, unsupported
            )
            with pytest.raises(UpstreamError) as e:
                await only_grpc.open(pb.GenerateRequest(model="alias"), 5.0, None, aliased)
            assert e.value.code == "INVALID_ARGUMENT"
            await only_grpc.close()
        finally:
            await d.close()

    asyncio.run(main())


def test_weights_apply_to_the_fleets_calls_in_flight() -> None:
    pool = [
        WorkerInfo(w, "127.0.0.1:9", models=["m"], state=WorkerState.SERVING) for w in ("a", "b")
    ]

    class Fixed:
        def workers(self) -> list[WorkerInfo]:
            return pool

    d = Dispatcher(Fixed(), Router("least-outstanding"), lambda w: None)  # type: ignore[arg-type, return-value]
    d.weights = lambda: {"a": 2.0}
    d.remote_loads = lambda: {"a": 10}  # another gateway's: 10 / 2 > b's 0
    picked = d._pick("m", pb.GenerateRequest(model="m"), set())
    assert picked is not None and picked[0].worker_id == "b"


def test_a_call_past_its_deadline_spends_no_retry() -> None:
    """The retry budget was taken before the deadline was checked: every call that timed out
    on its own spent a retry it never made, and a replica's crash right after found the
    budget gone (its calls 503s, untried elsewhere)."""
    from serving.calls import DEADLINE_EXCEEDED

    pool = [WorkerInfo(w, w, models=["m"], state=WorkerState.SERVING) for w in ("a", "b")]

    class Fixed:
        def workers(self) -> list[WorkerInfo]:
            return pool

    class Slow:
        def __init__(self, worker_id: str) -> None:
            self.worker_id = worker_id

        async def generate(self, request: pb.GenerateRequest, timeout: float | None):  # type: ignore[no-untyped-def]
            await asyncio.sleep(timeout or 0)
            raise UpstreamError(DEADLINE_EXCEEDED, "deadline exceeded")
            yield pb.GenerateResponse()  # pragma: no cover - makes a generator

        async def probe(self, info: WorkerInfo) -> WorkerInfo:
            return info

        async def close(self) -> None:
            pass

    async def main() -> None:
        d = Dispatcher(Fixed(), Router("round-robin"), lambda w: Slow(w.worker_id))  # type: ignore[arg-type, return-value]
        for i in range(20):
            with pytest.raises(UpstreamError):
                async for _ in d.generate(pb.GenerateRequest(model="m", request_id=f"r{i}"), 0.02):
                    pass
        assert d.retry_budget.retries_in_window == 0
        assert d.counters["retry_budget_exhausted"] == 0

    asyncio.run(main())


class _Replica:
    """Replica "a" as the dispatcher calls it (a test double: its answers are the test's)."""

    worker_id = "a"

    async def probe(self, info: WorkerInfo) -> WorkerInfo:
        return info

    async def close(self) -> None:
        pass


def _one_replica(replica: _Replica) -> Dispatcher:
    """A round-robin dispatcher over the one serving replica "a" of model "m"."""
    pool = [WorkerInfo("a", "a", models=["m"], state=WorkerState.SERVING)]

    class Fixed:
        def workers(self) -> list[WorkerInfo]:
            return pool

    return Dispatcher(Fixed(), Router("round-robin"), lambda w: replica)  # type: ignore[arg-type, return-value]


def test_a_second_cancel_while_a_call_closes_still_ends_its_attempt() -> None:
    """close() awaited the upstream's cleanup before ending the attempt: a cancel landing
    in that await (a gateway shutting down, a client leaving twice) left the replica one
    call busier for good, and its half-open probe slot taken."""
    cleaning = asyncio.Event()

    class SlowToClean(_Replica):
        async def generate(self, request: pb.GenerateRequest, timeout: float | None):  # type: ignore[no-untyped-def]
            try:
                yield pb.GenerateResponse(token_ids=[1])
                await asyncio.sleep(60)
            finally:
                cleaning.set()
                await asyncio.sleep(60)  # a slow goodbye: cancelled below

    async def main() -> None:
        d = _one_replica(SlowToClean())
        call = await d.open(pb.GenerateRequest(model="m"), 30.0)
        assert d.outstanding["a"] == 1
        closing = asyncio.create_task(call.close())
        await asyncio.wait_for(cleaning.wait(), 10)
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing
        assert d.outstanding["a"] == 0

    asyncio.run(main())


def test_a_worker_marked_down_by_a_failed_call_is_no_recovery_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The dispatcher marks a replica NOT_SERVING on a failed call; the next probe's
    SERVING was logged as a recovery each time (5 lines in 8 s for a replica failing 30%
    of calls), and its going down never. Only what probes see is logged, once a change."""
    from gateway.registry.embedded import EmbeddedRegistry

    class Up:
        async def probe(self, info: WorkerInfo) -> WorkerInfo:
            info.state = WorkerState.SERVING
            return info

    async def main() -> None:
        registry = EmbeddedRegistry(["127.0.0.1:5"], lambda w: Up())  # type: ignore[arg-type, return-value]
        await registry.probe_all()
        for _ in range(3):
            registry.workers()[0].state = WorkerState.NOT_SERVING  # as a failed call does
            await registry.probe_all()

    caplog.set_level(logging.INFO, logger="gateway.registry.embedded")
    asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert lines == ["worker 127.0.0.1:5: STARTING -> SERVING"], lines


def test_a_call_from_before_an_ejection_neither_frees_the_probe_nor_closes_the_breaker() -> None:
    """When a sibling's (or another gateway's) ejection ends, the replica is on probation
    here too; a stream this process opened before ended during it and freed the probe's
    slot and closed the breaker with its old success (a second probe, then full traffic,
    before any probe answered)."""

    class Answers(_Replica):
        async def generate(self, request: pb.GenerateRequest, timeout: float | None):  # type: ignore[no-untyped-def]
            yield pb.GenerateResponse(token_ids=[1], finish_reason=pb.FINISH_REASON_LENGTH)

    async def main() -> None:
        d = _one_replica(Answers())
        old = await d.open(pb.GenerateRequest(model="m"), 30.0)  # before the ejection
        d.breakers.force_open("a", 0.05)
        await asyncio.sleep(0.1)
        assert d.breakers.state("a") == HALF_OPEN
        probe = await d.open(pb.GenerateRequest(model="m"), 30.0)  # the probe slot
        assert not d.breakers.allow("a")
        while await old.next() is not None:
            pass
        await old.close()
        assert d.breakers.state("a") == HALF_OPEN and not d.breakers.allow("a")
        while await probe.next() is not None:
            pass
        await probe.close()
        assert d.breakers.state("a") == CLOSED

    asyncio.run(main())
