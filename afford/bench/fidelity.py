"""`afford bench fidelity`: what a lossy lever configuration changes and what it saves, against the plain
large model on the same prompts, in one run.

For each configuration (LLM keyword arguments; the plain large model is always the first row), greedy,
one prompt at a time (batch 1, as a user waiting on an answer sees it):
- agreement with the plain large model: the share of prompts whose text is identical, and the mean share
  of the large model's tokens matched before the first difference;
- the perplexity of the produced text under the large model;
- task accuracy: GSM8K's numeric answer, or the fact-QA set's (afford/bench/factqa.py);
- tokens/s, and two modeled costs per generated token, relative to the plain large model: FLOPs (~2 x
  parameters per fed token, the second model's catch-up and GRAD's document forwards included: the
  compute-bound view) and bytes read (weights once per forward of each model, plus the engine's model's
  K/V attended:
  the memory-bound view of batch-1 decoding, where a catch-up of many tokens costs about one forward).
Writes fidelity.json, fidelity.md and (with matplotlib) fidelity.png, cost vs quality.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from afford.config import ConfigError

TASKS = ("gsm8k", "factqa")


def load_task(task: str, n: int, data: Path, split: str) -> list[dict]:
    """[{"prompt", "answer"}] for the task's first n items of `split`."""
    if task == "gsm8k":      # dev: the last n of train.jsonl, inside the 5 % the zoo holds out for validation
        path = data / "gsm8k" / ("test.jsonl" if split == "test" else "train.jsonl")
        if not path.is_file():
            raise ConfigError(f"{path} is missing: run from the repository root, or pass --data")
        lines = path.read_text().splitlines()
        rows = [json.loads(line) for line in (lines[:n] if split == "test" else lines[-n:])]
        from afford.vote import numeric_answer
        return [{"prompt": f"Question: {r['question']}\nAnswer:", "answer": numeric_answer(r["answer"])} for r in rows]
    if task == "factqa":                        # written by afford.bench.factqa.write (data/README.md)
        path = data / "factqa" / "questions.jsonl"
        if not path.is_file():
            raise ConfigError(f"{path} is missing: run from the repository root, or pass --data")
        return [q for q in map(json.loads, path.read_text().splitlines()) if q["split"] == split][:n]
    raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


def is_correct(task: str, text: str, answer: str) -> bool:
    if task == "gsm8k":
        from afford.vote import numeric_answer
        return numeric_answer(text) == answer
    from afford.bench.factqa import correct
    return correct(text, answer)


@torch.inference_mode()
def perplexity(model, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """exp(mean NLL) of the output tokens given their prompts under `model` (a dense forward each)."""
    nll, n = 0.0, 0
    for p, o in zip(prompts, outputs):
        if not o:
            continue
        ids = torch.tensor(p + o)
        logp = torch.log_softmax(model(ids[None])[0].float(), -1)                 # (T, V)
        rows = torch.arange(len(p) - 1, len(p) + len(o) - 1)
        nll -= float(logp[rows, ids[len(p):]].sum())
        n += len(o)
    return math.exp(nll / n) if n else float("nan")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_config(kwargs: dict, items: list[dict], max_tokens: int, task: str) -> dict:
    from afford import LLM, SamplingParams
    llm = LLM(**kwargs)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0)
    llm.generate(items[0]["prompt"], SamplingParams(max_tokens=4, temperature=0))          # warm-up
    from afford.core.stats import EngineStats
    llm.engine.stats = EngineStats()
    side = llm.engine.levers.side if llm.engine.levers else None
    if side is not None:
        side.fed = 0
    outs, t = [], time.perf_counter()
    for it in items:
        outs.append(llm.generate(it["prompt"], sp)[0])
    secs = time.perf_counter() - t
    st = llm.stats
    gen = sum(len(o.token_ids) for o in outs)
    return {"config": kwargs, "texts": [o.text for o in outs], "token_ids": [o.token_ids for o in outs],
            "prompt_ids": [list(o.prompt_token_ids) for o in outs],
            "seconds": secs, "generated_tokens": gen, "tokens_per_s": gen / secs,
            "flops": st.flops, "flops_per_token": st.flops / max(gen, 1),
            "bytes_per_token": st.bytes_read / max(gen, 1),
            "large_share": st.large_tokens / max(st.generated_tokens, 1) if st.switches or st.large_tokens else None,
            "catchup_tokens": st.catchup_tokens, "side_tokens": st.side_tokens, "switches": st.switches,
            "accuracy": sum(is_correct(task, o.text, it["answer"]) for o, it in zip(outs, items)) / len(items)}


