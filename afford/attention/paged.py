"""The paged backend: every query row reads its sequence's K/V in place through the block table.

A row r (one fed token) belongs to sequence `row_seq[r]` and attends to that sequence's first
`limits[r]` = position + 1 tokens, looked up block by block in `tables` (B, M) -- decode, speculative
verify and prefill chunks after a cached prefix alike, with no gather into a padded (B, L) copy.
On CUDA the Triton kernel (triton_paged.py) does it; elsewhere a torch reference with the same contract
(it gathers each row's table into a (R, M * block_size) view and masks: for the CPU tests, and the
fallback where Triton is missing). A batch whose every sequence starts at position 0 (a fresh prefill)
attends to the K/V it just computed with one padded causal SDPA and reads nothing from the pool.

It is the backend CUDA graphs capture (afford/core/graphs.py): `prepare_for_capture` builds the
metadata on static buffers; a slot of -1 (a padding row of a batch-size bucket) is written to the
scratch block past the pool's last one, so it never touches a real block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from afford.attention.backend import AttentionBackend, AttnMetadata, ForwardBatch, register
from afford.attention.triton_paged import attend_decode, attend_rows, available, rope_store


def attend_rows_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                          row_seq: torch.Tensor, limits: torch.Tensor, block_size: int,
                          scale: float) -> torch.Tensor:
    """The rows contract in plain torch: q (R, H, D) -> (R, H, D)."""
    R, H, D = q.shape
    KV = k_pool.shape[1]
    L = tables.shape[1] * block_size
    n = torch.arange(L, device=q.device)
    slots = tables.long()[row_seq.long()][:, n // block_size] * block_size + n % block_size       # (R, L)
    kc = k_pool[slots].transpose(1, 2).to(q.dtype)                                              # (R, KV, L, D)
    vc = v_pool[slots].transpose(1, 2).to(q.dtype)
    keep = (n.view(1, L) < limits.view(R, 1)).view(R, 1, 1, L)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kc, vc, attn_mask=keep, scale=scale,
                                       enable_gqa=KV != H)                                      # (R, H, 1, D)
    return o.squeeze(2)


@register("paged")
class PagedBackend(AttentionBackend):
    name = "paged"

    def __init__(self, use_triton: bool | None = None):
        # None: Triton where it can run (a CUDA tensor and an installed triton); tests force either way
        self.use_triton = use_triton
        self.max_ctx = None      # the runner's longest context: eager forwards and graphs split it alike
        self.padded_scores_max = 1 << 26   # a ragged fresh prefill above this many B*H*T*T scores: per sequence
        # RoPE + the K/V store as one Triton kernel on the rows path (CUDA): 6 kernels a layer become 1 (a
        # batch-1 step of a 1.1 B model: 1.70 -> 1.33 ms on an H200, benchmarks/gpu_decode.py)
        self.fused_rope = True
        # ... and for decode rows (each its sequence's only fed token) RoPE, the K/V store, attention and the
        # splits' merge as ONE kernel (triton_paged.attend_decode): 3 kernels a layer become 1, but on an H200
        # (run 12, 8e2fd79) the step got slower: batch 1 0.900 vs 0.805 ms, batch 16 1.331 vs 1.248 ms. Off by
        # default (rope_store, then attend_rows); True switches it on
        self.fused_decode = False

    def _triton(self, q: torch.Tensor) -> bool:
        if self.use_triton is not None:
            return self.use_triton
        return q.is_cuda and available()

    def prepare(self, meta: AttnMetadata) -> None:
        b = meta.batch
        dev = meta.slots.device
        if not any(b.starts):                               # fresh prefill: attend to what is fed now
            B, T = len(b.query_lens), max(b.query_lens)
            pad = None
            if B * T != b.num_tokens:
                pad = torch.cat([i * T + torch.arange(n) for i, n in enumerate(b.query_lens)]).to(dev)   # (N,)
            mask = None
            if pad is not None:                             # causal and no padded keys: (B, 1, T, T)
                lens = torch.tensor(b.query_lens).view(B, 1, 1)
                t = torch.arange(T)
                mask = ((t.view(1, 1, T) <= t.view(1, T, 1)) & (t.view(1, 1, T) < lens)).unsqueeze(1).to(dev)
            meta.extra["fresh"] = (B, T, pad, mask)
            return
        M = max(len(t) for t in b.tables)
        tables = torch.zeros(len(b.tables), M, dtype=torch.int32)
        for i, t in enumerate(b.tables):
            tables[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        row_seq = torch.repeat_interleave(torch.arange(len(b.query_lens)), torch.tensor(b.query_lens))
        meta.extra["rows"] = (tables.to(dev), row_seq.to(dev), (b.positions + 1).to(dev))
        meta.extra["scratch"] = None
        meta.extra["fused_rope"] = self._fused(dev) and not b.padded
        meta.extra["decode"] = all(n == 1 for n in b.query_lens)

    def prepare_for_capture(self, kv, slots: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                            row_seq: torch.Tensor, limits: torch.Tensor, block_size: int,
                            scratch: int, decode: bool = False) -> AttnMetadata:
        """Metadata over static buffers (a graph bucket): slots -1 go to the `scratch` slot. decode: every row
        is its sequence's only fed token."""
        batch = ForwardBatch("graph", [], [], [], [], block_size, slots, positions, padded=True)
        meta = AttnMetadata(self, batch, kv, slots, None)
        meta.extra.update(rows=(tables, row_seq, limits), scratch=scratch, fused_rope=self._fused(slots.device),
                          decode=decode)
        return meta

    def _fused(self, dev: torch.device) -> bool:
        return self.fused_rope and self.use_triton is not False and dev.type == "cuda" and available()

    def prepare_for_replay(self, meta: AttnMetadata) -> None:
        """Nothing: the graph runner refills the static buffers the captured metadata points at."""

    def forward_qkv(self, qkv: torch.Tensor, heads: int, cos_table: torch.Tensor, sin_table: torch.Tensor,
                    layer: int, meta: AttnMetadata) -> torch.Tensor:
        """The rows path from the un-rotated q|k|v (N, H + 2 KV, D): RoPE and the K/V store in one kernel
        (meta.extra["fused_rope"]), then attention; (N, H, D)."""
        k_pool, v_pool = meta.kv[layer]
        scratch = meta.extra.get("scratch")
        if self.fused_rope and self.use_triton is not False:
            try:
                tables, row_seq, limits = meta.extra["rows"]
                if self.fused_decode and meta.extra.get("decode"):
                    try:
                        return attend_decode(qkv, cos_table, sin_table, meta.batch.positions, meta.slots, k_pool,
                                             v_pool, -1 if scratch is None else scratch, heads, tables, row_seq,
                                             limits, meta.batch.block_size, self.max_ctx)
                    except Exception as e:   # a Triton that cannot build the one-kernel form: the three kernels
                        if self.use_triton:
                            raise
                        import logging
                        logging.getLogger("afford").warning("the one-kernel decode attention failed (%s: %s); RoPE + "
                                                            "K/V store and attention run as separate kernels",
                                                            type(e).__name__, e)
                        self.fused_decode = False
                q = rope_store(qkv, cos_table, sin_table, meta.batch.positions, meta.slots, k_pool, v_pool,
                               -1 if scratch is None else scratch, heads)
                return attend_rows(q, k_pool, v_pool, tables, row_seq, limits, meta.batch.block_size,
                                   q.shape[-1] ** -0.5, self.max_ctx)
            except Exception as e:           # a Triton that cannot build here: torch's operators, said once
                if self.use_triton:
                    raise
                import logging
                logging.getLogger("afford").warning("the fused Triton RoPE / attention kernels failed (%s: %s); "
                                                    "torch's operators run instead", type(e).__name__, e)
                self.fused_rope, self.use_triton = False, False
        # RoPE as the model's apply_rope computes it (x * cos + rotate_half(x) * sin), then the usual path
        KV, D = (qkv.shape[1] - heads) // 2, qkv.shape[2]
        cos = cos_table[meta.batch.positions].unsqueeze(-2).to(qkv.dtype)
        sin = sin_table[meta.batch.positions].unsqueeze(-2).to(qkv.dtype)
        x = qkv[:, :heads + KV]
        qk = x * cos + torch.cat((-x[..., D // 2:], x[..., :D // 2]), dim=-1) * sin
        return self.forward(qk[:, :heads], qk[:, heads:], qkv[:, heads + KV:], layer, meta)

    def qkv_rope(self, cos_table: torch.Tensor, sin_table: torch.Tensor, layer: int, meta: AttnMetadata,
                 heads: int) -> tuple | None:
        """rope_store's arguments for a one-row q|k|v GEMV that does its work (triton_gemv.gemv's rope), or
        None where forward_qkv would not run rope_store (torch's RoPE, no rows path) or runs attend_decode
        (fused_decode on: that kernel rotates and stores itself)."""
        if not (self.fused_rope and self.use_triton is not False and "rows" in meta.extra) \
                or (self.fused_decode and meta.extra.get("decode")):
            return None
        k_pool, v_pool = meta.kv[layer]
        scratch = meta.extra.get("scratch")
        return (cos_table, sin_table, meta.batch.positions, meta.slots, k_pool, v_pool,
                -1 if scratch is None else scratch, heads)

    def attend_rotated(self, q: torch.Tensor, layer: int, meta: AttnMetadata) -> torch.Tensor:
        """forward_qkv after its rope_store: q (N, H, D) rotated, k and v in the pools already."""
        tables, row_seq, limits = meta.extra["rows"]
        k_pool, v_pool = meta.kv[layer]
        return attend_rows(q, k_pool, v_pool, tables, row_seq, limits, meta.batch.block_size, q.shape[-1] ** -0.5,
                           self.max_ctx)

    def forward(self, q, k, v, layer, meta):
        scratch = meta.extra.get("scratch")
        if scratch is not None:                              # a graph bucket: padding rows write the scratch slot
            k_pool, v_pool = meta.kv[layer]
            slots = torch.where(meta.slots >= 0, meta.slots, scratch)
            k_pool.index_copy_(0, slots, k.to(k_pool.dtype))
            v_pool.index_copy_(0, slots, v.to(v_pool.dtype))
        else:
            self.write_kv(k, v, layer, meta)
        H, D = q.shape[1], q.shape[2]
        KV = k.shape[1]
        fresh = meta.extra.get("fresh")
        if fresh is not None:
            B, T, pad, mask = fresh
            if pad is not None and B * H * T * T > self.padded_scores_max:   # too large a padded score tensor:
                outs, at = [], 0                                # one causal SDPA per sequence instead
                for n in meta.batch.query_lens:
                    o = F.scaled_dot_product_attention(q[at:at + n].transpose(0, 1).unsqueeze(0),
                                                       k[at:at + n].transpose(0, 1).unsqueeze(0),
                                                       v[at:at + n].transpose(0, 1).unsqueeze(0), is_causal=True,
                                                       enable_gqa=KV != H)                  # (1, H, n, D)
                    outs.append(o[0].transpose(0, 1))
                    at += n
                return torch.cat(outs)
            if pad is not None:
                q = q.new_zeros(B * T, H, D).index_copy_(0, pad, q)
                k = k.new_zeros(B * T, KV, D).index_copy_(0, pad, k)
                v = v.new_zeros(B * T, KV, D).index_copy_(0, pad, v)
            o = F.scaled_dot_product_attention(q.view(B, T, H, D).transpose(1, 2), k.view(B, T, KV, D).transpose(1, 2),
                                               v.view(B, T, KV, D).transpose(1, 2), attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=KV != H)   # (B, H, T, D)
            o = o.transpose(1, 2).reshape(B * T, H, D)
            return o if pad is None else o.index_select(0, pad)
        tables, row_seq, limits = meta.extra["rows"]
        k_pool, v_pool = meta.kv[layer]
        bs = meta.batch.block_size
        if self._triton(q):
            try:
                return attend_rows(q, k_pool, v_pool, tables, row_seq, limits, bs, D ** -0.5, self.max_ctx)
            except Exception as e:           # a Triton that cannot build for this card: the reference, said once
                if self.use_triton:
                    raise
                import logging
                logging.getLogger("afford").warning("the Triton paged-attention kernel failed (%s: %s); the torch "
                                                    "reference runs instead (slower)", type(e).__name__, e)
                self.use_triton = False
        return attend_rows_reference(q, k_pool, v_pool, tables, row_seq, limits, bs, D ** -0.5)
