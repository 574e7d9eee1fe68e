"""Shared helpers for the benchmark scripts: random-weight checkpoints, machine description, result files."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent

# name -> (layers, hidden, heads, kv_heads, intermediate, vocab)
SIZES = {
    "llama-34m": (8, 512, 8, 8, 1376, 8192),
    "llama-100m": (12, 768, 12, 12, 2048, 16384),
}


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "isa": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def per_call(f, n: int = 10, warm: int = 3) -> float:
    """Seconds per call of f(), after `warm` untimed calls."""
    for _ in range(warm):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n


def git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_dirty() -> bool | None:
    """Whether the code a result came from differs from its commit: uncommitted changes to tracked files
    under afford/ or benchmarks/ (results excluded). None when git cannot tell."""
    try:
        out = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no", "--", "afford",
                                       "benchmarks", ":!benchmarks/results"], cwd=ROOT, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return bool(out.strip())


def random_llama(out: Path, size: str, tokenizer_dir: Path | None = None) -> Path:
    """A random-init Llama checkpoint of a given size, written with transformers' save_pretrained
    (speed does not depend on the weights' values)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if (out / "config.json").exists():
        return out
    layers, hidden, heads, kv, inter, vocab = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                      max_position_embeddings=2048, eos_token_id=0, bos_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    copy_tokenizer(out, tokenizer_dir)
    return out


def copy_tokenizer(out: Path, tokenizer_dir: Path | None = None) -> None:
    """The tokenizer files of `tokenizer_dir` (default: the bundled target's) into a model folder."""
    import shutil
    tok = tokenizer_dir or ROOT / "afford" / "assets" / "default" / "target"
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok / f).exists():
            shutil.copy(tok / f, out / f)


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), "commit": git_rev(), "dirty": git_dirty(), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def perplexity(llm, texts_with_prefix: list[tuple[str, str]]) -> float:
    """exp(mean NLL) of each text's continuation given its prefix."""
    from afford import SamplingParams
    tok = llm.tokenizer
    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)
    nll, n = 0.0, 0
    prompts, skips = [], []
    for prefix, cont in texts_with_prefix:
        ids = tok(prefix + cont, add_special_tokens=False)["input_ids"][: llm.engine.max_model_len - 1]
        skip = len(tok(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
        prompts.append(ids)
        skips.append(max(skip - 1, 0))       # prompt_logprobs[i] scores token i + 1
    for out, skip in zip(llm.generate(prompts, sp), skips):
        lps = out.prompt_logprobs[skip:]
        nll -= sum(lps)
        n += len(lps)
    return math.exp(nll / n)



def heldout_texts(tokenizer, questions: int = 100) -> tuple[list, list]:
    """(prefix, continuation) pairs never trained on: GSM8K test answers given their question, and
    256-token chunks of the held-out 5 % tail of Tiny Shakespeare."""
    from afford.zoo.data import split_documents
    gsm = [json.loads(line) for line in open(ROOT / "data" / "gsm8k" / "test.jsonl")][:questions]
    tail = split_documents([ROOT / "data" / "tinyshakespeare" / "input.txt"], 0.05).val[0]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    chunks = [tokenizer.decode(ids[i:i + 256]) for i in range(0, len(ids) - 256, 256)]
    return [(r["question"] + "\n", r["answer"]) for r in gsm], [("", c) for c in chunks]


def greedy_answers(target, tok, recs: list[dict], new_tokens: int) -> list[tuple]:
    """The target's own greedy answers to GSM8K-style records (dense forwards, no engine): per record
    (ids (1, T) = question + "\n" + answer, the index of the position that predicts the answer's first token)."""
    import torch
    out = []
    with torch.no_grad():
        for r in recs:
            x = torch.tensor([tok(r["question"] + "\n")["input_ids"]])
            start = x.shape[1] - 1
            for _ in range(new_tokens):
                x = torch.cat([x, target(x)[:, -1:].argmax(-1)], dim=1)
            out.append((x, start))
    return out

