"""Block-sparse decode attention (issue #17) against dense, training-free, on the bundled target (1,024
positions: the longest model afford has yet), in one run:

- teacher-forced decoding of held-out text (the tail of Tiny Shakespeare the zoo never trained on and GSM8K
  test records), one token per decode step through the paged cache, so every position past the prompt is
  predicted by the decode path under test: perplexity of positions 256..1023;
- per decode token: K/V bytes attention read (selected blocks + compressed keys) vs what dense read, bytes
  moved into the fast tier, its hit rate and size, tokens/s;
- greedy agreement: 128 tokens after a 768-token prompt, against dense.

Arms: dense (cpu_paged); sparse with a budget of 4 blocks of 64 tokens (sink + 2 local + 1 chosen) and of 8
(sink + 2 local + 5 chosen), each without and with the locality share, with a fast tier that holds one
query's blocks per layer (the working set: what is not in it moves every step).

    python benchmarks/sparse_long.py              # -> results/sparse_long.json (about 6 minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from common import ROOT, save

sys.path.insert(0, str(ROOT))
from afford import LLM, SamplingParams  # noqa: E402
from afford.zoo.data import read_documents  # noqa: E402

ARMS = {"dense": dict(attention="cpu_paged", block_size=64)}
for _b, _loc in ((4, 0.0), (4, 1.0), (8, 0.0), (8, 0.5)):      # a fast tier of one query's blocks per layer
    ARMS[f"sparse b={_b}, locality {_loc:g}"] = dict(attention="sparse", sparse_budget=_b, sparse_locality=_loc,
                                                    sparse_fast_blocks=_b)


def texts(tok, n: int, length: int) -> list[list[int]]:
    """n token lists of `length` from held-out text: Shakespeare's last 5 % and GSM8K test records."""
    shakes = read_documents(ROOT / "data" / "tinyshakespeare" / "input.txt")[0]
    tail = shakes[int(len(shakes) * 0.95):]
    ids = tok(tail, add_special_tokens=False)["input_ids"]
    out = [ids[i * length:(i + 1) * length] for i in range(n // 2)]
    gsm = "\n\n".join(r for r in read_documents(ROOT / "data" / "gsm8k" / "test.jsonl")[:400])
    g = tok(gsm, add_special_tokens=False)["input_ids"]
    out += [g[i * length:(i + 1) * length] for i in range(n - len(out))]
    return [t for t in out if len(t) == length]


@torch.inference_mode()
def teacher_forced(llm, ids: list[int], prompt: int) -> tuple[float, int, float]:
    """NLL summed over positions prompt..len-1, decoding one token per step; (nll, tokens, seconds)."""
    eng = llm.engine
    pool, runner = eng.pool, eng.runner
    sid = 10 ** 6
    pool.prepare_write(sid, len(ids))
    try:
        logits = runner.forward([sid], [0], [ids[:prompt]])                      # (1, V): dense prefill
        nll, t = 0.0, time.perf_counter()
        for p in range(prompt, len(ids)):
            nll -= float(torch.log_softmax(logits[0].float(), -1)[ids[p]])
            if p + 1 < len(ids):
                logits = runner.forward([sid], [p], [[ids[p]]])                   # one decode step
        return nll, len(ids) - prompt, time.perf_counter() - t
    finally:
        pool.free(sid)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=4)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=256)
    a = ap.parse_args()
    results = {"settings": vars(a), "arms": {}}
    ref_tokens = None
    for name, kw in ARMS.items():
        llm = LLM("default", **kw)
        docs = texts(llm.tokenizer, a.texts, a.length)
        nll = n = secs = 0.0
        for ids in docs:
            x, m, s = teacher_forced(llm, ids, a.prompt)
            nll, n, secs = nll + x, n + m, secs + s
        backend = llm.engine.runner.backend
        counters = backend.counters() if hasattr(backend, "counters") else {}
        gen = llm.generate(docs[0][:a.length - 256], SamplingParams(max_tokens=128, temperature=0, ignore_eos=True))[0]
        if ref_tokens is None:
            ref_tokens = gen.token_ids
        agree = next((i for i, (x, y) in enumerate(zip(gen.token_ids, ref_tokens)) if x != y), len(ref_tokens))
        per_tok = 2 * llm.engine.model_config.num_kv_heads * llm.engine.model_config.head_dim * 4 * \
            llm.engine.model_config.num_layers
        dense_read = sum(range(a.prompt + 1, a.length + 1)) / (a.length - a.prompt) * per_tok   # mean over positions
        r = {"perplexity": math.exp(nll / n), "tokens": int(n), "decode_tokens_per_s": n / secs,
             "greedy_agreement_tokens": agree, "greedy_tokens": len(ref_tokens),
             "kv_read_bytes_per_token": counters["read_bytes"] / n if counters else dense_read,
             "dense_kv_bytes_per_token": counters["dense_bytes"] / n if counters else dense_read}
        if counters:
            r.update(moved_bytes_per_token=counters["moved_bytes"] / n, hit_rate=counters["hits"] /
                     max(counters["hits"] + counters["misses"], 1), fast_tier_blocks=counters["fast_blocks"],
                     kv_read_vs_dense=counters["read_bytes"] / counters["dense_bytes"])
        results["arms"][name] = r
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    print(f"wrote {save('sparse_long', results)}")


if __name__ == "__main__":
    main()
