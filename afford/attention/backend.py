"""AttentionBackend: how a batch of sequences attends to its paged K/V cache.

The runner describes one forward as a `ForwardBatch` (who feeds which tokens where); the backend turns
that into `AttnMetadata` ONCE per forward (`prepare_metadata`), and every layer then calls
`forward(q, k, v, layer, meta)`: write the new K/V into the pool at their slots, attend, return the
output. Tokens are flattened: a forward feeds N = sum(query_lens) tokens, 1-D, no padding.

Contract (after mini-sglang's `BaseAttnBackend`):
- `prepare_metadata(batch, kv)`: everything a layer needs that does not depend on the layer; never
  allocates blocks or changes the pool (the scheduler owns it; the runner only reads tables).
- `forward(q (N, H, D), k (N, KV, D), v (N, KV, D), layer, meta) -> (N, H, D)`: query i of a sequence
  at position p attends to that sequence's positions 0..p (its cache, including the tokens written now).
  A slot of -1 marks a padding token (graph buckets; the batch then says `padded`): its K/V is not written.
- `prepare_for_capture(kv, slots, positions, tables, row_seq, limits, block_size, scratch, decode)` /
  `prepare_for_replay(meta)`: the hooks a graph-capturing backend needs to keep its metadata in static
  buffers (the paged backend, paged.py); the CPU backends run eagerly and need neither.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from afford.registry import registry

BACKENDS, register = registry()


@dataclass
class ForwardBatch:
    """One forward, as the runner describes it (filled by ModelRunner.prepare_*; read by backends).

    seq_ids, starts, query_lens: per sequence, the first position fed and how many tokens are fed
    tables: per sequence, its block table (the scheduler allocated every block the forward writes)
    slot_mapping: (N,) long, flat slot (block * block_size + offset) of each fed token, -1 = padding
    positions:    (N,) long, position of each fed token
    padded:       whether any slot is -1 (a graph bucket's padding rows); the runner's batches are not
    """
    phase: str                          # "prefill" | "decode" (one token each) | "verify" (1 + k each)
    seq_ids: list[int]
    starts: list[int]
    query_lens: list[int]
    tables: list[list[int]]
    block_size: int
    slot_mapping: torch.Tensor
    positions: torch.Tensor
    padded: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def context_lens(self) -> list[int]:
        """Tokens each sequence attends to after this forward (its cache plus what it feeds)."""
        return [s + n for s, n in zip(self.starts, self.query_lens)]


@dataclass
class AttnMetadata:
    """What every layer of one forward shares. `kv[layer]` = (k_pool, v_pool), each (slots, KV, D).
    `write_rows`: (n,) the fed tokens whose slot is real, or None when all are (no padding)."""
    backend: "AttentionBackend"
    batch: ForwardBatch
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    slots: torch.Tensor
    write_rows: torch.Tensor | None
    extra: dict = field(default_factory=dict)   # backend-specific, built by its prepare_metadata


class AttentionBackend(ABC):
    name = "abstract"

    def prepare_metadata(self, batch: ForwardBatch, kv) -> AttnMetadata:
        slots = batch.slot_mapping
        rows = (slots >= 0).nonzero().view(-1) if batch.padded else None
        meta = AttnMetadata(self, batch, kv, slots if rows is None else slots[rows], rows)
        self.prepare(meta)
        return meta

    def prepare(self, meta: AttnMetadata) -> None:
        """Backend-specific metadata into meta.extra (once per forward)."""

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """The runner copied these (src, dst) pool blocks (copy-on-write): copy any per-block state too."""

    @staticmethod
    def write_kv(k: torch.Tensor, v: torch.Tensor, layer: int, meta: AttnMetadata) -> None:
        """Store the fed tokens' K/V (N, KV, D) at their slots; padding (-1) is skipped."""
        k_pool, v_pool = meta.kv[layer]
        if meta.write_rows is not None:
            k, v = k.index_select(0, meta.write_rows), v.index_select(0, meta.write_rows)
        k_pool.index_copy_(0, meta.slots, k.to(k_pool.dtype))
        v_pool.index_copy_(0, meta.slots, v.to(v_pool.dtype))

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                meta: AttnMetadata) -> torch.Tensor: ...

    def prepare_for_capture(self, kv, slots, positions, tables, row_seq, limits, block_size: int,
                            scratch: int, decode: bool = False) -> AttnMetadata:
        raise NotImplementedError(f"the {self.name} backend runs eagerly (no graph capture)")

    def prepare_for_replay(self, meta: AttnMetadata) -> None:
        raise NotImplementedError(f"the {self.name} backend runs eagerly (no graph capture)")
