"""Write a small *random-weight* checkpoint in the Hugging Face format.

No weights can be downloaded where Breakwater is developed and tested, so the demo model,
the test models and the benchmark models are made here: deterministic random weights
(the text they produce is gibberish by design) and a byte-level BPE tokenizer trained
locally on a built-in word list. The directory loads in our engine, in transformers and
in vLLM alike.

    python -m worker.engine.demo_model --preset demo --out /tmp/demo-random
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = """
the of and to in is was for on that with as by at from it an be this which or are his have
not had but were one all their they has been more its when who there also can would other
first after new time two into some only may most over such many these than where about
between made used three under then during well any city world system state year years
water river light engine model token cache block request server worker gateway queue
retry budget breaker latency burst replica prefix stream batch decode prefill memory
kernel tensor layer head attention vector matrix random weight gradient sample greedy
temperature people house market garden winter summer morning evening music story
simple quiet bright heavy quick little large small great good long short high low
""".split()


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int = 4096


PRESETS: dict[str, Preset] = {
    # Fast enough for unit tests on 2 cores.
    "tiny": Preset(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512),
    # The default served model: ~3.4M parameters, the shape of the vLLM CPU peer comparison.
    "demo": Preset(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512, vocab=2048),
    # A realistic small shape (~30M parameters) for the engine benchmark.
    "small": Preset(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408, vocab=8192),
}

ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "mistral": ("MistralForCausalLM", "mistral"),
}


def _corpus(seed: int, n_lines: int = 12_000) -> list[str]:
    """Pseudo-text: real words plus a Zipf-distributed lexicon of made-up ones.

    The made-up words give BPE enough distinct material to fill a vocabulary of thousands.
    """
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["th", "st", "ng", "er"]
    lexicon = list(_WORDS)
    while len(lexicon) < 6000:
        lexicon.append("".join(rng.choices(syllables, k=rng.choice([1, 2, 2, 3, 3, 4]))))
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]
    lines = []
    for _ in range(n_lines):
        words = rng.choices(lexicon, weights=weights, k=12)
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", ",", "?", "!", ";"]))
    return lines


def build_tokenizer(vocab_size: int, seed: int = 0):  # -> tokenizers.Tokenizer
    """A byte-level BPE trained on a fixed pseudo-text, so any string round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    return tok


