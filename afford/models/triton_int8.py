"""Weight-only int8 matmul for CUDA (Triton): y = x @ (q * s)^T with int8 codes q (N, K) and a bf16
scale per (output row, group of K). torch's `_weight_int8pack_mm` runs on CUDA but took 14.5 ms per
decode step of a 1.1 B model against bf16's 3.5 ms (benchmarks/gpu_decode.py, H200): this kernel reads
the codes once, widens them to bf16 in registers (int8 is exact in bf16) and multiplies on tensor cores
with fp32 accumulation, one K-tile (inside one scale group) at a time.
"""
from __future__ import annotations

import torch

from afford.models.triton_lib import available, tl, triton  # noqa: F401  (available: re-exported)

if triton is not None:
    @triton.jit
    def _w8_kernel(X, W, S, Y, M, N, n_groups, group, stride_xm, stride_wn, stride_ym, K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):      # K is a constant of the kernel: a for loop Triton pipelines
            x = tl.load(X + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=(rm < M)[:, None], other=0.0)
            w = tl.load(W + rn[:, None] * stride_wn + (k0 + rk)[None, :], mask=(rn < N)[:, None], other=0)
            part = tl.dot(x, tl.trans(w.to(x.dtype)))                                     # (BLOCK_M, BLOCK_N)
            s = tl.load(S + rn * n_groups + k0 // group, mask=rn < N, other=0.0).to(tl.float32)
            acc += part * s[None, :]
        tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
                 mask=(rm < M)[:, None] & (rn < N)[None, :])


def block_k(in_features: int, group: int) -> int | None:
    """The K-tile: a power of two from 256 down to 16 that divides the group (so a tile sees one scale)."""
    return next((b for b in (256, 128, 64, 32, 16) if group % b == 0 and in_features % b == 0), None)


def int8_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """x (M, K) bf16, codes (N, K) int8, scales (N, K / group) -> (M, N) bf16."""
    M, K = x.shape
    N = codes.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    BLOCK_M = 16 if M <= 16 else 32 if M <= 32 else 64
    BLOCK_N = 16                         # many programs: a one-row product is bound by how many loads fly
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M))
    _w8_kernel[grid](x, codes, scales, y, M, N, scales.shape[1], group, x.stride(0), codes.stride(0), y.stride(0), K=K,
                     BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k(K, group), num_warps=4,
                     num_stages=4 if BLOCK_M <= 16 else 2)      # fewer stages where tiles are large: shared memory
    return y
