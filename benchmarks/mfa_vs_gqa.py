"""MFA vs GQA at (nearly) equal parameter count: same data, same step budget, same seed.
Reports validation loss / perplexity and KV bytes per token (bf16 cache) of each.

    python benchmarks/mfa_vs_gqa.py [--steps 400]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import ROOT, save


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from afford.zoo.data import split_documents
    from afford.zoo.tokenizer import train_tokenizer
    from afford.zoo.train import from_preset, model_config, train
    data = (str(ROOT / "data" / "tinyshakespeare" / "input.txt"), str(ROOT / "data" / "gsm8k" / "train.jsonl"))
    tmp = Path(tempfile.mkdtemp())
    tok = train_tokenizer(split_documents(list(data)).train, 4096, tmp / "tok")
    rows = []
    for preset in ("small-gqa", "small-mfa"):
        tc = from_preset(preset, out=str(tmp / preset), data=data, tokenizer=str(tmp / "tok"), steps=a.steps,
                         eval_every=10 ** 9, seed=0, threads=a.threads)
        res = train(tc)
        mc = model_config(tc, len(tok), tok.eos_token_id)
        kv_values = mc.num_layers * mc.kv_values_per_token
        rows.append({"preset": preset, "attention": mc.attention, "params": res["params"],
                     "val_loss": round(res["val_loss"], 4), "val_ppl": round(res["val_ppl"], 2),
                     "kv_values_per_token": kv_values, "kv_bytes_per_token_bf16": 2 * kv_values,
                     "train_seconds": res["elapsed_s"]})
        print(rows[-1], flush=True)
    out = save("mfa_vs_gqa", {"settings": vars(a), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
