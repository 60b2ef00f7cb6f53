"""Fake of vllm.inputs (test double, not vLLM): the two prompt shapes the adapter sends."""

from typing import TypedDict


class TextPrompt(TypedDict):
    prompt: str


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
