"""Guided re-ranking after AMBEDKAR (../shared/reference/decoding-methods.md §5) -- a LOSSY steering lever,
not a speed lever: it adds two guide-model forwards per decoded token.

The engine's own (small) model proposes its top_k next tokens c with log-probabilities log p(c). A guide
model (usually larger) reads the request under its original context x and under a counterfactual context
x' (a user-given rewrite of the prompt, e.g. loaded identity words swapped), each followed by the tokens
generated so far and then by c; D(c) is the Jensen-Shannon divergence between its two next-token
distributions. The token is

    c* = argmax_c  log p(c) - alpha * D(c)          (greedy requests)

or, for sampled requests, a draw from the top_k of the request's sampling distribution q reweighted by
exp(-alpha * D(c)). A candidate whose continuation the guide judges the same whatever the rewrite is
preferred over one whose continuation depends on it. alpha = 0 is plain decoding (no guide forwards).

The guide keeps two paged caches per sequence (original and counterfactual) and, each step, forks one
copy-on-write child per candidate and branch, so the 2 * top_k candidate rows go through ONE forward.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import torch

from afford.config import ConfigError
from afford.levers.side import SideModel


def swap_words(mapping: Mapping[str, str]) -> Callable[[str], str]:
    """A rewrite that swaps whole words both ways (a -> b and b -> a), keeping a leading capital."""
    pairs = {}
    for a, b in mapping.items():
        pairs[a.lower()], pairs[b.lower()] = b.lower(), a.lower()
    if not pairs:
        raise ConfigError("counterfactual word swaps are empty: give at least one pair")
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, pairs), key=len, reverse=True)) + r")\b",
                         re.IGNORECASE)

    def rewrite(text: str) -> str:
        def one(m):
            out = pairs[m.group(0).lower()]
            return out[:1].upper() + out[1:] if m.group(0)[:1].isupper() else out
        return pattern.sub(one, text)
    return rewrite


def js_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in nats between rows of two (N, V) log-distributions -> (N,)."""
    p, q = logp.exp(), logq.exp()
    logm = torch.log((p + q) / 2).clamp_min(-1e30)
    return 0.5 * ((p * (logp - logm)).nan_to_num().sum(-1) + (q * (logq - logm)).nan_to_num().sum(-1))


