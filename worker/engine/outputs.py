"""What the engine hands back: streamed deltas, usage and a stats snapshot."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Delta:
    """New output of one request since its previous delta."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    """The stop string or stop token that ended the request, if any."""
    usage: Usage | None = None
    """Set on the final delta."""
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot in vLLM's vocabulary, published after every step."""

    model: str = ""
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    max_num_seqs: int = 0
    """Batch slots: the most requests the engine runs at once (0: not known)."""
    kv_cache_usage: float = 0.0
    num_blocks_total: int = 0
    num_blocks_free: int = 0
    block_size: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prompts_pretokenized: int = 0
    """Prompts taken as token ids a router computed rather than tokenized here."""
    num_steps: int = 0
    kv_peak_slots: int = 0
    kv_peak_tokens: int = 0
    """Tokens held when the most slots were allocated: peak slot utilisation."""

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )

    def as_dict(self) -> dict[str, float | int | str]:
        d = asdict(self)
        d["prefix_cache_hit_rate"] = self.prefix_cache_hit_rate
        return d
