"""Attention-FFN disaggregation on this machine, measured against the planner's model of the same run.

Two random-weight fp32 models shaped so that weight and KV reads, not Python, set the per-layer times
(4 layers, hidden 1024, 8 heads / 2 KV heads of 128): a dense one (intermediate 4096) and a Mixtral-style
MoE (8 experts of 1024, top-2). Workload: 96 sequences of 128 random prompt tokens decode 16 tokens
greedily (prefix caching off; the step budget admits every prompt before the first decode step, so each
timed step decodes all 96: 32 rows per micro-batch at m = 3, where a product is compute-bound here); only the decode steps after every sequence has its first token are timed.

Arms per model: one process (the default engine, both cores), and AFD with one FFN worker at 1 / 2 / 3
micro-batches, with two FFN workers at 3, and with two data-parallel attention workers and one FFN worker
at 1 and 3 (the last three: three processes on two cores, oversubscribed). With two attention workers the
attention column is rank 0's (its half of the sequences). In the AFD
arms each side runs one thread (one core each). Per arm: decode throughput and TPOT, whether the tokens
equal the one-process run, and per layer the attention side's compute and wait, the FFN worker's compute,
the transfer (a gloo ping of the same payload) -- next to `afford.cost.afd.pipeline`, the planner, given
this machine as custom hardware: one core's measured FLOP/s (the engine's oneDNN packed fp32 product,
256 x 2048 x 4096) and bandwidth (GEMV over a 256 MB matrix), and the loopback link's measured bandwidth
(16 MB ping); calibrated, also the FFN product's FLOP/s by rows and the native paged attention's K/V read
rate (one process, 32 sequences at 256 tokens: another shape than the arms').

Measured bubble per layer = attention-side time per layer (compute + wait) - max(attention, FFN); overlap
= attention + FFN - layer time, the work of the two sides that ran at the same time (0 when sequential).
On one host the transfer is ~1 % of a layer, below these layers' noise, so what share of it micro-batches
hide cannot be read off this run; the raw wait and transfer times are in the result.

    python benchmarks/afd.py [--batch 96] [--context 128] [--tokens 16]
    python benchmarks/afd.py --link 2,100 [--rounds 3]    # what micro-batches hide over an emulated link
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, copy_tokenizer, save

SHAPE = dict(layers=4, hidden=1024, heads=8, kv_heads=2)
ARMS = [(None, 1), ("attention=1,ffn=1", 1), ("attention=1,ffn=1", 2), ("attention=1,ffn=1", 3),
        ("attention=1,ffn=2", 3), ("attention=2,ffn=1", 1), ("attention=2,ffn=1", 3)]


def make_model(out: Path, moe: bool) -> Path:
    from afford.config import ModelConfig, RopeConfig
    from afford.models.loader import save_model
    from afford.models.transformer import Transformer
    from afford.zoo.train import init_weights
    tok = ROOT / "afford" / "assets" / "default" / "target"
    vocab = ModelConfig.from_dir(tok).vocab_size
    L, H, heads, kv = SHAPE["layers"], SHAPE["hidden"], SHAPE["heads"], SHAPE["kv_heads"]
    cfg = ModelConfig("MixtralForCausalLM" if moe else "LlamaForCausalLM", vocab, H, 1024 if moe else 4096, L, heads,
                      kv, H // heads, 2048, 1e-5, RopeConfig(), tie_word_embeddings=True, eos_token_ids=(0,),
                      num_experts=8 if moe else 0, num_experts_per_tok=2 if moe else 0,
                      moe_intermediate_size=1024 if moe else 0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    init_weights(model)
    save_model(model, out, dtype=torch.float32)
    copy_tokenizer(out, tok)
    return out


def machine_as_hardware() -> dict:
    """One core: sgemm FLOP/s and GEMV read bandwidth (the planner's custom hardware)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # the engine's kernel for 2+ rows: oneDNN's pre-packed fp32 linear (afford/models/transformer.py PackedLinear)
    a, wa = torch.randn(256, 2048), torch.randn(4096, 2048)
    packed = torch.ops.mkldnn._reorder_linear_weight(wa, None)
    w, x = torch.randn(8192, 8192), torch.randn(8192)                     # 256 MB

    def best(f, n=5):
        f()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return min(ts)
    flops = 2 * 256 * 2048 * 4096 / best(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    bw = w.numel() * 4 / best(lambda: torch.mv(w, x))
    torch.set_num_threads(threads)
    return {"flops": flops, "bw": bw}


ROWS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256)


def kv_read_rate(path: Path, batch: int = 32, context: int = 256, steps: int = 8) -> float:
    """One core's K/V read rate of afford's native paged decode attention (the attention side's kernel),
    bytes/s: one process, `batch` sequences decoding at `context` (not the AFD arms' shape), the native
    forward's own profiler timing its attention -- the planner's kv_bw calibration."""
    from afford import LLM, SamplingParams
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    whole = batch * (context + steps + 1)
    llm = LLM(str(path), dtype="float32", enable_prefix_caching=False, max_num_seqs=batch,
              max_num_batched_tokens=whole, decode_token_budget=whole)
    eng = llm.engine
    cfg = eng.model.cfg
    g = torch.Generator().manual_seed(2)
    seqs = [eng.add_request(torch.randint(3, cfg.vocab_size, (context,), generator=g).tolist(),
                            SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)) for _ in range(batch)]
    while any(s.num_output == 0 for s in seqs):
        eng.step()
    impl = eng.runner.native.impl
    impl.set_profiling(True)
    impl.take_profile()
    read = 0
    while eng.has_unfinished():
        read += sum(len(s.token_ids) for s in seqs if not s.finished)        # positions each step attends over
        eng.step()
    seconds = impl.take_profile()["attention"]
    impl.set_profiling(False)
    torch.set_num_threads(threads)
    return read * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4 / seconds


