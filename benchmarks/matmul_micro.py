"""What the decode matmuls cost here: one pass over every weight matrix of the 34 M Llama (8 layers of
q|k|v, o, gate|up, down, plus the LM head: 118 MB in fp32, so it streams from memory as decoding does),
for 1-16 rows, three ways of multiplying:

- F.linear(x, W) on W (out, in)             -- what transformers does
- x @ W^T on a pre-transposed (in, out) copy -- afford's one-row fp32 path
- (W @ x^T)^T on W (out, in), made contiguous -- MKL's sgemm the faster way round (afford's 2+ row path
  until oneDNN's packed weight replaced it)
- x @ W^T on (in, out) split in two halves of `out`, (2, in, out/2), as one batched matmul -- afford's
  one-row fp32 path (two GEMVs, one per core)
- oneDNN's linear on its pre-packed weight (torch.ops.mkldnn._linear_pointwise) -- afford's 2+ row path
- numpy's x @ W^T (its own BLAS, OpenBLAS in the numpy wheel) on the same (in, out) copy -- another
  library's GEMV, streamed alone (in the model, its thread pool and torch's compete for the 2 cores)

`sum_read_GB_s` is torch.sum over the same weights: how fast this machine streams them at all.

This is the ceiling the decode benchmarks run into and the measurement behind PackedLinear's choice.

    python benchmarks/matmul_micro.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from common import per_call as bench
from common import save

LAYERS, HIDDEN = 8, 512
SHAPES = [(1536, 512), (512, 512), (2752, 512), (512, 1376)]     # q|k|v, o, gate|up, down (out, in)
HEAD = (8192, 512)


def main():
    torch.set_num_threads(2)
    rows = []
    for dt in (torch.float32, torch.bfloat16):
        Ws = [torch.randn(o, i, dtype=dt) for _ in range(LAYERS) for o, i in SHAPES] + [torch.randn(*HEAD, dtype=dt)]
        Wts = [w.t().contiguous() for w in Ws]
        Wns = [w.float().numpy() for w in Wts] if dt == torch.float32 else None
        Whalf = [w.t().reshape(w.shape[1], 2, w.shape[0] // 2).permute(1, 0, 2).contiguous() for w in Ws]
        Wpk = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in Ws] if dt == torch.float32 else None
        gb = sum(w.numel() * w.element_size() for w in Ws) / 1e9
        read = gb / bench(lambda: [w.sum() for w in Ws], 10 if dt == torch.float32 else 3)   # plain streaming read
        for m in (1, 2, 4, 8, 16):
            xs = {i: torch.randn(m, i, dtype=dt) for i in (512, 1376)}
            xn = {i: x.float().numpy() for i, x in xs.items()}
            ways = {"F_linear": lambda: [F.linear(xs[w.shape[1]], w) for w in Ws],
                    "x_at_Wt": lambda: [xs[w.shape[0]] @ w for w in Wts],
                    "W_at_xT": lambda: [torch.mm(w, xs[w.shape[1]].t()).t().contiguous() for w in Ws],
                    "x_at_Wt_halves": lambda: [torch.matmul(xs[w.shape[1]].unsqueeze(0), w).transpose(0, 1)
                                               .reshape(m, -1) for w in Whalf]}
            if Wpk is not None:
                ways["onednn_packed"] = lambda: [torch.ops.mkldnn._linear_pointwise(
                    xs[w.shape[1]], p, None, "none", [], "") for w, p in zip(Ws, Wpk)]
            if Wns is not None:
                ways["numpy_x_at_Wt"] = lambda: [xn[w.shape[0]] @ w for w in Wns]
            row = {"dtype": str(dt).replace("torch.", ""), "rows": m, "MB": round(gb * 1e3),
                   "sum_read_GB_s": round(read, 1)}
            for name, f in ways.items():
                row[f"{name}_GB_s"] = round(gb / bench(f, 10 if dt == torch.float32 else 3), 1)
            rows.append(row)
            print(row, flush=True)
    print(f"wrote {save('matmul_micro', {'rows': rows})}")


if __name__ == "__main__":
    main()