class GuidedReranker:
    def __init__(self, guide: SideModel, alpha: float, top_k: int, counterfactual, tokenizer):
        """alpha >= 0 and 1 <= top_k <= RerankConfig.MAX_TOP_K (RerankConfig checks them)."""
        if counterfactual is None:
            raise ConfigError("rerank='guided' needs counterfactual=: a dict of word swaps or a function "
                              "that rewrites a prompt")
        self.rewrite = swap_words(counterfactual) if isinstance(counterfactual, Mapping) else counterfactual
        if not callable(self.rewrite):
            raise ConfigError("counterfactual must be a dict of word swaps or a function str -> str")
        self.guide, self.alpha, self.top_k, self.tokenizer = guide, alpha, top_k, tokenizer
        self.cf_prompt: dict[int, list[int]] = {}     # seq_id -> the counterfactual prompt's token ids
        self.changed = 0                              # tokens where the choice differs from the plain one

    def prepare(self, seq, text: str) -> None:
        """A new request: its counterfactual prompt, rewritten and checked here (an error fails this request
        at admission, not a step)."""
        try:
            out = self.rewrite(text)
        except Exception as e:
            raise ConfigError(f"the counterfactual rewrite failed on this prompt: {e!r}") from e
        if not isinstance(out, str):
            raise ConfigError(f"the counterfactual rewrite must return a string, got {type(out).__name__}")
        ids = self.tokenizer(out, add_special_tokens=False)["input_ids"] or list(seq.prompt_ids)
        room = self.guide.max_len - seq.params.max_tokens
        if len(ids) >= room:
            raise ConfigError(f"the counterfactual prompt has {len(ids)} tokens: with max_tokens="
                              f"{seq.params.max_tokens} it does not fit the context of {self.guide.max_len}; "
                              f"lower max_tokens or shorten the prompt")
        self.cf_prompt[seq.seq_id] = ids

    def blocks_needed(self, seq) -> int:
        """Guide-pool blocks one step of seq may take: both contexts grown, then a fork per candidate and
        context (a copy-on-write copy of its last block and at most one new block each)."""
        orig, cf = self.keys(seq.seq_id)
        pool = self.guide.pool
        return pool.extra_blocks(orig, len(seq.token_ids) + 1) + \
            pool.extra_blocks(cf, len(self.cf_prompt[seq.seq_id]) + seq.num_output + 1) + 4 * self.top_k

    @staticmethod
    def keys(seq_id: int) -> tuple[int, int]:
        return 64 * seq_id, 64 * seq_id + 1

    def divergences(self, seqs, candidates: torch.Tensor) -> torch.Tensor:
        """candidates (B, K) token ids -> D (B, K): the guide's JS divergence after each candidate."""
        g, K = self.guide, candidates.shape[1]
        parents, lists = [], []
        for s in seqs:
            orig, cf = self.keys(s.seq_id)
            parents += [orig, cf]
            lists += [s.token_ids, self.cf_prompt[s.seq_id] + s.output_ids]
        g.feed(parents, lists, want_logits=False)                # both contexts up to the last token
        kids, toks, starts = [], [], []
        try:
            for i, s in enumerate(seqs):
                for b in range(2):
                    parent, n = parents[2 * i + b], len(lists[2 * i + b])
                    for j in range(K):
                        kid = 64 * s.seq_id + 2 + 2 * j + b
                        g.fork(parent, kid)
                        kids.append(kid)
                        g.runner.copy_blocks(g.pool.prepare_write(kid, n + 1))
                        starts.append(n)
                        toks.append([int(candidates[i, j])])
            logits = g.runner.forward(kids, starts, toks)                           # (B * 2 * K, V)
        finally:
            for k in kids:
                g.free(k)
        g.fed += len(kids)
        logp = torch.log_softmax(logits.float(), -1).view(len(seqs), 2, K, -1)    # (B, 2, K, V)
        return js_divergence(logp[:, 0].reshape(-1, logp.shape[-1]),
                             logp[:, 1].reshape(-1, logp.shape[-1])).view(len(seqs), K)

    def choose(self, seqs, logits: torch.Tensor, sample_probs) -> list[int | Exception]:
        """logits (B, V) of the proposing model -> one token per sequence, or the error that fails that
        sequence alone (the guide's pool has no room for it now)."""
        free, fits = self.guide.pool.num_free, []
        for s in seqs:
            need = self.blocks_needed(s)
            fits.append(need <= free)
            free -= need if fits[-1] else 0
        if not all(fits):
            ok = [i for i, f in enumerate(fits) if f]
            picked = iter(self.choose([seqs[i] for i in ok], logits[ok], sample_probs) if ok else [])
            return [next(picked) if f else RuntimeError(
                "the guide model's KV pool is full: this request could not be re-ranked; retry it, or run "
                "fewer requests at once (max_num_seqs)") for f in fits]
        K = min(self.top_k, logits.shape[-1])
        scores, cands = [], []
        for s, row in zip(seqs, logits):
            if s.params.greedy:
                lp = torch.log_softmax(row.float(), -1)
            else:
                lp = torch.log(sample_probs(row, s.params))
            top = torch.topk(lp, K)
            scores.append(top.values)
            cands.append(top.indices)
        cands_t = torch.stack(cands)                                               # (B, K)
        d = self.divergences(seqs, cands_t)                                        # (B, K)
        out = []
        for s, sc, c, dd in zip(seqs, scores, cands_t, d):
            adj = sc - self.alpha * dd.to(sc.device)
            if s.params.greedy:
                pick = int(adj.argmax())
            else:
                w = torch.softmax(adj.masked_fill(~torch.isfinite(sc), -math.inf), -1)
                pick = int(torch.multinomial(w.cpu(), 1, generator=s.generator))
            out.append(int(c[pick]))
            self.changed += pick != 0
        return out

    def free(self, seq_id: int) -> None:
        for k in self.keys(seq_id):
            self.guide.free(k)
        self.cf_prompt.pop(seq_id, None)
