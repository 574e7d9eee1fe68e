"""S2D (issue #15): one sorted multi-exit draft serving several targets, against (a) the same draft at a
fixed shallow exit and (b) a draft trained separately for each target; greedy, batch 1, k = 4.

For each target (`--pair TARGET=SEPARATE_DRAFT`, repeatable): GSM8K test questions, every arm timed in
`--rounds` interleaved rounds (each round runs every arm once, in a rotated order; speed is the ratio to
plain decoding within the round, median over rounds), with acceptance (accepted / drafted) and mean
accepted tokens per verify step; then Spec-Bench first turns per category (acceptance, tokens per step,
one pass). Arms: plain; (b) the separate draft; (a) the sorted draft at each fixed exit before the last;
the sorted draft at its last exit always; (c) the sorted draft with confidence exits (draft_exit="auto",
calibrated on this target, then its choice and the fixed exits tried live, during the untimed warm-up,
which every arm gets).
Training cost: each run folder's checkpoint (`elapsed`), or `--train-minutes NAME=MIN` for folders without
one (the bundled draft: its README recipe).

    python benchmarks/s2d.py --sorted runs/sorted --pair default=default --pair runs/target-large=runs/draft-large

Writes benchmarks/results/s2d.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import ROOT, save
from spec_vs_hf import workloads


def run(llm, prompts, new_tokens):
    """Generate greedily one prompt at a time: tok/s and the stats the run added."""
    import time

    from afford import SamplingParams
    sp = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    st = llm.stats
    s0 = (st.generated_tokens, st.accepted, st.drafted, st.decode_steps)
    t = time.perf_counter()
    for p in prompts:
        llm.generate([p], sp)
    dt = time.perf_counter() - t
    gen, acc, dr, steps = (a - b for a, b in zip((st.generated_tokens, st.accepted, st.drafted, st.decode_steps), s0))
    return {"tok_s": gen / dt, "accepted": acc, "drafted": dr, "steps": steps}


def summary(parts: list[dict]) -> dict:
    acc, dr, steps = (sum(p[k] for p in parts) for k in ("accepted", "drafted", "steps"))
    return {"acceptance": round(acc / dr, 4) if dr else None, "accepted_per_step": round(acc / steps, 3) if steps else 0.0}


def train_minutes(path: str, given: dict[str, float]) -> float | None:
    if path in given:
        return given[path]
    ck = Path(path) / "ckpt.pt"
    if ck.is_file():
        return round(torch.load(ck, map_location="cpu", weights_only=False)["elapsed"] / 60, 1)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sorted", required=True, help="the multi-exit draft folder")
    ap.add_argument("--pair", action="append", required=True, help="TARGET=SEPARATE_DRAFT (repeat per target)")
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--per-category", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--train-minutes", action="append", default=[], help="NAME=MIN for a folder without ckpt.pt")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from afford import LLM
    from afford.config import ModelConfig
    from afford.models.loader import resolve_model_path
    given = {k: float(v) for k, v in (t.split("=") for t in a.train_minutes)}
    exits = ModelConfig.from_dir(resolve_model_path(a.sorted, "draft")).exits
    gsm = [json.loads(line)["question"] + "\n" for line in open(ROOT / "data" / "gsm8k" / "test.jsonl")][: a.questions]
    result = {"settings": vars(a), "sorted_exits": list(exits),
              "sorted_train_minutes": train_minutes(a.sorted, given), "targets": {}}
    for pair in a.pair:
        target, separate = pair.split("=")
        tcfg = ModelConfig.from_dir(resolve_model_path(target))
        fits = (lambda n: lambda p: len(p) < 3 * (n - a.new_tokens))(tcfg.max_position_embeddings)
        arms = {"plain": dict(),
                "(b) separate draft": dict(draft=separate),
                **{f"(a) sorted, exit {e}": dict(draft=a.sorted, draft_exit=str(e)) for e in exits[:-1]},
                f"sorted, exit {exits[-1]} always": dict(draft=a.sorted, draft_exit=str(exits[-1])),
                "(c) sorted, confidence exits": dict(draft=a.sorted, draft_exit="auto")}
        llms = {n: LLM(target, num_speculative_tokens=a.k, max_num_seqs=4, **kw) for n, kw in arms.items()}
        for n, llm in llms.items():                      # warm-up (and the auto arm's calibration), untimed
            run(llm, gsm[:8], a.new_tokens)
        auto_llm = llms["(c) sorted, confidence exits"]
        for i in range(8, len(gsm), 8):                  # ... until its live trial has picked a policy
            if isinstance(auto_llm.stats.draft.get("trial"), dict):
                break
            run(auto_llm, gsm[i:i + 8], a.new_tokens)
        names = list(arms)
        ratios = {n: [] for n in names}
        parts = {n: [] for n in names}
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            res = {n: run(llms[n], gsm, a.new_tokens) for n in order}
            for n in names:
                ratios[n].append(round(res[n]["tok_s"] / res["plain"]["tok_s"], 3))
                parts[n].append(res[n])
            print(f"{target} round {r + 1}: " + ", ".join(f"{n} {ratios[n][-1]:.2f}x" for n in names), flush=True)
        rows = {}
        for n in names:
            rows[n] = {"speedup_median": statistics.median(ratios[n]), "speedup_rounds": ratios[n],
                       "tok_s_median": round(statistics.median(p["tok_s"] for p in parts[n]), 1), **summary(parts[n])}
            print(f"  {n:32s} {rows[n]['speedup_median']:.2f}x plain, acceptance {rows[n]['acceptance']}, "
                  f"{rows[n]['accepted_per_step']} accepted per step")
        auto = llms["(c) sorted, confidence exits"].stats.draft
        cats = {}
        for cat, prompts in workloads(a.per_category, fits).items():
            cats[cat] = {n: summary([run(llms[n], prompts, a.new_tokens)]) for n in names if n != "plain"}
            print(f"  {cat}: " + ", ".join(f"{n} {v['acceptance']}" for n, v in cats[cat].items()), flush=True)
        result["targets"][target] = {
            "separate_draft": separate, "separate_train_minutes": train_minutes(separate, given),
            "target_params": tcfg.num_parameters, "gsm8k": rows, "categories": cats, "confidence_exits": auto}
    out = save("s2d", result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
