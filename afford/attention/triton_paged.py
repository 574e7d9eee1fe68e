"""Paged attention for query rows, read in place through the block table (Triton).

Why hand-written: the maintained paged-decode kernels (FlashInfer, flash-attn's `flash_attn_with_kvcache`)
ship no wheel for the torch + CUDA 13 build our GPU machines run and cannot be fetched there, and
FlashInfer's JIT build takes minutes; Triton comes with every CUDA build of torch. The kernel is the
textbook one (online softmax, flash-decoding without the split): one program per (query row, K/V
head) takes the G query heads that share that K/V head (GQA: the K/V are read once for all of them)
and walks the sequence's blocks in chunks of BLOCK_N tokens, looking each token's block up in the table --
no gather, no padded (B, L) copy, and the loop bound is read from memory, so one CUDA graph serves any
context length.

Row r belongs to sequence `row_seq[r]` (a row of `tables`) and attends to that sequence's first
`limits[r]` tokens (its position + 1: decode, verify and prefill chunks alike).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:                     # CPU-only installs: the torch reference runs instead
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _rows_kernel(Q, K, V, O, tables, row_seq, limits, scale,
                     stride_qr, stride_qh, stride_ks, stride_kh, stride_or, stride_oh, stride_tb,
                     BS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        r = tl.program_id(0)
        kvh = tl.program_id(1)
        seq = tl.load(row_seq + r).to(tl.int64)
        n_ctx = tl.load(limits + r)
        g = tl.arange(0, GP)                 # the G query heads sharing this K/V head (padded to GP >= 16)
        d = tl.arange(0, D_PAD)
        qm = (g < G)[:, None] & (d < D)[None, :]
        heads = (kvh * G + g)[:, None]
        q = tl.load(Q + r * stride_qr + heads * stride_qh + d[None, :], mask=qm, other=0.0).to(tl.float32) * scale
        m = tl.full((GP,), float("-inf"), tl.float32)
        l_sum = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D_PAD), tl.float32)
        start = n_ctx * 0                    # loop-carried, of n_ctx's type
        while start < n_ctx:                 # (a while loop: Triton's interpreter, the CPU tests, runs it too)
            n = start + tl.arange(0, BLOCK_N)
            valid = n < n_ctx
            page = tl.load(tables + seq * stride_tb + n // BS, mask=valid, other=0).to(tl.int64)
            slot = page * BS + n % BS                                                     # (BLOCK_N,)
            kv_off = slot[:, None] * stride_ks + kvh * stride_kh + d[None, :]
            km = valid[:, None] & (d < D)[None, :]
            k = tl.load(K + kv_off, mask=km, other=0.0).to(tl.float32)                    # (BLOCK_N, D_PAD)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")                            # (GP, BLOCK_N)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(V + kv_off, mask=km, other=0.0).to(tl.float32)
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m = m_new
            start += BLOCK_N
        o = acc / l_sum[:, None]
        tl.store(O + r * stride_or + heads * stride_oh + d[None, :], o.to(O.dtype.element_ty), mask=qm)


def attend_rows(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                row_seq: torch.Tensor, limits: torch.Tensor, block_size: int, scale: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """q (R, H, D), pools (slots, KV, D), tables (B, M) int32, row_seq / limits (R,) int32 -> (R, H, D)."""
    R, H, D = q.shape
    KV = k_pool.shape[1]
    out = torch.empty_like(q) if out is None else out
    if R == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    G = H // KV
    _rows_kernel[(R, KV)](q, k_pool, v_pool, out, tables, row_seq, limits, scale,
                          q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
                          out.stride(0), out.stride(1), tables.stride(0),
                          BS=block_size, G=G, GP=max(16, triton.next_power_of_2(G)), D=D,
                          D_PAD=max(16, triton.next_power_of_2(D)), BLOCK_N=64, num_warps=4)
    return out
