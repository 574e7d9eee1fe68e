"""The Step-3 per-token cost model (step3.md §2.1): attention = max(compute, memory) + linear compute;
FFN = compute; USD per 1M decoded tokens per hardware; the best AFD pairing and single-hardware totals."""
from __future__ import annotations

from afford.cost.hardware import Hardware
from afford.cost.specs import ModelSpec

PER_M = 1e6


def costs(spec: ModelSpec, context: int, hardware: list[Hardware]) -> dict:
    """The JSON object `afford cost --json` prints."""
    w = spec.per_token(context)
    attn, ffn = {}, {}
    for hw in hardware:
        attn[hw.key] = PER_M * (max(w["attention_flops"] * hw.usd_per_flop, w["kv_bytes"] * hw.usd_per_byte)
                                + w["linear_flops"] * hw.usd_per_flop)
        ffn[hw.key] = PER_M * w["ffn_flops"] * hw.usd_per_flop
    a_hw = min(attn, key=attn.get)
    f_hw = min(ffn, key=ffn.get)
    return {"model": spec.name, "context": context, **w,
            "attention_cost": attn, "ffn_cost": ffn, "total_cost": {k: attn[k] + ffn[k] for k in attn},
            "afd": {"attention_hardware": a_hw, "ffn_hardware": f_hw, "cost": attn[a_hw] + ffn[f_hw]}}


def cost_per_token_usd(spec: ModelSpec, context: int, hw: Hardware) -> float:
    """Single-hardware USD per decoded token (the engine's live cost line)."""
    return costs(spec, context, [hw])["total_cost"][hw.key] / PER_M
