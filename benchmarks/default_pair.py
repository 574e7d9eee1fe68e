"""Quality bar of the bundled default pair, measured through the public API.

- target perplexity on held-out GSM8K test answers (given their question) and on the held-out tail of
  Tiny Shakespeare (never trained on), through `SamplingParams(prompt_logprobs=True)`;
- the draft's greedy acceptance rate against the target at k = 4 on GSM8K test questions;
- target vs draft cost per token: parameters and measured decode time (batch 1, fp32).

    python benchmarks/default_pair.py [--questions 100]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from common import ROOT, heldout_texts, perplexity, save


def decode_time_per_token(path, n=128):
    from afford import LLM, SamplingParams
    llm = LLM(path, dtype="float32")
    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    t = time.perf_counter()
    llm.generate([[5, 6, 7]], sp)
    return (time.perf_counter() - t) / n, llm.engine.model_config.num_parameters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft", default="default", help="the draft to measure: the bundled one, or a folder")
    ap.add_argument("--name", default="default_pair", help="results file name")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from afford import LLM, SamplingParams
    gsm = [json.loads(line) for line in open(ROOT / "data" / "gsm8k" / "test.jsonl")][: a.questions]
    target = LLM("default", dtype="float32")
    gsm_texts, shk_texts = heldout_texts(target.tokenizer, a.questions)
    ppl_gsm = perplexity(target, gsm_texts)
    ppl_shk = perplexity(target, shk_texts)
    print(f"target perplexity: GSM8K test answers {ppl_gsm:.2f} | held-out Shakespeare {ppl_shk:.2f}")
    drafted = LLM("default", dtype="float32", draft=a.draft, num_speculative_tokens=4)
    t = time.perf_counter()
    outs = drafted.generate([r["question"] + "\n" for r in gsm], SamplingParams(max_tokens=a.new_tokens, temperature=0))
    spec_s = time.perf_counter() - t
    per_forward = sum(o.metrics["generated_tokens"] for o in outs) / sum(o.metrics["forward_passes"] for o in outs)
    st = drafted.stats
    rate = st.accepted / st.drafted
    per_pos = [acc / dr for acc, dr in zip(st.accepted_per_position, st.drafted_per_position)]
    print(f"draft acceptance at k=4 on {len(gsm)} GSM8K test questions: {rate:.3f} "
          f"(per position {', '.join(f'{p:.2f}' for p in per_pos)}); "
          f"{per_forward:.2f} tokens per target forward per sequence")
    from afford.models.loader import resolve_model_path
    t_tok, t_params = decode_time_per_token(str(resolve_model_path("default")))
    d_tok, d_params = decode_time_per_token(str(resolve_model_path(a.draft, "draft")))
    print(f"cost per token: params {t_params / 1e6:.2f} M vs {d_params / 1e6:.2f} M ({t_params / d_params:.1f}x); "
          f"measured decode {t_tok * 1e3:.2f} ms vs {d_tok * 1e3:.2f} ms ({t_tok / d_tok:.1f}x)")
    out = save(a.name, {
        "settings": vars(a), "target_ppl_gsm8k_test_answers": ppl_gsm, "target_ppl_shakespeare_heldout": ppl_shk,
        "draft_acceptance_k4_gsm8k": rate, "acceptance_per_position": per_pos,
        "spec_batch_seconds": spec_s, "tokens_per_target_forward": per_forward, "target_params": t_params, "draft_params": d_params,
        "param_ratio": t_params / d_params, "target_ms_per_token": t_tok * 1e3, "draft_ms_per_token": d_tok * 1e3,
        "time_ratio": t_tok / d_tok})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
