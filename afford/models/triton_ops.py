"""Two fused elementwise kernels for the CUDA decode step (Triton), each replacing two torch operators:
- `add_rmsnorm(x, r, norm)`: the residual add and the next RMSNorm (x + r is rounded to the model's dtype,
  as torch's add rounds, then normalized with fp32 accumulation, as F.rms_norm does);
- `silu_mul(gate_up)`: SwiGLU's silu(gate) * up (silu rounded to the model's dtype before the product,
  as torch's two operators round).
The kernels they replace took ~106 us of a 1.22 ms batch-1 step of a 1.1 B Llama on an H200 (residual
adds 47, SiLU 34, the product 25; gpu_decode.py's kernel profile); with them a captured batch-1 step
replays in 1.16 ms instead of 1.33 (1.09-1.14x tok/s over two runs; 1.08-1.20x at batch 64). On by
default on CUDA where Triton is installed (`model.fused_cuda`; False: torch's operators);
tests/test_gpu.py checks the logits against torch's operators, tests/test_graphs.py runs the kernels in
Triton's CPU interpreter.
"""
from __future__ import annotations

import torch

from afford.models.triton_lib import available, tl, triton  # noqa: F401  (available: re-exported)

if triton is not None:
    @triton.jit
    def _add_rmsnorm_kernel(X, R, W, XO, YO, eps, stride_x, stride_r, stride_o, D: tl.constexpr,
                            D_PAD: tl.constexpr):
        row = tl.program_id(0)
        d = tl.arange(0, D_PAD)
        m = d < D
        x = tl.load(X + row * stride_x + d, mask=m, other=0.0)
        r = tl.load(R + row * stride_r + d, mask=m, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(XO + row * stride_o + d, s, mask=m)
        sf = s.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / D + eps)
        w = tl.load(W + d, mask=m, other=0.0).to(tl.float32)
        tl.store(YO + row * stride_o + d, (sf * rstd * w).to(x.dtype), mask=m)

    @triton.jit
    def _silu_mul_kernel(GU, Y, stride_gu, stride_y, F: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = col < F
        g = tl.load(GU + row * stride_gu + col, mask=m, other=0.0)
        u = tl.load(GU + row * stride_gu + F + col, mask=m, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        tl.store(Y + row * stride_y + col, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)


def add_rmsnorm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, r (N, D) -> (x + r, rmsnorm(x + r) * weight), both (N, D) in x's dtype."""
    N, D = x.shape
    xo, yo = torch.empty_like(x), torch.empty_like(x)
    if N:
        _add_rmsnorm_kernel[(N,)](x, r, weight, xo, yo, eps, x.stride(0), r.stride(0), xo.stride(0), D=D,
                                  D_PAD=triton.next_power_of_2(D), num_warps=4 if D <= 4096 else 8)
    return xo, yo


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (N, 2F) -> silu(gate) * up (N, F)."""
    N, F2 = gate_up.shape
    F = F2 // 2
    y = torch.empty(N, F, dtype=gate_up.dtype, device=gate_up.device)
    if N:
        BLOCK = 1024
        _silu_mul_kernel[(N, triton.cdiv(F, BLOCK))](gate_up, y, gate_up.stride(0), y.stride(0), F=F, BLOCK=BLOCK,
                                                    num_warps=4)
    return y
