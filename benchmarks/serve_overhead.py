"""What serving costs on top of the engine: the bundled target (fp32, greedy, 48 Spec-Bench prompts, up to
64 new tokens) decoded (1) by `LLM.generate` on the main thread -- the engine alone; (2) through AsyncLLM
in-process (the engine's own thread, no HTTP), with the engine built on the main thread and stepped on
its thread (how AsyncLLM worked before), built on its thread, and with 1 or all torch threads; (3)
through `afford serve` over loopback with a streaming client (benchmarks/serve_load.py's), with torch's
default threads (one per core) or one core left to the front end and the client. Each arm is a fresh process (an OpenMP team, once created, stays for the
life of the process), arms interleaved over `--rounds` rounds; medians reported. "sequential": 12
requests one after another; "burst": all 48 at once.

    python benchmarks/serve_overhead.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

from common import ROOT, git_rev, machine, save

SEQ, BURST, MAX_TOKENS = 12, 48, 64


def prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in open(ROOT / "data" / "specbench" / "question.jsonl")]
    return [r["turns"][0] for r in rows][:n]


def run_offline(threads: int) -> dict:
    import torch

    from afford import LLM, SamplingParams
    torch.set_num_threads(threads)
    llm = LLM("default", dtype="float32", enable_prefix_caching=False)
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    ps = prompts(BURST)
    llm.generate(ps[:2], sp)
    t = time.perf_counter()
    n = sum(len(llm.generate([p], sp)[0].outputs[0].token_ids) for p in ps[:SEQ])
    seq = n / (time.perf_counter() - t)
    t = time.perf_counter()
    n = sum(len(o.outputs[0].token_ids) for o in llm.generate(ps, sp))
    return {"sequential_tok_s": seq, "burst_tok_s": n / (time.perf_counter() - t)}


def run_async(threads: int, build_on_main: bool) -> dict:
    import torch

    from afford import SamplingParams
    from afford.async_engine import AsyncLLM
    from afford.config import EngineConfig
    from afford.engine import Engine
    torch.set_num_threads(threads)
    cfg = EngineConfig(model="default", dtype="float32", enable_prefix_caching=False)
    llm = AsyncLLM(Engine(cfg)) if build_on_main else AsyncLLM.from_config(cfg)
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    ps = prompts(BURST)

    async def one(i: int, p: str) -> int:
        n = 0
        async for out in llm.generate(p, sp, f"r{i}"):
            n = len(out.token_ids)
        return n

    async def main() -> dict:
        await one(-1, ps[0])
        st = llm.engine.stats
        s0, n0 = st.decode_seconds, st.decode_steps
        t = time.perf_counter()
        n = 0
        for i, p in enumerate(ps[:SEQ]):
            n += await one(i, p)
        seq = n / (time.perf_counter() - t)
        step_ms = (st.decode_seconds - s0) / max(1, st.decode_steps - n0) * 1e3
        t = time.perf_counter()
        n = sum(await asyncio.gather(*(one(100 + i, p) for i, p in enumerate(ps))))
        return {"sequential_tok_s": seq, "burst_tok_s": n / (time.perf_counter() - t), "batch1_step_ms": step_ms}
    try:
        return asyncio.run(main())
    finally:
        llm.shutdown()


def run_http(threads: int | None) -> dict:
    import serve_load as S
    ps = prompts(BURST)
    proc, url = S.serve(["--no-enable-prefix-caching", *(["--threads", str(threads)] if threads else [])])
    try:
        asyncio.run(S.load(url, ps[:2], 0, 8))
        seq = asyncio.run(S.load(url, ps[:SEQ], 0, MAX_TOKENS))
        burst = asyncio.run(S.load(url, ps, 1000, MAX_TOKENS))   # serve_load's burst: 1000 req/s
        return {"sequential_tok_s": seq["tok_s"], "burst_tok_s": burst["tok_s"],
                "sequential_tpot_p50_ms": seq["tpot_p50_s"] * 1e3, "burst_tpot_p99_ms": burst["tpot_p99_s"] * 1e3,
                "burst_ttft_p50_s": burst["ttft_p50_s"]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def arms(cores: int) -> list[tuple[str, list[str]]]:
    one_less = max(1, cores - 1)
    return [
        (f"engine alone (LLM.generate), {cores} threads", ["offline", str(cores)]),
        (f"AsyncLLM, engine built on the main thread (before), {cores} threads", ["async-main", str(cores)]),
        (f"AsyncLLM, engine built on its thread, {cores} threads", ["async", str(cores)]),
        (f"AsyncLLM, engine built on its thread, {one_less} thread(s)", ["async", str(one_less)]),
        (f"afford serve (default: {cores} threads)", ["http", "0"]),
        (f"afford serve --threads {one_less} (a core left to the front end)", ["http", str(one_less)]),
    ]


def child(kind: str, threads: int) -> dict:
    if kind == "offline":
        return run_offline(threads)
    if kind in ("async", "async-main"):
        return run_async(threads, kind == "async-main")
    return run_http(threads or None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child[0], int(a.child[1]))), flush=True)
        return
    import os
    cores = len(os.sched_getaffinity(0))
    runs: dict[str, list[dict]] = {}
    for r in range(a.rounds):
        for label, args in arms(cores):
            out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                                 timeout=600)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{label} failed:\n{out.stderr[-3000:]}")
            runs.setdefault(label, []).append(json.loads(line[7:]))
            print(r, label, runs[label][-1], flush=True)
    rows = []
    for label, rs in runs.items():
        row = {"arm": label}
        for k in rs[0]:
            row[k] = round(statistics.median(x[k] for x in rs), 4)
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["sequential_vs_engine"] = round(row["sequential_tok_s"] / base["sequential_tok_s"], 3)
        row["burst_vs_engine"] = round(row["burst_tok_s"] / base["burst_tok_s"], 3)
    for row in rows:
        print(row)
    out = save("serve_overhead", {"settings": {"rounds": a.rounds, "sequential": SEQ, "burst": BURST,
                                               "max_tokens": MAX_TOKENS, "dtype": "float32"},
                                  "machine": machine(), "commit": git_rev(), "rows": rows, "runs": runs})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
