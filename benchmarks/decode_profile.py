"""Where one decode step's time goes: torch.profiler over the decode steps of LLM.generate on the 34 M
Llama (fp32, 128-token prompt, 64 new tokens), batch 1 and 8. Uses only the public API, so the same
script profiles an older checkout for a before/after comparison (run it from that checkout).

    python benchmarks/decode_profile.py [--out NAME]

Writes benchmarks/results/NAME.json (default decode_profile): per batch, wall ms per step, the
profiled self-CPU ms per step by operator (top 12) and the matmul share; where the native forward runs
(its kernels are not torch operators), its own split of each step: matmul, attention, elementwise (norms,
RoPE, K/V writes, SiLU), LM head, and the rest of the step outside it (Python: scheduling, sampling, stats).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import random_llama, save

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise")   # the last: oneDNN packed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="decode_profile")
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(2)
    from torch.profiler import profile

    from afford import LLM, SamplingParams
    path = random_llama(Path(tempfile.mkdtemp()) / "llama-34m", "llama-34m")
    llm = LLM(str(path), dtype="float32", max_model_len=256)
    prompt = list(range(2, 130))
    sp = SamplingParams(max_tokens=a.new_tokens + 1, temperature=0, ignore_eos=True)
    result = {}
    for batch in (1, 8):
        llm.generate([prompt] * batch, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        t = time.perf_counter()
        llm.generate([prompt] * batch, sp)
        wall = (time.perf_counter() - t) / a.new_tokens
        native = getattr(llm.engine.runner, "native", None)
        split = None
        if native is not None and hasattr(native.impl, "set_profiling"):     # older checkouts: no split
            native.impl.set_profiling(True)
            t = time.perf_counter()
            llm.generate([prompt] * batch, sp)
            wall_p = (time.perf_counter() - t) / a.new_tokens
            native.impl.set_profiling(False)
            parts = native.impl.take_profile()
            split = {k: round(1e3 * v / a.new_tokens, 3) for k, v in parts.items() if k != "forwards"}
            split["outside_native_forward"] = round(1e3 * wall_p - sum(split.values()), 3)
        with profile() as prof:
            llm.generate([prompt] * batch, sp)
        ka = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ka) / 1e3 / a.new_tokens
        mm = sum(e.self_cpu_time_total for e in ka if e.key in MATMUL_OPS) / 1e3
        result[f"batch{batch}"] = {
            "wall_ms_per_step": round(1e3 * wall, 2), "profiled_ms_per_step": round(total, 2),
            "mm_ms_per_step": round(mm / a.new_tokens, 2),
            "top_ops_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / a.new_tokens, 3) for e in ka[:12]},
            "calls_per_step": {e.key: round(e.count / a.new_tokens, 1) for e in ka[:12]},
            "native_ms_per_step": split}
        print(batch, result[f"batch{batch}"], flush=True)
    print(f"wrote {save(a.out, result)}")


if __name__ == "__main__":
    main()
