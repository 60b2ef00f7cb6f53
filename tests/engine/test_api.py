"""The engine's async API: streaming, stop strings, seeds, errors, aborts, priorities."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.engine._util import collect, greedy, tokens_of, wait_until
from worker.engine import (
    AsyncEngine,
    EngineConfig,
    GenerateRequest,
    InvalidRequestError,
    SamplingParams,
)
from worker.engine.engine_core import EngineCore
from worker.engine.output_processor import _holdback


@pytest.fixture(scope="module")
def engine_config(tiny_llama: Path) -> EngineConfig:
    return EngineConfig(model=str(tiny_llama), kv_cache_memory=16 << 20, max_model_len=128)


def run(coro_fn: Callable[[AsyncEngine], Awaitable[None]], config: EngineConfig) -> None:
    async def main() -> None:
        engine = AsyncEngine.from_config(config)
        try:
            await asyncio.wait_for(coro_fn(engine), timeout=120)
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_holdback() -> None:
    assert _holdback("hello wor", ["world"]) == 3
    assert _holdback("hello", ["xyz"]) == 0
    assert _holdback("ab", ["abc", "bcd"]) == 2
    assert _holdback("", ["a"]) == 0


def test_stop_string_across_token_boundary(engine_config: EngineConfig) -> None:
    prompt = "the engine and the queue"

    async def body(engine: AsyncEngine) -> None:
        base = await collect(engine, GenerateRequest("a", prompt=prompt, sampling=greedy(40)))
        ids = tokens_of(base)
        tok = engine.tokenizer
        # Find a token boundary inside the text and make a stop string that spans it.
        pieces = [tok.decode(ids[:i]) for i in range(len(ids) + 1)]
        k = next(
            i
            for i in range(2, len(ids))
            if len(pieces[i]) - len(pieces[i - 1]) >= 1
            and len(pieces[i + 1]) - len(pieces[i]) >= 1
            and pieces[i + 1].isprintable()
        )
        stop = pieces[k][-1] + pieces[k + 1][len(pieces[k]) : len(pieces[k]) + 1]
        expected = pieces[-1][: pieces[-1].find(stop)]
        deltas = await collect(
            engine, GenerateRequest("b", prompt=prompt, sampling=greedy(40, stop=[stop]))
        )
        text = "".join(d.text for d in deltas)
        assert deltas[-1].finish_reason == "stop"
        assert deltas[-1].stop_reason == stop
        assert text == expected
        assert stop not in text
        # include_stop_str_in_output keeps it.
        deltas = await collect(
            engine,
            GenerateRequest(
                "c",
                prompt=prompt,
                sampling=greedy(40, stop=[stop], include_stop_str_in_output=True),
            ),
        )
        assert "".join(d.text for d in deltas) == expected + stop

    run(body, engine_config)


def test_streamed_text_equals_full_decode(engine_config: EngineConfig) -> None:
    async def body(engine: AsyncEngine) -> None:
        deltas = await collect(engine, GenerateRequest("a", prompt="hello", sampling=greedy(30)))
        assert len(deltas) == 30
        text = "".join(d.text for d in deltas)
        assert text == engine.tokenizer.decode(tokens_of(deltas))
        usage = deltas[-1].usage
        assert usage is not None and usage.completion_tokens == 30
        assert usage.prompt_tokens == len(engine.tokenizer.encode("hello"))

    run(body, engine_config)


def test_seed_reproducible_under_batching(engine_config: EngineConfig) -> None:
    sp = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "max_tokens": 20, "ignore_eos": True}

    async def body(engine: AsyncEngine) -> None:
        alone = tokens_of(
            await collect(
                engine,
                GenerateRequest("a", prompt="seeded", sampling=SamplingParams(seed=123, **sp)),
            )
        )
        others = [
            collect(
                engine, GenerateRequest(f"o{i}", prompt=f"noise {i}", sampling=SamplingParams(**sp))
            )
            for i in range(5)
        ]
        batched, *_ = await asyncio.gather(
            collect(
                engine,
                GenerateRequest("b", prompt="seeded", sampling=SamplingParams(seed=123, **sp)),
            ),
            *others,
        )
        other_seed = tokens_of(
            await collect(
                engine, GenerateRequest("c", prompt="seeded", sampling=SamplingParams(seed=7, **sp))
            )
        )
        assert tokens_of(batched) == alone
        assert other_seed != alone

    run(body, engine_config)


@pytest.mark.parametrize(
    ("sampling", "param"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 99}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_bad_sampling_parameters_are_clear_errors(
    engine_config: EngineConfig, sampling: dict, param: str
) -> None:
    async def body(engine: AsyncEngine) -> None:
        with pytest.raises(InvalidRequestError) as e:
            engine.generate(GenerateRequest("x", prompt="hi", sampling=SamplingParams(**sampling)))
        assert e.value.param == param

    run(body, engine_config)


def test_too_long_prompts_and_bad_prompts(engine_config: EngineConfig) -> None:
    async def body(engine: AsyncEngine) -> None:
        with pytest.raises(InvalidRequestError, match="maximum context length is 128"):
            engine.generate(GenerateRequest("x", prompt_token_ids=[5] * 128))
        with pytest.raises(InvalidRequestError, match="max_tokens") as e:
            engine.generate(
                GenerateRequest(
                    "x", prompt_token_ids=[5] * 100, sampling=SamplingParams(max_tokens=29)
                )
            )
        assert e.value.param == "max_tokens"
        with pytest.raises(InvalidRequestError, match="empty"):
            engine.generate(GenerateRequest("x", prompt_token_ids=[]))
        with pytest.raises(InvalidRequestError, match="token ids"):
            engine.generate(GenerateRequest("x", prompt_token_ids=[10**9]))
        with pytest.raises(InvalidRequestError, match="exactly one"):
            engine.generate(GenerateRequest("x", prompt="a", prompt_token_ids=[1]))
        # Without max_tokens, the output may run to max_model_len and no further.
        deltas = await collect(
            engine,
            GenerateRequest(
                "ok", prompt_token_ids=[5] * 120, sampling=SamplingParams(ignore_eos=True)
            ),
        )
        assert deltas[-1].finish_reason == "length"
        assert len(tokens_of(deltas)) == 8

    run(body, engine_config)


def test_request_that_can_never_fit_is_rejected(tiny_llama: Path) -> None:
    config = EngineConfig(model=str(tiny_llama), num_blocks_override=3, max_model_len=128)

    async def body(engine: AsyncEngine) -> None:
        with pytest.raises(InvalidRequestError, match="KV cache"):
            engine.generate(
                GenerateRequest(
                    "x", prompt_token_ids=[5] * 20, sampling=SamplingParams(max_tokens=20)
                )
            )
        deltas = await collect(
            engine, GenerateRequest("y", prompt_token_ids=[5] * 20, sampling=greedy(10))
        )
        assert deltas[-1].finish_reason == "length"

    run(body, config)


def test_cancelling_the_iterator_frees_blocks(engine_config: EngineConfig) -> None:
    async def body(engine: AsyncEngine) -> None:
        stream = engine.generate(
            GenerateRequest("long", prompt_token_ids=[7] * 60, sampling=greedy(60))
        )
        first = await anext(stream)
        assert first.token_ids
        assert engine.stats().num_blocks_free < engine.stats().num_blocks_total
        await stream.aclose()
        await wait_until(
            lambda: (
                engine.stats().num_blocks_free == engine.stats().num_blocks_total
                and engine.stats().num_requests_running == 0
            )
        )

        # A task cancelled mid-stream aborts too.
        async def consume() -> None:
            async for _ in engine.generate(
                GenerateRequest("cancel-me", prompt_token_ids=[8] * 60, sampling=greedy(60))
            ):
                await asyncio.sleep(0.01)

        task = asyncio.create_task(consume())
        await wait_until(lambda: engine.stats().num_requests_running == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(
            lambda: (
                engine.stats().num_blocks_free == engine.stats().num_blocks_total
                and engine.stats().num_requests_running == 0
            )
        )

    run(body, engine_config)


def test_interactive_requests_go_before_batch(engine_config: EngineConfig) -> None:
    from dataclasses import replace

    core = EngineCore(replace(engine_config, max_num_seqs=1))
    order: list[str] = []
    for rid, prio in [("batch-1", "batch"), ("batch-2", "batch")]:
        core.add(core.prepare(GenerateRequest(rid, prompt="x", sampling=greedy(3), priority=prio)))
    core.step()  # batch-1 starts
    core.add(
        core.prepare(
            GenerateRequest("inter", prompt="x", sampling=greedy(3), priority="interactive")
        )
    )
    while core.has_work:
        for d in core.step():
            if d.finished:
                order.append(d.request_id)
    assert order == ["batch-1", "inter", "batch-2"]
    with pytest.raises(InvalidRequestError):
        core.prepare(GenerateRequest("bad", prompt="x", priority="urgent"))


def test_logprobs(engine_config: EngineConfig) -> None:
    async def body(engine: AsyncEngine) -> None:
        deltas = await collect(
            engine, GenerateRequest("lp", prompt="hello", sampling=greedy(5, logprobs=3))
        )
        for d in deltas:
            assert d.logprobs is not None
            (lp,) = d.logprobs
            assert len(lp.top) == 3
            assert lp.top[0][0] == lp.token_id  # greedy picks the most likely token
            assert lp.logprob == pytest.approx(lp.top[0][1])
            assert lp.logprob <= 0

    run(body, engine_config)


def test_chat_template_and_eos(engine_config: EngineConfig) -> None:
    async def body(engine: AsyncEngine) -> None:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
        assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        deltas = await collect(
            engine,
            GenerateRequest(
                "chat",
                messages=[{"role": "user", "content": "hi"}],
                sampling=SamplingParams(temperature=0, max_tokens=20),
            ),
        )
        assert deltas[-1].finish_reason in ("stop", "length")
        # Stop token ids end the request.
        first = tokens_of(deltas)[0]
        again = await collect(
            engine,
            GenerateRequest(
                "chat2",
                messages=[{"role": "user", "content": "hi"}],
                sampling=SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[first]),
            ),
        )
        assert tokens_of(again) == [first]
        assert again[-1].finish_reason == "stop"
        assert again[-1].stop_reason == first

    run(body, engine_config)


def test_a_routers_token_ids_are_taken_for_the_prompt(engine_config: EngineConfig) -> None:
    """A chat with the router's ids beside it generates exactly what the chat alone does,
    without tokenizing; ids past the vocabulary are refused, naming the router."""

    async def body(engine: AsyncEngine) -> None:
        msgs = [{"role": "user", "content": "hi there, how are you?"}]
        ids = engine.tokenizer.prompt_ids(None, msgs)
        greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        alone = await collect(engine, GenerateRequest("alone", messages=msgs, sampling=greedy))
        before = engine.stats().prompts_pretokenized
        given = await collect(
            engine, GenerateRequest("given", messages=msgs, sampling=greedy, pretokenized=ids)
        )
        assert tokens_of(given) == tokens_of(alone)
        assert engine.stats().prompts_pretokenized == before + 1
        with pytest.raises(InvalidRequestError, match="router's prompt token ids") as e:
            engine.generate(GenerateRequest("bad", messages=msgs, pretokenized=[10**6]))
        assert e.value.param == "prompt"

    run(body, engine_config)


def test_memory_budget_refused_with_clear_message(tiny_llama: Path) -> None:
    from worker.engine.errors import ConfigError

    with pytest.raises(ConfigError, match="does not fit the memory budget"):
        EngineCore(
            EngineConfig(model=str(tiny_llama), memory_budget=64 << 20, kv_cache_memory=1 << 30)
        )
    with pytest.raises(ConfigError, match="fewer than one request"):
        EngineCore(EngineConfig(model=str(tiny_llama), kv_cache_memory=1 << 16, max_model_len=4096))


def test_a_prompt_cut_inside_a_character_does_not_leak_into_the_output(
    engine_config: EngineConfig,
) -> None:
    """Token ids that end inside a UTF-8 character (an answer cut mid-emoji, sent back):
    the decoder, handed the prompt's last ids as its start, gave their whole text back
    with the first output token, and a stop string found in the prompt's words ended it."""
    core = EngineCore(engine_config)
    hf = core.tokenizer.hf
    frag = next(i for i in range(hf.get_vocab_size()) if hf.decode([i]).endswith("\ufffd"))
    prompt = [324, 301, 37, 314, 10, 469, 432, frag]
    assert "Bet" in hf.decode(prompt)

    def answer(stop: list[str]) -> tuple[str, str | None]:
        core.add(
            core.prepare(
                GenerateRequest(
                    f"r{len(stop)}", prompt_token_ids=prompt, sampling=greedy(5, stop=stop)
                )
            )
        )
        deltas = []
        while core.has_work:
            deltas += core.step()
        return "".join(d.text or "" for d in deltas), deltas[-1].finish_reason

    text, finish = answer([])
    assert "Bet" not in text and finish == "length"
    assert answer(["Bet"]) == (text, "length")  # only the prompt says it


