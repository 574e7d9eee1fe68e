"""Soak: `afford serve` (bundled model, fp32) on loopback under a steady mix of valid, invalid and
abandoned requests for a bounded time. Every `--window` seconds it records requests served, answers by
status class, latency p50/p99 of the valid ones, the server's RSS (/proc) and KV blocks in use and cached
(/metrics); at the end, growth after warm-up (the first window) is reported.

Mix per request (seeded): 60 % valid completions (a third streamed), 10 % valid chat, 15 % invalid
(wrong types, a lone surrogate, unknown fields, an unknown model, junk paths), 15 % abandoned (the
client hangs up after 50 ms, streamed or not).

    python benchmarks/soak.py [--minutes 10] [--rate 8] [--window 30]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import httpx
import numpy as np
from common import save
from serve_load import prompts, serve

INVALID = [("/v1/completions", {"prompt": "x", "max_tokens": "8"}),
           ("/v1/completions", '{"prompt": "a\\ud800"}'),
           ("/v1/completions", {"prompt": "x", "bogus": 1}),
           ("/v1/completions", {"model": "gpt-4o", "prompt": "x"}),
           ("/v1/chat/completions", {"messages": []}),
           ("/v1/junk", {})]


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gauge(text: str, name: str) -> float:
    return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(name + " ")), float("nan"))


async def one(c: httpx.AsyncClient, rng: random.Random, ps: list[str], log: list) -> None:
    r, t0 = rng.random(), time.perf_counter()
    p = rng.choice(ps)
    try:
        if r < 0.6:
            body = {"prompt": p, "max_tokens": 32, "temperature": rng.choice([0, 0.8])}
            if rng.random() < 1 / 3:
                async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                    async for _ in resp.aiter_lines():
                        pass
            else:
                resp = await c.post("/v1/completions", json=body)
            log.append(("valid", resp.status_code, time.perf_counter() - t0))
        elif r < 0.7:
            resp = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": p}],
                                                              "max_tokens": 32, "temperature": 0})
            log.append(("valid", resp.status_code, time.perf_counter() - t0))
        elif r < 0.85:
            path, body = rng.choice(INVALID)
            content = body if isinstance(body, str) else json.dumps(body)
            resp = await c.post(path, content=content, headers={"content-type": "application/json"})
            log.append(("invalid", resp.status_code, time.perf_counter() - t0))
        else:
            body = {"prompt": p, "max_tokens": 200, "temperature": 0.8, "stream": rng.random() < 0.5}
            try:
                await asyncio.wait_for(c.post("/v1/completions", json=body), timeout=0.05)
            except asyncio.TimeoutError:
                pass
            log.append(("abandoned", 0, time.perf_counter() - t0))
    except httpx.HTTPError as e:
        log.append(("transport error", repr(e)[:60], time.perf_counter() - t0))


async def soak(url: str, pid: int, minutes: float, rate: float, window: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    ps = prompts(80)
    windows, log, tasks = [], [], set()
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=256, max_keepalive_connections=64)) as c:
        t_end = time.perf_counter() + 60 * minutes
        t_win = time.perf_counter() + window
        while time.perf_counter() < t_end:
            await asyncio.sleep(rng.expovariate(rate))
            task = asyncio.create_task(one(c, rng, ps, log))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if time.perf_counter() >= t_win:
                t_win += window
                metrics = (await c.get("/metrics")).text
                done, log = log, []
                lat = [x[2] for x in done if x[0] == "valid" and x[1] == 200]
                classes: dict[str, int] = {}
                for kind, status, _ in done:
                    key = f"{kind} {status // 100}xx" if isinstance(status, int) and status else kind
                    classes[key] = classes.get(key, 0) + 1
                windows.append({"t_s": round(len(windows) * window + window), "requests": len(done),
                                "by_class": classes,
                                "valid_p50_s": round(float(np.percentile(lat, 50)), 3) if lat else None,
                                "valid_p99_s": round(float(np.percentile(lat, 99)), 3) if lat else None,
                                "rss_mb": round(rss_mb(pid), 1),
                                "kv_blocks_used": gauge(metrics, "afford_kv_blocks_used"),
                                "kv_blocks_cached": gauge(metrics, "afford_kv_blocks_cached"),
                                "metrics_bytes": len(metrics)})
                print(windows[-1], flush=True)
        await asyncio.gather(*tasks)
    return windows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rate", type=float, default=8, help="requests per second (Poisson)")
    ap.add_argument("--window", type=float, default=30, help="seconds per reported window")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-blocks", type=int, help="the server's KV pool (default: its own); a small pool is "
                    "touched whole during warm-up, so RSS after it shows leaks, not first-touched pages")
    a = ap.parse_args()
    proc, url = serve(["--max-queue", "128"] + (["--kv-blocks", str(a.kv_blocks)] if a.kv_blocks else []))
    try:
        windows = asyncio.run(soak(url, proc.pid, a.minutes, a.rate, a.window, a.seed))
        time.sleep(2)
        final = httpx.get(url + "/metrics").text
        idle = {"kv_blocks_used": gauge(final, "afford_kv_blocks_used"),
                "running": gauge(final, "afford_running_sequences"),
                "in_flight": gauge(final, "afford_requests_in_flight"), "rss_mb": round(rss_mb(proc.pid), 1)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    first, last = windows[0], windows[-1]
    summary = {"served": sum(w["requests"] for w in windows),
               "server_errors_5xx": sum(n for w in windows for k, n in w["by_class"].items() if "5xx" in k),
               "transport_errors": sum(n for w in windows for k, n in w["by_class"].items() if k == "transport error"),
               "rss_growth_after_warmup_mb": round(last["rss_mb"] - first["rss_mb"], 1),
               "metrics_bytes_growth": last["metrics_bytes"] - first["metrics_bytes"],
               "idle_after": idle}
    print(summary)
    print(f"wrote {save('soak', {'settings': vars(a), 'windows': windows, 'summary': summary})}")


if __name__ == "__main__":
    main()
