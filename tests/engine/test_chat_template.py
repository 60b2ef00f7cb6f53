"""Chat templates render as Hugging Face's do: the globals templates in the wild lean on
(namespace, raise_exception, strftime_now, tojson, loop variables), and a template's own
refusal comes back as a clear PromptError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from prompts.errors import PromptError
from prompts.tokenizer import Tokenizer
from worker.engine.demo_model import ensure_demo_model

# Shaped like the templates models ship (Qwen's and Llama 3's use all of these).
TEMPLATE = """{%- set ns = namespace(system='', turns=0) -%}
{%- if messages[0]['role'] == 'system' -%}
{%- set ns.system = messages[0]['content'] -%}
{%- endif -%}
{{ bos_token }}<|sys|>{{ ns.system or 'default' }} {{ strftime_now('%Y') | length }}
{%- for m in messages -%}
{%- if m['role'] not in ['system', 'user', 'assistant'] -%}
{{ raise_exception('unknown role ' + m['role']) }}
{%- endif -%}
{%- if m['role'] != 'system' -%}{%- set ns.turns = ns.turns + 1 -%}
<|{{ m['role'] }}|>{{ loop.index }}/{{ loop.length }} {{ m['content'] | trim }}{{ eos_token }}
{%- endif -%}
{%- endfor -%}
{{ {'turns': ns.turns, 'range': range(2) | list} | tojson }}
{%- if add_generation_prompt %}<|assistant|>{% endif -%}"""


@pytest.fixture
def tokenizer(tmp_path: Path) -> Tokenizer:
    model = tmp_path / "model"
    shutil.copytree(ensure_demo_model(), model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    return Tokenizer(model)


def reference(tok: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Rendered the plain way (Template.render with the same environment)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda message: 1 / 0
    env.globals["strftime_now"] = lambda fmt: "2026"
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
    return env.from_string(TEMPLATE).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=tok.bos_token or "",
        eos_token=tok.eos_token or "",
    )


def test_renders_as_template_render_does(tokenizer: Tokenizer) -> None:
    chats = [
        [{"role": "user", "content": " hi "}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "émigré 数据 🙂"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "again"},
        ],
    ]
    for messages in chats:
        for gen in (True, False):
            got = tokenizer.apply_chat_template(messages, gen)
            assert got == reference(tokenizer, messages, gen)
            assert '"turns": ' in got and '"range": [0, 1]' in got
    # Nothing of one call stays for the next (the context shares the dict built per call).
    first = tokenizer.apply_chat_template(chats[1])
    tokenizer.apply_chat_template(chats[0])
    assert tokenizer.apply_chat_template(chats[1]) == first


def test_a_templates_refusal_is_a_prompt_error(tokenizer: Tokenizer) -> None:
    with pytest.raises(PromptError, match="unknown role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])
    # and the template still renders afterwards
    assert "<|user|>1/1 hi" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
