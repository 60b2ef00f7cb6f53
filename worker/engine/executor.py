"""What runs a scheduled batch: the torch model (TorchExecutor) or a timing model (sim).

The scheduler, block pool and output processing are shared; only the compute differs.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from prompts.tokenizer import Tokenizer
from worker.engine.config import EngineConfig
from worker.engine.kv_cache_manager import KVCacheManager
from worker.engine.memory import plan_memory
from worker.engine.model.config import ModelConfig
from worker.engine.model.loader import load_model
from worker.engine.request import Request
from worker.engine.runner import ModelRunner
from worker.engine.sampler import Sampler, SampleResult
from worker.engine.scheduler import ScheduledBatch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Executor(Protocol):
    tokenizer: Tokenizer
    vocab_size: int
    eos_token_ids: frozenset[int]
    max_model_len: int
    num_blocks: int
    """KV blocks including the null block."""

    def describe(self) -> str: ...

    def execute(
        self, batch: ScheduledBatch, kv: KVCacheManager
    ) -> tuple[list[Request], SampleResult]:
        """Run one step; return the requests that sampled a token and their samples."""
        ...

    def forget(self, request_id: str) -> None:
        """Drop per-request state (e.g. a seeded generator) of a finished request."""
        ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or auto")
    return _DTYPES[name]


def eos_ids(model_config: ModelConfig, tokenizer: Tokenizer) -> frozenset[int]:
    eos = set(model_config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return frozenset(eos)


class TorchExecutor:
    """Our PyTorch model over the paged KV cache."""

    def __init__(self, config: EngineConfig) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_config = mc = ModelConfig.from_dir(config.model)
        self.tokenizer = Tokenizer(config.model)
        self.vocab_size = mc.vocab_size
        self.eos_token_ids = eos_ids(mc, self.tokenizer)
        max_len = config.max_model_len or mc.max_position_embeddings
        if mc.sliding_window and max_len > mc.sliding_window:
            log.warning("capping max_model_len to the sliding window %d", mc.sliding_window)
            max_len = mc.sliding_window
        self.max_model_len = max_len
        self.memory = plan_memory(config, mc, self.device, self.dtype, max_len)
        self.num_blocks = self.memory.num_blocks
        log.info("memory plan: %s", self.memory.describe())
        model = load_model(config.model, mc, self.device, self.dtype, max_len)
        self.runner = ModelRunner(
            model, mc, self.num_blocks, config.block_size, self.device, self.dtype
        )
        self.sampler = Sampler(config.seed)

    def describe(self) -> str:
        return f"torch on {self.device} ({self.dtype}); {self.memory.describe()}"

    def execute(
        self, batch: ScheduledBatch, kv: KVCacheManager
    ) -> tuple[list[Request], SampleResult]:
        inputs = self.runner.prepare(batch, kv)
        logits = self.runner.execute(inputs)
        if not inputs.sampling_requests:
            return [], SampleResult([], [])
        return inputs.sampling_requests, self.sampler.sample(logits, inputs.sampling_requests)

    def forget(self, request_id: str) -> None:
        self.sampler.forget(request_id)
