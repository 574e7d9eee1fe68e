"""A design that did not pay: torch.compile (inductor, dynamic shapes) of one layer's dense parts
(RMSNorm + q|k|v matmul + RoPE; o-projection + residual + RMSNorm + SwiGLU MLP + residual) against
the same functions eager, one row and four rows, at the bundled draft's width (128) and the 34 M
Llama's (512). Reports microseconds per call, the compile time and the largest difference.

    python benchmarks/compile_probe.py

Writes benchmarks/results/compile_probe.json.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from common import per_call, save


def bench(f, n=500):
    return per_call(f, n, warm=20) * 1e6


def pre(x, ln_w, wqkv_t, cos, sin, H: int, KV: int, D: int):
    h = F.rms_norm(x, (x.shape[-1],), ln_w, 1e-6)
    qkv = (h @ wqkv_t).view(-1, H + 2 * KV, D)                                  # (N, H + 2KV, D)
    qk = qkv[:, :H + KV]
    qk = qk * cos + torch.cat((-qk[..., D // 2:], qk[..., :D // 2]), -1) * sin
    return qk[:, :H], qk[:, H:], qkv[:, H + KV:]


def post(x, o, wo_t, ln2_w, wgu_t, wd_t):
    x = x + o @ wo_t
    g, u = (F.rms_norm(x, (x.shape[-1],), ln2_w, 1e-6) @ wgu_t).chunk(2, -1)
    return x + (F.silu(g) * u) @ wd_t


def main():
    torch.set_num_threads(2)
    rows = []
    for hid, H, inter in ((128, 4, 352), (512, 8, 1376)):
        D = hid // H
        ln, wqkv, wo = torch.randn(hid), torch.randn(hid, 3 * hid), torch.randn(hid, hid)
        wgu, wd = torch.randn(hid, 2 * inter), torch.randn(inter, hid)
        cpre, cpost = torch.compile(pre, dynamic=True), torch.compile(post, dynamic=True)
        t0 = time.perf_counter()
        for n in (1, 3):                                  # compile for the dynamic row count up front
            cpre(torch.randn(n, hid), ln, wqkv, torch.randn(n, 1, D), torch.randn(n, 1, D), H, H, D)
            cpost(torch.randn(n, hid), torch.randn(n, hid), wo, ln, wgu, wd)
        compile_s = time.perf_counter() - t0
        for n in (1, 4):
            x, o, cos, sin = torch.randn(n, hid), torch.randn(n, hid), torch.randn(n, 1, D), torch.randn(n, 1, D)
            args_pre, args_post = (x, ln, wqkv, cos, sin, H, H, D), (x, o, wo, ln, wgu, wd)
            diff = max(max((a - b).abs().max().item() for a, b in zip(cpre(*args_pre), pre(*args_pre))),
                       (cpost(*args_post) - post(*args_post)).abs().max().item())
            r = {"hidden": hid, "rows": n, "eager_us": round(bench(lambda: pre(*args_pre)) + bench(lambda: post(*args_post))),
                 "compiled_us": round(bench(lambda: cpre(*args_pre)) + bench(lambda: cpost(*args_post))),
                 "compile_s": round(compile_s, 1), "max_abs_diff": diff}
            r["compiled_over_eager"] = round(r["compiled_us"] / r["eager_us"], 2)
            rows.append(r)
            print(r, flush=True)
    print(f"wrote {save('compile_probe', {'rows': rows})}")


if __name__ == "__main__":
    main()
