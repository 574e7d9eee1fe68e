"""Which product for 2-8 rows (a verify forward of 1 + k tokens, a small decode batch): oneDNN's packed
weight or MKL's (W @ x^T)^T, per model, interleaved in one process. One sequence with a 128-token
context feeds T tokens per forward (logits for all T), 24 forwards a round, rounds alternating between
the two settings of the same loaded model (PackedLinear.mm_rows = 0: oneDNN for every 2+ rows; = 8: MKL
up to 8 rows). afford takes MKL for up to CACHE_RESIDENT_MM_ROWS rows (models/transformer.py) when a
model's weights fit in the last-level cache.

    python benchmarks/verify_rows.py [--rounds 9] [--rows 2 3 5 8]

Writes benchmarks/results/verify_rows.json.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import random_llama, save


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 3, 5, 8])
    a = ap.parse_args()
    torch.set_num_threads(2)
    from afford.core.runner import ModelRunner
    from afford.kv.paged import BlockPool
    from afford.models.loader import load_for_inference, resolve_model_path
    from afford.models.transformer import PackedLinear, last_level_cache_bytes
    models = {"default draft": resolve_model_path("default", "draft"),
              "default target": resolve_model_path("default", "target"),
              "llama-34m": random_llama(Path(tempfile.mkdtemp()) / "llama-34m", "llama-34m")}
    prompt, n = list(range(5, 133)), 24
    rows = []
    for name, path in models.items():
        model = load_for_inference(path, "cpu", "float32")
        lins = [m for m in model.modules() if isinstance(m, PackedLinear)]
        runner = ModelRunner(model, BlockPool(64, 16))
        pool = runner.pool

        def per_forward(t, mm_rows):
            for m in lins:
                m.mm_rows = mm_rows
            runner.native = None                               # rebuilt: the C++ side copies mm_rows
            runner.__init__(model, pool)
            pool.prepare_write(0, len(prompt) + n + t)
            runner.forward([0], [0], [prompt])
            start = time.perf_counter()
            for i in range(n):
                runner.forward([0], [len(prompt) + i], [[7] * t], [list(range(t))])
            dt = (time.perf_counter() - start) / n
            pool.free(0)
            return dt

        for t in a.rows:
            dnn, mkl = [], []
            for _ in range(a.rounds):
                dnn.append(per_forward(t, 0))
                mkl.append(per_forward(t, 8))
            r = {"model": name, "weight_MB": round(model.weight_bytes() / 1e6, 1), "rows": t,
                 "onednn_ms": round(1e3 * statistics.median(dnn), 3), "mkl_ms": round(1e3 * statistics.median(mkl), 3)}
            r["mkl_over_onednn"] = round(r["mkl_ms"] / r["onednn_ms"], 3)
            rows.append(r)
            print(r, flush=True)
    print(f"wrote {save('verify_rows', {'settings': vars(a), 'llc_bytes': last_level_cache_bytes(), 'rows': rows})}")


if __name__ == "__main__":
    main()
