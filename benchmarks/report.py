"""Render benchmarks/results/*.json as the markdown tables quoted in BENCHMARKS.md.

    python benchmarks/report.py > /tmp/tables.md
"""
from __future__ import annotations

import json

from common import RESULTS


def load(name):
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def table(head: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine(r) -> str:
    m = r["machine"]
    isa = f" ({m['isa']})" if m.get("isa") else ""
    dirty = " + uncommitted changes" if r.get("dirty") else ""
    return (f"_{m['cpu']}{isa}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, {m['date']}, "
            f"commit {r['commit']}{dirty}_")


def main():
    r = load("matmul_micro")
    if r:
        print("## matmul_micro\n" + machine(r) + "\n")
        print(table(["dtype", "rows", "MB streamed", "F.linear(x, W) GB/s", "x @ W^T (in, out) GB/s",
                     "(W @ x^T)^T GB/s", "x @ W^T in two halves GB/s", "oneDNN packed GB/s", "numpy x @ W^T GB/s",
                     "torch.sum read GB/s"],
                    [[x["dtype"], x["rows"], x["MB"], x["F_linear_GB_s"], x["x_at_Wt_GB_s"], x["W_at_xT_GB_s"],
                      x.get("x_at_Wt_halves_GB_s", "—"), x.get("onednn_packed_GB_s", "—"),
                      x.get("numpy_x_at_Wt_GB_s", "—"), x.get("sum_read_GB_s", "—")] for x in r["rows"]]))
    r = load("forward_overhead")
    if r:
        print("\n## forward_overhead\n" + machine(r) + "\n")
        print(table(["model", "params", "bare loop µs", "afford runner µs (native)", "afford runner µs (Python path)",
                     "afford engine step µs", "afford engine wall µs", "transformers µs", "engine wall / bare"],
                    [[x["model"], x["params"], x["bare_us"], x["runner_us"], x.get("runner_python_us", "—"),
                      x["engine_step_us"], x["engine_wall_us"], x["transformers_us"], x["engine_over_bare"]]
                     for x in r["rows"]]))
        print(f"\ndraft / target time per token {r['draft_over_target_time']} (median of interleaved rounds; parameters "
              f"{r['draft_over_target_params']})")
    for name in ("decode_profile_before", "decode_profile"):
        r = load(name)
        if r:
            print(f"\n## {name}\n" + machine(r) + "\n")
            for b in ("batch1", "batch8"):
                x = r[b]
                ops = ", ".join(f"{k.replace('aten::', '')} {v}" for k, v in list(x["top_ops_ms_per_step"].items())[:8])
                print(f"- {b}: {x['wall_ms_per_step']} ms/step wall, {x['profiled_ms_per_step']} ms profiled, "
                      f"matmul {x['mm_ms_per_step']} ms; top ops (ms/step): {ops}")
                if x.get("native_ms_per_step"):
                    print("  - native forward's own split (ms/step): "
                          + ", ".join(f"{k} {v}" for k, v in x["native_ms_per_step"].items()))
    r = load("verify_rows")
    if r:
        print("\n## verify_rows\n" + machine(r) + "\n")
        def split(d):
            return ", ".join(f"{k} {v}" for k, v in d.items())
        print(table(["model", "weights MB", "rows", "1 row ms", "rows ms", "rows / 1 row (median of rounds)",
                     "1 row: native split ms", "rows: native split ms"],
                    [[x["model"], x["weight_MB"], x["rows"], x["one_row_ms"], x["rows_ms"], x["ratio_median"],
                      split(x["split_one_row_ms"]), split(x["split_rows_ms"])] for x in r["rows"]]))
    r = load("cot")
    if r:
        print("\n## cot\n" + machine(r) + "\n")
        c = r["compression"]
        print(f"compressor on GSM8K train: {c['records']} solutions, {c['words_long']} -> {c['words_short']} words, "
              f"compression rate {c['compression_rate']}; training per arm: "
              + "; ".join(f"{t['arm']} {t['steps']} steps, val loss {t['val_loss']:.3f}" for t in r["training"]) + "\n")
        print(table(["arm", "accuracy", "mean chain tokens", "chain / long CoT", "hit max tokens"],
                    [[x["arm"], f"{x['accuracy']} ({x['correct']}/{x['questions']})", x["mean_chain_tokens"],
                      x["chain_vs_long"], x["finished_by_length"]] for x in r["rows"]]))
    r = load("batch_invariance")
    if r:
        print("\n## batch_invariance\n" + machine(r) + "\n")
        print(table(["dtype", "arm", "prompts", "differ from alone"],
                    [[x["dtype"], x["arm"], x["prompts"], x["differ_from_alone"]] for x in r["rows"]]))
    r = load("compile_probe")
    if r:
        print("\n## compile_probe\n" + machine(r) + "\n")
        print(table(["hidden", "rows", "eager µs", "compiled µs", "compiled / eager", "compile s", "max abs diff"],
                    [[x["hidden"], x["rows"], x["eager_us"], x["compiled_us"], x["compiled_over_eager"], x["compile_s"],
                      f"{x['max_abs_diff']:.1e}"] for x in r["rows"]]))
    r = load("default_pair")
    if r:
        print("## default_pair\n" + machine(r) + "\n")
        print(table(["target ppl GSM8K test answers", "target ppl held-out Shakespeare", "draft acceptance k=4",
                     "per position", "tokens / target forward", "params target / draft", "ms/token target / draft"],
                    [[f"{r['target_ppl_gsm8k_test_answers']:.2f}", f"{r['target_ppl_shakespeare_heldout']:.2f}",
                      f"{r['draft_acceptance_k4_gsm8k']:.3f}", ", ".join(f"{p:.2f}" for p in r["acceptance_per_position"]),
                      f"{r.get('tokens_per_target_forward', float('nan')):.2f}",
                      f"{r['target_params'] / 1e6:.2f} M / {r['draft_params'] / 1e6:.2f} M ({r['param_ratio']:.1f}x)",
                      f"{r['target_ms_per_token']:.2f} / {r['draft_ms_per_token']:.2f} ({r['time_ratio']:.1f}x)"]]))
    r = load("decode_vs_hf")
    if r:
        print("\n## decode_vs_hf\n" + machine(r) + "\n")
        rows = [[x["model"], x["dtype"], x["batch"], x.get("attention", ""), x["afford_tok_s"], x["hf_tok_s"],
                 f"**{x['ratio_vs_hf']:.2f}x**", x["afford_GB_s"], x["afford_GFLOP_s"]] for x in r["rows"] if "dtype" in x]
        print(table(["model", "dtype", "batch", "attention", "afford tok/s", "transformers tok/s", "afford / HF", "GB/s",
                     "GFLOP/s"], rows))
        lc = [x for x in r["rows"] if "engine" in x]
        if lc:
            print()
            print(table(["model", "engine", "batch", "tok/s", "afford fp32 / it", "afford bf16 / it"],
                        [[x["model"], x["engine"], x["batch"], x["tok_s"], x["afford_fp32_over_it"], x["afford_bf16_over_it"]]
                         for x in lc]))
    r = load("spec_vs_hf")
    if r:
        print("\n## spec_vs_hf\n" + machine(r) + "\n")
        arms = list(dict.fromkeys(x["arm"] for x in r["rows"]))
        cats = list(dict.fromkeys(x["category"] for x in r["rows"]))
        cell = {(x["category"], x["arm"]): x for x in r["rows"]}
        rows = []
        for c in cats:
            row = [c]
            for a in arms:
                x = cell[(c, a)]
                s = f"{x['ratio_vs_hf_plain']:.2f}x"
                if "tokens_per_step" in x:
                    s += f" ({x['tokens_per_step']:.2f})"
                row.append(s)
            rows.append(row)
        print(table(["category"] + arms, rows))
        print("\nbatch 8, GSM8K: " + "; ".join(f"{x['arm']} {x['tok_s']:.1f} tok/s" for x in r["batch8"]))
        for b, arms in r.get("interleaved_gsm8k", {}).items():
            arms = {n: v for n, v in arms.items() if isinstance(v, dict) and "rounds" in v}
            what = "mixed workload (math, summarization, QA, translation), batch1" if b == "mixed_batch1" else f"GSM8K {b}"
            print(f"\n{what}, interleaved ({len(next(iter(arms.values()))['rounds'])} rounds; tok/s over plain's in "
                  "the same round, median [per round]): " + "; ".join(
                      f"{n} {v['median']:.2f}x {v['rounds']}" for n, v in arms.items() if n != "afford plain"))
    r = load("quant")
    if r:
        print("\n## quant\n" + machine(r) + "\n")
        models = list(dict.fromkeys(x["model"] for x in r["speed"]))
        arms = list(dict.fromkeys(x["arm"] for x in r["speed"]))
        cell = {(x["model"], x["arm"], x["batch"]): x for x in r["speed"]}
        def fmt(k):
            return f"{cell[k]['tok_s']} ({cell[k]['ratio_vs_fp32']:.2f}x)" if k in cell else "—"
        rows = [[a] + [fmt((m, a, b)) for m in models for b in (1, 8)] for a in arms]
        print(table(["arm"] + [f"{m} B={b}" for m in models for b in (1, 8)], rows))
        print()
        print(table(["arm", "ppl GSM8K test", "Δ %", "ppl Shakespeare held-out", "Δ %", "greedy prefix match / 256"],
                    [[q["arm"], q["ppl_gsm8k_test"], q["ppl_increase_gsm8k_pct"], q["ppl_shakespeare_heldout"],
                      q["ppl_increase_shakespeare_pct"], q["greedy_prefix_match_of_256"]] for q in r["quality"]]))
        extra = r.get("llamacpp")
        if extra:
            print("\n" + table(["model", "engine", "tok/s (batch 1)"], [[x["model"], x["engine"], x["tok_s"]] for x in extra]))
    r = load("mfa_vs_gqa")
    if r:
        print("\n## mfa_vs_gqa\n" + machine(r) + "\n")
        print(table(["preset", "attention", "params", "val loss", "val ppl", "KV values / token", "KV bytes / token (bf16)"],
                    [[x["preset"], x["attention"], x["params"], x["val_loss"], x["val_ppl"], x["kv_values_per_token"],
                      x["kv_bytes_per_token_bf16"]] for x in r["rows"]]))
    r = load("serve_load")
    if r:
        print("\n## serve_load\n" + machine(r) + "\n")
        print(table(["arm", "rate (req/s)", "tok/s", "TTFT p50 / p99 (s)", "TPOT p50 / p99 (ms)",
                     "TPOT p99 / rate 1"],
                    [[x["arm"], x["rate"], f"{x['tok_s']:.1f}", f"{x['ttft_p50_s']:.3f} / {x['ttft_p99_s']:.3f}",
                      f"{1e3 * x['tpot_p50_s']:.1f} / {1e3 * x['tpot_p99_s']:.1f}", x.get("tpot_p99_over_light", "")]
                     for x in r["rows"]]))
    r = load("chunked")
    if r:
        print("\n## chunked\n" + machine(r) + "\n")
        print(table(["arm", "TPOT p50 / p99 / max (ms)", "TPOT p99 / light", "long prompts' TTFT (ms)",
                     "most tokens in a step"],
                    [[x["arm"], f"{x['tpot_p50_ms']} / {x['tpot_p99_ms']} / {x['tpot_max_ms']}",
                      x["tpot_p99_over_light"], x["long_ttft_mean_ms"] or "—", x["max_step_tokens"]]
                     for x in r["rows"]]))
    r = load("prefix")
    if r:
        print("\n## prefix\n" + machine(r) + "\n")
        print(table(["scenario", "prefix caching", "TTFT mean / p50 / p99 (s)", "wall (s)", "tok/s",
                     "prompt tokens reused", "TTFT off / on", "tok/s on / off", "outputs identical"],
                    [[x["scenario"], "on" if x["prefix_caching"] else "off",
                      f"{x['ttft_mean_s']} / {x['ttft_p50_s']} / {x['ttft_p99_s']}", x["wall_s"], x["tok_s"],
                      f"{x['reused_tokens']} of {x['prompt_tokens']}", x.get("ttft_mean_off_over_on", ""),
                      x.get("throughput_on_over_off", ""), x.get("outputs_identical", "")] for x in r["rows"]]))
    r = load("selfconsistency")
    if r:
        print("\n## selfconsistency\n" + machine(r) + "\n")
        print(table(["arm", "accuracy (majority)", "decoded (sequence-steps)", "naive / this", "mean chain tokens",
                     "wall (s)"],
                    [[x["arm"], f"{x['accuracy']} ({x['correct']}/{x['questions']})", x["decoded"],
                      x.get("decoded_naive_over_this", ""), x["mean_chain_tokens"], x["wall_s"]] for x in r["rows"]]))
    r = load("soak")
    if r:
        print("\n## soak\n" + machine(r) + "\n")
        print(table(["t (s)", "requests", "answers by class", "valid p50 / p99 (s)", "server RSS (MB)",
                     "KV blocks used / cached", "/metrics bytes"],
                    [[w["t_s"], w["requests"], ", ".join(f"{k} {v}" for k, v in sorted(w["by_class"].items())),
                      f"{w['valid_p50_s']} / {w['valid_p99_s']}", w["rss_mb"],
                      f"{w['kv_blocks_used']:.0f} / {w['kv_blocks_cached']:.0f}", w["metrics_bytes"]]
                     for w in r["windows"]]))
        print(f"\nsummary: {r['summary']}")
    r = load("smartspec_load")
    if r:
        print("\n## smartspec_load\n" + machine(r) + "\n")
        for wl in dict.fromkeys(x["workload"] for x in r["rows"]):
            sub = [x for x in r["rows"] if x["workload"] == wl]
            arms = list(dict.fromkeys(x["arm"] for x in sub))
            rates = list(dict.fromkeys(x["rate_req_s"] for x in sub))
            cell = {(x["rate_req_s"], x["arm"]): x for x in sub}
            print(f"\n{wl}: mean latency s (p99 s), throughput tok/s; goodput's mean latency over the best "
                  f"and the worst fixed arm and over k=0 (below 1 is faster); noise floor = the second k=0 engine "
                  f"over the first\n")
            fixed = [a for a in arms if a not in ("goodput", "k=0 again")]
            rows = []
            for rt in rates:
                lat = {a: cell[(rt, a)]["mean_latency_s"] for a in arms}
                row = [rt] + [f"{lat[a]:.3f} ({cell[(rt, a)]['p99_latency_s']:.2f}), "
                              f"{cell[(rt, a)]['throughput_tok_s']:.0f}" for a in arms]
                row.append(f"{lat['goodput'] / min(lat[a] for a in fixed):.2f} / "
                           f"{lat['goodput'] / max(lat[a] for a in fixed):.2f} / {lat['goodput'] / lat['k=0']:.2f}")
                if "k=0 again" in lat:
                    row.append(f"{lat['k=0 again'] / lat['k=0']:.2f}")
                row.append(cell[(rt, "goodput")].get("forecast_mean_abs_err", ""))
                rows.append(row)
            head = ["rate req/s"] + arms + ["goodput / best, / worst, / k=0"]
            head += ["noise floor"] if "k=0 again" in arms else []
            print(table(head + ["step-time forecast error"], rows))
        for name, c in r.get("controller", {}).items():
            print(f"\n- {name}: acceptance {c['acceptance']}, k histogram {c['k_histogram']}")

    r = load("compress")
    if r:
        compress(r)
    r = load("gpu_decode")
    if r:
        gpu_decode(r)
    r = load("fidelity")
    if r:
        fidelity(r)
    r = load("afd")
    if r:
        afd(r)
    r = load("s2d")
    if r:
        s2d(r)
    r = load("bf16_panels")
    if r:
        bf16_panels(r)
    r = load("serve_overhead")
    if r:
        serve_overhead(r)
    for name in ("passkey_long", "passkey_long_bound", "passkey_long_fast", "passkey_long_noloc", "passkey_long_sparse_ft",
                 "passkey_long_ppl", "passkey_long_ppl_noloc"):
        r = load(name)
        if r:
            passkey_long(r, name)


def passkey_long(r, name: str = "passkey_long") -> None:
    """benchmarks/passkey_long.py: passkey retrieval, dense vs sparse decode attention, and the fast tier."""
    print(f"\n## {name}\n" + machine(r) + "\n")
    print(f"Model {r['settings']['model']}, {r['settings']['n']} documents per length.\n")
    rows = []
    for x in r["rows"]:
        c = x.get("continuation") or {}
        rows.append([x["arm"], f"{x['context_tokens_mean']:,.0f}", x["documents"], f"{100 * x['accuracy']:.0f} %",
                     f"{x['perplexity_tail']:.2f}" if "perplexity_tail" in x else "-",
                     f"{x['decode_tok_s']:.0f}" if "decode_tok_s" in x else "-",
                     f"{x['kv_read_vs_dense']:.2f}" if "kv_read_vs_dense" in x else "1.00",
                     f"{100 * x['hit_rate']:.0f} %" if "hit_rate" in x else "-",
                     f"{x['moved_bytes_per_token'] / 1e6:.2f} MB" if "moved_bytes_per_token" in x else "-",
                     f"{c['kv_read_vs_dense']:.2f}" if c else "-", f"{100 * c['hit_rate']:.1f} %" if c else "-",
                     f"{c['moved_bytes_per_token'] / 1e6:.3f} MB" if c else "-"])
    print(table(["arm", "context (mean tokens)", "documents", "retrieval", "perplexity, last 128 filler tokens",
                 "decode tok/s", "K/V read vs dense (question + answer)",
                 "fast-tier hit rate (question + answer)", "moved per token", "K/V read vs dense (continuation)",
                 "hit rate (continuation)", "moved per token (continuation)"], rows))


def serve_overhead(r) -> None:
    """benchmarks/serve_overhead.py: the engine alone, through AsyncLLM, and through the HTTP server."""
    st = r["settings"]
    print("\n## serve_overhead\n" + machine(r) + "\n")
    print(f"{st['sequential']} requests one after another / {st['burst']} at once, up to {st['max_tokens']} "
          f"tokens, {st['dtype']}; medians of {st['rounds']} interleaved rounds, each arm a fresh process.\n")

    def ms(x, k):
        return f"{x[k]:.2f}" if k in x else "-"
    print(table(["arm", "sequential tok/s", "vs engine", "burst tok/s", "vs engine", "batch-1 step (ms)",
                 "TPOT p50 sequential (ms)", "TPOT p99 burst (ms)"],
                [[x["arm"], f"{x['sequential_tok_s']:,.0f}", f"{x['sequential_vs_engine']:.2f}",
                  f"{x['burst_tok_s']:,.0f}", f"{x['burst_vs_engine']:.2f}", ms(x, "batch1_step_ms"),
                  ms(x, "sequential_tpot_p50_ms"), ms(x, "burst_tpot_p99_ms")] for x in r["rows"]]))


def bf16_panels(r) -> None:
    """benchmarks/bf16_panels.py: the bundled models on bf16 vs fp32 panels, interleaved."""
    st = r["settings"]
    print("\n## bf16_panels\n" + machine(r) + "\n")
    print(f"{st['questions']} GSM8K test questions x {st['new_tokens']} tokens, greedy, batch 1; {st['rounds']} "
          f"interleaved rounds, medians.\n")
    print(table(["arm", "tok/s", "ms per token", "tokens per step"],
                [[n, f"{a['tok_s_median']:,.0f}", f"{a['ms_per_token_median']:.3f}", f"{a['tokens_per_step']:.2f}"]
                 for n, a in r["arms"].items()]))
    print("\n" + "; ".join(f"{k} {v:.3f}" for k, v in r["ratios"].items()) + f"; same tokens: {r['same_tokens']}")


def s2d(r) -> None:
    """benchmarks/s2d.py: one sorted multi-exit draft against fixed exits and per-target drafts."""
    st = r["settings"]
    print("\n## s2d\n" + machine(r) + "\n")
    print(f"Sorted draft exits {r['sorted_exits']}, trained {r['sorted_train_minutes']} min; greedy, batch 1, "
          f"k = {st['k']}, {st['questions']} GSM8K test questions x {st['new_tokens']} tokens, speed as the median "
          f"over {st['rounds']} interleaved rounds of the ratio to plain in the round.\n")
    for target, t in r["targets"].items():
        print(f"\n### target {target} ({t['target_params'] / 1e6:.1f} M parameters); separate draft "
              f"{t['separate_draft']} trained {t['separate_train_minutes']} min\n")
        rows = [[n, f"{v['speedup_median']:.2f}x", v["acceptance"], v["accepted_per_step"], v["tok_s_median"]]
                for n, v in t["gsm8k"].items()]
        print(table(["arm", "speed vs plain", "acceptance", "accepted per step", "tok/s"], rows))
        c = t["confidence_exits"]
        print(f"\nConfidence exits: thresholds {c['thresholds']} (calibrated: {c['calibrated']}, "
              f"{c['calibration_records']} records, their per-token match rate {c['predicted_acceptance']:.2f}), tokens per "
              f"exit {dict(zip(c['exits'], c['exit_tokens']))}.\n")
        tr = c.get("trial")
        if isinstance(tr, dict):                  # the live trial of the fit's choice and every fixed exit
            print(table(["policy (thresholds)", "match rate (records)", "step ms (live)", "tokens/s expected", "kept"],
                        [[str(p), a, ms, v, "yes" if i == tr["chosen"] else ""] for i, (p, a, ms, v) in
                         enumerate(zip(tr["policies"], tr["alpha"], tr["step_ms"], tr["tokens_per_s"]))]) + "\n")
        arms = list(next(iter(t["categories"].values())))
        print(table(["category"] + arms, [[cat] + [v[a]["acceptance"] for a in arms] for cat, v in t["categories"].items()]))


def afd(r) -> None:
    """benchmarks/afd.py: one process vs attention-FFN disaggregation, measured per layer beside the planner."""
    hw, w = r["hardware"], r["workload"]
    print("\n## afd\n" + machine(r) + "\n")
    print(f"{w['batch']} sequences x {w['context']} prompt tokens, {w['tokens']} decode steps timed; planner "
          f"hardware = one core: {hw['flops'] / 1e9:.1f} GFLOP/s, {hw['bw'] / 1e9:.1f} GB/s"
          + (f" (calibrated: K/V read by the native paged attention at {hw['kv_bw'] / 1e9:.1f} GB/s, and the "
             f"FFN table below)" if "kv_bw" in hw else "")
          + f"; loopback gloo {hw['net_bps'] / 1e9:.2f} GB/s, {hw['latency_us']:.0f} us one-way\n")
    for m in r["models"]:
        c = m["config"]
        kind = f"MoE {c['experts']} experts of {c['intermediate']}, top-{c['top_k']}" if c["experts"] else \
            f"dense, intermediate {c['intermediate']}"
        base = m["arms"][0]
        cal = "planner_calibrated_us" in m["arms"][-1]
        print(f"\n{m['model']} ({c['layers']} layers, hidden {c['hidden']}, {kind}); per layer and step, us "
              f"(in brackets: the planner's prediction" + (" at one peak FLOP/s / with the measured FLOP/s-by-rows "
              "table, and the calibrated error" if cal else "") + ")\n")
        if "ffn_flops_by_rows" in m:
            print("FFN product, one core, GFLOP/s by rows: "
                  + ", ".join(f"{rr}: {f / 1e9:.1f}" for rr, f in m["ffn_flops_by_rows"]) + "\n")

        def cell(a, key):
            p, q = a["per_layer_us"], a["planner_us"]
            if not cal or key not in a["planner_calibrated_error"]:
                return f"{p[key]:.0f} ({q[key]:.0f})"
            return (f"{p[key]:.0f} ({q[key]:.0f} / {a['planner_calibrated_us'][key]:.0f}, "
                    f"{100 * a['planner_calibrated_error'][key]:+.0f} %)")
        rows = []
        for a in m["arms"]:
            p, q = a.get("per_layer_us"), a.get("planner_us")
            cells = ["", "", "", "", "", ""] if not p else [
                cell(a, "attention"), cell(a, "ffn"), f"{p['transfer']:.0f} ({q['transfer']:.0f})", cell(a, "layer"),
                f"{p['bubble']:.0f} ({q['bubble']:.0f})", f"{p['attention'] + p['ffn'] - p['layer']:.0f}"]
            rows.append([a["arm"], f"{a['tok_s']:.0f}", f"{a['tok_s'] / base['tok_s']:.2f}x", f"{a['tpot_ms']:.1f}",
                         "yes" if a["same_tokens"] else "NO", *cells])
        print(table(["arm", "tok/s", "vs 1 process", "TPOT ms", "same tokens", "attention", "FFN", "transfer",
                     "layer", "bubble", "overlap"], rows))


def fidelity(r) -> None:
    """benchmarks/fidelity.py: the lossy levers beside their quality change."""
    import sys

    from common import ROOT
    sys.path.insert(0, str(ROOT))
    from afford.bench.fidelity import markdown
    print("\n## fidelity\n" + machine(r) + "\n")
    for part in ("ead", "grad"):
        print(markdown(r[part]))
    st = r["steering"]
    print(f"Guided re-ranking, {st['n']} GSM8K prompts with a gendered word and their swapped rewrites, "
          f"{st['max_tokens']} new tokens, greedy, bundled draft proposing, bundled target guiding:\n")
    print(table(["arm", "invariance (prefix share)", "identical after swap-back", "tokens overridden", "tokens/s",
                 "time vs plain"],
                [[k, f"{a['invariance_prefix']:.1%}", f"{a['invariant_outputs']:.0%}", a["overridden_tokens"],
                  f"{a['tokens_per_s']:.0f}", f"{a['time_vs_plain']:.1f}x"] for k, a in st["arms"].items()]))


def gpu_decode(r) -> None:
    """benchmarks/gpu_decode.py's run: afford vs the bare loop and transformers, busy share, low bits."""
    a = r["arms"]
    print(f"\n## gpu_decode\n_{r['device']}, torch {r['torch']}, commit {r.get('commit')}_\n")
    rows = []
    for b in (1, 16, 64):
        g, e, bg, be, hf = (a.get(f"{k}_b{b}") for k in ("afford_graphs", "afford_eager", "bare_graph", "bare_eager", "hf"))
        if not (g and bg):
            continue
        rows.append([b, f"{g['tok_s']:.0f}", f"{e['tok_s']:.0f}" if e else "", f"{bg['tok_s']:.0f}",
                     f"{be['tok_s']:.0f}" if be else "", f"{hf['tok_s']:.0f}" if hf else "",
                     f"{g['tok_s'] / bg['tok_s']:.2f}x", f"{g['tok_s'] / e['tok_s']:.1f}x" if e else "",
                     f"{g['tok_s'] / hf['tok_s']:.1f}x" if hf else "", f"{g['decode_ms']:.2f} / {bg['decode_ms']:.2f}"])
    print(table(["batch", "afford, graphs", "afford, enforce_eager", "bare + graph", "bare eager", "transformers eager",
                 "afford / bare+graph", "graphs / eager", "afford / transformers", "decode ms: afford / bare+graph"],
                rows))
    busy = a.get("busy") or {}
    shares = ", ".join(f"batch {k.split('_b')[-1]}: {v:.0%}" for k, v in busy.items() if k.startswith("gpu_busy"))
    print(f"\nGPU busy share {shares}; "
          f"roofline share {r.get('roofline_share', 0):.2f} (graph alone {r.get('graph_roofline_share', 0):.2f}); "
          f"copy bandwidth {r.get('copy_bandwidth_gbs', 0):.0f} GB/s")
    ab = []
    for b in (1, 16, 64):                  # async scheduling (the default) against the synchronous loop
        g, s_ = a.get(f"afford_graphs_b{b}"), a.get(f"afford_graphs_sync_b{b}")
        if g and s_:
            ab.append([b, f"{g['tok_s']:.0f}", f"{s_['tok_s']:.0f}", f"{g['tok_s'] / s_['tok_s']:.2f}x",
                       f"{g['decode_ms']:.2f} / {s_['decode_ms']:.2f}", f"{s_['graph_replay_ms']:.2f}",
                       f"{s_['graph_replay_ms'] / s_['decode_ms']:.0%}", f"{s_['same_tokens_as_default']:.0%}"])
    if ab:
        print("\n" + table(["batch", "async tok/s", "sync tok/s", "async / sync", "decode ms async / sync",
                            "graph replay ms", "GPU busy, sync", "same tokens"], ab))
    for name in ("afford_graphs_nogemv_b1", "afford_graphs_gemv_b1"):   # the fused one-row GEMV's A/B arm
        v, g = a.get(name), a.get("afford_graphs_b1")
        if v and g:
            on, off = (v, g) if v["fused_gemv"] else (g, v)
            kp = v.get("kernel_profile", {})
            print(f"\nFused one-row GEMV (triton_gemv.py) {'on' if v['fused_gemv'] else 'off'} against the default, "
                  f"batch 1: {on['tok_s']:.0f} vs {off['tok_s']:.0f} tok/s without it ({on['tok_s'] / off['tok_s']:.2f}x; "
                  f"decode step {on['decode_ms']:.3f} vs {off['decode_ms']:.3f} ms); the switched arm: graph replay "
                  f"{v.get('graph_replay_ms') or 0:.3f} ms, roofline share {v['roofline_share']:.2f}, "
                  f"{kp.get('kernels_per_step', 0):.0f} kernels a step, same tokens as the default "
                  f"{v['same_tokens_as_default']:.0%}")
    pdl = []
    for b in (1, 16, 64):                  # programmatic dependent launch switched against the default
        v, g = a.get(f"afford_graphs_pdl_b{b}") or a.get(f"afford_graphs_nopdl_b{b}"), a.get(f"afford_graphs_b{b}")
        if v and g:
            on, off = (v, g) if v["pdl"] else (g, v)
            pdl.append([f"bf16, batch {b}", f"{on['tok_s']:.0f}", f"{off['tok_s']:.0f}", f"{on['tok_s'] / off['tok_s']:.2f}x",
                        f"{on['decode_ms']:.3f} / {off['decode_ms']:.3f}", f"{v.get('graph_replay_ms') or 0:.3f}",
                        f"{v['same_tokens_as_default']:.0%}"])
    v, g = a.get("afford_int4_pdl") or a.get("afford_int4_nopdl"), a.get("afford_int4")
    if v and g:
        on, off = (v, g) if v["pdl"] else (g, v)
        for b in (1, 16):
            if f"b{b}" in on and f"b{b}" in off:
                pdl.append([f"int4, batch {b}", f"{on[f'b{b}']['tok_s']:.0f}", f"{off[f'b{b}']['tok_s']:.0f}",
                            f"{on[f'b{b}']['tok_s'] / off[f'b{b}']['tok_s']:.2f}x",
                            f"{on[f'b{b}']['decode_ms']:.3f} / {off[f'b{b}']['decode_ms']:.3f}",
                            f"{v[f'b{b}'].get('graph_replay_ms') or 0:.3f}", ""])
    if pdl:
        print("\nProgrammatic dependent launch (afford/models/triton_lib.py) on vs off, graphs:\n\n"
              + table(["arm", "PDL tok/s", "no PDL tok/s", "PDL / no PDL", "decode ms PDL / no PDL",
                       "switched arm's graph replay ms", "same tokens"], pdl))
    def switch_ab(b, names, title, on, off):
        """A switch's A/B against the default arm at batch b: names = (the switched arm's name when the switch is
        on by default, when it is off); on / off: what each side runs."""
        for name, on_default in zip(names, (True, False)):
            v, g = a.get(f"afford_graphs_{name}_b{b}"), a.get(f"afford_graphs_b{b}")
            if v and g:
                x, y = (g, v) if on_default else (v, g)
                print(f"\n{title}, batch {b} ({'on' if on_default else 'off'} by default): {on} {x['tok_s']:.0f} vs "
                      f"{off} {y['tok_s']:.0f} tok/s ({x['tok_s'] / y['tok_s']:.2f}x; decode step {x['decode_ms']:.3f} "
                      f"vs {y['decode_ms']:.3f} ms, the switched arm's graph replay {v.get('graph_replay_ms') or 0:.3f}"
                      f" ms); same tokens {v['same_tokens_as_default']:.0%}")
    for b in (1, 16, 64):
        switch_ab(b, ("unfuseddecode", "fuseddecode"), "Decode attention in one kernel (fused_decode)",
                  "attend_decode", "rope_store + split + merge")
    switch_ab(1, ("noqkvrope", "qkvrope"), "The q|k|v GEMV doing RoPE + the K/V store (fused_qkv_rope)",
              "in the GEMV", "the rope_store kernel")
    sv, g = a.get("afford_graphs_swept_b1"), a.get("afford_graphs_b1")
    if sv and g:
        print(f"\nThe sweep's tiles {sv['configs']} instead of the defaults, batch 1: {sv['tok_s']:.0f} vs "
              f"{g['tok_s']:.0f} tok/s (decode step {sv['decode_ms']:.3f} vs {g['decode_ms']:.3f} ms)")
    for key, ref, unit in (("gemv_sweep", "cublas", "TB/s of weights"), ("gemv_w4_sweep", "tinygemm", "TB/s of codes")):
        sw = a.get(key)
        if not sw:
            continue
        rows = [[role, "x".join(map(str, m["shape"])), " + ".join(m["fused"]) or "-", f"{m[ref + '_us']:.2f}",
                 f"{m['best']['us']:.2f} {tuple(m['best']['config'])}",
                 f"{m[ref + '_tb_s']:.2f} / {m['best']['tb_s']:.2f}", str(tuple(sw["chosen"][role]) if sw["chosen"][role] else ref)]
                for role, m in sw["roles"].items()]
        print(f"\n{key} ({sw['layers']} distinct matrices a role in a row, in a CUDA graph; us per matrix):\n\n"
              + table(["role", "N x K", "fused in", f"{ref} (+ the kernels it replaces) us", "afford Triton us (best tile)",
                       f"{unit}: {ref} / Triton", "chosen"], rows))
        if key == "gemv_w4_sweep":          # each int4 kernel's best tile per role (triton_gemv.W4_KINDS)
            kinds = {0: "pairs", 1: "halves", 2: "tensor cores", 3: "octets", 4: "halves x2d", 5: "quads"}
            best = {}
            for role, m in sw["roles"].items():
                for c, us in zip(sw["configs"], m["triton_us"]):
                    k = kinds[c[4] if len(c) > 4 else 0] + (" split" if len(c) > 5 else "")
                    if us is not None and us < best.get((role, k), (float("inf"),))[0]:
                        best[role, k] = (us, tuple(c))
            present = [k for k in sorted({kk for _, kk in best}, key=lambda k: (k.split()[0] not in kinds.values(), k))]
            rows = [[role] + [f"{best[role, k][0]:.2f} {best[role, k][1]}" if (role, k) in best else "-" for k in present]
                    for role in sw["roles"]]
            print("\nThe fastest tile of each int4 kernel (us per matrix):\n\n" + table(["role"] + present, rows))
    def fused_roles(name, v):
        """The roles the fused int4 GEMV ran: the head's tile only where the head was int4 (runs before 843c068
        did not record it: the arm named _head quantized it)."""
        return [role for role in v.get("fused_gemv_w4") or {}
                if role != "head" or v.get("quantized_head", name.endswith("_head"))]
    bf16_replay = (a.get("busy") or {}).get("graph_replay_ms_b1")
    low = [[k, ", ".join(v["kernels"]) + (f" ({v['row_kernel_layers']} matrices through the Triton row kernel)"
                                          if v.get("row_kernel_layers") else "")
            + (f" + fused int4 GEMV for {', '.join(fused_roles(k, v))}" if fused_roles(k, v) else ""),
            f"{v['b1']['tok_s']:.0f}", f"{v['b16']['tok_s']:.0f}" if "b16" in v else "",
            f"{v['b1']['tok_s'] / a['afford_graphs_b1']['tok_s']:.2f}x",
            f"{v['b1']['decode_ms']:.3f} / {a['afford_graphs_b1']['decode_ms']:.3f}",
            f"{v['b1']['graph_replay_ms']:.3f} / {bf16_replay:.3f}" if v["b1"].get("graph_replay_ms") and bf16_replay
            else ""]
           for k, v in a.items() if k.startswith("afford_int") and "b1" in v and "afford_graphs_b1" in a]
    if low:
        print("\n" + table(["arm", "kernels", "batch 1 tok/s", "batch 16 tok/s", "batch 1 / bf16",
                            "decode ms / bf16's", "graph replay ms / bf16's"], low))
    sw = a.get("int4_sweep")
    if sw:
        rows = [[k, "x".join(map(str, m["shape"])), f"{m['bf16_us']:.2f}", f"{m['tinygemm_us']:.2f}",
                 f"{m['best']['us']:.2f} {tuple(m['best']['config'])}", f"{m['tinygemm_gb_s']:.0f} / {m['best']['gb_s']:.0f}"]
                for k, m in sw["matrices"].items()]
        lu = sw["layer_us"]
        rows.append(["one layer", "", f"{lu['bf16']:.1f}", f"{lu['tinygemm']:.1f}", f"{lu['triton_best']:.1f}", ""])
        print("\n" + table(["matrix (one row, in a CUDA graph)", "N x K", "cuBLAS bf16 us", "tinygemm int4 us",
                            "afford Triton int4 us (best tiles)", "GB/s of codes: tinygemm / Triton"], rows))
    gl = load("gemlite_probe")
    if gl and gl.get("layer_us"):
        rows = [[k, f"{m['bf16_us']:.2f}", f"{m['tinygemm_us']:.2f}", f"{m['gemlite_us']:.2f}",
                 f"{m['tinygemm_rel_err']:.4f} / {m['gemlite_rel_err']:.4f}"] for k, m in gl["matrices"].items()]
        lu = gl["layer_us"]
        rows.append(["one layer", f"{lu['bf16']:.1f}", f"{lu['tinygemm']:.1f}", f"{lu['gemlite']:.1f}", ""])
        print(f"\nGemLite {gl['gemlite']} probe (benchmarks/gemlite_probe.py, group {gl['group']}, {gl['device']}):\n\n"
              + table(["matrix", "cuBLAS bf16 us", "tinygemm us", "GemLite us", "max rel. error: tinygemm / GemLite"], rows))
    gs = load("gemv_scaling")
    if gs and gs.get("fit_k2048"):
        arms = ("cublas_bf16", "afford_bf16", "tinygemm_int4", "afford_int4")
        rows = [[k] + [f"{v['arms'][a]['us']:.2f}" if v["arms"][a]["us"] else "" for a in arms]
                + [f"{v['arms']['afford_int4']['tile']}", f"{v['copies']}"] for k, v in gs["shapes"].items()]
        fits = [[a, f"{f['fixed_us']:.2f}", f"{f['rate_tb_s']:.2f}", f"{f['worst_rel_residual']:.0%}"]
                for a, f in gs["fit_k2048"].items() if f]
        lay = "; ".join(f"{k}: bf16 {v['bf16_us']:.1f} us, int4 {v['int4_us']:.1f} us, {v['int4_speedup']:.2f}x"
                        for k, v in gs["layer"].items() if v)
        print(f"\nOne-row products by size (benchmarks/gemv_scaling.py, {gs['device']}, commit {gs.get('commit')}, "
              f"PDL {'on' if gs.get('pdl') else 'off'}; us per product, chained distinct matrices in a CUDA graph):\n\n"
              + table(["N x K", "cuBLAS bf16", "afford bf16", "tinygemm int4", "afford int4", "afford int4 tile",
                       "matrices chained"], rows)
              + "\n\nFit over K = 2048 (us = fixed + bytes / rate):\n\n"
              + table(["kernel", "fixed us", "rate TB/s", "worst residual"], fits
                      + [[f"afford int4 {t}", f"{f['fixed_us']:.2f}", f"{f['rate_tb_s']:.2f}" if f["rate_tb_s"] else "",
                          f"{f['worst_rel_residual']:.0%}"]
                         for t, f in gs.get("fit_k2048_int4_tiles", {}).items() if f])
              + f"\n\nOne layer's four products, the faster kernel of each kind per role: {lay}")


def compress(r) -> None:
    """benchmarks/compress.py: the language-model coder and the digits circuit against gzip / xz / zstd."""
    print("\n## compress\n" + machine(r) + "\n")
    rows = []
    for t in r["text"]:
        b = t["baselines_bits_per_byte"]
        rows.append([t["file"], f"{t['bytes']:,}", f"{t['bits_per_byte']:.3f}", f"{t['model_bits_per_byte']:.3f}",
                     f"{t['coder_overhead']:+.2%}", f"{b['gzip -9']:.3f}", f"{b['xz -9e']:.3f}", f"{b.get('zstd -19', 0):.3f}",
                     f"{t['x_smaller_than_xz']:.2f}x", f"{t['encode_bytes_per_s']:,.0f}", f"{t['decode_bytes_per_s']:,.0f}"])
    d = r["digits"]
    b = d["baselines_bits_per_dim"]
    rows.append([f"digits test ({d['images']} images, bits/dim)", f"{d['dims']:,} pixels", f"{d['bits_per_dim']:.3f}",
                 f"{d['nll_bits_per_dim']:.3f}", f"{d['over_nll']:+.2%}", f"{b['gzip -9']:.3f}", f"{b['xz -9e']:.3f}",
                 f"{b.get('zstd -19', 0):.3f}", f"{b['xz -9e'] / d['bits_per_dim']:.2f}x",
                 f"{d['dims'] / d['encode_s']:,.0f} px/s", f"{d['pixels_per_s_decode']:,.0f} px/s"])
    print(table(["file", "size", "afford bits/byte", "model cross-entropy", "coder overhead", "gzip -9", "xz -9e",
                 "zstd -19", "x smaller than xz", "encode B/s", "decode B/s"], rows))
    print(f"\nDigits HCLT: H={d['hidden']}, {d['em_iters']} EM iterations ({d['fit_s']:.0f} s), tree height "
          f"{d['tree_height']}; {d['node_evals_per_conditional']:.1f} node evaluations per conditional (of "
          f"{d['tree_nodes']} nodes).")
    if r.get("overlap_sweep"):
        print("\n" + table(["file (slice)", "overlap", "bits/byte", "x smaller than xz", "encode B/s", "decode B/s"],
                           [[x["file"], x["overlap"], f"{x['bits_per_byte']:.3f}", f"{x['x_smaller_than_xz']:.2f}x",
                             f"{x['encode_bytes_per_s']:,.0f}", f"{x['decode_bytes_per_s']:,.0f}"]
                            for x in r["overlap_sweep"]]))
    if r.get("batch_sweep"):
        print("\n" + table(["batch (lanes)", "bytes", "encode B/s", "decode B/s", "forwards"],
                           [[x["batch"], f"{x['bytes']:,}", f"{x['encode_bytes_per_s']:,.0f}",
                             f"{x['decode_bytes_per_s']:,.0f}", x["forwards"]] for x in r["batch_sweep"]]))


if __name__ == "__main__":
    main()
