"""Memory plan: weights + KV cache + activations must fit the budget, checked at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from worker.engine.config import EngineConfig
from worker.engine.errors import ConfigError
from worker.engine.model.config import ModelConfig

GiB = 1 << 30
# On CPU a bigger KV cache buys nothing but resident memory, so the derived size is capped
# (vLLM's CPU backend likewise takes a fixed KV space); raise it with --kv-cache-memory.
CPU_DEFAULT_KV = 1 * GiB


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    weights: int
    activations: int
    headroom: int
    kv_cache: int
    num_blocks: int
    block_bytes: int

    def describe(self) -> str:
        return (
            f"budget {fmt(self.budget)} = weights {fmt(self.weights)} + KV cache "
            f"{fmt(self.kv_cache)} ({self.num_blocks} blocks) + activations "
            f"{fmt(self.activations)} + headroom {fmt(self.headroom)}"
        )


def plan_memory(
    cfg: EngineConfig,
    model: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
) -> MemoryPlan:
    esize = torch.empty((), dtype=dtype).element_size()
    weights = model.num_params() * esize
    t = cfg.max_num_batched_tokens
    q = model.num_heads * model.head_dim
    kv = model.num_kv_heads * model.head_dim
    per_token = model.hidden_size * 4 + q * 3 + kv * 4 + model.intermediate_size * 3
    blocks_per_seq = -(-max_model_len // cfg.block_size)
    # Decode attention gathers every running sequence's K and V, plus the scores.
    gather = cfg.max_num_seqs * blocks_per_seq * cfg.block_size * (2 * kv + model.num_heads)
    logits = min(cfg.max_num_seqs, t) * model.vocab_size * 4 * 3
    activations = (t * per_token + gather) * esize + logits
    if device.type == "cuda":
        budget = cfg.memory_budget or int(
            0.9 * torch.cuda.get_device_properties(device).total_memory
        )
    else:
        budget = cfg.memory_budget or int(0.5 * _available_host_memory())
    headroom = max(int(0.05 * budget), 64 << 20) if cfg.memory_budget is None else 0
    block_bytes = model.kv_bytes_per_token(esize) * cfg.block_size
    free_for_kv = budget - weights - activations - headroom
    if cfg.kv_cache_memory is not None:
        kv_bytes = cfg.kv_cache_memory
        if kv_bytes > free_for_kv:
            raise ConfigError(
                f"configuration does not fit the memory budget: weights {fmt(weights)} + KV cache "
                f"{fmt(kv_bytes)} + activations {fmt(activations)} + headroom {fmt(headroom)} > "
                f"budget {fmt(budget)}. Lower --kv-cache-memory, --max-num-batched-tokens or "
                "--max-num-seqs, or raise --memory-budget."
            )
    else:
        if free_for_kv <= 0:
            raise ConfigError(
                f"the model does not fit the memory budget: weights {fmt(weights)} + activations "
                f"{fmt(activations)} + headroom {fmt(headroom)} > budget {fmt(budget)}"
            )
        kv_bytes = free_for_kv if device.type == "cuda" else min(free_for_kv, CPU_DEFAULT_KV)
    num_blocks = kv_bytes // block_bytes + 1  # +1: the null block
    if cfg.num_blocks_override is not None:
        num_blocks = cfg.num_blocks_override
        kv_bytes = (num_blocks - 1) * block_bytes
    elif num_blocks - 1 < blocks_per_seq:
        raise ConfigError(
            f"KV cache of {fmt(kv_bytes)} holds {(num_blocks - 1) * cfg.block_size} tokens, fewer "
            f"than one request of max_model_len={max_model_len}. Raise --kv-cache-memory or "
            "lower --max-model-len."
        )
    return MemoryPlan(
        budget, weights, activations, headroom, kv_bytes, int(num_blocks), block_bytes
    )