def test_end_of_sequence_ids_of_the_generation_config_count(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """config.json names one, generation_config.json more (as Qwen2.5-Instruct ships):
    the engine stops on all of them, as transformers and vLLM do (it ran past the second)."""
    import json
    import shutil

    from worker.engine.model.config import ModelConfig

    model = tmp_path / "m"
    shutil.copytree(tiny_llama, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 3}))
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 1]}))
    assert ModelConfig.from_dir(model).eos_token_ids == (3, 1)
    (model / "generation_config.json").write_text("not json")  # a broken one is skipped
    assert ModelConfig.from_dir(model).eos_token_ids == (3,)


def test_an_end_of_sequence_token_as_the_last_allowed_one_ends_by_length(
    engine_config: EngineConfig,
) -> None:
    """vLLM checks the length first: finish_reason "length", where this said "stop"."""
    core = EngineCore(engine_config)
    prompt = [257, 452, 179, 377, 233, 151, 315, 505, 41]  # greedy: end of sequence first

    def answer(max_tokens: int) -> tuple[list[int], str | None]:
        sampling = SamplingParams(temperature=0, max_tokens=max_tokens)
        core.add(
            core.prepare(
                GenerateRequest(f"e{max_tokens}", prompt_token_ids=prompt, sampling=sampling)
            )
        )
        deltas = []
        while core.has_work:
            deltas += core.step()
        return tokens_of(deltas), deltas[-1].finish_reason

    tokens, finish = answer(2)
    assert finish == "stop" and len(tokens) == 1 and tokens[0] in core.eos_token_ids
    assert answer(1) == (tokens, "length")


def test_a_cache_salt_keeps_prefixes_apart(engine_config: EngineConfig) -> None:
    """Blocks cached under one salt (a tenant's) are hits only for the same salt: another
    salt, or none, recomputes the prompt, and the output is the same either way."""

    async def body(engine: AsyncEngine) -> None:
        prompt = list(range(5, 5 + 3 * engine.core.config.block_size + 3))
        greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

        async def cached(name: str, salt: str) -> tuple[int, list[int]]:
            req = GenerateRequest(name, prompt_token_ids=prompt, sampling=greedy, cache_salt=salt)
            deltas = await collect(engine, req)
            usage = next(d.usage for d in deltas if d.usage is not None)
            return usage.cached_prompt_tokens, tokens_of(deltas)

        first, out = await cached("a1", "tenant-a")
        assert first == 0
        again, out_again = await cached("a2", "tenant-a")
        assert again == 3 * engine.core.config.block_size and out_again == out
        for name, salt in (("b", "tenant-b"), ("none", "")):
            hits, out_other = await cached(name, salt)
            assert hits == 0 and out_other == out, salt

    run(body, engine_config)
