"""`afford bench`: the suite (every lever and the installed peers, suite.py + report.py) and
`afford bench fidelity` (the lossy levers' quality change, fidelity.py)."""
from __future__ import annotations

from pathlib import Path

from afford.config import ConfigError


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="every lever and the installed peers side by side: tokens/s, acceptance, "
                       "agreement, modeled $/1M tokens, latency under load; a report with plots")
    b.add_argument("--suite", choices=("quick", "full"), default="quick",
                   help="quick: 6 categories x 1 prompt, 32 new tokens (a few minutes); full: 14 x 3, 64 tokens")
    b.add_argument("--model", default="default", help="the target model (default: the bundled one)")
    b.add_argument("--draft", help="a draft model for speculation and the cascade ('default': the bundled draft)")
    b.add_argument("--out", default="bench", help="folder for results.json, report.md and the plots; a run "
                   "there with the same settings resumes")
    b.add_argument("--max-tokens", type=int, help="new tokens per prompt (default: the suite's)")
    b.add_argument("--per-category", type=int, help="prompts per category (default: the suite's)")
    b.add_argument("--categories", help="comma-separated categories (default: the suite's)")
    b.add_argument("--load", help="comma-separated numbers of requests arriving together (default: the suite's)")
    b.add_argument("--cost-hardware", default="h100", help="hardware of the modeled cost (afford cost --list)")
    b.add_argument("--no-peers", dest="peers", action="store_false", help="afford only")
    b.add_argument("--grad-corpus", help="a document folder: adds the GRAD arm")
    b.add_argument("--gguf", help="a GGUF file of the model: adds llama.cpp (needs the bench extra)")
    b.add_argument("--data", default="data", help="the data folder (Spec-Bench, GSM8K)")
    bsub = b.add_subparsers(dest="bench_cmd")
    from afford.bench.fidelity import add_parser as fidelity_parser
    fidelity_parser(bsub)


def main(a) -> int:
    if a.bench_cmd == "fidelity":
        from afford.bench.fidelity import main as fidelity_main
        return fidelity_main(a)
    from afford.bench.report import write
    from afford.bench.suite import run, settings
    for name in ("max_tokens", "per_category"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    try:
        load = tuple(int(x) for x in a.load.split(",")) if a.load else None
        cats = tuple(x.strip() for x in a.categories.split(",")) if a.categories else None
    except ValueError:
        raise ConfigError("--load takes comma-separated integers, e.g. 1,4,16") from None
    if load is not None and any(n < 1 for n in load):
        raise ConfigError("--load levels must be >= 1")
    s = settings(a.suite, a.model, a.draft, max_tokens=a.max_tokens, per_category=a.per_category, categories=cats,
                 load=load, cost_hardware=a.cost_hardware, peers=a.peers, grad_corpus=a.grad_corpus, gguf=a.gguf)
    from afford.cost.hardware import get_hardware
    get_hardware(s.cost_hardware)                       # an unknown key is a clear error before anything runs
    out = Path(a.out)
    res = run(s, out, Path(a.data))
    sm = write(res, out)
    print((out / "report.md").read_text())
    print(f"wrote {out}/results.json, summary.json, report.md" + "".join(f", {p}" for p in sm["plots"]))
    return 0
