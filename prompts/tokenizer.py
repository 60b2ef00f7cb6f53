"""Tokenizer and chat template of a local checkpoint, through the `tokenizers` library."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from prompts.errors import PromptError


def _special_token(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


RENDERING = 1
"""Bump when `prompt_ids` changes what it makes of the same files (the template's
environment, `encode`): a gateway and a worker on either side of the change then differ
in fingerprint, and the worker tokenizes for itself."""

LONG_TEXT_CHARS = 16 * 1024
"""Texts longer than this are tokenized with the GIL released (see Tokenizer.encode)."""


def prompt_chars(prompt: str | None, messages: list[dict[str, Any]] | None) -> int:
    """Characters of a text or chat prompt: what tokenizing it costs, about."""
    n = len(prompt or "")
    for m in messages or ():
        content = m.get("content")
        if isinstance(content, str):
            n += len(content)
        elif isinstance(content, list):  # parts: their texts
            n += sum(len(str(p.get("text", ""))) for p in content if isinstance(p, dict))
    return n


def fingerprint(tokenizer_json: bytes, config: dict[str, Any], template: str | None) -> str:
    """A digest of everything `prompt_ids` depends on: the vocabulary and its rules, the
    chat template, the special tokens the template and `encode` add, and the code that
    renders and tokenizes (this module's RENDERING, the tokenizers and jinja2 releases).
    Not the clock: a template that prints today's date (`strftime_now`) renders it where
    the request is tokenized, the gateway's clock where it forwards the ids."""
    h = hashlib.sha256(tokenizer_json)
    shared = {k: config.get(k) for k in ("bos_token", "eos_token", "add_bos_token")}
    code = [RENDERING, version("tokenizers"), version("jinja2")]
    h.update(json.dumps([template, shared, code], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        self.source_dir = str(model_dir.resolve())
        """Where it was loaded from: a router on the same host can load the same one."""
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (only fast tokenizers are supported)")
        self.hf = HFTokenizer.from_file(str(path))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        tpl_file = model_dir / "chat_template.jinja"
        if template is None and tpl_file.is_file():
            template = tpl_file.read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        self.bos_token = _special_token(cfg.get("bos_token"))
        self.eos_token = _special_token(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.eos_token_id = self.hf.token_to_id(self.eos_token) if self.eos_token else None
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self._compiled: Template | None = None
        self._globals: dict[str, Any] = {}
        self.fingerprint = fingerprint(path.read_bytes(), cfg, template)
        """Equal on two hosts only when text and chat prompts tokenize the same on both: a
        worker takes a router's token ids only with its own fingerprint on them."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > LONG_TEXT_CHARS:
            # encode_batch releases the GIL (encode does not: 2 MB took 2.7 s, and no other
            # thread ran meanwhile), so a long prompt tokenized in a thread leaves the event
            # loop free; the same ids
            ids = self.hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = self.hf.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token:
            bos = self.hf.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        return ids

    def prompt_ids(
        self,
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """A text or chat prompt's token ids, as the engine computes them (and so its cache)."""
        if messages is not None:
            text = self.apply_chat_template(messages, add_generation_prompt)
            return self.encode(text, add_special_tokens=False)
        return self.encode(prompt or "")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, prompt_ids: list[int], skip_special_tokens: bool) -> DecodeStream:
        """Incremental decoder primed with the prompt so leading spaces come out right.

        Primed by stepping through the prompt's last tokens, as vLLM does: given them as
        its starting ids instead, a DecodeStream whose window ended inside a character
        (a prompt of ids cut mid-emoji) handed the whole window's text back with the
        first output token, and stop strings matched the prompt's own words."""
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for token in prompt_ids[-8:]:
            try:
                stream.step(self.hf, token)
            except Exception:  # tokenizers' "Invalid prefix encountered": start again here
                stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        return stream

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        if not self.chat_template:
            raise PromptError("this model has no chat template", "messages")
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda x, indent=None: json.dumps(
                x, indent=indent, ensure_ascii=False
            )
            compiled = env.from_string(self.chat_template)
            # globals first: the worker renders from threads too, and one that saw the
            # template before its globals would render without namespace() or range()
            self._globals = dict(compiled.globals)
            self._compiled = compiled
        # Template.render merges the environment's globals into a new dict on every call
        # (a ChainMap walked: half of a render's ~14 us for a 3 KB chat, timeit); here
        # they are merged once and the context shares the dict built for the call.
        template = self._compiled
        context = template.new_context(
            {
                **self._globals,
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
                "bos_token": self.bos_token or "",
                "eos_token": self.eos_token or "",
            },
            shared=True,
        )
        try:
            return template.environment.concat(template.root_render_func(context))  # type: ignore[attr-defined]
        except TemplateError as e:
            raise PromptError(f"chat template rejected the messages: {e}", "messages") from e
