"""What a caller asks for (GenerateRequest, SamplingParams) and the engine's per-request state."""

from __future__ import annotations

import enum
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

from worker.engine.errors import InvalidRequestError

MAX_LOGPROBS = 20


class Priority(enum.IntEnum):
    """Scheduling classes; a lower value is served first."""

    INTERACTIVE = 0
    BATCH = 1

    @classmethod
    def parse(cls, value: int | str | Priority) -> Priority:
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise InvalidRequestError(
                    f"priority must be 'interactive' or 'batch', got {value!r}", "priority"
                ) from None
        try:
            return cls(int(value))
        except ValueError:
            raise InvalidRequestError(
                f"priority must be 0 (interactive) or 1 (batch), got {value!r}", "priority"
            ) from None


@dataclass
class SamplingParams:
    """Sampling controls with OpenAI/vLLM semantics."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 disables top-k."""
    seed: int | None = None
    max_tokens: int | None = None
    """None: until EOS, a stop condition, or max_model_len."""
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    """Return the sampled token's logprob plus this many top alternatives."""
    skip_special_tokens: bool = True

    def validate(self) -> None:
        def bad(msg: str, param: str) -> InvalidRequestError:
            return InvalidRequestError(msg, param)

        if not isinstance(self.temperature, int | float) or not math.isfinite(self.temperature):
            raise bad("temperature must be a finite number", "temperature")
        if self.temperature < 0:
            raise bad(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not (0 < self.top_p <= 1):
            raise bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < -1:
            raise bad(f"top_k must be -1, 0 (disabled) or >= 1, got {self.top_k}", "top_k")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad(f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad(f"logprobs must be between 0 and {MAX_LOGPROBS}", "logprobs")
        if self.seed is not None and not (-(2**63) <= self.seed < 2**64):
            raise bad("seed is out of range", "seed")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop must be a list of non-empty strings", "stop")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids must be non-negative integers", "stop_token_ids")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


@dataclass
class GenerateRequest:
    """One generation request. Exactly one of prompt, prompt_token_ids, messages is set."""

    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    """Chat messages, rendered with the model's chat template."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: int | str = Priority.INTERACTIVE
    add_generation_prompt: bool = True
    pretokenized: list[int] | None = None
    """The prompt or messages' token ids as a router already computed them with this
    engine's tokenizer (the server checked its fingerprint): taken instead of tokenizing."""
    cache_salt: str = ""
    """Prefix-cache blocks are shared only with requests of the same salt (vLLM's)."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


_arrival_counter = itertools.count()


class Request:
    """Engine-side state of one request: tokens, progress and its KV blocks' hashes."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        priority: Priority,
        max_tokens: int,
        eos_token_ids: frozenset[int],
        cache_salt: str = "",
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.num_prompt_tokens = len(prompt_token_ids)
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling = sampling
        self.priority = priority
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids
        self.arrival_time = time.monotonic()
        self.arrival_seq = next(_arrival_counter)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1
        """Prompt tokens served from the prefix cache at first schedule (-1: not yet)."""
        self.block_hashes: list[bytes] = []
        self.cache_salt = cache_salt
        self.num_preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: priority class, then first come first served."""
        return (int(self.priority), self.arrival_seq)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
