"""When does speculation pay under load? In-process Poisson arrivals at 5 rates, from light load to
beyond saturation, on two workloads (GSM8K with the bundled draft: high acceptance; Spec-Bench
translation + QA with the same draft: low acceptance). Arms: k = 0, fixed k in {1, 3, 5}, goodput
(SmartSpec, k_max = 5). Mean and p99 request latency and throughput per arm and rate.

    python benchmarks/smartspec_load.py [--requests 30] [--max-tokens 48] [--repeats 4]

Every arm is warmed up first (a served engine is warm; goodput's time model has seen steps). Each rate
runs `--repeats` times with different arrival draws, the arms interleaved in a rotating order, so a
slow spell of this shared machine lands on all arms alike. Goodput's step-time forecast is compared
with the measured step time (mean absolute error). "k=0 again" is a second, identical k = 0 engine:
how far it lands from "k=0" is this machine's noise floor for every comparison in the table.

Writes benchmarks/results/smartspec_load.json and smartspec_load.png.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from common import RESULTS, ROOT, save

ARMS = {"k=0": dict(speculation="off"), "k=0 again": dict(speculation="off"), "fixed k=1": dict(num_speculative_tokens=1),
        "fixed k=3": dict(num_speculative_tokens=3), "fixed k=5": dict(num_speculative_tokens=5),
        "goodput": dict(num_speculative_tokens=5, speculation="goodput")}


def workload(name: str, n: int) -> list[str]:
    if name == "gsm8k":
        return [json.loads(line)["question"] + "\n" for line in open(ROOT / "data" / "gsm8k" / "test.jsonl")][:n]
    out = [json.loads(line) for line in open(ROOT / "data" / "specbench" / "question.jsonl")]
    return [r["turns"][0] + "\n" for r in out if r["category"] in ("translation", "qa")][:n]


def run_load(llm, prompts, rate: float, max_tokens: int, seed: int = 0) -> dict:
    """Requests arrive by a Poisson process at `rate` per second; the engine steps in between."""
    from afford import SamplingParams
    eng = llm.engine
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, len(prompts)))
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    nxt, latency, start_of, forecast = 0, {}, {}, []
    gen0 = eng.stats.generated_tokens
    while nxt < len(prompts) or eng.has_unfinished():
        now = time.perf_counter() - t0
        while nxt < len(prompts) and arrivals[nxt] <= now:
            rid = f"r{nxt}"
            eng.add_request(prompts[nxt], sp, rid)
            start_of[rid] = t0 + arrivals[nxt]
            nxt += 1
        if not eng.has_unfinished():
            time.sleep(max(0.0, min(arrivals[nxt] - now, 0.05)))
            continue
        for out in eng.step():
            if out.finished:
                latency[out.request_id] = time.perf_counter() - start_of[out.request_id]
        st = eng.stats.last
        if st is not None and st.predicted_seconds is not None:
            forecast.append(abs(st.predicted_seconds - st.seconds) / st.seconds)
    wall = time.perf_counter() - t0
    return {"latencies": list(latency.values()), "throughput_tok_s": (eng.stats.generated_tokens - gen0) / wall,
            "forecast_err": forecast}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from afford import LLM, SamplingParams
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True)
    rows, controller = [], {}
    for wl in ("gsm8k", "translation+qa"):
        prompts = workload(wl, a.requests)
        base = LLM("default", dtype="float32")
        base.generate(prompts[:4], sp)
        t = time.perf_counter()
        base.generate(prompts, sp)
        capacity = len(prompts) / (time.perf_counter() - t)           # requests/s when all arrive at once
        rates = [round(capacity * f, 3) for f in (0.1, 0.3, 0.6, 1.0, 1.5)]
        print(f"{wl}: saturation ~{capacity:.2f} req/s at k=0; rates {rates}", flush=True)
        llms = {arm: LLM("default", dtype="float32", draft="default", **kw) for arm, kw in ARMS.items()}
        for llm in llms.values():
            llm.generate(prompts[-4:], sp)                              # warm-up
        arms = list(ARMS)
        for rate in rates:
            runs = {arm: [] for arm in arms}
            for rep in range(a.repeats):
                order = arms[rep % len(arms):] + arms[:rep % len(arms)]
                for arm in order:
                    runs[arm].append(run_load(llms[arm], prompts, rate, a.max_tokens, seed=rep))
            for arm in arms:
                lat = np.concatenate([r["latencies"] for r in runs[arm]])
                err = np.concatenate([r["forecast_err"] for r in runs[arm]])
                means = [float(np.mean(r["latencies"])) for r in runs[arm]]
                rows.append({"workload": wl, "rate_req_s": rate, "arm": arm,
                             "mean_latency_s": round(float(np.mean(means)), 4),
                             "mean_latency_per_repeat_s": [round(m, 4) for m in means],
                             "p99_latency_s": round(float(np.percentile(lat, 99)), 4),
                             "throughput_tok_s": round(float(np.mean([r["throughput_tok_s"] for r in runs[arm]])), 2)})
                if len(err):
                    rows[-1]["forecast_mean_abs_err"] = round(float(err.mean()), 4)
                print(rows[-1], flush=True)
        for arm, llm in llms.items():
            if llm.stats.drafted:
                controller[f"{wl} {arm}"] = {"acceptance": round(llm.stats.acceptance_rate, 3),
                                             "k_histogram": llm.stats.k_histogram}
                print(f"  {wl} {arm}: acceptance {llm.stats.acceptance_rate:.2f}, k histogram {llm.stats.k_histogram}")
    plot(rows)
    out = save("smartspec_load", {"settings": vars(a), "rows": rows, "controller": controller})
    print(f"wrote {out}")


def plot(rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    wls = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(1, len(wls), figsize=(6 * len(wls), 4))
    for ax, wl in zip(np.atleast_1d(axes), wls):
        for arm in ARMS:
            pts = [(r["rate_req_s"], r["mean_latency_s"]) for r in rows if r["workload"] == wl and r["arm"] == arm]
            ax.plot(*zip(*pts), marker="o", label=arm)
        ax.set_title(wl)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("mean latency (s)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "smartspec_load.png", dpi=110)


if __name__ == "__main__":
    main()