def _random_weights(
    arch: str, p: Preset, vocab: int, tie: bool, seed: int
) -> dict[str, torch.Tensor]:
    """Scaled so logits spread widely: greedy ties (which make reference tests flaky) are rare."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    head_dim = p.hidden // p.heads
    q, kv = p.heads * head_dim, p.kv_heads * head_dim
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(vocab, p.hidden, std=1.0)}
    for i in range(p.layers):
        pre = f"model.layers.{i}."
        a, m = pre + "self_attn.", pre + "mlp."
        w[a + "q_proj.weight"] = normal(q, p.hidden, std=p.hidden**-0.5)
        w[a + "k_proj.weight"] = normal(kv, p.hidden, std=p.hidden**-0.5)
        w[a + "v_proj.weight"] = normal(kv, p.hidden, std=p.hidden**-0.5)
        w[a + "o_proj.weight"] = normal(p.hidden, q, std=0.5 * q**-0.5)
        if arch == "qwen2":
            w[a + "q_proj.bias"] = normal(q, std=0.1)
            w[a + "k_proj.bias"] = normal(kv, std=0.1)
            w[a + "v_proj.bias"] = normal(kv, std=0.1)
        w[m + "gate_proj.weight"] = normal(p.intermediate, p.hidden, std=p.hidden**-0.5)
        w[m + "up_proj.weight"] = normal(p.intermediate, p.hidden, std=p.hidden**-0.5)
        w[m + "down_proj.weight"] = normal(p.hidden, p.intermediate, std=0.5 * p.intermediate**-0.5)
        w[pre + "input_layernorm.weight"] = 1.0 + normal(p.hidden, std=0.1)
        w[pre + "post_attention_layernorm.weight"] = 1.0 + normal(p.hidden, std=0.1)
    w["model.norm.weight"] = 1.0 + normal(p.hidden, std=0.1)
    if not tie:
        w["lm_head.weight"] = normal(vocab, p.hidden, std=3.0 * p.hidden**-0.5)
    return w


def write_demo_model(
    out: str | Path,
    preset: str | Preset = "demo",
    arch: str = "llama",
    seed: int = 0,
    tie_word_embeddings: bool = False,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config, random weights and tokenizer to `out`; returns the directory."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(p.vocab, seed)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    class_name, model_type = ARCHITECTURES[arch]
    config = {
        "architectures": [class_name],
        "model_type": model_type,
        "hidden_size": p.hidden,
        "intermediate_size": p.intermediate,
        "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.hidden // p.heads,
        "hidden_act": "silu",
        "max_position_embeddings": p.max_positions,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "vocab_size": vocab,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": ids[BOS],
        "eos_token_id": [ids[EOS], ids[IM_END]],
        "torch_dtype": "float32",
        "attention_bias": arch == "qwen2",
        "sliding_window": None,
        "use_sliding_window": False,
        "_breakwater_note": "RANDOM WEIGHTS: a demo/test model, its output is gibberish",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[IM_END]]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": IM_END,
        "pad_token": EOS,
        "add_bos_token": False,
        "model_max_length": p.max_positions,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    weights = _random_weights(arch, p, vocab, tie_word_embeddings, seed)
    _save_weights(out, weights, max_shard_bytes)
    (out / "README.md").write_text(
        f"# Breakwater demo model ({preset if isinstance(preset, str) else 'custom'}, {arch})\n\n"
        "**Random weights.** Made locally by `worker.engine.demo_model` for demos, tests and\n"
        "benchmarks; it produces gibberish by design. Not a trained model.\n"
    )
    return out


def _save_weights(out: Path, weights: dict[str, torch.Tensor], max_shard: int | None) -> None:
    for old in out.glob("*.safetensors"):
        old.unlink()
    if not max_shard:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in weights.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {
        "metadata": {"total_size": sum(t.numel() * 4 for t in weights.values())},
        "weight_map": weight_map,
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def default_demo_dir(preset: str = "demo") -> Path:
    root = Path(os.environ.get("BREAKWATER_CACHE", Path.home() / ".cache" / "breakwater"))
    return root / f"demo-random-{preset}"


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def ensure_demo_model(preset: str = "demo") -> Path:
    """The demo checkpoint's directory, written on first use.

    Safe when many processes (workers started together, pods sharing a cache volume) ask at
    once: each writes into a private temporary directory beside the target and publishes it
    with one atomic rename; a process that loses the race drops its copy and uses the
    winner's, so a reader never sees a half-written checkpoint.
    """
    path = default_demo_dir(preset)
    if _complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write_demo_model(tmp, preset)
        for _ in range(5):
            try:
                tmp.rename(path)
                return path
            except OSError:  # the target exists: a winner's copy, or a broken leftover
                if _complete(path):
                    return path
                _discard(path)
        raise OSError(f"could not publish the demo model at {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(path: Path) -> None:
    """Move an incomplete leftover aside atomically, then delete it.

    Another process may have published a complete copy between our check and the move; that
    copy is put back rather than deleted.
    """
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    moved = aside / "x"
    try:
        with contextlib.suppress(FileNotFoundError):
            path.rename(moved)
        if _complete(moved):
            with contextlib.suppress(OSError):
                moved.rename(path)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory to write")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--arch", choices=sorted(ARCHITECTURES), default="llama")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tie-word-embeddings", action="store_true")
    args = ap.parse_args(argv)
    path = write_demo_model(args.out, args.preset, args.arch, args.seed, args.tie_word_embeddings)
    print(f"wrote a RANDOM-WEIGHT {args.arch} checkpoint ({args.preset}) to {path}")


if __name__ == "__main__":
    main()
