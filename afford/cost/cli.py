"""`afford cost`: the Step-3 decoding-cost planner on the command line."""
from __future__ import annotations

import json
import math
from pathlib import Path

from afford.config import ConfigError, number_arg
from afford.cost.afd import pipeline, sizing
from afford.cost.hardware import custom_hardware, get_hardware
from afford.cost.hf import load_spec
from afford.cost.model import costs
from afford.cost.specs import PRESETS

PAPER_HW = "h800,h20,a800,910b"
MAX_CONTEXT = 1 << 24          # 16 M tokens: beyond any model here, and the table's columns stay aligned


def add_parser(sub) -> None:
    c = sub.add_parser("cost", help="what one decoded token costs (the Step-3 cost model), and AFD sizing")
    c.add_argument("action", nargs="?", choices=["afd"], help="'afd': size an attention-FFN disaggregated deployment")
    c.add_argument("--model", help=f"a preset ({', '.join(PRESETS)}) or a config.json / model folder")
    c.add_argument("--context", type=number_arg(int, 1, MAX_CONTEXT),
                   help="context length in tokens (default 8192; afd: 4096)")
    c.add_argument("--hardware", help="comma-separated keys (default: all; afd: h800)")
    c.add_argument("--price", action="append", default=[], help="override a price: KEY=USD_PER_CARD_HOUR")
    c.add_argument("--kv-dtype", choices=["fp8", "bf16"], help="cost every KV cache in this dtype")
    c.add_argument("--json", action="store_true", help="print exactly one JSON object")
    c.add_argument("--table", action="store_true", help="the paper's Table 6 layout for all presets")
    c.add_argument("--plot", help="PNG: cost against context (1K-128K) for --model(s) and --hardware")
    c.add_argument("--tpot-ms", type=number_arg(float, 0, lo_open=True), default=50.0)
    c.add_argument("--network-gbps", type=number_arg(float, 0, lo_open=True),
                   help="per 8-card server (default: the hardware's)")
    c.add_argument("--custom-hardware", action="append", default=[], metavar="KEY:flops=F,bw=B[,net=GBPS][,lat_us=US][,price=USD][,kv_bw=B][,flops@ROWS=F]",
                   help="a machine you measured, then named by --hardware KEY (repeatable)")
    c.add_argument("--batch", type=number_arg(int, 1), help="afd: also model one decode step of this many "
                                                           "sequences through the AFD pipeline, per layer")
    c.add_argument("--micro-batches", type=number_arg(int, 1), default=3, help="afd --batch: micro-batches")
    c.add_argument("--ffn-workers", type=number_arg(int, 1), default=1, help="afd --batch: FFN workers")
    c.add_argument("--attention-workers", type=number_arg(int, 1), default=1,
                   help="afd --batch: data-parallel attention workers (batch / N sequences each)")
    c.add_argument("--weight-bytes", type=number_arg(float, 0, lo_open=True), default=1.0,
                   help="afd --batch: bytes per weight (1: FP8/INT8, 2: BF16, 4: FP32)")
    c.add_argument("--act-bytes", type=number_arg(float, 0, lo_open=True), default=1.0,
                   help="afd --batch: bytes per transferred activation value")


def _prices(items: list[str]) -> dict[str, float]:
    out = {}
    for it in items:
        key, _, val = it.partition("=")
        try:
            price = float(val)
        except ValueError:
            raise ConfigError(f"--price takes KEY=USD, got {it!r}") from None
        if not math.isfinite(price) or price < 0:
            raise ConfigError(f"--price {it}: a price is a finite number >= 0 USD per card-hour")
        out[key.strip().lower()] = price
    return out


