"""Weight-only int4 matmul for few rows on CUDA (Triton), an alternative to torch's tinygemm
`_weight_int4pack_mm`, which moved a 1.1 B model's int4 weights at ~1.3 TB/s at batch 1 on an H200 (a
third of the card's copy rate; benchmarks/gpu_decode.py). Opt-in (`quant.CUDA_INT4_KERNEL = "triton"` or
AFFORD_INT4_KERNEL=triton or auto, see quant.py): on an H200 it lost to tinygemm (gpu_decode.py's arms).

Layout: two codes per byte along K (even k in the low nibble), w = (q - 8) * s + z per (row, group of K).
A program takes BLOCK_N output rows and streams their codes in K-tiles inside one group, so each tile's
product factors as s * (x . (q - 8)) + z * sum(x): the codes minus 8 are exact in bf16 and go through the
tensor cores, the scale and zero point are applied once per tile in fp32.

Few rows (M <= 4, a batch-1 decode step) take `_w4_gemv` instead: no tensor cores (a 16-row tile would
be 15/16 padding), many small programs (BLOCK_N rows each) so that enough loads are in flight to stream
the codes at the card's rate; each K-tile is unpacked to fp32 in x's order and its products are summed
per scale group, then scaled: s * sum(x * (q - 8)) + z * sum(x) per (row, group).
"""
from __future__ import annotations

import os

import torch

from afford.models.triton_lib import available, tl, triton  # noqa: F401  (available: re-exported)

