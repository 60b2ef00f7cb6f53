"""Model runner: owns the weights and the paged KV tensors, runs one packed forward a step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.kv_cache_manager import KVCacheManager
from worker.engine.model.attention import AttentionMetadata, PrefillSeq
from worker.engine.model.config import ModelConfig
from worker.engine.model.llama import LlamaModel
from worker.engine.request import Request
from worker.engine.scheduler import ScheduledBatch


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor
    sampling_requests: list[Request]
    """Requests whose last known token is computed this step, so they sample one token."""


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.dtype = dtype
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # Zeroed, not empty: padded slots are masked out, but 0 * NaN from stale memory is NaN.
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(cfg.num_layers)
        ]

    def prepare(self, batch: ScheduledBatch, kv: KVCacheManager) -> StepInputs:
        bs = self.block_size
        dev = self.device
        items = list(zip(batch.requests, batch.num_new_tokens, strict=True))
        decodes = [(r, n) for r, n in items if n == 1]
        prefills = [(r, n) for r, n in items if n > 1]

        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        sampling: list[Request] = []

        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        for r, _ in decodes:
            pos = r.num_computed_tokens
            table = kv.block_ids(r.request_id)
            input_ids.append(r.all_token_ids[pos])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            decode_tables.append(table)
            decode_lens.append(pos + 1)
            if pos + 1 == r.num_tokens:
                logits_indices.append(len(input_ids) - 1)
                sampling.append(r)

        prefill_seqs: list[PrefillSeq] = []
        for r, n in prefills:
            start = r.num_computed_tokens
            table = kv.block_ids(r.request_id)
            q_start = len(input_ids)
            input_ids.extend(r.all_token_ids[start : start + n])
            pos = torch.arange(start, start + n)
            positions.extend(pos.tolist())
            table_t = torch.tensor(table, dtype=torch.long)
            slots.extend((table_t[pos // bs] * bs + pos % bs).tolist())
            mask = None
            block_table = None
            if start > 0:
                total = start + n
                block_table = table_t[: -(-total // bs)].to(dev)
                key_pos = torch.arange(total, device=dev)
                mask = key_pos[None, :] <= (start + torch.arange(n, device=dev))[:, None]
            prefill_seqs.append(PrefillSeq(q_start, q_start + n, start, block_table, mask))
            if start + n == r.num_tokens:
                logits_indices.append(q_start + n - 1)
                sampling.append(r)

        decode_block_tables = decode_mask = lens = None
        if decodes:
            width = max(len(t) for t in decode_tables)
            padded = [t + [0] * (width - len(t)) for t in decode_tables]
            decode_block_tables = torch.tensor(padded, dtype=torch.long, device=dev)
            lens = torch.tensor(decode_lens, device=dev)
            pad = torch.arange(width * bs, device=dev)[None, :] >= lens[:, None]
            decode_mask = torch.zeros(pad.shape, dtype=self.dtype, device=dev)
            decode_mask.masked_fill_(pad, float("-inf"))
            decode_mask = decode_mask.view(len(decodes), 1, 1, width * bs)
        md = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=len(decodes),
            decode_block_tables=decode_block_tables,
            decode_mask=decode_mask,
            decode_context_lens=lens,
            prefills=prefill_seqs,
        )
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            metadata=md,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long, device=dev),
            sampling_requests=sampling,
        )

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        logits = self.model(
            inputs.input_ids,
            inputs.positions,
            self.kv_caches,
            inputs.metadata,
            inputs.logits_indices,
        )
        return logits.cpu() if logits.device.type != "cpu" else logits
