"""Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Covers Llama, Mistral and Qwen2 (q/k/v bias). Every step runs one packed forward over all
scheduled tokens of all sequences; q/k/v and gate/up projections are fused at load time so
a layer issues as few kernels as possible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.model.attention import AttentionMetadata, paged_attention, write_kv
from worker.engine.model.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies computed exactly as transformers does (fp32), with scaling."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if not s:
        return inv
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv / s["factor"]
    if kind == "llama3":
        factor = s["factor"]
        low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_len = s.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        inv = rope_inv_freq(cfg)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return (
            self.cos[positions].unsqueeze(1).to(dtype),
            self.sin[positions].unsqueeze(1).to(dtype),
        )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face layout): x [T, heads, D], cos/sin [T, 1, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        h = cfg.hidden_size
        self.input_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attn_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.qkv = nn.Linear(h, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, h, bias=cfg.o_proj_bias)
        self.gate_up = nn.Linear(h, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.intermediate_size, h, bias=cfg.mlp_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        md: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv(self.input_norm(x))
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = apply_rope(q.view(t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(t, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        write_kv(k_cache, v_cache, k, v, md.slot_mapping)
        attn = paged_attention(q, k, v, k_cache, v_cache, md, self.scale)
        x = x + self.o_proj(attn.view(t, self.q_size))
        gate, up = self.gate_up(self.post_attn_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg, max_positions)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        md: AttentionMetadata,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """Return logits [len(logits_indices), vocab] for the rows that sample a token."""
        x = self.embed(input_ids)
        cos, sin = self.rotary.lookup(positions, x.dtype)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, k_cache, v_cache, md)
        x = self.norm(x[logits_indices])
        return self.lm_head(x).float()

    def load_hf_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face tensors in, fusing q/k/v and gate/up."""
        missing: list[str] = []
        used: set[str] = set()

        def take(name: str) -> torch.Tensor:
            t = tensors.get(name)
            if t is None:
                missing.append(name)
                return torch.empty(0)
            used.add(name)
            return t

        def copy(dst: torch.Tensor, *names: str) -> None:
            parts = [take(n) for n in names]
            if missing:
                return
            src = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            if src.shape != dst.shape:
                raise ValueError(f"{names}: shape {tuple(src.shape)} != {tuple(dst.shape)}")
            dst.copy_(src)

        with torch.no_grad():
            copy(self.embed.weight, "model.embed_tokens.weight")
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                a = p + "self_attn."
                copy(
                    layer.qkv.weight, a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"
                )
                if layer.qkv.bias is not None:
                    copy(layer.qkv.bias, a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias")
                copy(layer.o_proj.weight, a + "o_proj.weight")
                if layer.o_proj.bias is not None:
                    copy(layer.o_proj.bias, a + "o_proj.bias")
                m = p + "mlp."
                copy(layer.gate_up.weight, m + "gate_proj.weight", m + "up_proj.weight")
                copy(layer.down.weight, m + "down_proj.weight")
                if layer.down.bias is not None and layer.gate_up.bias is not None:
                    copy(layer.gate_up.bias, m + "gate_proj.bias", m + "up_proj.bias")
                    copy(layer.down.bias, m + "down_proj.bias")
                copy(layer.input_norm.weight, p + "input_layernorm.weight")
                copy(layer.post_attn_norm.weight, p + "post_attention_layernorm.weight")
            copy(self.norm.weight, "model.norm.weight")
            if self.cfg.tie_word_embeddings or "lm_head.weight" not in tensors:
                self.lm_head.weight = self.embed.weight
            else:
                copy(self.lm_head.weight, "lm_head.weight")
        if missing:
            raise ValueError(f"checkpoint is missing tensors: {missing[:5]}")
        # a bias the config does not announce would be dropped, and every answer wrong
        unused = sorted(n for n in tensors if n.endswith(".bias") and n not in used)
        if unused:
            raise ValueError(f"checkpoint has tensors this model does not use: {unused[:5]}")
