"""The reference backend: gather every context slot of every sequence out of the pool into a padded
(B, KV, L, D) batch, pad the ragged queries to (B, H, T, D), one masked SDPA. Simple and general
(any phase, any ragged mix); it copies each sequence's whole context every layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from afford.attention.backend import AttentionBackend, AttnMetadata, register
from afford.kv.paged import table_slots


@register("sdpa")
class GatherSDPABackend(AttentionBackend):
    def prepare(self, meta: AttnMetadata) -> None:
        b = meta.batch
        B, T, L = len(b.seq_ids), max(b.query_lens), max(b.context_lens)
        gather = torch.zeros(B, L, dtype=torch.long)                                    # (B, L)
        for i, (tbl, n) in enumerate(zip(b.tables, b.context_lens)):
            gather[i, :n] = torch.tensor(table_slots(tbl, b.block_size, 0, n))
        # query t of sequence i sits at position starts[i] + t and sees context positions <= it
        qpos = torch.tensor(b.starts).view(B, 1) + torch.arange(T).view(1, T)          # (B, T)
        mask = torch.arange(L).view(1, 1, L) <= qpos.unsqueeze(-1)                      # (B, T, L)
        pad = None
        if T > 1 or B * T != b.num_tokens:
            pad = torch.cat([i * T + torch.arange(n) for i, n in enumerate(b.query_lens)])   # (N,) into B*T
        dev = meta.slots.device
        meta.extra.update(gather=gather.view(-1).to(dev), mask=mask.unsqueeze(1).to(dev),   # (B, 1, T, L)
                          pad=None if pad is None else pad.to(dev), shape=(B, T, L))

    def forward(self, q, k, v, layer, meta):
        self.write_kv(k, v, layer, meta)
        B, T, L = meta.extra["shape"]
        N, H, D = q.shape
        KV = k.shape[1]
        k_pool, v_pool = meta.kv[layer]
        idx = meta.extra["gather"]
        kc = k_pool.index_select(0, idx).view(B, L, KV, D).transpose(1, 2)              # (B, KV, L, D)
        vc = v_pool.index_select(0, idx).view(B, L, KV, D).transpose(1, 2)              # (B, KV, L, D)
        pad = meta.extra["pad"]
        if pad is not None:
            q = q.new_zeros(B * T, H, D).index_copy_(0, pad, q)                         # (B*T, H, D)
        qb = q.view(B, T, H, D).transpose(1, 2)                                         # (B, H, T, D)
        o = F.scaled_dot_product_attention(qb, kc.to(q.dtype), vc.to(q.dtype), attn_mask=meta.extra["mask"],
                                           enable_gqa=KV != H)                          # (B, H, T, D)
        o = o.transpose(1, 2).reshape(B * T, H, D)                                      # (B*T, H, D)
        return o if pad is None else o.index_select(0, pad)                             # (N, H, D)
