"""afford vs transformers `generate` on the same random-weight Llama checkpoints: greedy, 128-token
prompt, 256 new tokens, batch 1 and 8, fp32 and bf16, side by side in one run.

    python benchmarks/decode_vs_hf.py [--sizes llama-34m llama-100m] [--new-tokens 256] [--reps 2]

Prints tokens/s, the ratio afford / transformers, achieved memory bandwidth (bytes of weights + KV read
per step x steps / s) and FLOP/s; writes benchmarks/results/decode_vs_hf.json.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import llamacpp
import torch
from common import SIZES, random_llama, save


def time_afford(llm, prompt, batch, new_tokens, reps):
    from afford import SamplingParams
    sp = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate([prompt] * batch, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))   # warm-up
    runs = []
    for _ in range(reps):
        before = llm.stats.bytes_read
        t = time.perf_counter()
        outs = llm.generate([prompt] * batch, sp)
        dt = time.perf_counter() - t
        assert all(len(o.token_ids) == new_tokens for o in outs)
        runs.append((batch * new_tokens / dt, (llm.stats.bytes_read - before) / dt / 1e9))
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def time_hf(model, prompt, batch, new_tokens, reps):
    ids = torch.tensor([prompt] * batch)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
    runs = []
    for _ in range(reps):
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        dt = time.perf_counter() - t
        assert out.shape[1] == len(prompt) + new_tokens
        runs.append(batch * new_tokens / dt)
    return statistics.median(runs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attention", nargs="+", default=["cpu_paged", "cpu_paged/python", "sdpa"],
                    help="afford arms to run (fp32; bf16 runs the first): an attention backend; /python: with "
                         "native=False (the Python path of the same backend; cpu_paged alone runs native)")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp anchor")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    from afford import LLM
    rows = []
    tmp = Path(tempfile.mkdtemp())
    for size in a.sizes:
        path = random_llama(tmp / size, size)
        vocab = SIZES[size][-1]
        prompt = torch.randint(2, vocab, (a.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
        for dtype in a.dtypes:
            backends = a.attention if dtype == "float32" else a.attention[:1]
            llms = {b: LLM(str(path), dtype=dtype, max_model_len=a.prompt_tokens + a.new_tokens + 16,
                           attention=b.split("/")[0], native=not b.endswith("/python"))
                    for b in backends}
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
            params = llms[backends[0]].engine.model_config.num_parameters
            for batch in a.batches:
                hf_tps = time_hf(hf, prompt, batch, a.new_tokens, a.reps)
                for b, llm in llms.items():
                    tps, gbs = time_afford(llm, prompt, batch, a.new_tokens, a.reps)
                    row = {"model": size, "params": params, "dtype": dtype, "batch": batch, "attention": b,
                           "afford_tok_s": round(tps, 1), "hf_tok_s": round(hf_tps, 1),
                           "ratio_vs_hf": round(tps / hf_tps, 2), "afford_GB_s": round(gbs, 2),
                           "afford_GFLOP_s": round(2 * params * tps / 1e9, 2)}
                    rows.append(row)
                    print(f"{size:11s} {dtype:9s} B={batch} {b:16s}: afford {tps:7.1f} tok/s | transformers "
                          f"{hf_tps:7.1f} | x{tps / hf_tps:.2f} | {gbs:.1f} GB/s | {row['afford_GFLOP_s']:.1f} GFLOP/s",
                          flush=True)
        if llamacpp.available() and not a.no_llamacpp:
            for outtype in ("f32", "q8_0"):
                gguf = llamacpp.to_gguf(path, tmp / f"{size}-{outtype}.gguf", outtype)
                tps = llamacpp.decode_tok_s(gguf, prompt, a.new_tokens, a.threads, a.reps)
                ref = next(r for r in rows if r["model"] == size and r.get("dtype") == "float32" and r["batch"] == 1)
                bf = next((r for r in rows if r["model"] == size and r.get("dtype") == "bfloat16" and r["batch"] == 1),
                          None)
                row = {"model": size, "engine": f"llama.cpp {outtype}", "batch": 1, "tok_s": round(tps, 1),
                       "afford_fp32_over_it": round(ref["afford_tok_s"] / tps, 2),
                       "afford_bf16_over_it": round(bf["afford_tok_s"] / tps, 2) if bf else None}
                rows.append(row)
                print(f"{size:11s} llama.cpp {outtype}: {tps:7.1f} tok/s | afford fp32 x{row['afford_fp32_over_it']} "
                      f"| afford bf16 x{row['afford_bf16_over_it']}", flush=True)
    out = save("decode_vs_hf", {"settings": vars(a), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
