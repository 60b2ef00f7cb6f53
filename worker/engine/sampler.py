"""Turn a step's logits into tokens: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.request import Request


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]
    """Per row: (sampled token's logprob, top-n [(token, logprob)]) where asked."""


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._generators: dict[str, torch.Generator] = {}
        self._default = torch.Generator().manual_seed(seed)

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request: Request) -> torch.Generator:
        seed = request.sampling.seed
        if seed is None:
            return self._default
        g = self._generators.get(request.request_id)
        if g is None:
            g = self._generators[request.request_id] = torch.Generator().manual_seed(seed)
        return g

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        """logits: fp32 [len(requests), vocab], one row per request that samples this step."""
        n = len(requests)
        if any(r.sampling.logprobs is not None for r in requests):
            logprobs_all = torch.log_softmax(logits, dim=-1)
        else:
            logprobs_all = None
        greedy_ids = logits.argmax(dim=-1).tolist()
        token_ids = list(greedy_ids)
        for i, req in enumerate(requests):
            sp = req.sampling
            if sp.greedy:
                continue
            row = logits[i] / sp.temperature
            if sp.top_k > 0 and sp.top_k < row.shape[-1]:
                kth = torch.topk(row, sp.top_k).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            if sp.top_p < 1.0:
                sorted_logits, idx = torch.sort(row, descending=True)
                cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
                # Drop tokens once the mass before them already reaches top_p (keep >= 1).
                drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= sp.top_p
                row = row.scatter(0, idx[drop], float("-inf"))
            probs = torch.softmax(row, dim=-1)
            token_ids[i] = int(torch.multinomial(probs, 1, generator=self._generator(req)))
        out_logprobs: list[tuple[float, list[tuple[int, float]]] | None] = [None] * n
        if logprobs_all is not None:
            for i, req in enumerate(requests):
                k = req.sampling.logprobs
                if k is None:
                    continue
                row = logprobs_all[i]
                top: list[tuple[int, float]] = []
                if k > 0:
                    vals, ids = torch.topk(row, k)
                    top = list(zip(ids.tolist(), vals.tolist(), strict=True))
                out_logprobs[i] = (float(row[token_ids[i]]), top)
        return SampleResult(token_ids, out_logprobs)
