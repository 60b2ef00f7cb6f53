"""Fake of vllm.engine (test double, not vLLM)."""
