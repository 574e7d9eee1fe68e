"""What one decode matmul costs here: bytes-per-second of weight reading for F.linear on an (out, in)
weight vs x @ W^T on a pre-transposed one, fp32 and bf16, 1 and 8 rows, at the 34 M Llama's shapes.
This is the ceiling the decode benchmarks run into.

    python benchmarks/matmul_micro.py
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from common import save

SHAPES = [(1536, 512), (2752, 512), (512, 1376), (8192, 512)]     # qkv, gate|up, down, lm_head of llama-34m


def bench(f, n=200):
    for _ in range(20):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n


def main():
    torch.set_num_threads(2)
    rows = []
    for dt in (torch.float32, torch.bfloat16):
        for o, i in SHAPES:
            W = torch.randn(o, i, dtype=dt)
            Wt = W.t().contiguous()
            for m in (1, 8):
                x = torch.randn(m, i, dtype=dt)
                gb = W.numel() * W.element_size() / 1e9
                row = {"dtype": str(dt).replace("torch.", ""), "out": o, "in": i, "rows": m,
                       "F_linear_GB_s": round(gb / bench(lambda: F.linear(x, W)), 1),
                       "x_at_Wt_GB_s": round(gb / bench(lambda: x @ Wt), 1)}
                rows.append(row)
                print(row, flush=True)
    print(f"wrote {save('matmul_micro', {'rows': rows})}")


if __name__ == "__main__":
    main()
