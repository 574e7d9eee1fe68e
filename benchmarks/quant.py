"""Weight-only quantization, side by side in one run: fp32, bf16, int8 and int4 (per-channel, 128,
auto; the blocks' matrices, and with "+ head" the LM head too) decode tokens/s at batch 1 and 8 on random-init Llamas (34 M, 100 M) and on the bundled zoo
target; held-out perplexity (through prompt_logprobs) and greedy agreement with fp32 on the zoo target.

    python benchmarks/quant.py [--sizes llama-34m llama-100m] [--new-tokens 128]

Writes benchmarks/results/quant.json.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import llamacpp
import torch
from common import SIZES, heldout_texts, perplexity, random_llama, save

ARMS = [("fp32", dict(dtype="float32")), ("bf16", dict(dtype="bfloat16")),
        ("int8 per-channel", dict(dtype="bfloat16", quantization="int8", quant_group="per-channel")),
        ("int8 g128", dict(dtype="bfloat16", quantization="int8", quant_group="128")),
        ("int8 auto", dict(dtype="bfloat16", quantization="int8", quant_group="auto")),
        ("int4 per-channel", dict(dtype="bfloat16", quantization="int4", quant_group="per-channel")),
        ("int4 g128", dict(dtype="bfloat16", quantization="int4", quant_group="128")),
        ("int4 auto", dict(dtype="bfloat16", quantization="int4", quant_group="auto")),
        # the LM head low-bit too (quantize_head): on these small models it is a large share of a token's bytes
        ("int8 auto + head", dict(dtype="bfloat16", quantization="int8", quant_group="auto", quantize_head=True)),
        ("int4 per-channel + head", dict(dtype="bfloat16", quantization="int4", quant_group="per-channel",
                                         quantize_head=True)),
        ("int4 auto + head", dict(dtype="bfloat16", quantization="int4", quant_group="auto", quantize_head=True))]


def speed(llm, batch, new_tokens, reps=2):
    from afford import SamplingParams
    prompt = list(range(2, 130))
    llm.generate([prompt] * batch, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    runs = []
    for _ in range(reps):
        t = time.perf_counter()
        llm.generate([prompt] * batch, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
        runs.append(batch * new_tokens / (time.perf_counter() - t))
    return statistics.median(runs)


def fixed_group(path: str, arm: str, kw: dict) -> tuple[str, dict]:
    """The g128 arm uses the largest of 128, 64, 32 that divides every input width of the model
    (the zoo target's 704 and the 34 M model's 1376 are not multiples of 128)."""
    if kw.get("quant_group") != "128":
        return arm, kw
    from afford.config import ModelConfig
    from afford.models.loader import resolve_model_path
    cfg = ModelConfig.from_dir(resolve_model_path(path))
    g = next(g for g in (128, 64, 32) if cfg.hidden_size % g == 0 and cfg.intermediate_size % g == 0)
    return arm.replace("g128", f"g{g}"), {**kw, "quant_group": str(g)}


def agreement(ref_llm, llm, prompts, n):
    """Mean length of the exact greedy prefix shared with the reference model, over n tokens."""
    from afford import SamplingParams
    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    prefix = []
    for r, m in zip(ref_llm.generate(prompts, sp), llm.generate(prompts, sp)):
        k = 0
        while k < n and r.token_ids[k] == m.token_ids[k]:
            k += 1
        prefix.append(k)
    return statistics.mean(prefix)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from afford import LLM
    from afford.models.loader import resolve_model_path
    tmp = Path(tempfile.mkdtemp())
    rows = []
    models = [("default target", "default")] + [(s, str(random_llama(tmp / s, s))) for s in a.sizes]
    for label, path in models:
        for arm, kw in ARMS:
            arm, kw = fixed_group(path, arm, kw)
            llm = LLM(path, max_model_len=512, **kw)
            for batch in (1, 8):
                tps = speed(llm, batch, a.new_tokens)
                rows.append({"model": label, "arm": arm, "batch": batch, "tok_s": round(tps, 1),
                             "weight_MB": round(llm.engine.runner.weight_bytes / 1e6, 2)})
                print(rows[-1], flush=True)
            del llm
    anchors = []
    if llamacpp.available():
        for label, path in models[1:]:
            prompt = list(range(2, 130))
            for outtype in ("q8_0", "q4_0"):
                gguf = llamacpp.to_gguf(Path(path), tmp / f"{label}-{outtype}.gguf", outtype)
                anchors.append({"model": label, "engine": f"llama.cpp {outtype}",
                                "tok_s": round(llamacpp.decode_tok_s(gguf, prompt, a.new_tokens, a.threads), 1)})
                print(anchors[-1], flush=True)
    for label, _ in models:
        base = {r["batch"]: r["tok_s"] for r in rows if r["model"] == label and r["arm"] == "fp32"}
        for r in rows:
            if r["model"] == label:
                r["ratio_vs_fp32"] = round(r["tok_s"] / base[r["batch"]], 2)
    quality = []
    ref = LLM("default", dtype="float32", max_model_len=512)
    gsm, shk = heldout_texts(ref.tokenizer, 100)
    prompts = [ref.tokenizer(q)["input_ids"] for q, _ in gsm[:16]]
    for arm, kw in ARMS:
        arm, kw = fixed_group(str(resolve_model_path("default")), arm, kw)
        llm = LLM("default", max_model_len=512, **kw)
        q = {"arm": arm, "ppl_gsm8k_test": round(perplexity(llm, gsm), 3),
             "ppl_shakespeare_heldout": round(perplexity(llm, shk), 3),
             "greedy_prefix_match_of_256": agreement(ref, llm, prompts, 256) if arm != "fp32" else 256}
        quality.append(q)
        print(q, flush=True)
    base = quality[0]
    for q in quality:
        q["ppl_increase_gsm8k_pct"] = round(100 * (q["ppl_gsm8k_test"] / base["ppl_gsm8k_test"] - 1), 2)
        q["ppl_increase_shakespeare_pct"] = round(100 * (q["ppl_shakespeare_heldout"] / base["ppl_shakespeare_heldout"] - 1), 2)
    out = save("quant", {"settings": vars(a), "speed": rows, "quality": quality, "llamacpp": anchors})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
