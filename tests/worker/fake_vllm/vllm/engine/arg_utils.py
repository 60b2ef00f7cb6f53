"""Fake of vllm.engine.arg_utils (test double, not vLLM): the engine args the adapter sets.

`kv_cache_memory_bytes` is left out on purpose, so tests see the adapter drop an argument
this vLLM does not know instead of failing.
"""

from dataclasses import dataclass


@dataclass
class AsyncEngineArgs:
    model: str = "facebook/opt-125m"
    served_model_name: str | list[str] | None = None
    dtype: str = "auto"
    seed: int | None = 0
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool | None = None
    scheduling_policy: str = "fcfs"
    disable_log_stats: bool = False
