"""GRAD: token-graph logits fusion from retrieved text (../shared/reference/decoding-methods.md §4) -- LOSSY.

A corpus is a folder of UTF-8 text files (*.txt, *.md), one document each. Per request, BM25 (the bm25s
library) retrieves the `top_docs` documents that best match the prompt. Their token-transition graph is
the sum over the documents' consecutive token pairs (u -> v) of the model's logit of v at that position
(one teacher-forced forward per document, cached: a document's edges do not depend on the request),
measured from that position's lowest logit -- a logit is defined only up to a per-position constant, and
this is the representative that is >= 0, as GRAD's edge weights are.

At each decoding step, with u the sequence's last token, the row g = E(u, .) is max-normalised to [0, 1]
and fused into the model's logits z:

    z' = z + weight * (1 - max softmax(z)) * g

The gate (1 - the model's top probability) lets the graph speak where the model is unsure and stay out
of its way where it is confident. weight = 0 is plain decoding (the lever does nothing).
"""
from __future__ import annotations

from pathlib import Path

import torch

from afford.config import ConfigError

SUFFIXES = (".txt", ".md")


class Corpus:
    """The documents of a folder and a BM25 index over them."""

    def __init__(self, folder: str | Path):
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"grad_corpus {str(folder)!r} is not a folder: pass a folder of .txt/.md documents")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        self.names, self.texts = [], []
        for p in files:
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{p} is not UTF-8 text: GRAD's corpus takes UTF-8 .txt/.md files") from None
            if text.strip():
                self.names.append(str(p.relative_to(folder)))
                self.texts.append(text)
        if not self.texts:
            raise ConfigError(f"grad_corpus {str(folder)!r} holds no non-empty .txt or .md document")
        import bm25s
        self.bm25 = bm25s.BM25()
        self.bm25.index(bm25s.tokenize(self.texts, stopwords="en", show_progress=False), show_progress=False)

    def retrieve(self, query: str, k: int) -> list[int]:
        """Indices of the k documents BM25 ranks first for query (those with a positive score)."""
        import bm25s
        q = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not q.vocab or not any(len(ids) for ids in q.ids):
            return []
        docs, scores = self.bm25.retrieve(q, k=min(k, len(self.texts)), show_progress=False)
        return [int(d) for d, s in zip(docs[0], scores[0]) if s > 0]


class TokenGraph:
    """A sparse graph over the vocabulary: row(u) -> (next token ids, max-normalised weights)."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor, vocab: int):
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if not len(src):
            return
        key, inv = torch.unique(src * vocab + dst, return_inverse=True)                # (E,) distinct edges
        total = torch.zeros(len(key), dtype=torch.float64).index_add_(0, inv, w.double())
        us, vs = key // vocab, key % vocab
        bounds = torch.searchsorted(us, torch.unique(us), right=True).tolist()          # keys are sorted by u
        at = 0
        for end in bounds:
            row = total[at:end]
            top = float(row.max())
            if top > 0:
                self.rows[int(us[at])] = (vs[at:end].clone(), (row / top).float())
            at = end

    def __len__(self) -> int:
        return sum(len(v) for v, _ in self.rows.values())

    def weight(self, u: int, v: int) -> float:
        """The normalised weight of edge u -> v (0 when absent)."""
        if u not in self.rows:
            return 0.0
        ids, w = self.rows[u]
        hit = (ids == v).nonzero()
        return float(w[hit[0, 0]]) if len(hit) else 0.0


class Grad:
    """Per-request graphs from a corpus, and the fusion rule."""

    def __init__(self, corpus: str | Path, weight: float, top_docs: int, model, tokenizer, max_len: int):
        """weight >= 0, top_docs >= 1 (GradConfig checks them)."""
        self.corpus = Corpus(corpus)
        self.weight, self.top_docs = weight, top_docs
        self.model, self.tokenizer, self.max_len = model, tokenizer, max_len
        self.vocab = model.cfg.vocab_size
        self.edges: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}   # doc -> (u, v, w)
        self.doc_tokens = 0                   # tokens fed to build document edges (a cost)

    @torch.inference_mode()
    def doc_edges(self, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Document d's edges (u, v, weight), one teacher-forced forward per window of max_len tokens
        (consecutive windows share one token, so every pair is scored once, nothing is cut)."""
        if d not in self.edges:
            ids = self.tokenizer(self.corpus.texts[d], add_special_tokens=False)["input_ids"]
            us, vs, ws = [], [], []
            step = self.max_len - 1
            dev = next(self.model.parameters()).device
            for a in range(0, max(len(ids) - 1, 0), step):
                win = torch.tensor(ids[a:a + self.max_len], device=dev)
                z = self.model(win[None])[0].float()                                     # (T, V)
                nxt = win[1:]
                w = z[:-1].gather(1, nxt[:, None])[:, 0] - z[:-1].min(-1).values          # (T-1,) >= 0
                us.append(win[:-1].cpu())
                vs.append(nxt.cpu())
                ws.append(w.cpu())
                self.doc_tokens += len(win)
            cat = (lambda x: torch.cat(x) if x else torch.zeros(0, dtype=torch.long))
            self.edges[d] = (cat(us), cat(vs), torch.cat(ws) if ws else torch.zeros(0))
        return self.edges[d]

    def graph_for(self, prompt: str) -> tuple[TokenGraph, list[str]]:
        """The graph of the documents retrieved for prompt, and their names."""
        docs = self.corpus.retrieve(prompt, self.top_docs)
        parts = [self.doc_edges(d) for d in docs]
        if not parts:
            return TokenGraph(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                              torch.zeros(0), self.vocab), []
        src, dst, w = (torch.cat(x) for x in zip(*parts))
        return TokenGraph(src, dst, w, self.vocab), [self.corpus.names[d] for d in docs]

    def fuse(self, logits: torch.Tensor, graph: TokenGraph, prev: int) -> torch.Tensor:
        """logits (V,) of a sequence whose last token is prev -> fused logits (V,)."""
        if prev not in graph.rows or self.weight == 0:
            return logits
        ids, g = graph.rows[prev]
        gate = 1.0 - float(torch.softmax(logits.float(), -1).max())
        out = logits.clone()
        out[ids.to(out.device)] += self.weight * gate * g.to(out.device, out.dtype)
        return out
