"""What a verify forward of T = 1 + k tokens costs against a one-token decode forward, per model, on the
native kernels: one sequence with a 128-token context feeds T tokens per forward (logits for all T), 24
forwards per measurement, T = 1 and each T interleaved in rounds (this machine's speed drifts), with the
kernels' own split (matmul, attention, elementwise, LM head) of each. Speculation pays only when a verify
costs little more than a decode step (BENCHMARKS.md, issue #12).

    python benchmarks/verify_rows.py [--rounds 7] [--rows 2 3 5 8]

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
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 3, 5, 8])
    a = ap.parse_args()
    torch.set_num_threads(2)
    from afford.core.runner import ModelRunner
    from afford.kv.paged import BlockPool
    from afford.models.loader import load_for_inference, resolve_model_path
    models = {"default draft": resolve_model_path("default", "draft"),
              "default target": resolve_model_path("default", "target"),
              "llama-34m": random_llama(Path(tempfile.mkdtemp()) / "llama-34m", "llama-34m")}
    prompt, n = list(range(5, 133)), 24
    rows = []
    for name, path in models.items():
        model = load_for_inference(path, "cpu", "float32")
        runner = ModelRunner(model, BlockPool(64, 16))
        if runner.native is None:
            raise SystemExit("the native forward did not build; this benchmark measures its kernels")
        runner.pool.prepare_write(0, len(prompt) + n + max(a.rows))
        runner.forward([0], [0], [prompt])

        def per_forward(t):
            runner.native.impl.set_profiling(True)
            start = time.perf_counter()
            for i in range(n):
                runner.forward([0], [len(prompt) + i], [[7] * t], [list(range(t))])
            dt = (time.perf_counter() - start) / n
            runner.native.impl.set_profiling(False)
            split = runner.native.impl.take_profile()
            return dt, {k: v / n for k, v in split.items() if k != "forwards"}

        for t in a.rows:
            one, many = [], []
            for _ in range(a.rounds):
                one.append(per_forward(1))
                many.append(per_forward(t))
            med = lambda xs: statistics.median(x[0] for x in xs)  # noqa: E731
            ratios = [m[0] / o[0] for o, m in zip(one, many)]
            r = {"model": name, "weight_MB": round(runner.weight_bytes / 1e6, 1), "rows": t,   # as read (bf16 panels: half)
                 "one_row_ms": round(1e3 * med(one), 3), "rows_ms": round(1e3 * med(many), 3),
                 "ratio_median": round(statistics.median(ratios), 2),
                 "split_one_row_ms": {k: round(1e3 * statistics.median(x[1][k] for x in one), 3) for k in one[0][1]},
                 "split_rows_ms": {k: round(1e3 * statistics.median(x[1][k] for x in many), 3) for k in many[0][1]}}
            rows.append(r)
            print(r, flush=True)
    print(f"wrote {save('verify_rows', {'settings': vars(a), 'rows': rows})}")


if __name__ == "__main__":
    main()