def ffn_flops_by_rows(cfg, intermediate: int) -> list[tuple[int, float]]:
    """One core's FLOP/s of the FFN workers' own product (afford's MLP packed as a worker packs it: oneDNN's
    pre-packed fp32 linear, gate|up then down) by the number of rows it multiplies: the planner's
    calibration table (Hardware.flops_by_rows). The products cycle through copies of the MLP that
    together hold 256 MB, more than the caches: each reads its weights from memory, as every layer's (and
    every expert's) product does in a decode step. (The table of the 2026-11-27 midday runs multiplied one
    MLP again and again -- the expert's 12 MB stayed in cache -- and priced the MoE's few-row products as if
    their reads overlapped the arithmetic for free: -31 to -52 % on the MoE layer.)"""
    from afford.models.transformer import MLP
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    copies = []
    for _ in range(max(2, -(-(256 << 20) // (3 * cfg.hidden_size * intermediate * 4)))):
        mlp = MLP(cfg, intermediate)
        for p in mlp.parameters():
            torch.nn.init.normal_(p, 0.0, 0.02)
        mlp.pack(True)
        copies.append(mlp)
    table = []
    with torch.inference_mode():
        for r in ROWS:
            x = torch.randn(r, cfg.hidden_size)
            for mlp in copies:
                mlp(x)
            reps = max(len(copies), 256 // r)
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                for i in range(reps):
                    copies[i % len(copies)](x)
                best = min(best, (time.perf_counter() - t) / reps)
            table.append((r, 2 * r * 3 * cfg.hidden_size * intermediate / best))
    torch.set_num_threads(threads)
    return table


def decode(llm, prompts, tokens: int) -> dict:
    """Run the prompts; time the steps after every sequence has its first token."""
    from afford import SamplingParams
    eng = llm.engine
    seqs = [eng.add_request(p, SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True)) for p in prompts]
    while any(s.num_output == 0 for s in seqs):
        eng.step()
    assert not any(s.finished for s in seqs), "a sequence finished before the whole batch was decoding"
    runner = eng.runner
    if hasattr(runner, "timings"):
        runner.timings()                                                   # reset: decode steps only from here
    steps, t0 = 0, time.perf_counter()
    while eng.has_unfinished():
        eng.step()
        steps += 1
    wall = time.perf_counter() - t0
    out = {"decode_s": wall, "steps": steps, "tok_s": len(prompts) * tokens / wall, "tpot_ms": wall / steps * 1e3,
           "tokens": [s.output_ids for s in seqs]}
    if hasattr(runner, "timings"):
        t = runner.timings()
        L = len(t["attention_s"])
        per = {k: sum(t[k]) / L / t["steps"] * 1e6 for k in ("attention_s", "wait_s", "ffn_s", "ffn_wait_s")}
        out["per_layer_us"] = {"attention": per["attention_s"], "wait": per["wait_s"], "ffn": per["ffn_s"],
                               "layer": per["attention_s"] + per["wait_s"]}
    return out


def run_model(path: Path, moe: bool, args, hw: dict) -> dict:
    from afford import LLM
    from afford.config import ModelConfig
    from afford.cost.afd import pipeline
    from afford.cost.hardware import custom_hardware
    from afford.cost.hf import spec_from_model_config
    cfg = ModelConfig.from_dir(path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (args.context,), generator=g).tolist() for _ in range(args.batch)]
    spec = spec_from_model_config(cfg, 4)
    res, ref = [], None
    k = cfg.num_experts_per_tok
    table = ffn_flops_by_rows(cfg, cfg.moe_intermediate_size if moe else cfg.intermediate_size)
    print("  FFN product, one core, GFLOP/s by rows: " + ", ".join(f"{r}: {f / 1e9:.1f}" for r, f in table), flush=True)
    if "kv_bw" not in hw:
        hw["kv_bw"] = kv_read_rate(path)
        print(f"  native paged attention, one core: K/V read at {hw['kv_bw'] / 1e9:.1f} GB/s", flush=True)
    for afd, m in ARMS:
        threads = torch.get_num_threads()
        if afd:
            torch.set_num_threads(1)
        kw = dict(afd=afd, micro_batches=m) if afd else {}
        whole = args.batch * (args.context + args.tokens + 1)      # every prompt admitted before decoding starts
        llm = LLM(str(path), dtype="float32", enable_prefix_caching=False, max_num_seqs=args.batch,
                  max_num_batched_tokens=whole, decode_token_budget=whole, **kw)
        decode(llm, prompts[:2], 2)                                                   # warm-up
        r = decode(llm, prompts, args.tokens)
        attention = int(afd.split(",")[0].split("=")[1]) if afd else 1
        name = afd and (afd.split(",")[1] if attention == 1 else afd)
        arm = {"arm": "1 process" if not afd else f"AFD {name}, {m} micro-batch(es)", "afd": afd,
               "micro_batches": m, **{k_: v for k_, v in r.items() if k_ != "tokens"}}
        if ref is None:
            ref = r["tokens"]
        arm["same_tokens"] = r["tokens"] == ref
        if afd:
            runner = llm.engine.runner
            workers = int(afd.split("ffn=")[1])
            rows = -(-args.batch // (m * attention))
            rtt = runner.ping(rows, cfg.hidden_size + k, repeats=30)                 # one micro-batch, both ways
            arm["per_layer_us"]["transfer"] = m * rtt * max(workers, attention) * 1e6
            if "net_bps" not in hw:
                big = runner.ping(1024, 4096, repeats=5)
                hw["net_bps"] = 2 * 1024 * 4096 * 4 / big
                hw["latency_us"] = runner.ping(1, 16, repeats=50) / 2 * 1e6
            base = f"cpu:flops={hw['flops']},bw={hw['bw']},net={hw['net_bps'] * 8 / 1e9},lat_us={hw['latency_us']}"
            calibrated = base + f",kv_bw={hw['kv_bw']}" + "".join(f",flops@{r}={f}" for r, f in table)
            p, A, F = arm["per_layer_us"], arm["per_layer_us"]["attention"], arm["per_layer_us"]["ffn"]
            p["bubble"] = p["layer"] - max(A, F)
            p["overlap"] = A + F - p["layer"]
            # the planner with one peak FLOP/s, and with the measured FLOP/s by rows (--custom-hardware flops@R=)
            for name, text in (("planner", base), ("planner_calibrated", calibrated)):
                plan = pipeline(spec, custom_hardware(text), args.batch, args.context + args.tokens // 2, m, workers,
                                4.0, 4.0, attention_workers=attention)
                arm[f"{name}_us"] = {key: plan[f"{key}_us"] for key in ("attention", "ffn", "transfer", "layer", "bubble")}
                arm[f"{name}_error"] = {key: arm[f"{name}_us"][key] / p[key] - 1 for key in ("attention", "ffn", "layer")}
            arm["custom_hardware"] = calibrated
        llm.close()
        torch.set_num_threads(threads)
        res.append(arm)
        print(f"  {arm['arm']:32s} {arm['tok_s']:7.1f} tok/s  TPOT {arm['tpot_ms']:6.1f} ms  same {arm['same_tokens']}"
              + (f"  per layer A {A:.0f} / wait {p['wait']:.0f} / F {F:.0f} / X {p['transfer']:.0f} us, planner "
                 f"A {arm['planner_us']['attention']:.0f} F {arm['planner_us']['ffn']:.0f} X "
                 f"{arm['planner_us']['transfer']:.0f} layer {arm['planner_us']['layer']:.0f} vs {p['layer']:.0f}, "
                 f"calibrated A {arm['planner_calibrated_us']['attention']:.0f} F "
                 f"{arm['planner_calibrated_us']['ffn']:.0f} layer {arm['planner_calibrated_us']['layer']:.0f}, "
                 f"overlap {p['overlap']:.0f}" if afd else ""), flush=True)
    return {"model": "moe" if moe else "dense", "config": {**SHAPE, "intermediate": cfg.intermediate_size,
            "experts": cfg.num_experts, "top_k": k, "vocab": cfg.vocab_size}, "arms": res,
            "ffn_flops_by_rows": table}


def link_arms(path: Path, args) -> dict:
    """What share of the transfer micro-batches hide, over an emulated link (protocol.Link: each process's
    hidden-state messages leave in order over one wire at MB_PER_S and arrive LATENCY_MS later, while the
    sender goes on computing). Dense model, one FFN worker, 1 and 3 micro-batches, each with and without
    the link, interleaved over rounds. A step's transfer time = the link time of its messages, one after
    another (layers x micro-batches x both directions x (latency + bytes / bandwidth)); hidden share =
    1 - (TPOT with the link - TPOT without) / that transfer time."""
    import os

    from afford import LLM
    from afford.config import ModelConfig
    ms, mbps = (float(v) for v in args.link.split(","))
    cfg = ModelConfig.from_dir(path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (args.context,), generator=g).tolist() for _ in range(args.batch)]
    whole = args.batch * (args.context + args.tokens + 1)
    tpot = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rnd in range(args.rounds):
            for m in (1, 3):
                for linked in (False, True):
                    if linked:
                        os.environ["AFFORD_AFD_LINK"] = args.link         # the workers spawned below inherit it
                    try:
                        llm = LLM(str(path), dtype="float32", enable_prefix_caching=False, max_num_seqs=args.batch,
                                  max_num_batched_tokens=whole, decode_token_budget=whole, afd="attention=1,ffn=1",
                                  micro_batches=m)
                        decode(llm, prompts[:2], 2)
                        r = decode(llm, prompts, args.tokens)
                        llm.close()
                    finally:
                        os.environ.pop("AFFORD_AFD_LINK", None)
                    tpot.setdefault((m, linked), []).append(r["tpot_ms"])
                    print(f"  round {rnd} m={m} link={linked}: TPOT {r['tpot_ms']:.1f} ms", flush=True)
    finally:
        torch.set_num_threads(threads)
    arms = []
    for m in (1, 3):
        rows = -(-args.batch // m)
        per_msg_ms = ms + rows * cfg.hidden_size * 4 / (mbps * 1e6) * 1e3       # fp32 hidden states, each way
        xfer = cfg.num_layers * m * 2 * per_msg_ms
        base = sorted(tpot[(m, False)])[len(tpot[(m, False)]) // 2]
        linked = sorted(tpot[(m, True)])[len(tpot[(m, True)]) // 2]
        arms.append({"micro_batches": m, "tpot_ms": base, "tpot_link_ms": linked, "message_ms": per_msg_ms,
                     "transfer_ms_per_step": xfer, "added_ms": linked - base,
                     "hidden_share": 1 - (linked - base) / xfer, "rounds": {str(k): v for k, v in tpot.items()
                                                                           if k[0] == m}})
        print(f"  m={m}: TPOT {base:.1f} -> {linked:.1f} ms with the link; transfer {xfer:.1f} ms a step; "
              f"hidden {arms[-1]['hidden_share']:.0%}", flush=True)
    return {"link": {"latency_ms": ms, "mb_per_s": mbps}, "arms": arms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--link", metavar="LATENCY_MS,MB_PER_S",
                    help="only the emulated-link arms (what micro-batches hide of a slower network): afd_link.json")
    ap.add_argument("--rounds", type=int, default=3, help="--link: interleaved rounds (medians)")
    args = ap.parse_args()
    if args.link:
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            out = link_arms(make_model(Path(tmp) / "dense", False), args)
        save("afd_link", {"workload": vars(args), **out, "wall_s": time.time() - t0})
        return
    hw = machine_as_hardware()
    print(f"one core: {hw['flops'] / 1e9:.1f} GFLOP/s (oneDNN packed), {hw['bw'] / 1e9:.1f} GB/s GEMV read", flush=True)
    t0 = time.time()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for moe in (False, True):
            print("MoE" if moe else "dense", flush=True)
            out.append(run_model(make_model(Path(tmp) / ("moe" if moe else "dense"), moe), moe, args, hw))
    print(f"loopback gloo link: {hw['net_bps'] / 1e9:.2f} GB/s, {hw['latency_us']:.0f} us one-way latency; "
          f"{time.time() - t0:.0f} s in all")
    save("afd", {"workload": vars(args), "hardware": hw, "models": out, "wall_s": time.time() - t0})


if __name__ == "__main__":
    main()
