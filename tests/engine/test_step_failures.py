"""A failure inside a step must end every affected stream and leave no uncomputed KV cached.

Runs the real engine over the sim executor; the failures are injected by fakes (a raising
output processor, an executor that raises on a chosen step).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from worker.backends.sim import SimExecutor
from worker.engine import AsyncEngine, EngineConfig, GenerateRequest, SamplingParams
from worker.engine import output_processor as op
from worker.engine.engine_core import EngineCore
from worker.engine.errors import EngineDeadError
from worker.engine.outputs import Delta
from worker.engine.request import Request
from worker.engine.scheduler import ScheduledBatch

CONFIG = EngineConfig(model="", block_size=16)
PROMPT = list(range(10, 74))  # 64 tokens: 4 full blocks, 3 of them hits (one is computed)


class FailingExecutor(SimExecutor):
    """A fake: the sim executor, raising as a CUDA OOM would on the chosen (1-based) steps."""

    def __init__(self, fail_on: set[int]) -> None:
        super().__init__(CONFIG, "tiny", speed=1000.0)
        self.fail_on = fail_on
        self.calls = 0

    def execute(self, batch: ScheduledBatch, kv: object) -> tuple[list[Request], object]:  # type: ignore[override]
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("CUDA out of memory")
        return super().execute(batch, kv)  # type: ignore[arg-type]


def greedy(rid: str, max_tokens: int, prompt: list[int] | None = None) -> GenerateRequest:
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return GenerateRequest(rid, prompt_token_ids=prompt or [5, 6, 7], sampling=sp)


@pytest.fixture
def bad_on_second_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake detokenizer failure ("Invalid prefix encountered", as tokenizers' DecodeStream
    can raise) for request "bad" on its 2nd token."""
    orig = op.OutputProcessor.process

    def process(self: op.OutputProcessor, token_id: int, logprob: object) -> Delta:
        if self.request.request_id == "bad" and self.request.num_output_tokens >= 2:
            raise RuntimeError("Invalid prefix encountered")
        return orig(self, token_id, logprob)  # type: ignore[arg-type]

    monkeypatch.setattr(op.OutputProcessor, "process", process)


def all_free(core: EngineCore) -> bool:
    return core.kv.pool.num_free_blocks == core.kv.num_usable_blocks


@pytest.mark.usefixtures("bad_on_second_token")
def test_one_requests_output_error_fails_it_alone_in_the_step() -> None:
    core = EngineCore(CONFIG, executor=SimExecutor(CONFIG, "tiny", speed=1000.0))
    for rid, n in (("good", 2), ("bad", 10), ("other", 5)):
        core.add(core.prepare(greedy(rid, n)))
    assert {d.request_id for d in core.step()} == {"good", "bad", "other"}  # one batch
    # "good" finishes (leaving `live`) in the very step where "bad" raises
    second = {d.request_id: d for d in core.step()}
    assert second["good"].finish_reason == "length"
    assert second["bad"].finish_reason == "error"
    assert "Invalid prefix encountered" in (second["bad"].error or "")
    assert second["other"].finish_reason is None
    assert list(core.live) == ["other"]
    finished: list[Delta] = []
    while core.has_work:
        core.step(finished)  # the caller's list is appended to
    assert [d.finish_reason for d in finished if d.finished] == ["length"]
    assert all_free(core)


@pytest.mark.usefixtures("bad_on_second_token")
def test_every_stream_ends_when_one_request_fails() -> None:
    engine = AsyncEngine(EngineCore(CONFIG, executor=SimExecutor(CONFIG, "tiny", speed=1000.0)))

    async def collect(rid: str, max_tokens: int) -> list[Delta]:
        return [d async for d in engine.generate(greedy(rid, max_tokens))]

    async def main() -> dict[str, list[Delta]]:
        runs = {rid: collect(rid, n) for rid, n in (("good", 2), ("bad", 10), ("other", 50))}
        got = await asyncio.wait_for(asyncio.gather(*runs.values()), timeout=30)
        return dict(zip(runs, got, strict=True))

    try:
        out = asyncio.run(main())
    finally:
        engine.shutdown()
    assert out["good"][-1].finish_reason == "length" and len(out["good"]) == 2
    assert out["other"][-1].finish_reason == "length" and len(out["other"]) == 50
    assert out["bad"][-1].finish_reason == "error"
    assert "Invalid prefix encountered" in (out["bad"][-1].error or "")
    assert all_free(engine.core)


