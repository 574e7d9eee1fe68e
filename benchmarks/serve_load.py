"""Load on the OpenAI-compatible server over loopback: Poisson arrivals of Spec-Bench prompts at
several rates, streaming completions; throughput, TTFT and TPOT p50/p99 for plain decoding with
chunked prefill (the default), plain decoding without it (a step prefills whole prompts while the
decodes wait) and speculation (goodput controller, bundled draft); and the same model at batch 1 (one
request at a time) through the same server; plain arms capped at --max-num-seqs N (rate 1 and the burst)
show what bounding the decode batch does at saturation. `tpot_p99_over_light` is each row's TPOT p99 over the
arm's at rate 1 (light load). Prefix caching is off in every arm: each rate replays the same prompts,
which a cache would serve from the second rate on (benchmarks/prefix.py measures the cache). Bounded
in requests and time.

    python benchmarks/serve_load.py [--requests 48] [--max-tokens 64] [--max-num-seqs 4 8 16]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
from common import ROOT, save


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in open(ROOT / "data" / "specbench" / "question.jsonl")]
    return [r["turns"][0] for r in rows][:n]


async def one(client, prompt, max_tokens, t_arrival):
    """Stream one completion; returns (time to first token, latency, completion tokens)."""
    ttft, n = None, 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ch = json.loads(line[6:])
                if ch.get("usage"):
                    n = ch["usage"]["completion_tokens"]
                elif ttft is None and ch["choices"] and ch["choices"][0]["text"]:
                    ttft = time.perf_counter() - t_arrival
    return ttft if ttft is not None else time.perf_counter() - t_arrival, time.perf_counter() - t_arrival, n


async def load(url, ps, rate, max_tokens, seed=0):
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, len(ps)) if rate else np.zeros(len(ps))
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        t0 = time.perf_counter()
        tasks = []
        for p, g in zip(ps, gaps):
            if rate:
                await asyncio.sleep(g)
            tasks.append(asyncio.create_task(one(c, p, max_tokens, time.perf_counter())))
            if not rate:                       # batch 1: one request at a time
                await tasks[-1]
        res = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ttft = np.array([r[0] for r in res])
    tpot = np.array([(r[1] - r[0]) / max(r[2] - 1, 1) for r in res])
    tokens = sum(r[2] for r in res)
    return {"ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "tpot_p50_s": float(np.percentile(tpot, 50)), "tpot_p99_s": float(np.percentile(tpot, 99)),
            "wall_s": wall, "generated_tokens": tokens, "tok_s": tokens / wall}


def serve(extra: list[str]):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "afford", "serve", "--port", str(port), "--dtype", "float32",
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rates", nargs="+", type=float, default=[1, 2, 4, 8, 1000])
    ap.add_argument("--max-num-seqs", nargs="*", type=int, default=[4, 8, 16],
                    help="extra plain arms with this cap on running sequences, at rate 1 and the burst only: "
                         "what bounding the decode batch buys TPOT at saturation and costs TTFT")
    a = ap.parse_args()
    ps = prompts(a.requests)
    rows = []
    arms = (("plain", []), ("plain, no chunked prefill", ["--no-enable-chunked-prefill"]),
            ("spec goodput", ["--draft", "default", "--k", "4"]))
    arms = [(arm, extra, a.rates) for arm, extra in arms]
    arms += [(f"plain, max_num_seqs={n}", ["--max-num-seqs", str(n)], [1, 1000]) for n in a.max_num_seqs]
    for arm, extra, rates in arms:
        proc, url = serve(extra + ["--no-enable-prefix-caching"])
        light = None
        try:
            asyncio.run(load(url, ps[:2], 0, 8))                           # warm-up
            r = asyncio.run(load(url, ps[:12], 0, a.max_tokens))
            rows.append({"arm": arm, "rate": "batch 1 (sequential)", **r})
            print(rows[-1], flush=True)
            for rate in rates:
                r = asyncio.run(load(url, ps, rate, a.max_tokens))
                light = r["tpot_p99_s"] if light is None else light
                rows.append({"arm": arm, "rate": rate, **r, "tpot_p99_over_light": round(r["tpot_p99_s"] / light, 2)})
                print(rows[-1], flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    out = save("serve_load", {"settings": vars(a), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
