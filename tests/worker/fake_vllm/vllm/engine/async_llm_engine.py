"""Fake of vLLM's AsyncLLM (test double, not vLLM), exported as AsyncLLMEngine like vLLM's V1.

Generation is a fixed text, one character per token (token id = code point), streamed
asynchronously one token every `step_s`. It applies vLLM's stop rules (max_tokens, stop
strings with held-back text, stop token ids), its output kinds and logprob shape, reports a
prefix-cache hit for a prompt seen before, and records requests and abort() calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams

TEXT = "hello world, hello breakwater. "


class FakeTokenizer:
    """One token per character; ids are code points."""

    chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
    ) -> str | list[int]:
        if any("role" not in m for m in messages):
            raise ValueError("every message needs a role")
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        text += "[assistant]" if add_generation_prompt else ""
        return self.encode(text) if tokenize else text


@dataclass
class ModelConfig:
    max_model_len: int


class AsyncLLM:
    step_s = 0.001

    def __init__(self, engine_args: AsyncEngineArgs) -> None:
        self.engine_args = engine_args
        self.model_config = ModelConfig(engine_args.max_model_len or 64)
        self.tokenizer = FakeTokenizer()
        self.requests: dict[str, dict[str, Any]] = {}
        self.aborted: list[str] = []
        self.shut_down = False
        self._abort_flags: dict[str, asyncio.Event] = {}
        self._seen: set[tuple[int, ...]] = set()

    @classmethod
    def from_engine_args(
        cls,
        engine_args: AsyncEngineArgs,
        start_engine_loop: bool = True,
        usage_context: Any = None,
        stat_loggers: Any = None,
    ) -> AsyncLLM:
        return cls(engine_args)

    def shutdown(self, timeout: float | None = None) -> None:
        self.shut_down = True

    def get_tokenizer(self) -> FakeTokenizer:
        return self.tokenizer

    async def abort(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            self.aborted.append(rid)
            flag = self._abort_flags.get(rid)
            if flag is not None:
                flag.set()

    async def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        prompt_text: str | None = None,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        trace_headers: Mapping[str, str] | None = None,
        priority: int = 0,
        data_parallel_rank: int | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        self.requests[request_id] = {
            "prompt": prompt,
            "params": sampling_params,
            "priority": priority,
        }
        added = False
        try:
            ids = self._prompt_ids(prompt)
            cached = len(ids) - 1 if tuple(ids) in self._seen else 0
            self._seen.add(tuple(ids))
            self._abort_flags[request_id] = flag = asyncio.Event()
            added = True
            async for out in self._run(request_id, ids, cached, sampling_params, flag):
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            if added:
                await self.abort(request_id, internal=True)
            raise
        finally:
            self._abort_flags.pop(request_id, None)

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
        else:
            ids = self.tokenizer.encode(prompt["prompt"])
        if not ids:
            raise ValueError("The decoder prompt cannot be empty")
        if len(ids) >= self.model_config.max_model_len:
            raise ValueError(
                f"The decoder prompt (length {len(ids)}) is longer than the maximum model "
                f"length of {self.model_config.max_model_len}."
            )
        return ids

    async def _run(
        self, rid: str, ids: list[int], cached: int, sp: SamplingParams, flag: asyncio.Event
    ) -> AsyncGenerator[RequestOutput, None]:
        stops: list[str] = list(sp.stop or [])
        holdback = max((len(s) for s in stops), default=1) - 1
        limit = self.model_config.max_model_len - len(ids)
        max_tokens = min(sp.max_tokens, limit) if sp.max_tokens is not None else limit
        tokens: list[int] = []
        logprobs: list[dict[int, Logprob]] = []
        text, sent_text, sent_tokens = "", 0, 0
        finish: str | None = None
        stop_reason: int | str | None = None
        while finish is None:
            await asyncio.sleep(self.step_s)
            if flag.is_set():
                finish = "abort"
                break
            token = ord(TEXT[len(tokens) % len(TEXT)])
            tokens.append(token)
            text += chr(token)
            if sp.logprobs is not None:
                logprobs.append(_position(token, sp.logprobs))
            if token in (sp.stop_token_ids or []):
                finish, stop_reason = "stop", token
            for s in stops:
                at = text.find(s, max(0, len(text) - len(chr(token)) - len(s) + 1))
                if at >= 0:
                    text = text[: at + len(s)] if sp.include_stop_str_in_output else text[:at]
                    finish, stop_reason = "stop", s
                    break
            if finish is None and len(tokens) >= max_tokens:
                finish = "length"
            end = len(text) if finish is not None else max(sent_text, len(text) - holdback)
            if end == sent_text and finish is None:
                continue
            if sp.output_kind == RequestOutputKind.DELTA:
                out_text, out_tokens = text[sent_text:end], tokens[sent_tokens:]
                out_logprobs = logprobs[sent_tokens:] if sp.logprobs is not None else None
            else:
                out_text, out_tokens = text[:end], list(tokens)
                out_logprobs = list(logprobs) if sp.logprobs is not None else None
            sent_text, sent_tokens = end, len(tokens)
            yield self._output(
                rid, ids, cached, out_text, out_tokens, out_logprobs, finish, stop_reason
            )
            if finish is not None:
                return
        # Aborted from outside: vLLM's V1 output processor emits a final "abort" output.
        delta = sp.output_kind == RequestOutputKind.DELTA
        yield self._output(
            rid,
            ids,
            cached,
            "" if delta else text[:sent_text],
            [] if delta else list(tokens),
            [] if sp.logprobs is not None else None,
            finish,
            stop_reason,
        )

    @staticmethod
    def _output(
        rid: str,
        ids: list[int],
        cached: int,
        text: str,
        tokens: list[int],
        logprobs: list[dict[int, Logprob]] | None,
        finish: str | None,
        stop_reason: int | str | None = None,
    ) -> RequestOutput:
        comp = CompletionOutput(0, text, tokens, None, logprobs, finish, stop_reason)
        return RequestOutput(
            rid, None, ids, None, [comp], finish is not None, num_cached_tokens=cached
        )


def _position(token: int, k: int) -> dict[int, Logprob]:
    """The sampled token at rank 1, then k - 1 alternatives, as vLLM returns them."""
    pos = {token: Logprob(-0.25, 1, chr(token))}
    for i in range(1, k):
        pos[token + i] = Logprob(-1.0 - i, 1 + i, chr(token + i))
    return pos


AsyncLLMEngine = AsyncLLM
