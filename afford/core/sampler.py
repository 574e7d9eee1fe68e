"""Sampler: temperature, top-k, top-p, per-request seeded generators, logprobs of the chosen and the
top-n tokens. `probs()` is the one place that turns logits into the sampling distribution, so the
speculative acceptance rule sees exactly the distribution plain sampling draws from."""
from __future__ import annotations

import torch

from afford.core.params import SamplingParams
from afford.models.native import argmax_rows


def filtered_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits: (..., V) fp32 -> logits with temperature applied and top-k/top-p masked to -inf."""
    x = logits / p.temperature
    if p.top_k and p.top_k > 0 and p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, idx = torch.sort(x, dim=-1, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_x, dim=-1) >= p.top_p    # keep the smallest set reaching top_p
        x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return x


def probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a non-greedy request samples from: (..., V)."""
    return torch.softmax(filtered_logits(logits.float(), p), dim=-1)


def top_logprobs(logprobs_row: torch.Tensor, token: int, n: int) -> dict:
    entry = {"token": token, "logprob": float(logprobs_row[token])}
    if n:
        vals, ids = torch.topk(logprobs_row, n)
        entry["top"] = {int(i): float(v) for i, v in zip(ids, vals)}
    return entry


class Sampler:
    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator]) -> list[int]:
        """logits: (B, V) -> one token per row."""
        if all(p.greedy for p in params):
            return argmax_rows(logits)
        out = []
        for row, p, g in zip(logits.float().cpu(), params, generators):   # generators live on the CPU
            if p.greedy:
                out.append(int(row.argmax()))
            else:
                out.append(int(torch.multinomial(probs(row, p), 1, generator=g)))
        return out
