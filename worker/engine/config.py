"""Engine configuration: one typed object, filled from CLI flags or code."""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(value: str | int) -> int:
    """Parse '512MiB', '2G', '1.5gb' or a plain byte count."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)(i?[bB])?\s*", value)
    if not m:
        raise ValueError(f"cannot parse a memory size from {value!r} (use e.g. 512MiB or 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class EngineConfig:
    """Knobs for one engine instance; names follow vLLM's where the concept is the same."""

    model: str
    """Path to a local Hugging Face checkpoint directory."""
    served_model_name: str | None = None
    device: str = "auto"
    """'cpu', 'cuda', 'cuda:1' or 'auto' (CUDA when present)."""
    dtype: str = "auto"
    """'float32', 'bfloat16', 'float16' or 'auto' (fp32 on CPU, bf16 on GPU)."""
    block_size: int = 16
    kv_cache_memory: int | None = None
    """Bytes for the KV cache; None derives it from `memory_budget` minus weights and
    activations."""
    memory_budget: int | None = None
    """Total bytes the engine may use (weights + KV + activations). None: 90% of the GPU, or
    on CPU 40% of available RAM."""
    max_model_len: int | None = None
    """Longest prompt + output; None takes the model's max_position_embeddings."""
    max_num_batched_tokens: int = 2048
    """Token budget of one scheduler step (prefill chunks and decodes together)."""
    max_num_seqs: int = 128
    long_prefill_token_threshold: int = 0
    """Cap on prefill tokens one request may take in a step (0: no cap beyond the budget)."""
    num_blocks_override: int | None = None
    """Exact KV block count, bypassing the memory plan (tests and experiments)."""
    enable_prefix_caching: bool = True
    seed: int = 0
    num_threads: int | None = None
    """torch intra-op threads on CPU; None leaves torch's default."""
    enforce_eager: bool = False
    """vllm engine only: skip torch.compile and CUDA graphs. On vLLM's CPU build, measured
    here, start-up 18 s instead of 32 s (the compile cache does not reload) for slower steps."""

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
