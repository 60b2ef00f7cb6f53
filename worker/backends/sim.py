"""The `sim` engine: the real scheduler, KV block pool and output path over a timing model of a GPU.

Only the model forward is replaced. Each step sleeps (time.sleep releases the GIL) for as long
as the modelled GPU would take, so many simulated workers fit on two CPU cores while the
gateway sees real continuous batching, KV pressure, preemption, queueing and streaming.

Step time, divided by `speed` (2.0 is twice as fast, 0.2 a 5x slower worker):

    base_ms                                 every forward streams all weights from HBM once
    + prefill_tokens / prefill_tok_per_s    prefill is compute bound
    + per_seq_ms * num_decode_seqs          per-row costs that grow with the batch
    + per_kv_token_us * context_tokens      decode attention reads every cached token: memory
                                            bound

Host overhead (scheduling, detokenising) adds to this, as in a synchronous engine. Attention
of a prefill chunk over earlier context is folded into the prefill rate.

Figures. H100 = H100 SXM 80 GB: 3.35 TB/s HBM3, 989 dense bf16 TFLOPS, 79.6 GiB usable.
"Measured" is copied from a published run, "derived" is our arithmetic, "chosen" is a fit.

llama3-8b-h100, Llama-3(.1)-8B bf16 on one H100, vLLM defaults (gpu_memory_utilization 0.9):
- Measured: vLLM nightly benchmark on H100, `latency_llama8B_tp1` (batch 8, 32 tokens in,
  128 out): 997 ms, about 7.8 ms per decode step. Table from buildkite.com/vllm/
  performance-benchmark; the copy we found is at buildkite.com/elastic/enterprise-search-ruby/
  builds/571.
- Measured: SGLang bench_latency, Meta-Llama-3-8B bf16, batch 1: 9.0 ms per decode step,
  128-token prefill in 11.9 ms (gist.github.com/jerryzh168/caa3f3a87f403091b238f85f7b22c20e;
  the log does not name the GPU).
- Measured: NVIDIA NIM (TensorRT-LLM) Llama-3.1-8B ITL 4.6 ms at concurrency 1, 7.6 ms at
  100, 12.7 ms at 200 (docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance). It is a
  more optimised, possibly FP8, engine, so we treat it as a lower bound.
- Derived: KV per token = 32 layers * 8 KV heads * 128 dims * 2 (K, V) * 2 B = 128 KiB (the
  "0.125 GB per 1k tokens" of huggingface.co/blog/llama31). Capacity = (0.9 * 79.6 GiB
  - 15.0 GiB weights - ~2.5 GiB activations and CUDA graphs) / 128 KiB = about 440k tokens.
  We found no published vLLM "GPU KV cache size" line for this pairing; the activation
  reserve depends on version and max_num_batched_tokens, so expect 10-20% either way.
- Derived: prefill 25k tokens/s = 989 TFLOPS * ~40% MFU / (2 * 8.0 GFLOP per token).
- Chosen: base 7.5 ms (reproduces the 997 ms batch-8 run), 0.03 ms per sequence, 0.05 us
  per context token (128 KiB at ~2.6 TB/s effective). That gives 7.5 ms at batch 1, ~11 ms at
  batch 64 and ~27 ms at batch 256 with 1k-token contexts.

llama3-70b-4xh100, Llama-3-70B bf16, tensor parallel over four H100s:
- Measured: vLLM nightly `latency_llama70B_tp4` (batch 8, 32 in, 128 out) on H100: 2444 ms,
  about 19 ms per decode step (same table).
- Measured: NIM Llama-3.1-70B ITL 13.2 ms at concurrency 1, 23.3 ms at 100, 31.2 ms at 200
  (same NIM page; a lower bound as above).
- Derived: KV per token = 80 layers * 8 * 128 * 2 * 2 B = 320 KiB ("0.313 GB per 1k tokens"
  in the HF blog). Capacity = (4 * 0.9 * 79.6 GiB - 131 GiB weights - ~12 GiB activations)
  / 320 KiB = about 470k tokens.
- Derived: prefill 10k tokens/s = 4 * 989 TFLOPS * ~35% MFU (TP all-reduces) / 141 GFLOP.
- Chosen: base 18 ms (reproduces the 2444 ms run), 0.06 ms per sequence, 0.03 us per
  context token (320 KiB over four HBM stacks at ~2.6 TB/s effective each).

tiny: made up, sub-millisecond steps for fast tests.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import math
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from prompts.tokenizer import Tokenizer
from worker.engine.async_engine import AsyncEngine
from worker.engine.config import EngineConfig
from worker.engine.demo_model import default_demo_dir, ensure_demo_model
from worker.engine.engine_core import EngineCore
from worker.engine.kv_cache_manager import KVCacheManager
from worker.engine.request import Request
from worker.engine.sampler import SampleResult
from worker.engine.scheduler import ScheduledBatch


@dataclass(frozen=True)
class SimPreset:
    """A model on a GPU, as a step-time model and a KV capacity (sources: module docstring)."""

    name: str
    prefill_tok_per_s: float
    base_ms: float
    per_seq_ms: float
    per_kv_token_us: float
    kv_tokens: int
    max_model_len: int = 8192

    def step_seconds(self, prefill_tokens: int, num_decodes: int, context_tokens: int) -> float:
        """GPU time of one step at speed 1.0."""
        return (
            self.base_ms / 1e3
            + prefill_tokens / self.prefill_tok_per_s
            + self.per_seq_ms * num_decodes / 1e3
            + self.per_kv_token_us * context_tokens / 1e6
        )


PRESETS: dict[str, SimPreset] = {
    p.name: p
    for p in (
        SimPreset("llama3-8b-h100", 25_000, 7.5, 0.03, 0.05, 440_000),
        SimPreset("llama3-70b-4xh100", 10_000, 18.0, 0.06, 0.03, 470_000),
        SimPreset("tiny", 2_000_000, 0.2, 0.002, 0.0001, 32_768, max_model_len=2048),
    )
}

_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _digest(*parts: bytes) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return int.from_bytes(h.digest(), "little")


@dataclass(frozen=True)
class _Vocab:
    tokenizer: Tokenizer
    eos: frozenset[int]
    ordinary: tuple[int, ...]
    """Ids that decode on their own to printable text: never special, never EOS."""


def _demo_dir() -> Path:
    """The tiny demo checkpoint, written once even when many sim workers start together."""
    path = default_demo_dir("tiny")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".demo-random-tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released on close
        return ensure_demo_model("tiny")


@functools.cache
def _load_vocab(model_dir: str) -> _Vocab:
    """Shared by every sim engine of a process: tokenizers are read-only after loading."""
    tok = Tokenizer(model_dir)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    cfg = Path(model_dir) / "config.json"
    if cfg.is_file():
        ids = json.loads(cfg.read_text()).get("eos_token_id")
        if ids is not None:
            eos.update(ids if isinstance(ids, list) else [ids])
    banned = eos | {i for i, t in tok.hf.get_added_tokens_decoder().items() if t.special}
    pieces = tok.hf.decode_batch([[i] for i in range(tok.vocab_size)])
    ordinary = tuple(
        i
        for i, s in enumerate(pieces)
        if i not in banned and s.strip() and s.isprintable() and "\ufffd" not in s
    )
    if not ordinary:
        raise ValueError(f"the tokenizer in {model_dir} has no ordinary tokens to generate")
    return _Vocab(tok, frozenset(eos), ordinary)


class SimExecutor:
    """Executor that sleeps for the modelled step time and emits deterministic tokens.

    A request's tokens are a hash of a per-request key and the position, so they survive
    preemption and recompute unchanged. The key follows what a real model would repeat: the
    prompt for greedy requests, prompt and seed for seeded ones, else the request id.
    """

    def __init__(
        self,
        config: EngineConfig,
        preset: str | SimPreset = "llama3-8b-h100",
        speed: float = 1.0,
        kv_tokens: int | None = None,
    ) -> None:
        if isinstance(preset, str):
            if preset not in PRESETS:
                raise ValueError(f"unknown sim preset {preset!r}; choose from {sorted(PRESETS)}")
            preset = PRESETS[preset]
        if not speed > 0:
            raise ValueError(f"sim speed must be > 0, got {speed}")
        self.preset = preset
        self.speed = speed
        model_dir = config.model
        if not (model_dir and (Path(model_dir) / "tokenizer.json").is_file()):
            model_dir = str(_demo_dir())
        self._vocab = vocab = _load_vocab(model_dir)
        self.tokenizer = vocab.tokenizer
        self.vocab_size = vocab.tokenizer.vocab_size
        self.eos_token_ids = vocab.eos
        self.max_model_len = config.max_model_len or preset.max_model_len
        if kv_tokens is not None:
            self.num_blocks = kv_tokens // config.block_size + 1
        elif config.num_blocks_override is not None:
            self.num_blocks = config.num_blocks_override
        else:
            self.num_blocks = preset.kv_tokens // config.block_size + 1
        self.kv_tokens = (self.num_blocks - 1) * config.block_size
        if self.max_model_len > self.kv_tokens:
            # As the torch engine refuses to start (and vLLM) where one whole-context request
            # cannot fit: capped here, so a request without max_tokens is not refused for
            # needing the preset's context, which a smaller simulated cache cannot hold.
            logging.getLogger(__name__).warning(
                "sim: max_model_len %d capped at the %d KV tokens",
                self.max_model_len,
                self.kv_tokens,
            )
            self.max_model_len = self.kv_tokens
        self.simulated_seconds = 0.0
        """GPU time modelled so far, at this speed: wall time minus host overhead."""
        self._keys: dict[str, int] = {}

    def describe(self) -> str:
        return (
            f"sim {self.preset.name} at {self.speed:g}x speed; {self.kv_tokens} KV tokens, "
            f"max_model_len {self.max_model_len}"
        )

    def execute(
        self, batch: ScheduledBatch, kv: KVCacheManager
    ) -> tuple[list[Request], SampleResult]:
        start = time.perf_counter()
        prefill = decodes = context = 0
        sampling: list[Request] = []
        for r, n in zip(batch.requests, batch.num_new_tokens, strict=True):
            if n == 1:  # as the torch runner: a one-token step reads the cache like a decode
                decodes += 1
                context += r.num_computed_tokens + 1
            else:
                prefill += n
            if r.num_computed_tokens + n == r.num_tokens:
                sampling.append(r)
        token_ids: list[int] = []
        logprobs: list[tuple[float, list[tuple[int, float]]] | None] = []
        for r in sampling:
            h = _mix(self._key(r) ^ r.num_tokens)
            idx = h % len(self._vocab.ordinary)
            token_ids.append(self._vocab.ordinary[idx])
            k = r.sampling.logprobs
            logprobs.append(None if k is None else self._logprobs(idx, h, k))
        seconds = self.preset.step_seconds(prefill, decodes, context) / self.speed
        self.simulated_seconds += seconds
        remaining = seconds - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)
        return sampling, SampleResult(token_ids, logprobs)

    def forget(self, request_id: str) -> None:
        self._keys.pop(request_id, None)

    def _key(self, r: Request) -> int:
        key = self._keys.get(r.request_id)
        if key is None:
            sp = r.sampling
            prompt = array("q", r.prompt_token_ids).tobytes()
            if sp.seed is not None:
                key = _digest(b"seed", prompt, str(sp.seed).encode())
            elif sp.greedy:
                key = _digest(b"greedy", prompt)
            else:
                key = _digest(b"id", r.request_id.encode())
            self._keys[r.request_id] = key
        return key

    def _logprobs(self, idx: int, h: int, k: int) -> tuple[float, list[tuple[int, float]]]:
        """A valid distribution: the sampled token has p in [0.5, 0.95), the rest halves down."""
        ordinary = self._vocab.ordinary
        p = 0.5 + 0.45 * ((h >> 40) / (1 << 24))
        lp = math.log(p)
        top = [(ordinary[idx], lp)] if k > 0 else []
        for i in range(1, min(k, len(ordinary))):
            top.append((ordinary[(idx + i) % len(ordinary)], math.log((1 - p) / 2**i)))
        return lp, top


def build_sim_engine(
    config: EngineConfig,
    preset: str | SimPreset = "llama3-8b-h100",
    speed: float = 1.0,
    kv_tokens: int | None = None,
) -> AsyncEngine:
    """An AsyncEngine whose forward is the timing model; `config.model` may name a
    checkpoint dir whose tokenizer to use (default: the tiny demo model's)."""
    return AsyncEngine(EngineCore(config, executor=SimExecutor(config, preset, speed, kv_tokens)))
