"""Shared helpers for engine tests: run the real engine, and the transformers reference."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import torch

from worker.engine import AsyncEngine, EngineConfig, GenerateRequest, SamplingParams
from worker.engine.outputs import Delta

_hf_models: dict[str, object] = {}
_hf_cache: dict[tuple[str, tuple[int, ...], int], list[int]] = {}


def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by transformers' own model (the reference), one prompt at a time."""
    from transformers import AutoModelForCausalLM

    key = (str(model_dir), tuple(prompt), max_new_tokens)
    if key in _hf_cache:
        return _hf_cache[key]
    model = _hf_models.get(str(model_dir))
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        _hf_models[str(model_dir)] = model
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(  # type: ignore[attr-defined]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    result = out[0, len(prompt) :].tolist()
    _hf_cache[key] = result
    return result


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)  # type: ignore[arg-type]


async def collect(engine: AsyncEngine, request: GenerateRequest) -> list[Delta]:
    return [d async for d in engine.generate(request)]


def run_concurrently(
    config: EngineConfig,
    requests: list[GenerateRequest],
    before: Callable[[AsyncEngine], None] | None = None,
) -> tuple[list[list[Delta]], AsyncEngine]:
    """Submit every request at once to a fresh engine; returns each one's deltas."""

    async def main() -> tuple[list[list[Delta]], AsyncEngine]:
        engine = AsyncEngine.from_config(config)
        try:
            if before:
                before(engine)
            results = await asyncio.wait_for(
                asyncio.gather(*(collect(engine, r) for r in requests)), timeout=240
            )
            await wait_until(
                lambda: engine.stats().num_blocks_free == engine.stats().num_blocks_total
            )
            return list(results), engine
        finally:
            engine.shutdown()

    return asyncio.run(main())


async def wait_until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within deadline")
        await asyncio.sleep(0.01)


def tokens_of(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]
