"""Automatic prefix caching: 32 requests that share a 512-token system prompt (a Tiny Shakespeare passage)
followed by a GSM8K test question each, on the bundled target (fp32, greedy, 32 new tokens), with
prefix caching off and on, side by side in one run. Two arrival patterns:

- burst, cold cache: all 32 arrive at once and nothing is cached yet -- the first prompt chunks compute
  the system prompt, requests admitted in later steps reuse what earlier steps registered;
- warm cache: the system prompt was served before (one earlier request), then the burst of 32 -- a
  service whose system prompt is always the same.

Reports mean / p50 / p99 time to first token, wall time and generated tokens/s, the tokens reused,
and whether the outputs are identical with and without the cache.

    python benchmarks/prefix.py [--requests 32] [--system-tokens 512] [--max-tokens 32]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from common import ROOT, save


def workload(tokenizer, n: int, system_tokens: int) -> list[list[int]]:
    text = (ROOT / "data" / "tinyshakespeare" / "input.txt").read_text()[:20000]
    system = tokenizer(text, add_special_tokens=False)["input_ids"][:system_tokens]
    rows = [json.loads(line) for line in open(ROOT / "data" / "gsm8k" / "test.jsonl")][:n]
    return [system + tokenizer("\n\nQuestion: " + r["question"] + "\nAnswer:", add_special_tokens=False)["input_ids"]
            for r in rows]


def run(llm, prompts, sp) -> dict:
    pool = llm.engine.pool
    hit0 = pool.hit_tokens
    t = time.perf_counter()
    outs = llm.generate(prompts, sp)
    wall = time.perf_counter() - t
    ttft = np.array([o.metrics["ttft_s"] for o in outs])
    toks = sum(len(o.token_ids) for o in outs)
    return {"ttft_mean_s": round(float(ttft.mean()), 3), "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
            "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3), "wall_s": round(wall, 2),
            "tok_s": round(toks / wall, 1), "reused_tokens": pool.hit_tokens - hit0,
            "prompt_tokens": sum(map(len, prompts)), "_tokens": [o.token_ids for o in outs]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--system-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(2)
    from afford import LLM, SamplingParams
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True)
    rows = []
    for scenario in ("burst, cold cache", "warm cache"):
        outs = {}
        for caching in (False, True):
            llm = LLM("default", dtype="float32", enable_prefix_caching=caching)
            ps = workload(llm.engine.tokenizer, a.requests + 1, a.system_tokens)
            llm.generate([ps[-1][:a.system_tokens + 4]], SamplingParams(max_tokens=2))   # warm-up (and cache)
            if scenario == "burst, cold cache":
                llm.engine.pool.reset_prefix_cache()
            r = run(llm, ps[:a.requests], sp)
            outs[caching] = r.pop("_tokens")
            rows.append({"scenario": scenario, "prefix_caching": caching, **r})
            print(rows[-1], flush=True)
        off, on = rows[-2], rows[-1]
        on["ttft_mean_off_over_on"] = round(off["ttft_mean_s"] / on["ttft_mean_s"], 2)
        on["throughput_on_over_off"] = round(on["tok_s"] / off["tok_s"], 2)
        on["outputs_identical"] = outs[True] == outs[False]
        print({k: v for k, v in on.items() if k not in off}, flush=True)
    print(f"wrote {save('prefix', {'settings': vars(a), 'rows': rows})}")


if __name__ == "__main__":
    main()
