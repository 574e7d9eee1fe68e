"""Speculative decoding, side by side in one run: afford plain / draft (k = 2, 4, 6) / ngram / goodput against
transformers plain / assisted generation (same draft) / prompt lookup, on Spec-Bench first turns (per
category) and GSM8K test questions; greedy, batch 1, the bundled default pair. Then batch 8 with and
without speculation on GSM8K.

    python benchmarks/spec_vs_hf.py [--per-category 5] [--new-tokens 128]

Writes benchmarks/results/spec_vs_hf.json; every arm's tokens/s is also given as a ratio to
transformers plain on the same prompts. The per-category table runs its arms one after another, so on a
shared machine whose speed drifts it mixes drift into the ratios; the GSM8K goals are therefore also
measured interleaved (`--rounds`): each round runs every afford arm once, in a rotated order, and the
ratio to plain is taken within the round (median over rounds); so is goodput against plain on the goal's
mixed workload (math, summarization, QA, translation prompts, batch 1).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch
from common import ROOT, save


def workloads(per_category: int, fits=lambda p: True) -> dict[str, list[str]]:
    """The first prompts of each category that fit the model's context with the new tokens (the
    bundled model has 1024 positions, so long summarization / RAG prompts are skipped, not cut)."""
    cats: dict[str, list[str]] = defaultdict(list)
    for line in open(ROOT / "data" / "specbench" / "question.jsonl"):
        rec = json.loads(line)
        p = rec["turns"][0] + "\n"
        if len(cats[rec["category"]]) < per_category and fits(p):
            cats[rec["category"]].append(p)
    for line in open(ROOT / "data" / "gsm8k" / "test.jsonl"):
        if len(cats["gsm8k"]) >= per_category:
            break
        cats["gsm8k"].append(json.loads(line)["question"] + "\n")
    return dict(cats)


def afford_arm(llm, prompts, new_tokens, batch=1):
    from afford import SamplingParams
    sp = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    s0 = (llm.stats.generated_tokens, llm.stats.accepted, llm.stats.decode_steps)
    t = time.perf_counter()
    for i in range(0, len(prompts), batch):
        llm.generate(prompts[i:i + batch], sp)
    dt = time.perf_counter() - t
    gen = llm.stats.generated_tokens - s0[0]
    steps = llm.stats.decode_steps - s0[2]
    return {"tok_s": gen / dt, "tokens_per_step": (gen - len(prompts)) / max(steps, 1) / batch,
            "accepted": llm.stats.accepted - s0[1]}


def interleaved(llms: dict, names: list[str], prompts: list[str], new_tokens: int, batch: int, rounds: int) -> dict:
    """Each arm's tok/s over / plain's tok/s in the same round, per round (arms in a rotated order)."""
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        tps = {n: afford_arm(llms[n], prompts, new_tokens, batch)["tok_s"] for n in order}
        for n in names:
            ratios[n].append(round(tps[n] / tps["afford plain"], 3))
    return ratios


def hf_arm(model, tok, prompts, new_tokens, **kw):
    n = 0
    t = time.perf_counter()
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, **kw)
        n += out.shape[1] - ids["input_ids"].shape[1]
    return {"tok_s": n / (time.perf_counter() - t)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-category", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds for the GSM8K goals")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afford import LLM
    from afford.models.loader import resolve_model_path
    tpath, dpath = resolve_model_path("default"), resolve_model_path("default", "draft")
    tok = AutoTokenizer.from_pretrained(tpath)
    hf_t = AutoModelForCausalLM.from_pretrained(tpath, dtype=torch.float32).eval()
    hf_d = AutoModelForCausalLM.from_pretrained(dpath, dtype=torch.float32).eval()
    llms = {"afford plain": LLM("default", dtype="float32")}
    for k in (2, 4, 6):
        llms[f"afford draft k={k}"] = LLM("default", dtype="float32", draft="default", num_speculative_tokens=k)
    llms["afford ngram k=4"] = LLM("default", dtype="float32", draft="ngram", num_speculative_tokens=4)
    llms["afford goodput k<=4"] = LLM("default", dtype="float32", draft="default", num_speculative_tokens=4,
                                      speculation="goodput")
    hf_arms = {"hf plain": {}, "hf assisted": {"assistant_model": hf_d}, "hf prompt lookup": {"prompt_lookup_num_tokens": 4}}
    limit = llms["afford plain"].engine.max_model_len - a.new_tokens - 1

    def fits(p: str) -> bool:
        return len(tok(p, add_special_tokens=False)["input_ids"]) < limit
    work = workloads(a.per_category, fits)
    rows = []
    warm = work["gsm8k"][:1]
    for llm in llms.values():
        afford_arm(llm, warm, 8)
    skipped = [c for c, ps in work.items() if not ps]
    for c in skipped:
        print(f"{c}: no prompt fits {limit} tokens + {a.new_tokens} new; skipped", flush=True)
    for cat, prompts in work.items():
        if not prompts:
            continue
        res = {name: afford_arm(llm, prompts, a.new_tokens) for name, llm in llms.items()}
        res.update({name: hf_arm(hf_t, tok, prompts, a.new_tokens, **kw) for name, kw in hf_arms.items()})
        base = res["hf plain"]["tok_s"]
        for name, r in res.items():
            r["ratio_vs_hf_plain"] = r["tok_s"] / base
            rows.append({"category": cat, "arm": name, **{k: round(v, 3) for k, v in r.items()}})
        print(cat.ljust(15) + " | ".join(f"{n} {r['tok_s']:.0f} ({r['ratio_vs_hf_plain']:.2f}x"
                                         + (f", {r['tokens_per_step']:.2f} tok/step)" if "tokens_per_step" in r else ")")
                                         for n, r in res.items()), flush=True)
    batch_rows = []
    gsm = workloads(max(a.per_category, 8), fits)["gsm8k"][:8]
    for name in ("afford plain", "afford draft k=2", "afford draft k=4", "afford goodput k<=4"):
        r = afford_arm(llms[name], gsm, a.new_tokens, batch=8)
        batch_rows.append({"arm": name, "batch": 8, **{k: round(v, 3) for k, v in r.items()}})
        print(f"batch 8 GSM8K {name}: {r['tok_s']:.1f} tok/s", flush=True)
    arms = ["afford plain", "afford draft k=2", "afford draft k=4", "afford goodput k<=4"]
    inter = {}
    for batch, prompts in ((1, work["gsm8k"]), (8, gsm)):
        ratios = interleaved(llms, arms, prompts, a.new_tokens, batch, a.rounds)
        inter[f"batch{batch}"] = {n: {"rounds": v, "median": statistics.median(v)} for n, v in ratios.items()}
        print(f"interleaved GSM8K batch {batch}, median over {a.rounds} rounds of tok/s / plain's in the round: "
              + ", ".join(f"{n} {statistics.median(v):.2f}x" for n, v in ratios.items()), flush=True)
    # the goodput goal's mixed workload (math, summarization, QA, translation), batch 1, interleaved: the
    # per-category table above runs arms one after another, so drift swamps a few-percent difference
    mixed_cats = [c for c in ("math", "summarization", "qa", "translation") if work.get(c)]
    mixed = [p for c in mixed_cats for p in work[c]]
    ratios = interleaved(llms, ["afford plain", "afford goodput k<=4", "afford draft k=4"], mixed, a.new_tokens, 1, a.rounds)
    inter["mixed_batch1"] = {"categories": mixed_cats, "prompts": len(mixed),
                             **{n: {"rounds": v, "median": statistics.median(v)} for n, v in ratios.items()}}
    print(f"interleaved mixed workload ({', '.join(mixed_cats)}; {len(mixed)} prompts) batch 1, median over "
          f"{a.rounds} rounds: " + ", ".join(f"{n} {statistics.median(v):.2f}x" for n, v in ratios.items()), flush=True)
    out = save("spec_vs_hf", {"settings": vars(a), "rows": rows, "batch8": batch_rows, "skipped_categories": skipped,
                              "interleaved_gsm8k": inter})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
