"""The report of an `afford bench` run: per-arm summary (tokens/s, ratios to afford plain and to
transformers plain, agreement with afford plain, acceptance by draft position, modeled $/1M tokens),
OUT/report.md and, with matplotlib, four plots: tokens/s by category, acceptance by position, cost vs
quality, latency vs load."""
from __future__ import annotations

import json
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

from afford.bench.fidelity import common_prefix


@lru_cache(maxsize=None)
def _planner(model: str, role: str, hardware: str):
    """(spec, hardware) of a model folder for the Step-3 cost model (K/V in bf16)."""
    from afford.config import ModelConfig
    from afford.cost.hardware import get_hardware
    from afford.cost.hf import spec_from_model_config
    from afford.models.loader import resolve_model_path
    return spec_from_model_config(ModelConfig.from_dir(resolve_model_path(model, role)), 2), get_hardware(hardware)[0]


def usd_per_token(model: str, role: str, hardware: str, context: int) -> float:
    from afford.cost.model import cost_per_token_usd
    spec, hw = _planner(model, role, hardware)
    return cost_per_token_usd(spec, max(context, 1), hw)


def cell_cost(cell: dict, kwargs: dict | None, hw: str) -> float | None:
    """Modeled USD of one cell: every token each model fed, at the cell's mean context."""
    if kwargs is None or "fed" not in cell:
        return None
    ctx = cell["prompt_tokens"] + cell["tokens"] // 2
    if kwargs.get("attention") == "sparse":         # a query reads its budget's blocks and the compressed keys
        ctx = min(ctx, kwargs.get("sparse_budget", 16) * 64 + ctx // 64)
    fed = cell["fed"]
    usd = usd_per_token(kwargs["model"], "target", hw, ctx) * fed["engine"]
    if kwargs.get("draft") not in (None, "ngram"):
        usd += usd_per_token(kwargs["draft"], "draft", hw, ctx) * fed["draft"]
    if kwargs.get("large"):
        usd += usd_per_token(kwargs["large"], "target", hw, ctx) * fed["side"]
    return usd


def summarize(res: dict) -> dict:
    from afford.bench.suite import Settings, afford_arms
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in res["settings"].items()})
    kwargs, _ = afford_arms(s)
    cells = list(res["cells"].values())
    plain = {(c["category"], c["prompt"]): c["token_ids"] for c in cells if c["arm"] == "afford plain"}
    arms: dict[str, dict] = {}
    for arm in dict.fromkeys(c["arm"] for c in cells):
        mine = [c for c in cells if c["arm"] == arm]
        tok, sec = sum(c["tokens"] for c in mine), sum(c["seconds"] for c in mine)
        by_cat = defaultdict(lambda: [0, 0.0])
        for c in mine:
            by_cat[c["category"]][0] += c["tokens"]
            by_cat[c["category"]][1] += c["seconds"]
        acc, dr = [], []
        for c in mine:
            for lst, src in ((acc, c.get("accepted_per_position", [])), (dr, c.get("drafted_per_position", []))):
                lst.extend([0] * (len(src) - len(lst)))
                for i, n in enumerate(src):
                    lst[i] += n
        costs = [cell_cost(c, kwargs.get(arm), s.cost_hardware) for c in mine]
        agree = [common_prefix(c["token_ids"], plain[(c["category"], c["prompt"])]) / max(len(c["token_ids"]), 1)
                 for c in mine if (c["category"], c["prompt"]) in plain]
        arms[arm] = {"tokens_per_s": tok / sec if sec else 0.0, "tokens": tok, "seconds": sec,
                     "by_category": {k: v[0] / v[1] for k, v in by_cat.items() if v[1]},
                     "acceptance_by_position": [a / d if d else 0.0 for a, d in zip(acc, dr)],
                     "agreement": sum(agree) / len(agree) if agree else None,
                     "usd_per_1m": 1e6 * sum(costs) / tok if tok and all(x is not None for x in costs) else None}
    for ref, key in (("afford plain", "vs_afford_plain"), ("hf plain", "vs_hf_plain")):
        if ref in arms:
            for a in arms.values():
                a[key] = a["tokens_per_s"] / arms[ref]["tokens_per_s"] if arms[ref]["tokens_per_s"] else None
    return {"settings": res["settings"], "machine": res.get("machine"), "arms": arms, "skipped": res["skipped"],
            "categories": res.get("categories", {}), "load": res["load"]}


