"""Llama-family decoder (Llama, Mistral, Qwen2) over a paged KV cache."""
