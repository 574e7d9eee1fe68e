"""`afford bench --suite quick|full`: plain decoding, every applicable lever and the installed peers on
Spec-Bench prompts (and GSM8K), one prompt at a time, greedy, in one run; then latency under load.

A cell is one (arm, prompt): its new tokens, seconds, acceptance per draft position and the tokens each
model fed. Cells are written to OUT/results.json as they finish, so a run that stops resumes where it
left off (the same settings are required). Quality is agreement with afford's plain greedy output
(share of each prompt's tokens before the first difference: 1 for every lossless lever); modeled cost is
the Step-3 planner's USD per 1M decoded tokens on `cost_hardware` for every token past the prompt each
model fed (verification rows, draft tokens, a cascade's catch-up) per generated token: prompts are
processed alike by every arm and are left out. report.py renders the
markdown report and the plots.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from afford.config import ConfigError

SUITES = {   # categories (Spec-Bench's and "gsm8k"), prompts per category, new tokens, load levels
    "quick": (("math_reasoning", "qa", "summarization", "translation", "writing", "gsm8k"), 1, 32, (1, 4)),
    "full": (("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
              "translation", "summarization", "qa", "math_reasoning", "rag", "gsm8k"), 3, 64, (1, 4, 16)),
}


@dataclass(frozen=True)
class Settings:
    suite: str
    model: str
    draft: str | None
    categories: tuple[str, ...]
    per_category: int
    max_tokens: int
    load: tuple[int, ...]
    cost_hardware: str = "h100"
    peers: bool = True
    grad_corpus: str | None = None
    gguf: str | None = None


def settings(suite: str, model: str, draft: str | None, **over) -> Settings:
    if suite not in SUITES:
        raise ConfigError(f"--suite must be one of {', '.join(SUITES)}, got {suite!r}")
    cats, per, new, load = SUITES[suite]
    unknown = sorted(set(over.get("categories") or ()) - set(SUITES["full"][0]))
    if unknown:
        raise ConfigError(f"unknown categories {', '.join(unknown)}; known: {', '.join(SUITES['full'][0])}")
    base = dict(suite=suite, model=model, draft=draft, categories=cats, per_category=per, max_tokens=new, load=load)
    base.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in over.items() if v is not None})
    return Settings(**base)


def workload(s: Settings, data: Path, fits) -> dict[str, list[str]]:
    """The first prompts of each category that fit the model with the new tokens (longer ones are skipped,
    not cut): Spec-Bench first turns, and GSM8K test questions."""
    out: dict[str, list[str]] = defaultdict(list)
    for line in (data / "specbench" / "question.jsonl").read_text().splitlines():
        rec = json.loads(line)
        c, p = rec["category"], rec["turns"][0] + "\n"
        if c in s.categories and len(out[c]) < s.per_category and fits(p):
            out[c].append(p)
    if "gsm8k" in s.categories:
        for line in (data / "gsm8k" / "test.jsonl").read_text().splitlines()[:50]:
            if len(out["gsm8k"]) < s.per_category and fits(q := f"Question: {json.loads(line)['question']}\nAnswer:"):
                out["gsm8k"].append(q)
    return {c: out[c] for c in s.categories if out[c]}


def afford_arms(s: Settings) -> tuple[dict[str, dict], dict[str, str]]:
    """{arm: LLM keyword arguments} for the levers that apply, {arm: why skipped} for those that do not."""
    m, d = s.model, s.draft
    arms = {"afford plain": {"model": m}, "afford ngram k=4": {"model": m, "draft": "ngram"},
            "afford int8": {"model": m, "quantization": "int8"}, "afford int4": {"model": m, "quantization": "int4"}}
    skipped = {}
    if d:
        arms["afford draft k=4"] = {"model": m, "draft": d}
        arms["afford goodput k<=4"] = {"model": m, "draft": d, "speculation": "goodput"}
        small = "default-draft" if d == "default" else d           # the bundled pair's draft as the small model
        arms["afford cascade tau=2.5 (lossy)"] = {"model": small, "cascade": "entropy", "large": m, "tau": 2.5}
    else:
        for a in ("afford draft k=4", "afford goodput k<=4", "afford cascade (lossy)"):
            skipped[a] = "no draft model given (--draft)"
    if s.grad_corpus:
        arms["afford grad (lossy)"] = {"model": m, "grad_corpus": s.grad_corpus}
    else:
        skipped["afford grad (lossy)"] = "no document folder given (--grad-corpus)"
    skipped["afford rerank (lossy)"] = "a steering lever (needs a counterfactual rewrite): afford bench fidelity"
    # block-sparse decode attention: 4 blocks of 64 tokens per query, lossy past 256 tokens of context
    arms["afford sparse b=4 (lossy)"] = {"model": m, "attention": "sparse", "sparse_budget": 4}
    return arms, skipped


def load_results(path: Path, s: Settings) -> dict:
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("settings") != json.loads(json.dumps(asdict(s))):
            raise ConfigError(f"{path} holds a run with other settings: pass another --out, or delete it to "
                              f"start over")
        return old
    return {"settings": asdict(s), "cells": {}, "skipped": {}, "load": {}, "machine": machine()}


def machine() -> dict:
    import os
    import platform
    import subprocess

    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    try:                                   # the afford checkout this ran from, when it is one
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "commit": rev,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def save(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def afford_cell(llm, prompt: str, max_tokens: int) -> dict:
    from afford import SamplingParams
    st = llm.stats
    before = (st.decode_rows, st.drafted, st.side_tokens - st.side_prompt_tokens)
    t = time.perf_counter()
    out = llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0]
    secs = time.perf_counter() - t
    m = out.metrics
    return {"tokens": len(out.token_ids), "seconds": secs, "token_ids": out.token_ids,
            "prompt_tokens": len(out.prompt_token_ids),
            "accepted_per_position": m.get("accepted_per_position", []),
            "drafted_per_position": m.get("drafted_per_position", []),
            "fed": {"engine": st.decode_rows - before[0], "draft": st.drafted - before[1],
                    "side": st.side_tokens - st.side_prompt_tokens - before[2]}}


def run(s: Settings, out: Path, data: Path = Path("data"), log=print) -> dict:
    """Run (or resume) the suite into out/results.json; returns the results."""
    from tqdm import tqdm

    from afford import LLM, SamplingParams
    from afford.models.loader import load_tokenizer, resolve_model_path
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    res = load_results(path, s)
    tok = load_tokenizer(resolve_model_path(s.model))
    from afford.config import ModelConfig
    limit = ModelConfig.from_dir(resolve_model_path(s.model)).max_position_embeddings - s.max_tokens - 1
    work = workload(s, data, lambda p: len(tok(p, add_special_tokens=False)["input_ids"]) < limit)
    prompts = [(c, i, p) for c, ps in work.items() for i, p in enumerate(ps)]
    if not prompts:
        raise ConfigError(f"no prompt of {', '.join(s.categories)} fits the model's context with {s.max_tokens} new "
                          f"tokens: pick other categories or fewer --max-tokens")
    arms, skipped = afford_arms(s)
    res["skipped"].update(skipped)
    res["categories"] = {c: len(ps) for c, ps in work.items()}
    peers, peer_skipped = {}, {}
    if s.peers:
        from afford.bench.peers import llamacpp_runner, transformers_runners
        for make in (lambda: transformers_runners(s.model, s.draft), lambda: llamacpp_runner(s.gguf)):
            r, k = make()
            peers.update(r)
            peer_skipped.update(k)
    res["skipped"].update(peer_skipped)
    todo = [(a, c, i, p) for a in list(arms) + list(peers) for c, i, p in prompts if f"{a}|{c}|{i}" not in res["cells"]]
    res["ran"] = len(todo)                              # cells this invocation ran (0: all were done)
    bar = tqdm(total=len(todo), unit="cell", desc="afford bench", disable=None)
    for arm in list(arms) + list(peers):
        mine = [(c, i, p) for a, c, i, p in todo if a == arm]
        if not mine:
            continue
        if arm in arms:
            try:
                llm = LLM(**arms[arm])
                llm.generate(prompts[0][2], SamplingParams(max_tokens=4))                          # warm-up
            except Exception as e:                     # an arm this machine cannot run: say why, go on
                res["skipped"][arm] = f"could not start: {e}"
                bar.update(len(mine))
                continue
            cell = lambda p: afford_cell(llm, p, s.max_tokens)            # noqa: E731
        else:
            try:
                peers[arm](prompts[0][2], 4)
            except Exception as e:
                res["skipped"][arm] = f"could not run: {e}"
                bar.update(len(mine))
                continue
            cell = lambda p, f=peers[arm]: dict(zip(("token_ids", "seconds"), f(p, s.max_tokens)))   # noqa: E731
        res["skipped"].pop(arm, None)
        for c, i, p in mine:
            r = cell(p)
            r["tokens"] = len(r["token_ids"])
            res["cells"][f"{arm}|{c}|{i}"] = {"arm": arm, "category": c, "prompt": i, **r}
            save(path, res)
            bar.update(1)
    bar.close()
    save(path, res)
    for arm in ("afford plain", "afford goodput k<=4"):
        if arm in arms and not all(str(n) in res["load"].get(arm, {}) for n in s.load):
            try:
                res["load"][arm] = load_curve(LLM(**arms[arm]), [p for _, _, p in prompts], s.load, s.max_tokens)
            except Exception as e:
                res["skipped"][f"{arm} under load"] = f"could not run: {e}"
            save(path, res)
    return res


def load_curve(llm, prompts: list[str], levels, max_tokens: int) -> dict:
    """Mean time to first token and time per output token when n requests arrive together."""
    from afford import SamplingParams
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    curve = {}
    for n in levels:
        batch = [prompts[i % len(prompts)] for i in range(n)]
        t = time.perf_counter()
        outs = llm.generate(batch, sp)
        wall = time.perf_counter() - t
        ttft = [o.metrics["ttft_s"] for o in outs]
        tpot = [(o.metrics["latency_s"] - o.metrics["ttft_s"]) / max(len(o.token_ids) - 1, 1) for o in outs]
        curve[str(n)] = {"ttft_s": sum(ttft) / n, "tpot_s": sum(tpot) / n,
                         "tokens_per_s": sum(len(o.token_ids) for o in outs) / wall}
    return curve
