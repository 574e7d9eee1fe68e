"""The one-row (batch-1 decode) product of a dense bf16 / fp16 / fp32 matrix on CUDA (Triton), with the
work around it fused in: `gemv(x, w, add=a, norm=g, swiglu=True)` computes, in ONE kernel,

    h = x + a                          (the residual add, rounded to x's dtype as torch's add rounds)
    y = (w @ (h * g)) * rsqrt(mean(h^2) + eps)      (RMSNorm folded around the product)
    y = silu(y_gate) * y_up            (SwiGLU, when w is gate|up stacked: gate rows, then up rows)

and returns y and h (the new residual stream). Why: in a batch-1 CUDA-graph step of a 1.1 B Llama on an
H200, cuBLAS runs q|k|v and o (N = 2048-2560) with 64-row tiles, i.e. 32-40 thread blocks on a card of
132 SMs, at 1.5-1.8 TB/s, and each layer adds two add + RMSNorm launches, SwiGLU's product and a split-K
reduce (benchmarks/gpu_decode.py's kernel profile, run 6). Here a program takes BLOCK_N rows and streams
them over the whole K (hundreds of programs in flight), accumulates x * w in a (BLOCK_N, BLOCK_K) fp32
tile, and reads h in the same loop for the norm's sum of squares, so the norm costs no extra pass: its
1 / rms multiplies the row sums at the end (the same formula as RMSNorm then the product; the rounding
differs only in that the normed input is not rounded to bf16 before the product).

Used by `Transformer._hidden_gemv` (one-row forwards on CUDA, `model.fused_gemv`); the tiles per matrix
role are GEMV_CONFIGS (None: cuBLAS for that role), picked on the card by gpu_decode.py's `gemv_sweep`.
tests/test_graphs.py runs the kernel in Triton's interpreter; tests/test_gpu.py on the card.
"""
from __future__ import annotations

import torch

from afford.models.triton_lib import available, tl, triton  # noqa: F401  (available: re-exported)

# (BLOCK_N, BLOCK_K, num_warps, num_stages) per matrix role; None: F.linear (cuBLAS) for that role
GEMV_CONFIGS: dict[str, tuple[int, int, int, int] | None] = {
    "qkv": (8, 1024, 4, 1), "o": (8, 1024, 4, 1), "gate_up": (4, 1024, 4, 1), "down": (8, 1024, 4, 1)}
# the tiles gpu_decode.py's gemv_sweep times per role on the card (and tests/test_gpu.py checks)
SWEEP_CONFIGS = [(2, 2048, 4, 1), (4, 1024, 4, 1), (4, 2048, 4, 1), (8, 512, 4, 1), (8, 1024, 4, 1), (8, 2048, 8, 1),
                 (16, 512, 4, 1), (16, 512, 8, 1), (4, 512, 2, 1), (8, 512, 4, 3), (4, 1024, 4, 2), (16, 256, 4, 3)]

if triton is not None:
    @triton.jit
    def _gemv_kernel(X, A, XO, G, W, Y, N, F_OFF, eps, stride_w, K: tl.constexpr,
                     HAS_ADD: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        kk = tl.arange(0, BLOCK_K)
        rows = W + n[:, None].to(tl.int64) * stride_w
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        ss = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            if EVEN_K:                      # no mask along K: the loads stay 16-byte vectors
                x = tl.load(X + k)
                if HAS_ADD:
                    x = (x.to(tl.float32) + tl.load(A + k).to(tl.float32)).to(x.dtype)
                    tl.store(XO + k, x, mask=(k < K) & (pid == 0))
                xf = x.to(tl.float32)
                if NORM:
                    ss += xf * xf
                    xf = xf * tl.load(G + k).to(tl.float32)
                w = tl.load(rows + k[None, :], mask=nm[:, None], other=0.0)
                acc += w.to(tl.float32) * xf[None, :]
                if SWIGLU:
                    u = tl.load(rows + F_OFF * stride_w + k[None, :], mask=nm[:, None], other=0.0)
                    acc_u += u.to(tl.float32) * xf[None, :]
            else:
                km = k < K
                x = tl.load(X + k, mask=km, other=0.0)
                if HAS_ADD:
                    x = (x.to(tl.float32) + tl.load(A + k, mask=km, other=0.0).to(tl.float32)).to(x.dtype)
                    tl.store(XO + k, x, mask=km & (pid == 0))
                xf = x.to(tl.float32)
                if NORM:
                    ss += xf * xf
                    xf = xf * tl.load(G + k, mask=km, other=0.0).to(tl.float32)
                m2 = nm[:, None] & km[None, :]
                w = tl.load(rows + k[None, :], mask=m2, other=0.0)
                acc += w.to(tl.float32) * xf[None, :]
                if SWIGLU:
                    u = tl.load(rows + F_OFF * stride_w + k[None, :], mask=m2, other=0.0)
                    acc_u += u.to(tl.float32) * xf[None, :]
        r = 1.0
        if NORM:
            r = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
        y = tl.sum(acc, axis=1) * r
        dt = Y.dtype.element_ty
        if SWIGLU:                          # silu rounded to the dtype before the product, as torch's operators
            g = y.to(dt).to(tl.float32)
            act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
            y = act * (tl.sum(acc_u, axis=1) * r).to(dt).to(tl.float32)
        tl.store(Y + n, y.to(dt), mask=nm)


def gemv(x: torch.Tensor, w: torch.Tensor, config: tuple[int, int, int, int], *, add: torch.Tensor | None = None,
         norm: torch.Tensor | None = None, eps: float = 0.0, swiglu: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (1, K), w (N, K) contiguous rows -> (y, h): y (1, N) -- (1, N / 2) with swiglu -- and h = x + add
    (x itself without add), both in x's dtype. norm: RMSNorm's weight (K,) applied to h before the product."""
    if x.shape[0] != 1 or x.dim() != 2:
        raise ValueError(f"gemv takes one row (1, K); got {tuple(x.shape)}")
    N, K = w.shape
    if w.stride(1) != 1 or x.shape[1] != K:
        raise ValueError(f"gemv needs w (N, K) with contiguous rows and x (1, K); got {tuple(w.shape)}, {tuple(x.shape)}")
    x = x.contiguous()
    h = torch.empty_like(x) if add is not None else x
    F = N // 2 if swiglu else N
    y = torch.empty(1, F, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = config
    bk = min(bk, triton.next_power_of_2(K))
    _gemv_kernel[(triton.cdiv(F, bn),)](
        x, add.contiguous() if add is not None else x, h, norm if norm is not None else x, w, y, F, F, eps,
        w.stride(0), K=K, HAS_ADD=add is not None, NORM=norm is not None, SWIGLU=swiglu, BLOCK_N=bn, BLOCK_K=bk,
        EVEN_K=K % bk == 0, num_warps=warps, num_stages=stages)
    return y, h
