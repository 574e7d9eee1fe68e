"""C3oT on GSM8K with the zoo model: accuracy and chain length of long CoT, short CoT and C3oT-short.

Three fine-tunes of the bundled target (which saw GSM8K train while it was trained), each for the same
wall-clock budget on GSM8K train (the last 5 % held out as usual), then greedy decoding of GSM8K test
questions with each:

- long CoT: trained on question + the original solution; decoded from "question\\n";
- short CoT: trained on question + the compressed solution (afford/zoo/cot.py) only;
- C3oT: trained on both under the two condition prefixes (`afford zoo train --conditioned`); decoded
  with the short prefix (C3oT-short) and, for reference, the long one.

Accuracy: the number after "####" (or the last number) against the test answer (afford.vote); chain
length: generated tokens per question.

    python benchmarks/cot.py [--minutes 10] [--questions 100] [--max-tokens 256]

Writes benchmarks/results/cot.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, save


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per arm")
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    a = ap.parse_args()
    torch.set_num_threads(2)
    from afford import LLM, SamplingParams, vote
    from afford.models.loader import resolve_model_path
    from afford.zoo.cot import compress_file, prompt
    from afford.zoo.train import TrainConfig, preset_shape, train

    tmp = Path(tempfile.mkdtemp())
    gsm_train = ROOT / "data" / "gsm8k" / "train.jsonl"
    compressed = tmp / "train_short.jsonl"
    comp = compress_file(gsm_train, compressed)
    short_only = tmp / "short_only.jsonl"                 # question + compressed solution, as plain records
    with open(short_only, "w") as f:
        for line in compressed.read_text().splitlines():
            r = json.loads(line)
            f.write(json.dumps({"question": r["question"], "answer": r["short_answer"]}) + "\n")
    base = resolve_model_path("default", "target")
    arms = {"long CoT": ([gsm_train], False), "short CoT": ([short_only], False), "C3oT": ([compressed], True)}
    models, train_rows = {}, []
    for name, (data, conditioned) in arms.items():
        out = tmp / name.replace(" ", "_")
        tc = TrainConfig(out=str(out), data=tuple(str(d) for d in data), tokenizer=str(base), init=str(base),
                         minutes=a.minutes, lr=a.lr, warmup_steps=20, eval_every=10_000, conditioned=conditioned,
                         **preset_shape("target"))
        t = time.perf_counter()
        res = train(tc, overwrite=True, log=lambda *x: None)
        train_rows.append({"arm": name, "steps": res.get("steps"), "val_loss": res.get("val_loss"),
                           "minutes": round((time.perf_counter() - t) / 60, 1)})
        print(train_rows[-1], flush=True)
        models[name] = out

    test = [json.loads(line) for line in open(ROOT / "data" / "gsm8k" / "test.jsonl")][:a.questions]
    gold = [vote.numeric_answer(r["answer"]) for r in test]
    evals = [("long CoT", "long CoT", lambda q: q + "\n"), ("short CoT", "short CoT", lambda q: q + "\n"),
             ("C3oT-short", "C3oT", prompt), ("C3oT-long", "C3oT", lambda q: prompt(q, short=False))]
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=0)
    rows = []
    for label, model, make in evals:
        llm = LLM(str(models[model]), dtype="float32", max_num_seqs=32)
        outs = llm.generate([make(r["question"]) for r in test], sp)
        correct = sum(vote.numeric_answer(o.text) == g for o, g in zip(outs, gold))
        tokens = sum(len(o.token_ids) for o in outs)
        rows.append({"arm": label, "accuracy": round(correct / len(test), 3), "correct": correct,
                     "questions": len(test), "mean_chain_tokens": round(tokens / len(test), 1),
                     "finished_by_length": sum(o.finish_reason == "length" for o in outs)})
        print(rows[-1], flush=True)
    long_len = rows[0]["mean_chain_tokens"]
    for r in rows:
        r["chain_vs_long"] = round(r["mean_chain_tokens"] / long_len, 3) if long_len else None
    print(f"wrote {save('cot', {'settings': vars(a), 'compression': comp, 'training': train_rows, 'rows': rows})}")


if __name__ == "__main__":
    main()
