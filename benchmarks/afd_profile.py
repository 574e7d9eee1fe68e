"""Where an AFD layer's time goes on this machine (the profile behind benchmarks/afd.py's table).

1. Can two processes compute at once here? One single-thread process multiplies a (96 x 1024) by a
   (1024 x 8192) matrix (the FFN's gate|up product) in a loop, alone and then beside a second process
   doing the same: the ratio of their rates is the parallelism AFD's two sides can get.
2. The attention side's decode layer for 96 sequences at context 136 (the benchmark's dense model, one
   thread), under torch.profiler: time per operator, against the planner's roofline for the same layer.
3. The same layer as AFD runs it now (one FFN worker, one micro-batch): the attention half as one native
   call, split by the native forward's own profiler into products, attention and elementwise work, and
   the rest of the attention side's per-layer time (sends, receives, buffers) -- beside the projections'
   FLOPs and the K/V bytes the planner prices.

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


def afd_attention_half(batch: int = 96, context: int = 128, tokens: int = 16) -> dict:
    from afd import make_model

    from afford import LLM, SamplingParams
    torch.set_num_threads(1)
    whole = batch * (context + tokens + 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp) / "dense", False)
        llm = LLM(str(path), dtype="float32", enable_prefix_caching=False, max_num_seqs=batch,
                  max_num_batched_tokens=whole, decode_token_budget=whole, afd="attention=1,ffn=1", micro_batches=1)
        eng, runner = llm.engine, llm.engine.runner
        cfg = eng.model.cfg
        g = torch.Generator().manual_seed(1)
        seqs = [eng.add_request(torch.randint(3, cfg.vocab_size, (context,), generator=g).tolist(),
                                SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True))
                for _ in range(batch)]
        while any(s.num_output == 0 for s in seqs):
            eng.step()
        impl = runner.native_attn.impl
        runner.timings()
        impl.set_profiling(True)
        impl.take_profile()
        steps = 0
        while eng.has_unfinished():
            eng.step()
            steps += 1
        prof, t = impl.take_profile(), runner.timings()
        llm.close()
    L = cfg.num_layers
    per = {k: v / steps / L * 1e3 for k, v in prof.items() if k in ("matmul", "attention", "elementwise")}
    side = sum(t["attention_s"]) / L / t["steps"] * 1e3
    H, D, KV = cfg.hidden_size, cfg.head_dim, cfg.num_kv_heads
    ctx = context + tokens / 2
    return {"steps": steps, "native_ms_per_layer": per, "attention_side_ms_per_layer": side,
            "outside_native_ms_per_layer": side - sum(per.values()),
            "projection_gflop_per_layer": 2 * batch * H * (cfg.num_heads * D + 2 * KV * D + cfg.num_heads * D) / 1e9,
            "kv_mb_per_layer": batch * ctx * 2 * KV * D * 4 / 1e6}


def main() -> None:
    alone = rates(1)[0]
    pair = rates(2)
    print(f"gate|up product, one thread: alone {alone:.1f}/s; two processes at once {pair[0]:.1f}/s + "
          f"{pair[1]:.1f}/s = {sum(pair) / alone:.2f}x the throughput of one", flush=True)
    prof = attention_profile()
    print(f"attention module, layer 0, 96 decode rows: {prof['attention_module_ms_layer0']:.1f} ms")
    for k, v in prof["top_ops_ms_per_step"]:
        print(f"  {k:40s} {v:8.1f} ms per step (4 layers)")
    half = afd_attention_half()
    n = half["native_ms_per_layer"]
    print(f"AFD attention half, per layer: native products {n['matmul']:.2f} ms ({half['projection_gflop_per_layer']:.2f} "
          f"GFLOP), paged attention {n['attention']:.2f} ms ({half['kv_mb_per_layer']:.1f} MB of K/V), elementwise "
          f"{n['elementwise']:.2f} ms; outside the native call {half['outside_native_ms_per_layer']:.2f} ms; the "
          f"attention side in all {half['attention_side_ms_per_layer']:.2f} ms")
    save("afd_profile", {"parallel": {"alone_per_s": alone, "pair_per_s": pair, "speedup": sum(pair) / alone},
                         "attention": prof, "afd_attention_half": half})


if __name__ == "__main__":
    main()
