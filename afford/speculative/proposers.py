"""Proposers draft up to k tokens per running sequence (SmartSpec, S2D; ../shared/reference).

Contract: `propose(seqs, ks)` returns one Draft per sequence with len(tokens) <= ks[i]; `probs` is the
(len(tokens), V) distribution each token was drawn from when the proposer has one (None: a point mass).
After the target verifies, the engine calls `rollback(seq, n_valid)`: the proposer must forget any
state past the first n_valid tokens of seq.token_ids. `free(seq)` drops all state of a finished or
preempted sequence. A proposer never changes a sequence.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from afford.config import ConfigError
from afford.core.runner import ModelRunner
from afford.core.sampler import probs as sampling_probs
from afford.core.sequence import Sequence
from afford.kv.paged import BlockPool
from afford.models.loader import load_for_inference, load_tokenizer, resolve_model_path
from afford.models.native import argmax_rows
from afford.registry import registry

PROPOSERS, register = registry()


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None       # (len(tokens), V) or None for a point mass


class Proposer(ABC):
    name = "abstract"
    has_model = False

    @abstractmethod
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]: ...

    def rollback(self, seq: Sequence, n_valid: int) -> None:
        pass

    def free(self, seq: Sequence) -> None:
        pass

    def catchup(self, seq: Sequence) -> int:
        """Tokens this proposer must feed for seq before it can draft, beyond the usual one."""
        return 0

    def observe(self, st) -> None:
        """The StepStats of a step it drafted for (its time, the draft's part of it)."""

    def counters(self) -> dict | None:
        """What this proposer reports into the engine's stats and /metrics (None: nothing)."""
        return None


@register("ngram")
class NgramProposer(Proposer):
    """Prompt lookup: find the most recent earlier occurrence of the sequence's last n tokens
    (n from max_n down to min_n) in its prompt and output, and propose what followed it."""

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ConfigError("ngram sizes need 1 <= min_n <= max_n")
        self.max_n, self.min_n = max_n, min_n

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        arr = np.asarray(tokens, dtype=np.int64)
        L = len(arr)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)      # (L - n, n) earlier n-grams
            hits = np.flatnonzero((windows == arr[L - n:]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return arr[start:start + k].tolist()
        return []

    def propose(self, seqs, ks):
        return [Draft(self.lookup(s.token_ids, k) if k else []) for s, k in zip(seqs, ks)]


@register("draft")
class DraftModelProposer(Proposer):
    """A small model sharing the target's tokenizer, with its own paged KV cache. Each step it catches
    up on the tokens it has not seen (usually one), then drafts k tokens in k batched forwards."""
    has_model = True

    def __init__(self, path: str, target_tokenizer, target_max_len: int, num_blocks: int, block_size: int,
                 device: str = "auto", dtype: str = "auto", vocab_size: int | None = None,
                 quantization: str | None = None, attention: str = "auto", prefix_caching: bool = False,
                 native: bool = True, graphs: bool = True, max_batch: int = 64, max_q: int = 1,
                 attention_options: dict | None = None):
        from afford.config import ModelConfig
        path = resolve_model_path(path, role="draft")
        cfg = ModelConfig.from_dir(path)
        if vocab_size is not None and cfg.vocab_size != vocab_size:
            raise ConfigError(f"the draft's vocabulary ({cfg.vocab_size}) differs from the target's ({vocab_size}); "
                              f"a draft must share the target's tokenizer")
        tok = load_tokenizer(path)
        if tok.get_vocab() != target_tokenizer.get_vocab():
            raise ConfigError("the draft's tokenizer differs from the target's; a draft must share the "
                              "target's tokenizer (train it with `afford zoo distill --teacher TARGET`)")
        if cfg.max_position_embeddings < target_max_len:
            raise ConfigError(f"the draft handles {cfg.max_position_embeddings} positions but the target runs "
                              f"with max_model_len={target_max_len}; lower max_model_len or use a longer draft")
        self.model = load_for_inference(path, device, dtype, max_len=target_max_len, quantization=quantization)
        self.cfg = cfg
        self.pool = BlockPool(num_blocks, block_size, prefix_caching=prefix_caching)
        # its catch-up forward feeds up to 1 + k tokens: those fit the draft's CUDA graphs too
        self.runner = ModelRunner(self.model, self.pool, attention, native, graphs, max_batch, max_q,
                                  attention_options)
        self.computed: dict[int, int] = {}

    def propose(self, seqs, ks):
        for s, k in zip(seqs, ks):
            sid = s.seq_id
            if k and sid not in self.computed:            # new here: start from the cached prefix, if any
                self.computed[sid] = self.pool.match_prefix(sid, s.token_ids)
                self.pool.count_admitted(len(s.token_ids), self.computed[sid])
            elif sid in self.computed:                    # what it computed is verified (rolled back past drafts)
                self.pool.register(sid, s.token_ids, min(self.computed[sid], len(s.token_ids)))
        ks, active, drafts = self._reserve(seqs, ks)
        if not active:
            return drafts
        # Forward 0 feeds what the draft has not seen (usually the last token) and drafts token 0; forward j
        # feeds draft token j - 1 at position len - 1 + j (the last drafted token is never fed).
        cur = active
        starts = [self.computed.get(seqs[i].seq_id, 0) for i in cur]
        if all(seqs[i].params.greedy for i in cur):        # all k forwards in one native call, argmax inside
            toks = self.runner.draft_greedy([seqs[i].seq_id for i in cur], starts,
                                            [seqs[i].token_ids[st:] for i, st in zip(cur, starts)], [ks[i] for i in cur])
            if toks is not None:
                for i, t in zip(cur, toks):
                    drafts[i].tokens.extend(t)
                    self.computed[seqs[i].seq_id] = len(seqs[i].token_ids) + ks[i] - 1
                return drafts
        logits = self.runner.forward([seqs[i].seq_id for i in cur], starts,
                                     [seqs[i].token_ids[st:] for i, st in zip(cur, starts)])    # (b, V)
        rows: dict[int, list[torch.Tensor]] = {i: [] for i in active}
        for j in range(max(ks[i] for i in active)):
            if j:
                keep = [n for n, i in enumerate(cur) if ks[i] > j]
                cur = [cur[n] for n in keep]
                batch, ids = self.runner.prepare_decode([seqs[i].seq_id for i in cur],
                                                        [len(seqs[i].token_ids) - 1 + j for i in cur],
                                                        [drafts[i].tokens[-1] for i in cur])
                logits = self.runner.run(batch, ids)                                         # (b, V)
            self._sample(logits, [seqs[i] for i in cur], [drafts[i] for i in cur], [rows[i] for i in cur])
        for i in active:
            self.computed[seqs[i].seq_id] = len(seqs[i].token_ids) + ks[i] - 1
            if rows[i]:
                drafts[i].probs = torch.stack(rows[i])                                   # (k, V)
        return drafts

    def _reserve(self, seqs: list[Sequence], ks: list[int]) -> tuple[list[int], list[int], list[Draft]]:
        """This proposer schedules its own pool: ks shortened to what it holds, and every block the drafting
        forwards write allocated once up front. Returns (ks, the indices that draft, an empty Draft each)."""
        ks = self._fit_pool(seqs, ks)
        active = [i for i, k in enumerate(ks) if k > 0]
        for i in active:
            s = seqs[i]
            self.runner.copy_blocks(self.pool.prepare_write(s.seq_id, len(s.token_ids) + ks[i] - 1))
        return ks, active, [Draft([], None) for _ in seqs]

    def _fit_pool(self, seqs: list[Sequence], ks: list[int]) -> list[int]:
        """Shorten drafts to what this proposer's own pool holds (it does not share forked prompts as the
        target's does, so n > 1 can need more blocks here): k falls until it fits, 0 drafts nothing."""
        free, out = self.pool.num_free, []
        for s, k in zip(seqs, ks):
            while k > 0 and self.pool.extra_blocks(s.seq_id, len(s.token_ids) + k - 1) > free:
                k -= 1
            free -= self.pool.extra_blocks(s.seq_id, len(s.token_ids) + k - 1) if k else 0
            out.append(k)
        return out

    @staticmethod
    def _sample(logits: torch.Tensor, seqs: list[Sequence], drafts: list[Draft], rows: list[list]) -> None:
        top = argmax_rows(logits)                                                        # one call for all rows
        for row, best, s, d, r in zip(logits, top, seqs, drafts, rows):
            if s.params.greedy:
                d.tokens.append(best)
            else:
                q = sampling_probs(row.cpu(), s.params)
                d.tokens.append(int(torch.multinomial(q, 1, generator=s.generator)))
                r.append(q)

    def catchup(self, seq):
        return max(0, len(seq.token_ids) - self.computed.get(seq.seq_id, 0) - 1)

    def rollback(self, seq, n_valid):
        sid = seq.seq_id
        if sid in self.computed and self.computed[sid] > n_valid:
            self.computed[sid] = n_valid
            self.pool.truncate(sid, n_valid)

    def free(self, seq):
        self.computed.pop(seq.seq_id, None)
        self.pool.free(seq.seq_id)
