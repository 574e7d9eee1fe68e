"""Teacher-forced agreement of drafts with a target: on GSM8K test questions with their reference answers,
the share of positions where a draft's argmax (at each of its exits) equals the target's. A quick,
decoding-free proxy for acceptance, used to see whether a multi-exit draft's deeper exits learned more.
`--on-policy N` measures it on the target's own greedy answers (N new tokens after each question) instead:
the text a draft meets in greedy speculative decoding, where only the answer's positions count.

    python benchmarks/draft_agreement.py --target default --draft default-draft --draft default-sorted

Writes benchmarks/results/draft_agreement.json (draft_agreement_<target>.json for another target).
"""
from __future__ import annotations

import argparse
import json

import torch
from common import ROOT, save


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="default")
    ap.add_argument("--draft", action="append", required=True, help="a draft folder or bundled name (repeat)")
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--on-policy", type=int, default=0, metavar="N",
                    help="score the target's own greedy answers of N tokens, not the reference answers")
    ap.add_argument("--name", default="draft_agreement", help="results file name (a suffix per target is added)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from afford.models.loader import load_model, load_tokenizer, resolve_model_path
    tpath = resolve_model_path(a.target)
    tok = load_tokenizer(tpath)
    target = load_model(tpath, "cpu", "float32").eval()
    recs = [json.loads(line) for line in open(ROOT / "data" / "gsm8k" / "test.jsonl")][: a.questions]
    out = {"settings": vars(a), "drafts": {}}
    with torch.no_grad():
        if a.on_policy:                       # the question, then the target's greedy answer; score the answer
            ids, starts = [], []
            for r in recs:
                x = torch.tensor([tok(r["question"] + "\n")["input_ids"]])
                starts.append(x.shape[1] - 1)
                for _ in range(a.on_policy):
                    x = torch.cat([x, target(x)[:, -1:].argmax(-1)], dim=1)
                ids.append(x)
        else:
            ids = [torch.tensor([tok(r["question"] + "\n" + r["answer"])["input_ids"]]) for r in recs]
            starts = [0] * len(ids)
        want = [target(x).argmax(-1)[:, s:] for x, s in zip(ids, starts)]
        n = sum(w.numel() for w in want)
        for name in a.draft:
            d = load_model(resolve_model_path(name, "draft"), "cpu", "float32").eval()
            exits = d.cfg.exits or (d.cfg.num_layers,)
            agree = [0] * len(exits)
            for x, w, st in zip(ids, want, starts):
                for i, lg in enumerate(d.exit_logits(x)):
                    agree[i] += int((lg[:, st:].argmax(-1) == w).sum())
            out["drafts"][name] = {str(e): round(c / n, 4) for e, c in zip(exits, agree)}
            print(f"{name}: " + ", ".join(f"exit {e}: {c / n:.3f}" for e, c in zip(exits, agree)))
    slug = "" if a.target == "default" else "_" + "".join(c if c.isalnum() else "_" for c in a.target)
    print(f"wrote {save(a.name + slug, out)}")


if __name__ == "__main__":
    main()
