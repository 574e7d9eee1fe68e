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
from common import ROOT, greedy_answers, save


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
            ids, starts = (list(v) for v in zip(*greedy_answers(target, tok, recs, a.on_policy)))
        else:
            ids = [torch.tensor([tok(r["question"] + "\n" + r["answer"])["input_ids"]]) for r in recs]
            starts = [0] * len(ids)
        tl = [target(x)[:, s:] for x, s in zip(ids, starts)]
        want = [lg.argmax(-1) for lg in tl]
        n = sum(w.numel() for w in want)
        # the target's own confidence at each scored position: where drafts can and cannot follow it
        conf = torch.cat([torch.softmax(lg.float(), -1).amax(-1).flatten() for lg in tl])
        edges = [0.0, 0.5, 0.8, 0.95, 1.01]
        bucket = torch.bucketize(conf, torch.tensor(edges[1:-1]), right=True)
        names = [f"{lo:.2f}-{min(hi, 1.0):.2f}" for lo, hi in zip(edges, edges[1:])]
        out["target_confidence_share"] = {nm: round(float((bucket == b).float().mean()), 4) for b, nm in enumerate(names)}
        out["agreement_by_target_confidence"] = {}
        for name in a.draft:
            d = load_model(resolve_model_path(name, "draft"), "cpu", "float32").eval()
            exits = d.cfg.exits or (d.cfg.num_layers,)
            agree, hits = [0] * len(exits), [[] for _ in exits]
            for x, w, st in zip(ids, want, starts):
                for i, lg in enumerate(d.exit_logits(x)):
                    hit = lg[:, st:].argmax(-1) == w
                    agree[i] += int(hit.sum())
                    hits[i].append(hit.flatten())
            last = torch.cat(hits[-1]).float()
            out["agreement_by_target_confidence"][name] = {
                nm: round(float(last[bucket == b].mean()), 4) if bool((bucket == b).any()) else None
                for b, nm in enumerate(names)}
            out["drafts"][name] = {str(e): round(c / n, 4) for e, c in zip(exits, agree)}
            print(f"{name}: " + ", ".join(f"exit {e}: {c / n:.3f}" for e, c in zip(exits, agree)))
    print("target's top probability (share of positions): " + ", ".join(
        f"{k} {v:.2f}" for k, v in out["target_confidence_share"].items()))
    for name, per in out["agreement_by_target_confidence"].items():
        print(f"  {name} (last exit) agreement by it: " + ", ".join(f"{k} {v}" for k, v in per.items()))
    slug = "" if a.target == "default" else "_" + "".join(c if c.isalnum() else "_" for c in a.target)
    print(f"wrote {save(a.name + slug, out)}")


if __name__ == "__main__":
    main()
