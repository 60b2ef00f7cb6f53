"""The C decode kernel against the portable torch path, and the engine on the torch path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine.test_reference import check_against_hf, mixed_prompts
from worker.engine.kernels import native
from worker.engine.model import attention
from worker.engine.model.attention import AttentionMetadata, _decode_with_torch


@pytest.mark.parametrize(("kv_heads", "group", "head_dim"), [(2, 2, 16), (4, 1, 64), (1, 8, 32)])
def test_native_decode_matches_torch(kv_heads: int, group: int, head_dim: int) -> None:
    if native.load() is None:
        pytest.skip("no C compiler on this machine")
    g = torch.Generator().manual_seed(0)
    b, nblk, bs, nb = 7, 5, 16, 64
    k_cache = torch.randn(nb, bs, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(nb, bs, kv_heads, head_dim, generator=g)
    tables = (torch.randperm(nb - 1, generator=g)[: b * nblk] + 1).view(b, nblk)
    lens = torch.tensor([1, 2, 15, 16, 17, 40, 80])
    pad = torch.arange(nblk * bs)[None, :] >= lens[:, None]
    mask = torch.zeros(pad.shape).masked_fill_(pad, float("-inf")).view(b, 1, 1, -1)
    q = torch.randn(b, kv_heads * group, head_dim, generator=g)
    md = AttentionMetadata(torch.empty(0), b, tables, mask, lens, [])
    scale = head_dim**-0.5
    expected = _decode_with_torch(q, k_cache, v_cache, md, scale, group)
    got = native.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    assert got is not None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_engine_on_portable_torch_path(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "paged_decode_attention", lambda *a, **k: None)
    check_against_hf(tiny_llama, mixed_prompts(7, n=8), num_blocks_override=13)
