"""The sim engine: the real scheduler and block pool over a timing model of a GPU.

Timing assertions compare runs by ratios with wide margins, so a loaded machine cannot flip
them: the modelled GPU time dominates host overhead by an order of magnitude.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

import pytest

from tests.engine._util import collect, tokens_of, wait_until
from worker.backends.sim import PRESETS, SimExecutor, build_sim_engine
from worker.engine import AsyncEngine, EngineConfig, GenerateRequest, SamplingParams
from worker.engine.outputs import Delta

CONFIG = EngineConfig(model="")


def run(body: Callable[[AsyncEngine], Awaitable[None]], engine: AsyncEngine) -> None:
    async def main() -> None:
        try:
            await asyncio.wait_for(body(engine), timeout=60)
            await wait_until(blocks_all_free(engine))
        finally:
            engine.shutdown()

    asyncio.run(main())


def blocks_all_free(engine: AsyncEngine) -> Callable[[], bool]:
    return lambda: engine.stats().num_blocks_free == engine.stats().num_blocks_total


def executor(engine: AsyncEngine) -> SimExecutor:
    ex = engine.core.executor
    assert isinstance(ex, SimExecutor)
    return ex


def req(
    rid: str, max_tokens: int, prompt: str = "the gateway queue", **kw: object
) -> GenerateRequest:
    sp = SamplingParams(max_tokens=max_tokens, **kw)  # type: ignore[arg-type]
    return GenerateRequest(rid, prompt=prompt, sampling=sp)


async def timed(engine: AsyncEngine, requests: list[GenerateRequest]) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(collect(engine, r) for r in requests))
    return time.perf_counter() - start


def test_presets_are_plausible() -> None:
    h100 = PRESETS["llama3-8b-h100"]
    assert 0.004 < h100.step_seconds(0, 1, 100) < 0.012  # published ITL at batch 1: 4.6-9 ms
    assert h100.step_seconds(0, 256, 256_000) > 2.5 * h100.step_seconds(0, 1, 1000)
    assert PRESETS["llama3-70b-4xh100"].step_seconds(0, 1, 100) > h100.step_seconds(0, 1, 100)
    assert PRESETS["tiny"].step_seconds(64, 8, 800) < 0.001


def test_serves_concurrent_requests_with_correct_usage() -> None:
    engine = build_sim_engine(CONFIG, "tiny")
    tok = engine.tokenizer

    async def body(engine: AsyncEngine) -> None:
        requests = [req(f"r{i}", 5 + 3 * i, f"prompt number {i} for the sim") for i in range(12)]
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
        for r, deltas in zip(requests, results, strict=True):
            usage = deltas[-1].usage
            assert usage is not None and deltas[-1].finish_reason == "length"
            assert usage.prompt_tokens == len(tok.encode(r.prompt or ""))
            assert usage.completion_tokens == r.sampling.max_tokens == len(tokens_of(deltas))
            assert not set(tokens_of(deltas)) & engine.core.eos_token_ids
            assert "".join(d.text for d in deltas) == tok.decode(tokens_of(deltas))
        stats = engine.stats()
        assert stats.generation_tokens_total == sum(5 + 3 * i for i in range(12))

    run(body, engine)


def test_outputs_are_deterministic_and_honour_stops_and_logprobs() -> None:
    engine = build_sim_engine(CONFIG, "tiny")

    async def body(engine: AsyncEngine) -> None:
        greedy = {"temperature": 0.0}
        a = tokens_of(await collect(engine, req("a", 12, **greedy)))
        b = tokens_of(await collect(engine, req("b", 12, **greedy)))
        assert a == b  # greedy: same prompt, same text, whatever the request id
        c = tokens_of(await collect(engine, req("c", 12)))
        assert c != a  # sampled without a seed: varies per request
        stop = await collect(engine, req("d", 12, stop_token_ids=[a[4]], **greedy))
        assert stop[-1].finish_reason == "stop" and tokens_of(stop)[-1] == a[4]
        deltas = await collect(engine, req("e", 6, logprobs=3))
        for d in deltas:
            assert d.logprobs is not None
            (lp,) = d.logprobs
            assert lp.top[0] == (d.token_ids[0], lp.logprob) and len(lp.top) == 3
            assert all(x <= 0 for _, x in lp.top) and sum(math.exp(x) for _, x in lp.top) < 1

    run(body, engine)


def test_batching_beats_serial() -> None:
    engine = build_sim_engine(CONFIG, "llama3-8b-h100")  # 7.5 ms steps
    n, tokens = 8, 24

    async def body(engine: AsyncEngine) -> None:
        single = await timed(engine, [req("solo", tokens)])
        steps_before = engine.stats().num_steps
        batched = await timed(engine, [req(f"b{i}", tokens) for i in range(n)])
        # Serial would be n * single; a batch of 8 costs about one request's time.
        assert batched < single * n / 3
        assert engine.stats().num_steps - steps_before < 2 * tokens

    run(body, engine)


def test_small_kv_forces_preemption_and_still_completes() -> None:
    # 16 blocks of 16 tokens; six requests of ~80 tokens each need 30 blocks at their peak.
    engine = build_sim_engine(CONFIG, "tiny", kv_tokens=256)
    reference = build_sim_engine(CONFIG, "tiny")
    requests = [
        GenerateRequest(
            f"p{i}",
            prompt_token_ids=list(range(100 + i, 120 + i)),
            sampling=SamplingParams(0.0, max_tokens=60),
        )
        for i in range(6)
    ]
    expected: list[list[int]] = []

    async def baseline(engine: AsyncEngine) -> None:
        for r in requests:
            expected.append(tokens_of(await collect(engine, r)))

    async def body(engine: AsyncEngine) -> None:
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
        assert [tokens_of(d) for d in results] == expected  # recompute changes nothing
        assert all(d[-1].usage and d[-1].usage.completion_tokens == 60 for d in results)
        assert engine.stats().num_preemptions > 0

    run(baseline, reference)
    run(body, engine)


def test_slow_worker_is_slower() -> None:
    workload = [req(f"s{i}", 12) for i in range(2)]
    times: dict[float, float] = {}
    simulated: dict[float, float] = {}
    for speed in (1.0, 0.2):
        engine = build_sim_engine(CONFIG, "llama3-8b-h100", speed=speed)

        async def body(engine: AsyncEngine, speed: float = speed) -> None:
            times[speed] = await timed(engine, workload)
            simulated[speed] = executor(engine).simulated_seconds

        run(body, engine)
    assert times[0.2] > 2 * times[1.0]
    assert simulated[0.2] == pytest.approx(5 * simulated[1.0], rel=0.25)


def test_cancelling_a_stream_frees_blocks() -> None:
    engine = build_sim_engine(CONFIG, "llama3-8b-h100")

    async def body(engine: AsyncEngine) -> None:
        stream = engine.generate(req("closed", 500))
        for _ in range(3):
            await anext(stream)
        assert engine.stats().num_blocks_free < engine.stats().num_blocks_total
        await stream.aclose()  # type: ignore[attr-defined]
        await wait_until(blocks_all_free(engine))

        seen: list[Delta] = []

        async def consume() -> None:
            async for d in engine.generate(req("cancelled", 500)):
                seen.append(d)

        task = asyncio.create_task(consume())
        await wait_until(lambda: len(seen) >= 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: engine.stats().num_requests_running == 0)
        assert len(seen) < 500

    run(body, engine)


def test_a_cache_smaller_than_the_context_caps_it_and_a_prompt_too_big_is_named() -> None:
    """A sim cache under the preset's context refused every request without max_tokens
    (it asked for the whole context), blaming max_tokens; the torch engine (and vLLM)
    refuse to start there instead."""
    from worker.engine.errors import InvalidRequestError

    engine = build_sim_engine(CONFIG, "tiny", kv_tokens=512)
    assert executor(engine).max_model_len == 512

    async def body(engine: AsyncEngine) -> None:
        sp = SamplingParams(0.0, ignore_eos=True)  # no max_tokens: up to the context
        out = await collect(engine, GenerateRequest("all", prompt_token_ids=[5, 6, 7], sampling=sp))
        assert out[-1].usage and out[-1].usage.completion_tokens == 512 - 3
        with pytest.raises(InvalidRequestError) as too_big:
            big = SamplingParams(0.0, max_tokens=1)
            await collect(engine, GenerateRequest("big", prompt_token_ids=[5] * 600, sampling=big))
        assert too_big.value.param == "prompt" or "prompt" in str(too_big.value)

    run(body, engine)