def run(a) -> int:
    prices = _prices(a.price)
    custom = [custom_hardware(t) for t in a.custom_hardware]
    if a.action == "afd":
        if not a.model:
            raise ConfigError("afford cost afd needs --model")
        hw = get_hardware(a.hardware or "h800", prices, custom)
        spec = load_spec(a.model).with_kv_dtype(a.kv_dtype)
        res = [sizing(spec, h, a.context or 4096, a.tpot_ms, a.network_gbps) for h in hw]
        if a.batch:
            for r, h in zip(res, hw):
                r["pipeline"] = pipeline(spec, h, a.batch, a.context or 4096, a.micro_batches, a.ffn_workers,
                                         a.weight_bytes, a.act_bytes, a.network_gbps, a.attention_workers)
        if a.json:
            print(json.dumps(res[0] if len(res) == 1 else res))
        else:
            for r in res:
                print(f"{r['model']} on {r['hardware']} at context {r['context']}, TPOT {r['tpot_ms']} ms, "
                      f"network {r['network_gbps']:.0f} Gbps per server")
                print(f"  MoE sparsity S                    {r['moe_sparsity']:.4f}")
                print(f"  min FFN batch (dense / MoE)       {r['min_ffn_batch_dense']:.0f} / {r['min_ffn_batch_moe']:.0f} tokens")
                print(f"  min sparsity the network allows   {r['min_sparsity_for_network']:.3f}")
                print(f"  stage budget per layer (3-stage)  {r['stage_budget_us_per_layer']:.0f} us")
                print(f"  bytes per layer A->F / F->A       {r['bytes_per_layer_a2f'] / 1e6:.2f} MB / "
                      f"{r['bytes_per_layer_f2a'] / 1e6:.2f} MB (network {r['network_time_us_per_layer']:.0f} us)")
                print(f"  attention batch per card          {r['attention_batch_per_card']} sequences")
                print(f"  attention cards per FFN card      {r['attention_cards_per_ffn_card']:.2f}")
                if "pipeline" in r:
                    p = r["pipeline"]
                    print(f"  one step of batch {p['batch']}, {p['micro_batches']} micro-batches, {p['attention_workers']} "
                          f"attention / {p['ffn_workers']} FFN "
                          f"worker(s), per layer: attention {p['attention_us']:.0f} us | transfer {p['transfer_us']:.0f} us"
                          f" | FFN {p['ffn_us']:.0f} us -> {p['layer_us']:.0f} us (sequential "
                          f"{p['sequential_layer_us']:.0f} us); step {p['step_ms']:.2f} ms")
        return 0
    if a.table:
        return _table(a.context or 8192, get_hardware(a.hardware or PAPER_HW, prices, custom), a.kv_dtype)
    if not a.model:
        raise ConfigError("give --model NAME_OR_CONFIG, or --table")
    models = [m.strip() for m in a.model.split(",")]
    hw = get_hardware(a.hardware, prices, custom)
    if a.plot:
        if not Path(a.plot).resolve().parent.is_dir():
            raise ConfigError(f"--plot {a.plot}: the folder {Path(a.plot).parent} does not exist; create it first")
        return _plot(models, hw, a.plot, a.kv_dtype)
    res = costs(load_spec(models[0]).with_kv_dtype(a.kv_dtype), a.context or 8192, hw)
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"{res['model']} at context {res['context']}: KV {res['kv_bytes']:.3g} B | attention {res['attention_flops']:.3g} "
          f"FLOP | linear {res['linear_flops']:.3g} | FFN {res['ffn_flops']:.3g} | intensity {res['arithmetic_intensity']:.1f} FLOP/B")
    print(f"{'USD per 1M tokens':20s}{'attention':>12s}{'FFN':>10s}{'total':>10s}")
    for k in res["attention_cost"]:
        print(f"{k:20s}{res['attention_cost'][k]:12.3f}{res['ffn_cost'][k]:10.3f}{res['total_cost'][k]:10.3f}")
    afd = res["afd"]
    print(f"best AFD: attention on {afd['attention_hardware']}, FFN on {afd['ffn_hardware']}: {afd['cost']:.3f}")
    return 0


def _table(context: int, hw, kv_dtype) -> int:
    keys = [h.key for h in hw]
    head = f"{'model':22s}" + "".join(f"{'attn ' + k:>11s}" for k in keys) + "".join(f"{'FFN ' + k:>10s}" for k in keys) \
        + f"{'AFD':>8s}"
    print(f"USD per 1M decoded tokens at context {context} (Step-3 TR Table 6 layout)")
    print(head)
    for name, spec in PRESETS.items():
        r = costs(spec.with_kv_dtype(kv_dtype), context, hw)
        print(f"{name:22s}" + "".join(f"{r['attention_cost'][k]:11.3f}" for k in keys)
              + "".join(f"{r['ffn_cost'][k]:10.3f}" for k in keys) + f"{r['afd']['cost']:8.3f}")
    return 0


def _plot(models: list[str], hw, path: str, kv_dtype) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ctxs = [1024 * 2 ** i for i in range(8)]                       # 1K .. 128K
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in models:
        spec = load_spec(m).with_kv_dtype(kv_dtype)
        for h in hw:
            ax.plot(ctxs, [costs(spec, c, [h])["total_cost"][h.key] for c in ctxs], marker="o", label=f"{spec.name} / {h.key}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("USD per 1M decoded tokens")
    ax.set_title("Step-3 cost model: decoding cost against context")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
    return 0
