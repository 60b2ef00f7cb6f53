"""Greedy output must equal transformers token for token: batched, chunked, preempted, cached."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.engine._util import greedy, hf_greedy, run_concurrently, tokens_of
from worker.engine import EngineConfig, GenerateRequest


def mixed_prompts(seed: int, n: int = 16, vocab: int = 500) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice([1, 3, 7, 15, 16, 17, 31, 33, 48, 64, 5, 90])
        out.append(([rng.randrange(4, vocab) for _ in range(length)], 6 + (i * 5) % 19))
    return out


def shared_prefix_prompts(seed: int, n: int = 16) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(4, 500) for _ in range(40)]
    return [
        (prefix + [rng.randrange(4, 500) for _ in range(rng.randrange(1, 20))], 10)
        for _ in range(n)
    ]


def check_against_hf(model: Path, prompts: list[tuple[list[int], int]], **cfg: object):
    config = EngineConfig(model=str(model), kv_cache_memory=32 << 20, max_model_len=256, **cfg)  # type: ignore[arg-type]
    requests = [
        GenerateRequest(f"r{i}", prompt_token_ids=p, sampling=greedy(n))
        for i, (p, n) in enumerate(prompts)
    ]
    results, engine = run_concurrently(config, requests)
    for (prompt, n), deltas in zip(prompts, results, strict=True):
        assert deltas[-1].finish_reason == "length", deltas[-1]
        assert tokens_of(deltas) == hf_greedy(model, prompt, n), f"prompt {prompt}"
    return engine.stats()


@pytest.fixture(params=["llama", "qwen2"])
def model(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}")


def test_batched_matches_transformers(model: Path) -> None:
    stats = check_against_hf(model, mixed_prompts(0))
    assert stats.generation_tokens_total == sum(n for _, n in mixed_prompts(0))


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_chunked_prefill_matches_transformers(model: Path, chunk: int) -> None:
    # The whole step budget is `chunk` tokens, so long prompts are split into many chunks
    # that sit behind cached tokens, mixed with other requests' decodes.
    check_against_hf(model, mixed_prompts(1), max_num_batched_tokens=chunk)


def test_preemption_matches_transformers(model: Path) -> None:
    # 12 blocks of 16 slots for 16 requests needing up to 7 blocks each: preemption is forced.
    stats = check_against_hf(model, mixed_prompts(2), num_blocks_override=13)
    assert stats.num_preemptions > 0


def test_prefix_cache_hits_match_transformers(model: Path) -> None:
    stats = check_against_hf(model, shared_prefix_prompts(3))
    assert stats.prefix_cache_hits >= 15 * 32, stats


def test_prefix_cache_hits_with_chunking_and_preemption(model: Path) -> None:
    stats = check_against_hf(
        model, shared_prefix_prompts(4), num_blocks_override=16, max_num_batched_tokens=24
    )
    assert stats.prefix_cache_hits > 0
    assert stats.num_preemptions > 0


def test_mistral_and_sharded_checkpoint(tmp_path: Path) -> None:
    from worker.engine.demo_model import write_demo_model

    model = write_demo_model(tmp_path, "tiny", "mistral", seed=5, max_shard_bytes=100_000)
    assert (model / "model.safetensors.index.json").is_file()
    check_against_hf(model, mixed_prompts(5, n=4))


@pytest.mark.parametrize("bias", ["attention_bias", "mlp_bias"])
def test_llama_checkpoints_with_biases(tiny_llama: Path, tmp_path: Path, bias: str) -> None:
    """Llama's `attention_bias` biases o_proj too, and `mlp_bias` the MLP: both were
    dropped without a word (the loader took no tensor it did not look for), and every
    answer was wrong."""
    import json
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((tiny_llama / "config.json").read_text())
    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(**{**{k: v for k, v in cfg.items() if not k.startswith("_")}, bias: True})
    ).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    hf.save_pretrained(tmp_path)
    for f in tiny_llama.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, tmp_path)
    check_against_hf(tmp_path, mixed_prompts(7, n=4))