if triton is not None:
    @triton.jit
    def _w4_kernel(X, P, S, Z, Y, M, N, n_groups, group, stride_xm, stride_pn, stride_ym, K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.arange(0, BLOCK_K // 2)
        mm, nm = rm < M, rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            b = tl.load(P + rn[:, None] * stride_pn + (k0 // 2 + j)[None, :], mask=nm[:, None], other=0)
            xe = tl.load(X + rm[:, None] * stride_xm + (k0 + 2 * j)[None, :], mask=mm[:, None], other=0.0)
            xo = tl.load(X + rm[:, None] * stride_xm + (k0 + 2 * j + 1)[None, :], mask=mm[:, None], other=0.0)
            lo = ((b & 15).to(tl.int32) - 8).to(xe.dtype)                           # codes of even k, exact
            hi = ((b >> 4).to(tl.int32) - 8).to(xe.dtype)                           # codes of odd k
            part = tl.dot(xe, tl.trans(lo), out_dtype=tl.float32) + tl.dot(xo, tl.trans(hi), out_dtype=tl.float32)
            xs = tl.sum(xe.to(tl.float32) + xo.to(tl.float32), axis=1)                # (BLOCK_M,)
            g = k0 // group
            s = tl.load(S + rn * n_groups + g, mask=nm, other=0.0)
            z = tl.load(Z + rn * n_groups + g, mask=nm, other=0.0)
            acc += part * s[None, :] + xs[:, None] * z[None, :]
        tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty), mask=mm[:, None] & nm[None, :])


    @triton.jit
    def _w4_gemv(X, P, S, Z, Y, N, n_groups, stride_xm, stride_pn, stride_ym, K: tl.constexpr, GROUP: tl.constexpr,
                 BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # one tile spans GT scale groups of L columns each: GT = 1 where the group holds whole tiles
        GT: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
        L: tl.constexpr = BLOCK_K // GT
        pid_n = tl.program_id(0)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = rn < N
        rm = tl.arange(0, BM)
        j = tl.arange(0, BLOCK_K // 2)
        k = tl.arange(0, BLOCK_K)
        gt = tl.arange(0, GT)
        acc = tl.zeros((BM, BLOCK_N, GT), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            b = tl.load(P + rn[:, None] * stride_pn + (k0 // 2 + j)[None, :], mask=nm[:, None], other=0)
            lo = (b & 15).to(tl.float32) - 8.0
            hi = (b >> 4).to(tl.float32) - 8.0
            w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))                    # codes - 8, in x's order
            x = tl.load(X + rm[:, None] * stride_xm + (k0 + k)[None, :]).to(tl.float32)   # (BM, BLOCK_K)
            part = tl.sum(tl.reshape(x[:, None, :] * w[None, :, :], (BM, BLOCK_N, GT, L)), axis=3)
            xs = tl.sum(tl.reshape(x, (BM, GT, L)), axis=2)                        # (BM, GT)
            g = k0 // GROUP + gt
            s = tl.load(S + rn[:, None] * n_groups + g[None, :], mask=nm[:, None], other=0.0)   # (BLOCK_N, GT)
            z = tl.load(Z + rn[:, None] * n_groups + g[None, :], mask=nm[:, None], other=0.0)
            acc += part * s[None, :, :] + xs[:, None, :] * z[None, :, :]
        y = tl.sum(acc, axis=2)                                                    # (BM, BLOCK_N)
        tl.store(Y + rm[:, None] * stride_ym + rn[None, :], y.to(Y.dtype.element_ty), mask=nm[None, :])


    @triton.jit
    def _w4_gemv_row(X, P, S, Z, Y, N, n_groups, stride_pn, K: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # one row of x; the codes widen to fp32 without a conversion instruction: the nibble as the low
        # mantissa bits of 2^23 (0x4B000000), minus 2^23 + 8 -> q - 8 exactly; even and odd k apart
        GT: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
        H: tl.constexpr = BLOCK_K // 2 // GT
        pid_n = tl.program_id(0)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = rn < N
        j = tl.arange(0, BLOCK_K // 2)
        gt = tl.arange(0, GT)
        acc = tl.zeros((BLOCK_N, GT), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            b = tl.load(P + rn[:, None] * stride_pn + (k0 // 2 + j)[None, :], mask=nm[:, None], other=0).to(tl.uint32)
            lo = ((b & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            hi = ((b >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            xe = tl.load(X + k0 + 2 * j).to(tl.float32)
            xo = tl.load(X + k0 + 2 * j + 1).to(tl.float32)
            part = tl.sum(tl.reshape(lo * xe[None, :] + hi * xo[None, :], (BLOCK_N, GT, H)), axis=2)
            xs = tl.sum(tl.reshape(xe + xo, (GT, H)), axis=1)
            g = k0 // GROUP + gt
            s = tl.load(S + rn[:, None] * n_groups + g[None, :], mask=nm[:, None], other=0.0)   # (BLOCK_N, GT)
            z = tl.load(Z + rn[:, None] * n_groups + g[None, :], mask=nm[:, None], other=0.0)
            acc += part * s + xs[None, :] * z
        tl.store(Y + rn, tl.sum(acc, axis=1).to(Y.dtype.element_ty), mask=nm)


# The few-row kernel's tiles: (BLOCK_N, BLOCK_K, num_warps, num_stages, variant); variant 2 runs one row
# through `_w4_gemv_row`, 1 (and any M > 1) through `_w4_gemv`. The default is the best of
# benchmarks/gpu_decode.py's sweep on an H200 over the 1.1 B Llama's four matrices (26.1 us a layer against
# tinygemm's 22.3; variant 1's best 35.3); AFFORD_INT4_GEMV="4,2048,4,1,1" overrides it.
GEMV_CONFIG = tuple(int(v) for v in os.environ.get("AFFORD_INT4_GEMV", "8,1024,4,2,2").split(","))
GEMV_MAX_ROWS = 4


def gemv_block_k(in_features: int, group: int, want: int) -> int | None:
    """A power-of-two K-tile <= want that divides K and either divides the group or is a multiple of it."""
    b = want
    while b >= 32:
        if in_features % b == 0 and (group % b == 0 or (b % group == 0 and group & (group - 1) == 0)):
            return b
        b //= 2
    return None


def block_k(in_features: int, group: int) -> int | None:
    """A K-tile inside one group: the largest power of two from 512 down to 32 dividing the group."""
    return next((b for b in (512, 256, 128, 64, 32) if group % b == 0 and in_features % b == 0), None)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) in 0..15 -> (N, K / 2) uint8, even k in the low nibble."""
    u = codes.to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
            config: tuple | None = None) -> torch.Tensor:
    """x (M, K) bf16 / fp16, packed (N, K / 2) uint8, scales / zeros (N, K / group) fp32 -> (M, N) in x's dtype."""
    M, K = x.shape
    N = packed.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M <= GEMV_MAX_ROWS:
        bn, bk, warps, stages, variant = (tuple(config or GEMV_CONFIG) + (1,))[:5]
        bk = gemv_block_k(K, group, bk)
        if bk is not None and M == 1 and variant == 2:
            _w4_gemv_row[(triton.cdiv(N, bn),)](x, packed, scales, zeros, y, N, scales.shape[1], packed.stride(0),
                                                K=K, GROUP=group, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                                                num_stages=stages)
            return y
        if bk is not None:
            bm = 1 if M == 1 else 2 if M == 2 else 4
            if bm != M:                     # the kernel reads BM rows: pad with zeros (dropped below)
                x = torch.cat([x, x.new_zeros(bm - M, K)])
                y = torch.empty(bm, N, dtype=x.dtype, device=x.device)
            _w4_gemv[(triton.cdiv(N, bn),)](x, packed, scales, zeros, y, N, scales.shape[1], x.stride(0),
                                            packed.stride(0), y.stride(0), K=K, GROUP=group, BM=bm, BLOCK_N=bn,
                                            BLOCK_K=bk, num_warps=warps, num_stages=stages)
            return y[:M]
    BLOCK_M, BLOCK_N = 16, 16
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M))
    _w4_kernel[grid](x, packed, scales, zeros, y, M, N, scales.shape[1], group, x.stride(0), packed.stride(0),
                     y.stride(0), K=K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k(K, group),
                     num_warps=4, num_stages=3)
    return y
