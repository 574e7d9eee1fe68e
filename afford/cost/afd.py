"""Attention-FFN disaggregation sizing (step3.md §4.2, §4.5): how big the FFN batch must be, how sparse
a MoE may be for the network, and what each pipeline stage may spend per layer; and `pipeline`, the
planner's model of one AFD decode step, which benchmarks/afd.py checks against a run."""
from __future__ import annotations

from afford.config import ConfigError
from afford.cost.hardware import Hardware
from afford.cost.specs import ModelSpec

STAGES = 3           # attention / communication / FFN


def min_sparsity(hidden: int, layers: int, hw: Hardware, network_gbps: float, tpot_s: float = 0.05) -> float:
    """Table 7: S >= H * FLOPs * L / (Net * BW * T_comm), with T_comm = 2/3 of one stage (§4.5)."""
    net = network_gbps * 1e9 / 8
    t_comm = tpot_s / STAGES * 2 / 3
    return hidden * hw.flops * layers / (net * hw.mem_bw * t_comm)


def sizing(spec: ModelSpec, hw: Hardware, context: int = 4096, tpot_ms: float = 50.0,
           network_gbps: float | None = None) -> dict:
    if context <= 0 or tpot_ms <= 0:
        raise ConfigError("context and --tpot-ms must be positive")
    net = network_gbps or hw.net_gbps
    L, H, S = spec.layers, spec.hidden, spec.sparsity
    stage_s = tpot_ms / 1e3 / L / STAGES                       # per layer, per stage
    b_dense = hw.flops / hw.mem_bw / 2                         # 8-bit weights: compute-to-memory ratio 2B
    b_moe = b_dense / S
    per_layer_attn_weights = sum(g.linear_flops(H) for g in spec.attention) / 2 / L   # bytes at 8-bit
    kv_per_token_layer = spec.per_token(context)["kv_bytes"] / L / context
    kv_budget = hw.mem_bw * stage_s - per_layer_attn_weights   # bytes of KV one attention card reads per stage
    attn_batch = max(int(kv_budget // (kv_per_token_layer * context)), 0) if kv_budget > 0 else 0
    return {
        "model": spec.name, "hardware": hw.key, "context": context, "tpot_ms": tpot_ms, "network_gbps": net,
        "moe_sparsity": S, "min_ffn_batch_dense": b_dense, "min_ffn_batch_moe": b_moe,
        "min_sparsity_for_network": min_sparsity(H, L, hw, net, tpot_ms / 1e3),
        "stage_budget_us_per_layer": stage_s * 1e6,
        "bytes_per_layer_a2f": H * 1 * b_moe, "bytes_per_layer_f2a": H * 2 * b_moe,
        "network_time_us_per_layer": 3 * H * b_moe / (net * 1e9 / 8) * 1e6,
        "attention_batch_per_card": attn_batch,
        "attention_cards_per_ffn_card": (b_moe / attn_batch) if attn_batch else float("inf"),
    }


def _ffn_layer(spec: ModelSpec, batch: int, weight_bytes: float, hw: Hardware) -> tuple[float, float]:
    """(compute seconds, weight bytes read) of one FFN layer for `batch` tokens, averaged over the layers. A
    dense layer's and a shared expert's products multiply `batch` rows, a routed expert's batch * k / E of
    them on average: each part runs at the machine's FLOP/s for its rows (Hardware.flops_at). A MoE layer
    reads the experts the batch hits: E * (1 - (1 - k/E)^batch) of them under uniform routing."""
    H, seconds, read = spec.hidden, 0.0, 0.0
    for f in spec.ffn:
        shared = f.shared * (f.shared_intermediate or f.intermediate)
        hit = f.experts * (1 - (1 - f.active / f.experts) ** batch) if f.is_moe else 1
        rows = batch * f.active / f.experts if f.is_moe else batch
        seconds += f.layers * batch * 2 * 3 * H * f.active * f.intermediate / hw.flops_at(rows)
        seconds += f.layers * batch * 2 * 3 * H * shared / hw.flops_at(batch)
        read += f.layers * 3 * H * (hit * f.intermediate + shared) * weight_bytes
    return seconds / spec.layers, read / spec.layers


def pipeline(spec: ModelSpec, hw: Hardware, batch: int, context: int, micro_batches: int = 1, ffn_workers: int = 1,
             weight_bytes: float = 1.0, act_bytes: float = 1.0, network_gbps: float | None = None,
             attention_workers: int = 1) -> dict:
    """Per layer of one decode step of `batch` sequences at `context`, each stage of a micro-batch of b
    tokens at its roofline (Step-3's attention = max(core FLOPs, KV bytes) + linear, here with the weights'
    bytes in the linear and FFN terms: a small batch does not amortize them, and every micro-batch reads
    them again):
      a(b)  attention   max(core FLOPs / F, KV bytes / BW_kv) + max(linear FLOPs / F(b), projection weights / BW)
      f(b)  ffn         max(FLOPs / F(rows), weights read / BW) per FFN worker (each holds 1/M of the
                        columns/experts; rows = b for dense layers and shared experts, b*k/E per routed expert)
    F(r) is the FLOP/s of a product of r rows from the hardware's calibration table (`flops@R=` entries), or
    its peak F without one; BW_kv the attention kernel's measured K/V read rate (`kv_bw=`), or BW.
      x(b)  transfer    hidden states A->F (+ 2k routing columns in a MoE) and F->A, to and from each worker,
                        plus the network's one-way latency each way
    With m micro-batches of b = batch/m the attention side is busy m*a(b) per layer, the FFN side m*f(b), the
    link m*x(b), and a micro-batch's round trip a + x + f must end before its next layer's attention, so a
    layer takes max(m*a, m*f, m*x, a + x + f); m = 1 is the sequential a + x + f. With N attention workers
    (data parallel, batch/N sequences each) a micro-batch is b = batch/(N m) rows on each attention worker,
    the FFN workers multiply the N workers' rows together (f(N b)), and each link carries max(N, M) b rows.
    Embeddings and the LM head are left out."""
    if batch < 1 or micro_batches < 1 or ffn_workers < 1 or attention_workers < 1:
        raise ConfigError("batch, micro-batches, attention and FFN workers must be >= 1")
    L, H = spec.layers, spec.hidden
    w = spec.per_token(context)
    k = max((f.active for f in spec.ffn if f.is_moe), default=0)
    net = (network_gbps or hw.net_gbps) * 1e9 / 8

    def stages(b: float) -> tuple[float, float, float]:
        # weight products of b rows at the machine's FLOP/s for b rows (Hardware.flops_at: its calibration
        # table, else the peak); a routed expert sees b * k / E of them (_ffn_layer)
        attn = max(b * w["attention_flops"] / L / hw.flops, b * w["kv_bytes"] / L / hw.kv_read_bw) + \
            max(b * w["linear_flops"] / L / hw.flops_at(b), w["linear_flops"] / 2 / L * weight_bytes / hw.mem_bw)
        ffn_s, ffn_read = _ffn_layer(spec, max(1, round(N * b)), weight_bytes, hw)
        ffn = max(ffn_s / ffn_workers, ffn_read / ffn_workers / hw.mem_bw)
        xfer = max(ffn_workers, N) * b * (2 * H + 2 * k) * act_bytes / net + 2 * hw.net_latency_us * 1e-6
        return attn, xfer, ffn

    N = min(attention_workers, batch)
    m = min(micro_batches, -(-batch // N))      # the runner never makes more micro-batches than a worker's sequences
    a, x, f = stages(batch / N / m)
    layer = max(m * a, m * f, m * x, a + x + f)
    seq = sum(stages(batch / N))
    return {"model": spec.name, "hardware": hw.key, "batch": batch, "context": context, "micro_batches": m,
            "ffn_workers": ffn_workers, "attention_workers": N, "attention_us": m * a * 1e6, "ffn_us": m * f * 1e6, "transfer_us": m * x * 1e6,
            "layer_us": layer * 1e6, "sequential_layer_us": seq * 1e6, "step_ms": layer * L * 1e3,
            "bubble_us": (layer - max(m * a, m * f)) * 1e6}
