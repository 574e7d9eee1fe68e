"""Where an AFD layer's time goes on this machine (the profile behind benchmarks/afd.py's table).

1. Can two processes compute at once here? One single-thread process multiplies a (96 x 1024) by a
   (1024 x 8192) matrix (the FFN's gate|up product) in a loop, alone and then beside a second process
   doing the same: the ratio of their rates is the parallelism AFD's two sides can get.
2. The attention side's decode layer for 96 sequences at context 136 (the benchmark's dense model, one
   thread), under torch.profiler: time per operator, against the planner's roofline for the same layer.

    python benchmarks/afd_profile.py
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import save

LOOP = """
import sys, time, torch
torch.set_num_threads(1)
x, w = torch.randn(96, 1024), torch.randn(8192, 1024)
p = torch.ops.mkldnn._reorder_linear_weight(w, None)
f = lambda: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
for _ in range(3): f()
t = time.perf_counter(); n = 0
while time.perf_counter() - t < float(sys.argv[1]):
    f(); n += 1
print(n / (time.perf_counter() - t))
"""


def rates(k: int, seconds: float = 6.0) -> list[float]:
    procs = [subprocess.Popen([sys.executable, "-c", LOOP, str(seconds)], stdout=subprocess.PIPE, text=True)
             for _ in range(k)]
    return [float(p.communicate()[0]) for p in procs]


def attention_profile(batch: int = 96, context: int = 136) -> dict:
    from afd import make_model

    from afford import LLM, SamplingParams
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp) / "dense", False)
        llm = LLM(str(path), dtype="float32", native=False, enable_prefix_caching=False, max_num_seqs=batch,
                  max_num_batched_tokens=batch * (context + 8), decode_token_budget=batch * (context + 8))
    eng = llm.engine
    g = torch.Generator().manual_seed(1)
    seqs = [eng.add_request(torch.randint(3, 4096, (context,), generator=g).tolist(),
                            SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)) for _ in range(batch)]
    while any(s.num_output == 0 for s in seqs):
        eng.step()
    model = eng.model
    layer = model.model.layers[0]
    done = {}
    orig_attn = layer.self_attn.forward

    def timed_attn(*a, **k):
        t = time.perf_counter()
        out = orig_attn(*a, **k)
        done["attention_module_s"] = done.get("attention_module_s", 0) + time.perf_counter() - t
        return out
    layer.self_attn.forward = timed_attn
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        eng.step()
    ops = sorted(((e.key, e.self_cpu_time_total / 1e3) for e in prof.key_averages()), key=lambda x: -x[1])[:12]
    layers = model.cfg.num_layers
    return {"batch": batch, "context": context, "top_ops_ms_per_step": ops,
            "attention_module_ms_layer0": done["attention_module_s"] * 1e3,
            "step_ms_profiled": sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3, "layers": layers}


def main() -> None:
    alone = rates(1)[0]
    pair = rates(2)
    print(f"gate|up product, one thread: alone {alone:.1f}/s; two processes at once {pair[0]:.1f}/s + "
          f"{pair[1]:.1f}/s = {sum(pair) / alone:.2f}x the throughput of one", flush=True)
    prof = attention_profile()
    print(f"attention module, layer 0, 96 decode rows: {prof['attention_module_ms_layer0']:.1f} ms")
    for k, v in prof["top_ops_ms_per_step"]:
        print(f"  {k:40s} {v:8.1f} ms per step (4 layers)")
    save("afd_profile", {"parallel": {"alone_per_s": alone, "pair_per_s": pair, "speedup": sum(pair) / alone},
                         "attention": prof})


if __name__ == "__main__":
    main()
