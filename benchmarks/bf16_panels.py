"""bf16 panels against fp32 panels on the bundled models, side by side in one process: the native forward
keeps a bf16 checkpoint's weights in bf16 (widened to fp32 in registers, so the products and logits are
bitwise those of fp32 panels) -- half the bytes streamed per forward. Arms, each with both panel types
(AFFORD_NATIVE_BF16=0 / 1 when the engine is built): the target decoding alone, the draft decoding
alone, and draft speculation at k = 4; GSM8K test questions, greedy, batch 1, interleaved rounds (every
arm once per round, in a rotated order), medians of the per-round ratios. Also checks that both panel
types give the same tokens.

    python benchmarks/bf16_panels.py [--questions 10] [--rounds 5] [--new-tokens 128]

Writes benchmarks/results/bf16_panels.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from common import ROOT, save


def build(panels: str, **kw):
    from afford import LLM
    os.environ["AFFORD_NATIVE_BF16"] = "1" if panels == "bf16" else "0"
    try:
        llm = LLM(kw.pop("model", "default"), dtype="float32", **kw)
    finally:
        os.environ.pop("AFFORD_NATIVE_BF16")
    assert llm.engine.runner.native is not None and llm.engine.runner.native.bf16 == (panels == "bf16")
    return llm


def run(llm, prompts, new_tokens):
    from afford import SamplingParams
    sp = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    g0, s0 = llm.stats.generated_tokens, llm.stats.decode_steps
    t = time.perf_counter()
    outs = [llm.generate([p], sp)[0].token_ids for p in prompts]
    dt = time.perf_counter() - t
    gen, steps = llm.stats.generated_tokens - g0, llm.stats.decode_steps - s0
    return {"tok_s": gen / dt, "ms_per_token": 1e3 * dt / gen, "tokens_per_step": (gen - len(prompts)) / max(steps, 1)}, outs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from afford.models.loader import resolve_model_path
    qs = [json.loads(line)["question"] + "\n" for line in open(ROOT / "data" / "gsm8k" / "test.jsonl")][: a.questions]
    draft = str(resolve_model_path("default", "draft"))
    arms = {}
    for panels in ("fp32", "bf16"):
        arms[f"target, {panels} panels"] = build(panels)
        arms[f"draft alone, {panels} panels"] = build(panels, model=draft)
        arms[f"k=4 speculation, {panels} panels"] = build(panels, draft="default", num_speculative_tokens=4)
        assert arms[f"k=4 speculation, {panels} panels"].engine.speculator.proposer.runner.native.bf16 == (panels == "bf16")
    for llm in arms.values():
        run(llm, qs[:1], 8)
    names = list(arms)
    per: dict[str, list[dict]] = {n: [] for n in names}
    tokens: dict[str, list] = {}
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            res, outs = run(arms[n], qs, a.new_tokens)
            per[n].append(res)
            tokens.setdefault(n, outs)
        print(f"round {r}: " + ", ".join(f"{n} {per[n][-1]['tok_s']:.0f}" for n in names), flush=True)
    same = {kind: tokens[f"{kind}, fp32 panels"] == tokens[f"{kind}, bf16 panels"]
            for kind in ("target", "draft alone", "k=4 speculation")}
    same["speculation vs target"] = tokens["target, bf16 panels"] == tokens["k=4 speculation, bf16 panels"]

    def ratio(a_, b_):
        return statistics.median(x["tok_s"] / y["tok_s"] for x, y in zip(per[a_], per[b_]))
    summary = {n: {"tok_s_median": statistics.median(x["tok_s"] for x in per[n]),
                   "ms_per_token_median": statistics.median(x["ms_per_token"] for x in per[n]),
                   "tokens_per_step": per[n][0]["tokens_per_step"]} for n in names}
    ratios = {}
    for kind in ("target", "draft alone", "k=4 speculation"):
        ratios[f"{kind}: bf16 / fp32 panels"] = ratio(f"{kind}, bf16 panels", f"{kind}, fp32 panels")
    for panels in ("fp32", "bf16"):
        ratios[f"speculation / target, {panels} panels"] = ratio(f"k=4 speculation, {panels} panels", f"target, {panels} panels")
        ratios[f"draft / target time per token, {panels} panels"] = ratio(f"target, {panels} panels", f"draft alone, {panels} panels")
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    print("same tokens:", same)
    out = save("bf16_panels", {"settings": vars(a), "arms": summary, "rounds": per, "ratios": ratios, "same_tokens": same})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