def test_a_failed_prefill_leaves_nothing_in_the_prefix_cache() -> None:
    ex = FailingExecutor(fail_on={1})
    engine = AsyncEngine(EngineCore(CONFIG, executor=ex))
    pool = engine.core.kv.pool

    async def run(rid: str) -> Delta:
        deltas = [d async for d in engine.generate(greedy(rid, 4, PROMPT))]
        return deltas[-1]

    async def main() -> list[Delta]:
        return [await asyncio.wait_for(run(rid), timeout=30) for rid in ("a", "b", "c")]

    try:
        a, b, c = asyncio.run(main())
    finally:
        engine.shutdown()
    assert a.finish_reason == "error" and "CUDA out of memory" in (a.error or "")
    assert b.finish_reason == "length"
    assert b.usage is not None and b.usage.cached_prompt_tokens == 0  # not 48
    assert c.usage is not None and c.usage.cached_prompt_tokens == 48  # b's blocks were real
    assert all_free(engine.core)
    events, _ = pool.cache_events()
    # "a"'s four blocks were announced, then withdrawn (a router must not keep them); "b"
    # stored its own
    assert [stored for stored, _ in events[:8]] == [True] * 4 + [False] * 4
    assert sorted(h for _, h in events[:4]) == sorted(h for _, h in events[4:8])
    assert len(pool.cached) == 4


def test_a_failed_step_on_the_core_uncaches_its_blocks() -> None:
    core = EngineCore(CONFIG, executor=FailingExecutor(fail_on={1}))
    core.add(core.prepare(greedy("a", 4, PROMPT)))
    with pytest.raises(RuntimeError, match="out of memory"):
        core.step()
    assert not core.kv.pool.cached
    for rid in list(core.live):  # the caller's part, as AsyncEngine._run does it
        core.abort(rid, reason="engine error")
    assert all_free(core)
    r = core.prepare(greedy("b", 4, PROMPT))
    core.add(r)
    core.step()
    assert r.num_cached_tokens == 0


async def _until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def test_a_dead_loop_is_not_alive_and_health_says_so() -> None:
    from grpc_health.v1 import health, health_pb2

    from worker.grpc_service import NOT_SERVING, WorkerState
    from worker.server import Worker
    from worker.settings import WorkerSettings

    engine = AsyncEngine(EngineCore(CONFIG, executor=SimExecutor(CONFIG, "tiny", speed=1000.0)))
    worker = Worker(WorkerSettings(engine="sim"))
    worker.service.engine = engine
    worker.service.state = WorkerState.SERVING

    async def main() -> None:
        worker.health = health.aio.HealthServicer()
        await worker._set_health(health_pb2.HealthCheckResponse.SERVING)
        watch = asyncio.create_task(worker._watch_engine(interval_s=0.01))
        assert engine.alive and worker.service.state == WorkerState.SERVING
        engine._commands.put(("malformed",))  # a fake fault: the loop dies unpacking it
        await _until(lambda: not engine.alive)
        assert worker.service.state == WorkerState.NOT_SERVING
        assert worker.info().state == "NOT_SERVING"
        from prometheus_client import generate_latest

        from worker.metrics import WorkerMetrics

        text = generate_latest(WorkerMetrics(worker.service).registry).decode()
        assert 'breakwater_worker_state{state="NOT_SERVING"} 1.0' in text
        await asyncio.wait_for(watch, timeout=30)
        status = worker.health._server_status  # type: ignore[attr-defined]
        assert status[""] == NOT_SERVING
        with pytest.raises(EngineDeadError):
            engine.generate(greedy("late", 2))

    asyncio.run(main())
    engine.shutdown()


def test_a_request_after_shutdown_is_refused_at_once() -> None:
    engine = AsyncEngine(EngineCore(CONFIG, executor=SimExecutor(CONFIG, "tiny", speed=1000.0)))
    engine.shutdown()
    assert not engine.alive

    async def main() -> None:
        with pytest.raises(EngineDeadError, match="shut down"):
            engine.generate(greedy("late", 2))

    asyncio.run(main())


def test_a_request_that_fails_to_be_added_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception other than InvalidRequestError while a request was added (its decoder
    primed, say) ended the engine loop: every later request got "engine stopped"."""
    orig = op.OutputProcessor.__init__

    def init(self: op.OutputProcessor, request: Request, tokenizer: object) -> None:
        if request.request_id == "bad":
            raise RuntimeError("a fake decoder failure")
        orig(self, request, tokenizer)  # type: ignore[arg-type]

    monkeypatch.setattr(op.OutputProcessor, "__init__", init)
    engine = AsyncEngine(EngineCore(CONFIG, executor=SimExecutor(CONFIG, "tiny", speed=1000.0)))

    async def last(rid: str) -> Delta:
        return [d async for d in engine.generate(greedy(rid, 3))][-1]

    async def main() -> list[Delta]:
        return [await asyncio.wait_for(last(rid), timeout=30) for rid in ("bad", "good")]

    try:
        bad, good = asyncio.run(main())
    finally:
        engine.shutdown()
    assert bad.finish_reason == "error" and "a fake decoder failure" in (bad.error or "")
    assert good.finish_reason == "length"
    assert all_free(engine.core)
