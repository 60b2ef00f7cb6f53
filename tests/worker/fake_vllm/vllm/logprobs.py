"""Fake of vllm.logprobs (test double, not vLLM)."""

from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None