def markdown(sm: dict) -> str:
    s = sm["settings"]
    lines = [f"# afford bench --suite {s['suite']}", "",
             f"Model `{s['model']}`, draft `{s['draft']}`; {sum(sm['categories'].values())} prompts "
             f"({', '.join(f'{k} {v}' for k, v in sm['categories'].items())}), {s['max_tokens']} new tokens, greedy, "
             f"batch 1; modeled cost: the Step-3 planner on `{s['cost_hardware']}` for every token each model fed. "
             f"Machine: {json.dumps(sm.get('machine'))}.", "",
             "| arm | tokens/s | vs afford plain | vs transformers plain | agreement with afford plain | "
             "modeled $/1M tokens | acceptance by position |", "|---|---|---|---|---|---|---|"]
    f = (lambda x, fmt: "-" if x is None else fmt.format(x))
    for name, a in sm["arms"].items():
        acc = ", ".join(f"{x:.0%}" for x in a["acceptance_by_position"]) or "-"
        lines.append(f"| {name} | {a['tokens_per_s']:.1f} | {f(a.get('vs_afford_plain'), '{:.2f}x')} | "
                     f"{f(a.get('vs_hf_plain'), '{:.2f}x')} | {f(a['agreement'], '{:.0%}')} | "
                     f"{f(a['usd_per_1m'], '${:.3g}')} | {acc} |")
    cats = list(sm["categories"])
    lines += ["", "Tokens/s by category:", "", "| arm | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for name, a in sm["arms"].items():
        lines.append(f"| {name} | " + " | ".join(f"{a['by_category'].get(c, 0):.0f}" for c in cats) + " |")
    if sm["load"]:
        lines += ["", "Latency under load (n requests arriving together):", "",
                  "| arm | n | mean TTFT ms | mean TPOT ms | tokens/s |", "|---|---|---|---|---|"]
        for arm, curve in sm["load"].items():
            for n, r in curve.items():
                lines.append(f"| {arm} | {n} | {1e3 * r['ttft_s']:.1f} | {1e3 * r['tpot_s']:.2f} | "
                             f"{r['tokens_per_s']:.0f} |")
    if sm["skipped"]:
        lines += ["", "Not run:", ""] + [f"- {k}: {v}" for k, v in sm["skipped"].items()]
    return "\n".join(lines) + "\n"


def plots(sm: dict, out: Path, log=print) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no matplotlib: no plots (pip install 'afford[plot]')")
        return []
    arms, cats, made = sm["arms"], list(sm["categories"]), []

    def done(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)
    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.8 / max(len(arms), 1)
    for j, (name, a) in enumerate(arms.items()):
        ax.bar([i + j * w for i in range(len(cats))], [a["by_category"].get(c, 0) for c in cats], w, label=name)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cats))], cats, rotation=20)
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=6, ncol=3)
    done(fig, "tokens_per_s_by_category.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, a in arms.items():
        if a["acceptance_by_position"]:
            ax.plot(range(1, len(a["acceptance_by_position"]) + 1), a["acceptance_by_position"], "o-", label=name)
    ax.set_xlabel("draft position")
    ax.set_ylabel("accepted when drafted")
    ax.legend(fontsize=7)
    done(fig, "acceptance_by_position.png")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, a in arms.items():
        if a["usd_per_1m"] is not None and a["agreement"] is not None:
            ax.scatter(a["usd_per_1m"], a["agreement"])
            ax.annotate(name, (a["usd_per_1m"], a["agreement"]), fontsize=6)
    ax.set_xlabel(f"modeled $/1M tokens ({sm['settings']['cost_hardware']})")
    ax.set_ylabel("agreement with afford plain")
    done(fig, "cost_vs_quality.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for arm, curve in sm["load"].items():
        ax.plot([int(n) for n in curve], [1e3 * r["tpot_s"] for r in curve.values()], "o-", label=arm)
    ax.set_xlabel("requests arriving together")
    ax.set_ylabel("mean TPOT, ms")
    ax.legend(fontsize=7)
    done(fig, "latency_vs_load.png")
    return made


def write(res: dict, out: Path, log=print) -> dict:
    sm = summarize(res)
    (out / "summary.json").write_text(json.dumps(sm, indent=1))
    (out / "report.md").write_text(markdown(sm))
    sm["plots"] = plots(sm, out, log)
    return sm
