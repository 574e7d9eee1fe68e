"""Chunked prefill: do running decodes stall while long prompts are prefilled?

On the bundled target (fp32, greedy): 8 short GSM8K requests decode 160 tokens each; while they run, 4
requests with ~900-token prompts (Tiny Shakespeare passages) arrive at fixed engine steps (20, 50, 80,
110; the same in every arm) and generate 8 tokens. Per arm: the decoding streams' time between tokens
(TPOT p50 / p99 / max), the long prompts' time to first token, and the wall time. Arms: no chunked
prefill (a step prefills whole prompts while decodes wait), chunked prefill at several token budgets
(max_num_batched_tokens, the same while decoding), the default (512 tokens per step, 64 while sequences
decode: decode_token_budget), and the 8 streams alone (the light-load TPOT the others are compared with).
Prefix caching is off (the passages do not share blocks anyway).

    python benchmarks/chunked.py [--budgets 2048 512 256]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from common import ROOT, save

ARRIVALS = (20, 50, 80, 110)


def run(budget: int | None, long_prompts: list[list[int]], short: list[str], new_tokens: int,
        decode_budget: int | None = None) -> dict:
    """decode_budget: the tokens a step may feed while sequences decode (None: the budget itself)."""
    from afford import LLM, SamplingParams
    llm = LLM("default", dtype="float32", enable_prefix_caching=False, enable_chunked_prefill=budget is not None,
              max_num_batched_tokens=budget or 2048, decode_token_budget=decode_budget or budget or 2048)
    eng = llm.engine
    llm.generate(short[:2], SamplingParams(max_tokens=4))                                    # warm-up
    streams = [eng.add_request(p, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
               for p in short]
    longs, arrived = [], {}
    seen = {s.seq_id: [] for s in streams}
    step = 0
    while eng.has_unfinished() or len(longs) < len(long_prompts):
        if step in ARRIVALS[:len(long_prompts)]:
            longs.append(eng.add_request(long_prompts[len(longs)], SamplingParams(max_tokens=8, temperature=0)))
            arrived[longs[-1].seq_id] = time.perf_counter()
        eng.step()
        now = time.perf_counter()
        for s in streams:
            if len(seen[s.seq_id]) < s.num_output:
                seen[s.seq_id].append(now)
        step += 1
    gaps = np.concatenate([np.diff(t) for t in seen.values()])
    ttft = [s.metrics.first_token - s.metrics.arrival for s in longs]
    return {"tpot_p50_ms": round(float(np.percentile(gaps, 50)) * 1e3, 1),
            "tpot_p99_ms": round(float(np.percentile(gaps, 99)) * 1e3, 1),
            "tpot_max_ms": round(float(gaps.max()) * 1e3, 1),
            "long_ttft_mean_ms": round(float(np.mean(ttft)) * 1e3, 1) if ttft else None,
            "steps": step, "max_step_tokens": eng.stats.max_step_tokens}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", nargs="+", type=int, default=[2048, 512, 256])
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--long-tokens", type=int, default=900)
    a = ap.parse_args()
    torch.set_num_threads(2)
    from afford.models.loader import load_tokenizer, resolve_model_path
    tok = load_tokenizer(resolve_model_path("default"))
    text = (ROOT / "data" / "tinyshakespeare" / "input.txt").read_text()
    ids = tok(text[:200_000], add_special_tokens=False)["input_ids"]
    longs = [ids[i * 5000:i * 5000 + a.long_tokens] for i in range(len(ARRIVALS))]
    short = [json.loads(line)["question"] for line in open(ROOT / "data" / "gsm8k" / "test.jsonl")][:8]
    rows = []
    arms = [("alone (light load)", 2048, [], None), ("no chunked prefill", None, longs, None)] + \
        [(f"chunked, budget {b}", b, longs, None) for b in a.budgets] + \
        [("default: budget 512, 64 while decoding", 512, longs, 64)]
    for name, budget, lp, dec in arms:
        r = run(budget, lp, short, a.new_tokens, dec)
        rows.append({"arm": name, **r})
        print(rows[-1], flush=True)
    light = rows[0]["tpot_p99_ms"]
    for r in rows:
        r["tpot_p99_over_light"] = round(r["tpot_p99_ms"] / light, 2)
    print(f"wrote {save('chunked', {'settings': vars(a), 'arrival_steps': ARRIVALS, 'rows': rows})}")


if __name__ == "__main__":
    main()
