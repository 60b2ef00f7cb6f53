"""Bounds on what one OpenAI request may ask for, checked while it is parsed.

Every OpenAI surface of Breakwater (the gateway's public port, a worker's own HTTP port,
the gateway's gRPC front end) refuses a request outside these bounds with a 400 naming the
field (413 for the body; INVALID_ARGUMENT over gRPC), before any tokenizing, routing or
queueing spends work on it. The defaults are what OpenAI and vLLM users expect; a request
a real client sends stays well inside them.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class RequestLimits:
    """The bounds; one frozen instance is shared by every request of a server."""

    max_body_bytes: int = 4 * MiB
    """The raw HTTP body (answered with 413): bounds memory before JSON decoding."""
    max_model_chars: int = 256
    """`model`: it is echoed in the 404 for an unknown model and keyed on in routing."""
    max_messages: int = 2048
    """Entries of a chat's `messages`."""
    max_message_chars: int = 1 * MiB
    """Characters of one message's content (the text parts joined)."""
    max_prompt_chars: int = 2 * MiB
    """Characters of the whole prompt (all messages, or `prompt`): the gateway tokenizes
    prompts for cache-aware routing, so this bounds its CPU per request."""
    max_prompt_token_ids: int = 128 * 1024
    """Entries of `prompt` when it is given as token ids."""
    max_token_id: int = 2**31 - 1
    """Largest token id (ids travel as int32 in the Generate contract)."""
    max_batch_prompts: int = 1
    """Prompts in one completion request: this server does not batch (send one each)."""
    max_tokens: int = 32 * 1024
    """Ceiling of `max_tokens` / `max_completion_tokens`; a worker bounds it again by the
    model's context length."""
    max_stop: int = 4
    """Stop strings (OpenAI's limit)."""
    max_stop_chars: int = 256
    """Characters of one stop string: every one is matched against every new token."""
    max_stop_token_ids: int = 1024
    """Entries of vLLM's `stop_token_ids`."""
    max_logprobs: int = 20
    """`logprobs` (completions) and `top_logprobs` (chat), as OpenAI and vLLM cap them."""
    max_request_id_chars: int = 256
    """A caller's request id (`X-Request-Id`, or `request_id` over gRPC): it is echoed back
    and passed upstream as gRPC metadata, which takes only printable ASCII."""


DEFAULT_LIMITS = RequestLimits()
