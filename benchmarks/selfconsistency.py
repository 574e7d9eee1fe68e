"""Self-consistency on GSM8K test questions with the bundled target (fp32): accuracy of the majority
answer (afford.vote) against the tokens decoded, for greedy, naive n-sample voting and shared-prefix
sampling (the n choices share their first m sampled tokens, decoded once; HoneyBee-style), side by side
in one run. Prompts are "question\\n" (the zoo model was trained on question, newline, answer); answers
are read after "####" or as the last number.

"decoded" counts sequence-steps of decoding (EngineStats.decode_rows: tokens fed for sequences past
their prefill), the work the sharing saves.

    python benchmarks/selfconsistency.py [--questions 40] [--n 8] [--shared 16 32] [--max-tokens 160]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from common import ROOT, save


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--shared", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--temperature", type=float, default=0.8)
    a = ap.parse_args()
    torch.set_num_threads(2)
    from afford import LLM, SamplingParams, vote
    rows_in = [json.loads(line) for line in open(ROOT / "data" / "gsm8k" / "test.jsonl")][:a.questions]
    prompts = [r["question"] + "\n" for r in rows_in]
    gold = [vote.numeric_answer(r["answer"]) for r in rows_in]
    arms = [("greedy", SamplingParams(max_tokens=a.max_tokens, temperature=0))]
    arms.append((f"naive n={a.n}", SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, n=a.n, seed=0)))
    arms += [(f"shared m={m} n={a.n}", SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, n=a.n,
                                                      seed=0, shared_prefix=m)) for m in a.shared]
    rows = []
    for name, sp in arms:
        llm = LLM("default", dtype="float32")
        t = time.perf_counter()
        outs = llm.generate(prompts, sp)
        wall = time.perf_counter() - t
        picks = [vote.majority([vote.numeric_answer(c.text) for c in o.outputs])[0] for o in outs]
        correct = sum(p is not None and p == g for p, g in zip(picks, gold))
        rows.append({"arm": name, "accuracy": round(correct / len(gold), 3), "correct": correct,
                     "questions": len(gold), "decoded": llm.stats.decode_rows,
                     "generated_tokens": sum(len(c.token_ids) for o in outs for c in o.outputs),
                     "mean_chain_tokens": round(sum(len(c.token_ids) for o in outs for c in o.outputs)
                                                / sum(len(o.outputs) for o in outs), 1),
                     "wall_s": round(wall, 1)})
        print(rows[-1], flush=True)
    naive = rows[1]["decoded"]
    for r in rows[2:]:
        r["decoded_naive_over_this"] = round(naive / r["decoded"], 2)
    print(f"wrote {save('selfconsistency', {'settings': vars(a), 'rows': rows})}")


if __name__ == "__main__":
    main()
