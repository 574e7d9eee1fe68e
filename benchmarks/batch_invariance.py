"""How often greedy output depends on the batch or on speculation, per dtype: GSM8K test questions run
alone, as one batch, and under draft / ngram / goodput speculation (k = 4) on the bundled pair; counts
the prompts whose tokens differ from running alone.

    python benchmarks/batch_invariance.py [--prompts 16] [--new-tokens 64]

Writes benchmarks/results/batch_invariance.json.
"""
from __future__ import annotations

import argparse
import json

import torch
from common import ROOT, save


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    a = ap.parse_args()
    torch.set_num_threads(2)
    from afford import LLM, SamplingParams
    rows = [json.loads(line) for line in open(ROOT / "data" / "gsm8k" / "test.jsonl")][:a.prompts]
    prompts = [r["question"] + "\n" for r in rows]
    sp = SamplingParams(max_tokens=a.new_tokens, temperature=0)
    out = []
    for dtype in a.dtypes:
        plain = LLM("default", dtype=dtype)
        alone = [plain.generate([p], sp)[0].token_ids for p in prompts]
        arms = {"batch": plain}
        for name, kw in (("draft k=4", dict(draft="default")), ("ngram k=4", dict(draft="ngram")),
                         ("goodput k<=4", dict(draft="default", speculation="goodput"))):
            arms[name] = LLM("default", dtype=dtype, num_speculative_tokens=4, **kw)   # the target in `dtype`
        for name, llm in arms.items():
            got = [o.token_ids for o in llm.generate(prompts, sp)]           # the whole set as one batch
            diff = sum(g != r for g, r in zip(got, alone))
            out.append({"dtype": dtype, "arm": name, "prompts": len(prompts), "differ_from_alone": diff})
            print(out[-1], flush=True)
    print(f"wrote {save('batch_invariance', {'settings': vars(a), 'rows': out})}")


if __name__ == "__main__":
    main()
