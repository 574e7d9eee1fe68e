"""Passkey retrieval at 2K and 4K context, dense vs block-sparse decode attention (issue #17), on a model
with >= 4,096 positions (`afford zoo passkey` + `afford zoo train --max-positions 4096 --init ...`, README).

Each document (fresh ones, another seed than training's) is prefilled up to its last 12 tokens; those --
the end of the filler and the question "What is the pass key? The pass key is" -- are fed one decode step
at a time, and the answer is decoded greedily, so every query that has to find the key runs through the
decode attention under test (afford's sparse backend is sparse in decoding; prefill is dense). A document
counts when the answer starts with its key. Also: K/V bytes decode attention read vs dense, fast-tier hit
rate and bytes moved per decoded token -- over the question and answer steps (the fast tier starts cold
after the dense prefill, so its first step misses every block it selects) and, apart, over
`--continue-tokens` greedy tokens decoded past the answer (its steady state).

    python benchmarks/passkey_long.py --model runs/pk2      # -> results/passkey_long.json
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from common import ROOT, save

sys.path.insert(0, str(ROOT))
from afford import LLM  # noqa: E402
from afford.zoo.passkey import make  # noqa: E402

QUESTION_TOKENS = 12


def counters(llm) -> dict | None:
    backend = llm.engine.runner.backend
    return backend.counters() if hasattr(backend, "counters") else None


@torch.inference_mode()
def retrieve(llm, ids: list[int], new: int = 4, more: int = 0) -> tuple[list[int], dict | None]:
    """The answer's `new` tokens, then `more` tokens of greedy continuation (decoding on past the answer,
    where the fast tier's steady state shows); returns the answer and the sparse counters between the two."""
    eng = llm.engine
    pool, runner = eng.pool, eng.runner
    sid = 10 ** 6
    cut = len(ids) - QUESTION_TOKENS
    pool.prepare_write(sid, len(ids) + new + more)
    try:
        runner.forward([sid], [0], [ids[:cut]])                                   # dense prefill of the context
        for p in range(cut, len(ids)):
            logits = runner.forward([sid], [p], [[ids[p]]])                       # the question, decode steps
        out = []
        for p in range(len(ids), len(ids) + new):
            out.append(int(logits[0].argmax()))
            logits = runner.forward([sid], [p], [[out[-1]]])
        mid = counters(llm)
        for p in range(len(ids) + new, len(ids) + new + more):
            logits = runner.forward([sid], [p], [[int(logits[0].argmax())]])
        return out, mid
    finally:
        pool.free(sid)


@torch.inference_mode()
def tail_perplexity(llm, ids: list[int], tail: int) -> tuple[float, float]:
    """Teacher-forced: the context prefilled up to its last `tail` tokens, each of those fed as a decode step
    through the attention under test. Returns (summed NLL of the tail tokens, seconds of those steps)."""
    eng = llm.engine
    pool, runner = eng.pool, eng.runner
    sid = 10 ** 6 + 1
    cut = len(ids) - tail
    pool.prepare_write(sid, len(ids))
    try:
        logits = runner.forward([sid], [0], [ids[:cut]])
        nll, t = 0.0, time.perf_counter()
        for p in range(cut, len(ids)):
            nll -= float(torch.log_softmax(logits[0].float(), -1)[ids[p]])
            logits = runner.forward([sid], [p], [[ids[p]]])
        return nll, time.perf_counter() - t
    finally:
        pool.free(sid)


def diff(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in ("read_bytes", "dense_bytes", "moved_bytes", "hits", "misses")}


def sparse_row(d: dict, tokens: int) -> dict:
    return {"kv_read_vs_dense": d["read_bytes"] / d["dense_bytes"],
            "hit_rate": d["hits"] / max(d["hits"] + d["misses"], 1), "moved_bytes_per_token": d["moved_bytes"] / tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--lengths", default="1800:2000,3600:3900", help="token ranges of the documents")
    ap.add_argument("--scores", nargs="+", default=["mean", "bound"], choices=["mean", "bound"],
                    help="how sparse queries pick blocks (sparse_score): one arm per budget and score")
    ap.add_argument("--budgets", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--locality", type=float, default=0.5)
    ap.add_argument("--fast-factor", type=int, default=1, help="fast-tier blocks per layer = factor x budget")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense arm (a sparse-only comparison)")
    ap.add_argument("--name", default="passkey_long", help="results/NAME.json")
    ap.add_argument("--ppl-docs", type=int, default=0,
                    help="documents per length whose filler's last --ppl-tokens tokens are also scored teacher-forced "
                         "through decode steps: perplexity and decode tokens/s at that context")
    ap.add_argument("--ppl-tokens", type=int, default=128)
    ap.add_argument("--continue-tokens", type=int, default=128,
                    help="greedy tokens decoded past the answer: the fast tier's steady state, reported apart")
    a = ap.parse_args()
    arms = {} if a.no_dense else {"dense": dict(attention="cpu_paged", block_size=64)}
    for score in a.scores:
        for b in a.budgets:
            fast = a.fast_factor * b
            arms[f"sparse b={b}, locality {a.locality}, {score}" + (f", fast tier {fast}" if a.fast_factor > 1 else "")] = \
                dict(attention="sparse", sparse_budget=b, sparse_locality=a.locality, sparse_fast_blocks=fast,
                     sparse_score=score)
    filler = (ROOT / "data" / "tinyshakespeare" / "input.txt").read_text()
    results = {"settings": vars(a), "rows": []}
    for name, kw in arms.items():
        llm = LLM(a.model, **kw)
        tok, limit = llm.tokenizer, llm.engine.max_model_len - 8 - a.continue_tokens
        for span in a.lengths.split(","):
            lo, hi = (int(x) for x in span.split(":"))
            docs = [d for d in make(filler, tok, 3 * a.n, lo, hi, seed=12345)
                    if len(tok(d["prompt"], add_special_tokens=False)["input_ids"]) < limit][:a.n]
            hits, ctx = 0, 0
            answer = cont = None
            nll = secs = 0.0
            for i, d in enumerate(docs):
                ids = tok(d["prompt"], add_special_tokens=False)["input_ids"]
                ctx += len(ids)
                before = counters(llm)
                out, mid = retrieve(llm, ids, more=a.continue_tokens)
                hits += tok.decode(out).strip().startswith(d["key"])
                if before is not None:
                    one, two = diff(before, mid), diff(mid, counters(llm))
                    answer = one if answer is None else {k: answer[k] + one[k] for k in one}
                    cont = two if cont is None else {k: cont[k] + two[k] for k in two}
                if i < a.ppl_docs:                 # after the counters: these steps are not in the hit rates
                    n, s = tail_perplexity(llm, ids[:-QUESTION_TOKENS], a.ppl_tokens)
                    nll, secs = nll + n, secs + s
            row = {"arm": name, "context_tokens_mean": ctx / len(docs), "documents": len(docs),
                   "accuracy": hits / len(docs)}
            if a.ppl_docs:
                scored = min(a.ppl_docs, len(docs)) * a.ppl_tokens
                row.update(perplexity_tail=math.exp(nll / scored), decode_tok_s=scored / secs)
            if answer is not None:               # the question and answer steps, from a cold fast tier
                row.update(sparse_row(answer, len(docs) * (QUESTION_TOKENS + 4)))
                if a.continue_tokens:
                    row["continuation"] = sparse_row(cont, len(docs) * a.continue_tokens)
            results["rows"].append(row)
            print(row, flush=True)
    print(f"wrote {save(a.name, results)}")


if __name__ == "__main__":
    main()
