"""The lossy levers (issue #16) beside their quality change, with the bundled pair, in one run:

- EAD (cascade="entropy", small = the bundled draft, large = the bundled target) on GSM8K test prompts,
  at tau = 2.0 / 2.5 (the default, picked on the dev split: the tail of train.jsonl the zoo held out) / 3.0,
  against the plain large and the plain small model: accuracy, agreement, perplexity under the large
  model, tokens/s, modeled FLOPs and bytes per token (afford/bench/fidelity.py).
- GRAD on the fact-QA test split (data/factqa, facts no model trained on), with its default weight and
  top_docs (picked on the dev split), on both models.
- Guided re-ranking (steering, not speed): GSM8K prompts that mention a gendered word, rewritten with the
  words swapped (he/she, his/her, boy/girl, ...); counterfactual invariance = the share of the output that
  stays the same (after swapping back) when the prompt is rewritten, plain vs guided at alpha 1 (AMBEDKAR's
  default) and 8, and what it costs.

    python benchmarks/fidelity.py                 # -> results/fidelity.json (about 12 minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from common import ROOT, save

sys.path.insert(0, str(ROOT))
from afford import LLM, SamplingParams  # noqa: E402
from afford.bench.fidelity import common_prefix, run  # noqa: E402
from afford.levers.rerank import swap_words  # noqa: E402

SWAPS = {"he": "she", "his": "her", "him": "hers", "boy": "girl", "man": "woman", "men": "women",
         "father": "mother", "brother": "sister", "son": "daughter", "boys": "girls", "husband": "wife"}
DROP = ("texts", "token_ids")


def slim(result: dict) -> dict:
    return {**result, "rows": [{k: v for k, v in r.items() if k not in DROP} for r in result["rows"]]}


def steering(n: int, max_tokens: int, alphas: list[float]) -> dict:
    rewrite = swap_words(SWAPS)
    rows = [json.loads(line) for line in (ROOT / "data" / "gsm8k" / "test.jsonl").read_text().splitlines()]
    prompts = [f"Question: {r['question']}\nAnswer:" for r in rows if rewrite(r["question"]) != r["question"]][:n]
    sp = SamplingParams(max_tokens=max_tokens, temperature=0)
    out = {"n": len(prompts), "max_tokens": max_tokens, "swaps": SWAPS, "arms": {}}
    arms = [("plain", {})] + [(f"guided alpha={a:g}", dict(rerank="guided", large="default", alpha=a,
                                                            counterfactual=SWAPS)) for a in alphas]
    for arm, kw in arms:
        llm = LLM("default-draft", **kw)
        tok = llm.tokenizer
        llm.generate(prompts[0], SamplingParams(max_tokens=4, temperature=0))
        t, gen, agree, same = time.perf_counter(), 0, 0.0, 0
        for p in prompts:
            a = llm.generate(p, sp)[0]
            b = llm.generate(rewrite(p), sp)[0]
            gen += len(a.token_ids) + len(b.token_ids)
            back = tok(rewrite(b.text), add_special_tokens=False)["input_ids"]     # b's text with the words swapped back
            ref = tok(a.text, add_special_tokens=False)["input_ids"]
            agree += common_prefix(back, ref) / max(len(ref), 1)
            same += rewrite(b.text) == a.text
        secs = time.perf_counter() - t
        out["arms"][arm] = {"invariance_prefix": agree / len(prompts), "invariant_outputs": same / len(prompts),
                            "tokens_per_s": gen / secs,
                            "overridden_tokens": getattr(llm.engine.levers.reranker, "changed", 0)
                            if llm.engine.levers else 0, "generated_tokens": gen}
        print(f"steering {arm}: {out['arms'][arm]}", flush=True)
    for arm, r in out["arms"].items():
        r["time_vs_plain"] = out["arms"]["plain"]["tokens_per_s"] / r["tokens_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="GSM8K test prompts for EAD")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--taus", default="2.0,2.5,3.0")
    ap.add_argument("--steer-n", type=int, default=30)
    a = ap.parse_args()
    data = ROOT / "data"
    ead = [{"model": "default-draft"}] + [{"model": "default-draft", "cascade": "entropy", "large": "default",
                                            "tau": float(t)} for t in a.taus.split(",")]
    results = {"ead": slim(run(ead, "default", "gsm8k", a.n, a.max_tokens, None, data))}
    print(json.dumps({k: v for k, v in results["ead"].items() if k != "rows"}), flush=True)
    docs = str(data / "factqa" / "docs")
    grad = [{"model": "default", "grad_corpus": docs}, {"model": "default-draft"},
            {"model": "default-draft", "grad_corpus": docs}]
    results["grad"] = slim(run(grad, "default", "factqa", 200, 12, None, data, "test"))
    results["steering"] = steering(a.steer_n, 48, [1.0, 8.0])
    save("fidelity", results)
    for part in ("ead", "grad"):
        for r in results[part]["rows"]:
            print(part, r["config"], {k: r[k] for k in ("accuracy", "identical", "prefix_agreement",
                                                       "perplexity_under_large", "large_share", "speed_vs_large",
                                                       "cost_vs_large", "bytes_vs_large")})


if __name__ == "__main__":
    main()
