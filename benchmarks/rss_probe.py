"""Where the server's memory growth comes from, in-process: LLM.generate on random batches of Spec-Bench
prompts (1-12 prompts, 8-48 tokens, greedy or sampled) on the bundled target with a 1024-block KV pool
(touched whole within the first seconds) for a fixed time; every 40 batches the process RSS, the Python
heap (tracemalloc), the number of Python objects and of live sequences. Run it under different
allocator settings to split the growth, e.g.

    python benchmarks/rss_probe.py --seconds 60
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 python benchmarks/rss_probe.py --seconds 60
    python benchmarks/rss_probe.py --seconds 60 --trim     # glibc's malloc_trim before each reading
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import time
import tracemalloc

from serve_load import prompts


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--trim", action="store_true", help="glibc malloc_trim(0) before each reading")
    ap.add_argument("--no-native", action="store_true", help="the Python forward instead of the C++ one")
    ap.add_argument("--fixed", action="store_true", help="the same 4 prompts, 32 greedy tokens, every batch")
    ap.add_argument("--no-prefix-caching", action="store_true")
    a = ap.parse_args()
    trim = None
    if a.trim:
        import ctypes
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    from afford import LLM, SamplingParams
    llm = LLM("default", dtype="float32", kv_blocks=1024, native=not a.no_native,
              enable_prefix_caching=not a.no_prefix_caching)
    ps, rng = prompts(80), random.Random(0)
    print({k: v for k, v in os.environ.items() if k.startswith(("MALLOC", "ONEDNN", "DNNL"))})
    tracemalloc.start()
    t0, i = time.time(), 0
    while time.time() - t0 < a.seconds:
        if a.fixed:
            llm.generate(ps[:4], SamplingParams(max_tokens=32, temperature=0))
        else:
            llm.generate(rng.sample(ps, rng.randint(1, 12)),
                         SamplingParams(max_tokens=rng.randint(8, 48), temperature=rng.choice([0, 0.8])))
        i += 1
        if i % 40 == 0:
            gc.collect()
            if trim:
                trim(0)
            print(f"{time.time() - t0:5.0f} s  batches {i}  RSS {rss_mb():.0f} MB  python heap "
                  f"{tracemalloc.get_traced_memory()[0] / 1e6:.1f} MB  objects {len(gc.get_objects())}  "
                  f"live sequences {len(llm.engine.seqs)}", flush=True)


if __name__ == "__main__":
    main()
