"""A CPU backend that reads the paged cache in place where it can.

Per sequence: when its blocks are consecutive in the pool (the pool hands out blocks in order and
reuses freed ones first, so a lone sequence keeps them consecutive; sequences that grow side by side
interleave theirs), its context K/V is a zero-copy view `pool[first_slot : first_slot + n]`;
otherwise only its own blocks are gathered (block-sized copies, not one index per token). A prefill
that starts at position 0 attends to the K/V it just computed and reads nothing from the pool.
One SDPA per sequence: no padding, no dense (B, T, L) mask; a verify row of T > 1 queries gets a
(T, n) mask, a decode row none. A decode of `batched_decode_min` or more sequences instead gathers every
sequence's blocks (block-sized copies) into one padded batch with a (B, 1, 1, L) key mask for ONE SDPA:
per-sequence calls cost more than the copy there (benchmarks/decode_vs_hf.py, batch 8).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from afford.attention.backend import AttentionBackend, AttnMetadata, register


def consecutive(blocks: list[int]) -> bool:
    return blocks == list(range(blocks[0], blocks[0] + len(blocks)))


@register("cpu_paged")
class PagedCPUBackend(AttentionBackend):
    batched_decode_min = 4

    def prepare(self, meta: AttnMetadata) -> None:
        b = meta.batch
        bs, dev = b.block_size, meta.slots.device
        if b.phase == "decode" and len(b.seq_ids) >= self.batched_decode_min:
            lens = b.context_lens
            nblk = -(-max(lens) // bs)
            blocks = torch.tensor([t[:nblk] + [0] * (nblk - len(t[:nblk])) for t in b.tables])      # (B, nblk)
            keep = torch.arange(nblk * bs).view(1, -1) < torch.tensor(lens).view(-1, 1)             # (B, L)
            meta.extra["batched"] = (blocks.view(-1).to(dev), keep.view(len(lens), 1, 1, -1).to(dev))
            return
        plan, off = [], 0
        for start, t, tbl in zip(b.starts, b.query_lens, b.tables):
            n = start + t
            used = tbl[:-(-n // bs)]
            if start == 0:
                ctx = ("fresh", None)                      # attend to the K/V fed now, causal
            elif consecutive(used):
                ctx = ("view", used[0] * bs)               # pool[s0 : s0 + n] is the context
            else:
                ctx = ("blocks", torch.tensor(used, device=dev))
            mask = None
            if t > 1 and start > 0:                        # query r at start + r sees positions <= it
                mask = (torch.arange(n).view(1, n) <= (start + torch.arange(t)).view(t, 1)).to(dev)   # (T, n)
            plan.append((off, t, n, ctx, mask))
            off += t
        meta.extra["plan"] = plan

    def forward(self, q, k, v, layer, meta):
        self.write_kv(k, v, layer, meta)
        k_pool, v_pool = meta.kv[layer]
        H, KV, D = q.shape[1], k.shape[1], k.shape[2]
        bs = meta.batch.block_size
        gqa = KV != H
        if "batched" in meta.extra:
            blocks, keep = meta.extra["batched"]
            B = q.shape[0]
            kc = k_pool.view(-1, bs, KV, D).index_select(0, blocks).view(B, -1, KV, D).transpose(1, 2)  # (B, KV, L, D)
            vc = v_pool.view(-1, bs, KV, D).index_select(0, blocks).view(B, -1, KV, D).transpose(1, 2)
            o = F.scaled_dot_product_attention(q.unsqueeze(2), kc.to(q.dtype), vc.to(q.dtype), attn_mask=keep,
                                               enable_gqa=gqa)                             # (B, H, 1, D)
            return o.squeeze(2)                                                            # (N = B, H, D)
        outs = []
        for off, t, n, (kind, where), mask in meta.extra["plan"]:
            qi = q[off:off + t].transpose(0, 1).unsqueeze(0)                             # (1, H, T, D)
            if kind == "fresh":
                kc, vc = k[off:off + t], v[off:off + t]                                   # (n, KV, D)
            elif kind == "view":
                kc, vc = k_pool[where:where + n], v_pool[where:where + n]                 # (n, KV, D), no copy
            else:
                kc = k_pool.view(-1, bs, KV, D).index_select(0, where).view(-1, KV, D)[:n]
                vc = v_pool.view(-1, bs, KV, D).index_select(0, where).view(-1, KV, D)[:n]
            kc = kc.transpose(0, 1).unsqueeze(0).to(q.dtype)                              # (1, KV, n, D)
            vc = vc.transpose(0, 1).unsqueeze(0).to(q.dtype)
            o = F.scaled_dot_product_attention(qi, kc, vc, attn_mask=mask, is_causal=kind == "fresh" and t > 1,
                                               enable_gqa=gqa)                            # (1, H, T, D)
            outs.append(o[0].transpose(0, 1))                                             # (T, H, D)
        return outs[0] if len(outs) == 1 else torch.cat(outs)                             # (N, H, D)
