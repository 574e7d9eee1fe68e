"""Attention-FFN disaggregation sizing (step3.md §4.2, §4.5): how big the FFN batch must be, how sparse
a MoE may be for the network, and what each pipeline stage may spend per layer."""
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
