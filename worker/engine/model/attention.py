"""Attention over the paged KV cache for a packed batch of sequences.

Decodes (one query token each) are batched. On CPU in fp32 a small C kernel reads each
sequence's blocks in place (kernels/paged_decode.c); elsewhere the blocks are gathered into
one padded tensor and attended by a single scaled_dot_product_attention call with an
additive padding mask (~6x faster on CPU than matmuls over permuted keys, which copy).
Prefill chunks go one sequence at a time through scaled_dot_product_attention, gathering
cached context first when the chunk sits behind tokens computed in earlier steps; on CPU
this beat a padded or block-diagonal mask over the whole batch, since prefill lengths vary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.engine.kernels.native import paged_decode_attention


@dataclass
class PrefillSeq:
    """One sequence with a multi-token chunk in this step."""

    q_start: int
    q_end: int
    context_len: int
    """Tokens already in the cache before this chunk."""
    block_table: torch.Tensor | None
    """Block ids to gather context from; None when context_len == 0."""
    mask: torch.Tensor | None
    """Causal mask of the chunk against context + chunk; None when no context."""


@dataclass
class AttentionMetadata:
    """Layout of one packed step, shared by every layer. Decode tokens come first."""

    slot_mapping: torch.Tensor
    num_decodes: int
    decode_block_tables: torch.Tensor | None
    """[num_decodes, max_blocks], padded with the null block."""
    decode_mask: torch.Tensor | None
    """[num_decodes, 1, 1, max_blocks * block_size] additive mask: -inf past each context."""
    decode_context_lens: torch.Tensor | None
    prefills: list[PrefillSeq]


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    nb, bs, kvh, d = k_cache.shape
    k_cache.view(nb * bs, kvh, d).index_copy_(0, slot_mapping, k)
    v_cache.view(nb * bs, kvh, d).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Copy the given blocks out of the cache, in order (index_select beat advanced indexing)."""
    return cache.view(cache.shape[0], -1).index_select(0, block_ids.view(-1))


def _decode_with_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
    group: int,
) -> torch.Tensor:
    """Portable decode path: gather the blocks into a padded tensor, then one SDPA call."""
    b, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    assert md.decode_block_tables is not None
    keys = _gather(k_cache, md.decode_block_tables).view(b, -1, kv_heads, head_dim)
    values = _gather(v_cache, md.decode_block_tables).view(b, -1, kv_heads, head_dim)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=md.decode_mask,
        scale=scale,
        enable_gqa=group > 1,
    )
    return o.view(b, num_heads, head_dim)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] for this step's tokens (already written to the cache)."""
    _, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    out = torch.empty_like(q)

    b = md.num_decodes
    if b:
        assert md.decode_block_tables is not None and md.decode_context_lens is not None
        native = paged_decode_attention(
            q[:b], k_cache, v_cache, md.decode_block_tables, md.decode_context_lens, scale
        )
        if native is None:
            native = _decode_with_torch(q[:b], k_cache, v_cache, md, scale, group)
        out[:b] = native

    for seq in md.prefills:
        qs = q[seq.q_start : seq.q_end].transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
        if seq.context_len == 0:
            ks = k[seq.q_start : seq.q_end]
            vs = v[seq.q_start : seq.q_end]
        else:
            assert seq.block_table is not None
            total = seq.context_len + seq.q_end - seq.q_start
            ks = _gather(k_cache, seq.block_table).view(-1, kv_heads, head_dim)[:total]
            vs = _gather(v_cache, seq.block_table).view(-1, kv_heads, head_dim)[:total]
        ks = ks.transpose(0, 1).unsqueeze(0)
        vs = vs.transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qs,
            ks,
            vs,
            attn_mask=seq.mask,
            is_causal=seq.mask is None,
            scale=scale,
            enable_gqa=group > 1,
        )
        out[seq.q_start : seq.q_end] = o.squeeze(0).transpose(0, 1)
    return out
