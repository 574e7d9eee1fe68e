"""The lossy levers (opt-in, each changes the output distribution and reports what it changed):
entropy-adaptive model switching (cascade.py, EAD), guided re-ranking (rerank.py, AMBEDKAR) and
token-graph fusion from retrieved text (grad.py, GRAD). `Levers` builds what a LossyConfig asks for and
gives the engine's step loop three calls: `fuse` (logits before a token is chosen), `pick` (the choice)
and `forget` (a finished sequence)."""
from __future__ import annotations

import torch

from afford.config import KV_BUDGET_BYTES, ConfigError, LossyConfig
from afford.core.sampler import probs as sampling_probs


class Levers:
    def __init__(self, cfg: LossyConfig, engine):
        from afford.levers.cascade import EntropyCascade
        from afford.levers.side import SideModel
        self.cfg = cfg
        e = engine
        self.side = None
        if cfg.side_model is not None:
            # a cascade's large model holds what the engine's pool holds; a guide two contexts per sequence
            # and a fork per candidate and context
            blocks = e.pool.num_blocks if cfg.cascade else \
                2 * e.pool.num_blocks + 4 * cfg.rerank.top_k * e.cfg.max_num_seqs
            self.side = SideModel(cfg.side_model, e.tokenizer, e.model_config.vocab_size, e.max_model_len,
                                  blocks, e.pool.block_size, e.cfg.device, e.cfg.dtype,
                                  "large" if cfg.cascade else "guide", e.cfg.attention, e.cfg.native,
                                  KV_BUDGET_BYTES * (1 if cfg.cascade else 2), e.cfg.attention_options)
        c = cfg.cascade
        self.cascade = EntropyCascade(c.tau, c.window, c.dwell) if c else None
        self.reranker = self.grad = None
        if cfg.rerank is not None and cfg.rerank.alpha != 0:          # alpha = 0: plain decoding, no guide forwards
            from afford.levers.rerank import GuidedReranker
            r = cfg.rerank
            self.reranker = GuidedReranker(self.side, r.alpha, r.top_k, r.counterfactual, e.tokenizer)
        if cfg.grad is not None:
            from afford.levers.grad import Grad
            g = cfg.grad
            self.grad = Grad(g.corpus, g.weight, g.top_docs, e.model, e.tokenizer, e.max_model_len)

    def on_request(self, seqs, text: str) -> int:
        """A new request's sequences (its n choices): GRAD retrieves its documents and builds its graph.
        Returns the tokens fed to do it (documents seen before are cached: 0)."""
        if self.reranker is not None:
            if len(seqs) > 1:
                raise ConfigError("rerank='guided' decodes one choice per request: use n=1")
            self.reranker.prepare(seqs[0], text)
        if self.grad is None or self.grad.weight == 0:
            return 0
        before = self.grad.doc_tokens
        graph, docs = self.grad.graph_for(text)
        for s in seqs:
            s.graph, s.retrieved = graph, docs
        return self.grad.doc_tokens - before

    def fuse(self, seqs, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) of the sequences about to choose a token -> the logits they choose from."""
        if self.grad is None or self.grad.weight == 0:
            return logits
        rows = [self.grad.fuse(row, s.graph, s.token_ids[-1]) if s.graph is not None else row
                for s, row in zip(seqs, logits)]
        return torch.stack(rows) if rows else logits

    def pick(self, seqs, logits: torch.Tensor, sampler) -> list[int]:
        if self.reranker is not None:
            return self.reranker.choose(seqs, logits, sampling_probs)
        return sampler(logits, [s.params for s in seqs], [s.generator for s in seqs])

    def forget(self, seq) -> None:
        if self.cascade is not None:
            self.cascade.forget(seq.seq_id)
            self.side.free(seq.seq_id)
        if self.reranker is not None:
            self.reranker.free(seq.seq_id)