def run(configs: list[dict], large: str, task: str, n: int, max_tokens: int, out: Path | None,
        data: Path = Path("data"), split: str = "test", log=print) -> dict:
    from afford.models.loader import load_for_inference, resolve_model_path
    items = load_task(task, n, data, split)
    rows = []
    for kw in [{"model": large}] + configs:
        log(f"  {json.dumps(kw)} ...")
        rows.append(run_config(kw, items, max_tokens, task))
    ref = load_for_inference(resolve_model_path(large), "cpu", "float32")
    base = rows[0]
    for r in rows:
        r["perplexity_under_large"] = perplexity(ref, r["prompt_ids"], r["token_ids"])
        r["identical"] = sum(a == b for a, b in zip(r["token_ids"], base["token_ids"])) / len(items)
        r["prefix_agreement"] = sum(common_prefix(a, b) / max(len(b), 1) for a, b in
                                    zip(r["token_ids"], base["token_ids"])) / len(items)
        r["speed_vs_large"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["cost_vs_large"] = r["flops_per_token"] / base["flops_per_token"]
        r["bytes_vs_large"] = r["bytes_per_token"] / base["bytes_per_token"]
        r["accuracy_vs_large"] = r["accuracy"] / base["accuracy"] if base["accuracy"] else None
        del r["prompt_ids"]
    result = {"task": task, "split": split, "n": len(items), "max_tokens": max_tokens, "large": large,
              "rows": rows}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "fidelity.json").write_text(json.dumps(result, indent=1))
        (out / "fidelity.md").write_text(markdown(result))
        plot(result, out / "fidelity.png", log)
    return result


def label(kw: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in kw.items())


def markdown(result: dict) -> str:
    head = (f"Fidelity on {result['task']} ({result['split']}, {result['n']} prompts, greedy, {result['max_tokens']} "
            f"new tokens, batch 1), against the plain large model `{result['large']}`.\n\n"
            "| configuration | accuracy | identical | prefix agreement | perplexity under large | large share | "
            "tokens/s | speed vs large | FLOPs vs large | bytes read vs large |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in result["rows"]:
        share = "-" if r["large_share"] is None else f"{r['large_share']:.0%}"
        lines.append(f"| `{label(r['config'])}` | {r['accuracy']:.1%} | {r['identical']:.0%} | "
                     f"{r['prefix_agreement']:.0%} | {r['perplexity_under_large']:.2f} | {share} | "
                     f"{r['tokens_per_s']:.0f} | {r['speed_vs_large']:.2f}x | {r['cost_vs_large']:.2f}x | "
                     f"{r['bytes_vs_large']:.2f}x |")
    return head + "\n".join(lines) + "\n"


def plot(result: dict, path: Path, log=print) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("  (no matplotlib: no plot; pip install 'afford[plot]')")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in result["rows"]:
        ax.scatter(r["cost_vs_large"], r["prefix_agreement"])
        ax.annotate(label(r["config"])[:40], (r["cost_vs_large"], r["prefix_agreement"]), fontsize=6)
    ax.set_xlabel("modeled cost per token vs the plain large model")
    ax.set_ylabel("agreement with the large model (prefix share)")
    ax.set_title(f"cost vs quality, {result['task']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_parser(bsub) -> None:
    f = bsub.add_parser("fidelity", help="what lossy lever configurations change (accuracy, agreement, "
                        "perplexity) and save (tokens/s, modeled cost) against the plain large model")
    f.add_argument("--config", action="append", required=True, metavar="JSON",
                   help="LLM keyword arguments as a JSON object, e.g. '{\"model\": \"default-draft\", "
                        "\"cascade\": \"entropy\", \"large\": \"default\", \"tau\": 2.5}' (repeatable)")
    f.add_argument("--large", default="default", help="the plain large model every row is compared with")
    f.add_argument("--task", choices=TASKS, default="gsm8k")
    f.add_argument("--split", choices=("dev", "test"), default="test",
                   help="dev: tune on it (GSM8K: the zoo's held-out tail of train.jsonl)")
    f.add_argument("--n", type=int, default=50, help="prompts")
    f.add_argument("--max-tokens", type=int, default=128)
    f.add_argument("--data", default="data", help="the data folder (GSM8K, fact-QA)")
    f.add_argument("--out", default="fidelity", help="folder for fidelity.json / .md / .png")


def main(a) -> int:
    configs = []
    for c in a.config:
        try:
            kw = json.loads(c)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config is not JSON ({e}): give an object of LLM keyword arguments") from None
        if not isinstance(kw, dict):
            raise ConfigError("--config must be a JSON object of LLM keyword arguments")
        configs.append(kw)
    if a.n < 1 or a.max_tokens < 1:
        raise ConfigError("--n and --max-tokens must be >= 1")
    result = run(configs, a.large, a.task, a.n, a.max_tokens, Path(a.out), Path(a.data), a.split)
    print(markdown(result))
    print(f"wrote {a.out}/fidelity.json, fidelity.md" + (", fidelity.png" if (Path(a.out) / "fidelity.png").exists()
                                                          else ""))
    return 0
