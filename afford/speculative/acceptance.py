"""AcceptancePolicy: which prefix of a draft the target keeps, and the token that follows it.

Contract: `accept(target_logits (k+1, V), draft, params, generator) -> (n_accepted, next_token)`,
0 <= n_accepted <= k. Lossless policies leave the output distribution equal to plain decoding.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from afford.core.params import SamplingParams
from afford.core.sampler import probs as sampling_probs
from afford.models.native import argmax_rows
from afford.registry import registry
from afford.speculative.proposers import Draft

POLICIES, register = registry()


class AcceptancePolicy(ABC):
    name = "abstract"
    lossless = True

    @abstractmethod
    def accept(self, target_logits: torch.Tensor, draft: Draft, params: SamplingParams,
               generator: torch.Generator) -> tuple[int, int]: ...


@register("greedy")
class GreedyAcceptance(AcceptancePolicy):
    """Accept while the draft equals the target's argmax; then take the target's argmax. Lossless for
    greedy requests (the engine uses it for every temperature-0 request)."""

    def accept(self, target_logits, draft, params, generator):
        best = argmax_rows(target_logits)                               # (k+1,)
        n = 0
        while n < len(draft.tokens) and draft.tokens[n] == best[n]:
            n += 1
        return n, best[n]


@register("rejection")
class RejectionAcceptance(AcceptancePolicy):
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept draft token x with
    probability min(1, p(x)/q(x)); on rejection sample from normalize(max(0, p - q)); if all k are
    accepted take a bonus token from p. p and q are the temperature/top-k/top-p distributions plain
    sampling uses, so the output distribution equals plain sampling. A draft without probabilities
    (prompt lookup) is a point mass q = 1 at its token."""

    def accept(self, target_logits, draft, params, generator):
        if params.greedy:
            return GreedyAcceptance().accept(target_logits, draft, params, generator)
        p = sampling_probs(target_logits.cpu(), params)                  # (k+1, V)
        for i, x in enumerate(draft.tokens):
            q_row = draft.probs[i] if draft.probs is not None else None
            qx = float(q_row[x]) if q_row is not None else 1.0
            px = float(p[i, x])
            u = float(torch.rand((), generator=generator))
            if qx > 0 and u < min(1.0, px / qx):
                continue
            if q_row is None:
                residual = p[i].clone()
                residual[x] = 0.0
            else:
                residual = (p[i] - q_row).clamp_min(0.0)
            total = float(residual.sum())
            if total <= 0:           # p == q up to rounding: any token of p is exact
                residual, total = p[i], 1.0
            return i, int(torch.multinomial(residual / total, 1, generator=generator))
        return len(draft.tokens), int(torch.multinomial(p[len(draft.tokens)], 1, generator=generator))
