"""Per-token decoding work of a model, as the Step-3 cost model counts it (step3.md §2.1, §2.6).

A ModelSpec is groups of attention layers and groups of FFN layers. Per decoded token at context c:
KV/state bytes read, core attention FLOPs (QK^T + PV, 2 FLOPs per MAC), linear FLOPs of the attention
projections, and activated FFN FLOPs. Embedding and LM head are left out, as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from afford.config import ConfigError

LINEAR_ATTN_FLOPS_PER_HEAD_DIM2 = 10   # lightning attention: 10 * heads * d^2 per layer, inferred from Table 2


@dataclass(frozen=True)
class AttnGroup:
    kind: str                   # "gqa" (MHA/MQA too) | "mla" | "mfa" | "linear"
    layers: int
    heads: int
    kv_heads: int = 1
    head_dim: int = 128
    kv_bytes: float = 1.0       # bytes per cached element (FP8 = 1)
    window: int | None = None   # chunked / sliding attention sees min(c, window) tokens
    q_lora: int = 0             # MLA query compression (0: none)
    kv_lora: int = 0            # MLA latent
    rope_dim: int = 0           # MLA decoupled rope key
    nope_dim: int = 0
    v_dim: int = 0
    q_rank: int = 0             # MFA low-rank query
    linear_width: int = 0       # linear attention projection width (heads * head_dim)

    def ctx(self, c: int) -> int:
        return min(c, self.window) if self.window else c

    def kv_bytes_per_token(self, c: int) -> float:
        """Bytes read per decoded token: cached K/V (or latent) for every context token, or a state."""
        n, cc = self.layers, self.ctx(c)
        if self.kind == "mla":
            return n * (self.kv_lora + self.rope_dim) * self.kv_bytes * cc
        if self.kind == "linear":      # FP32 state, read and written every token
            return n * 2 * self.heads * self.head_dim * self.head_dim * 4
        return n * 2 * self.kv_heads * self.head_dim * self.kv_bytes * cc

    def attention_flops(self, c: int) -> float:
        n, cc = self.layers, self.ctx(c)
        if self.kind == "mla":
            return n * 4 * (self.kv_lora + self.rope_dim) * self.heads * cc
        if self.kind == "linear":
            return n * LINEAR_ATTN_FLOPS_PER_HEAD_DIM2 * self.heads * self.head_dim ** 2
        return n * 4 * self.heads * self.head_dim * cc

    def linear_flops(self, h: int) -> float:
        H, d, kv = self.heads, self.head_dim, self.kv_heads
        if self.kind == "mla":
            q = h * self.q_lora + self.q_lora * H * (self.nope_dim + self.rope_dim) if self.q_lora \
                else h * H * (self.nope_dim + self.rope_dim)
            per = q + h * (self.kv_lora + self.rope_dim) + self.kv_lora * H * (self.nope_dim + self.v_dim) \
                + H * self.v_dim * h
        elif self.kind == "mfa":
            per = h * self.q_rank + self.q_rank * H * d + 2 * h * kv * d + H * d * h
        elif self.kind == "linear":    # q, k, v, output gate and output projections
            per = 5 * h * self.linear_width
        else:
            per = 2 * h * H * d + 2 * h * kv * d
        return 2 * self.layers * per


@dataclass(frozen=True)
class FFNGroup:
    layers: int
    intermediate: int           # dense FFN, or one routed expert
    active: int = 1             # routed experts per token (dense: 1)
    experts: int = 1            # routed experts in total (dense: 1)
    shared: int = 0
    shared_intermediate: int | None = None

    def flops(self, h: int) -> float:
        shared = self.shared * (self.shared_intermediate or self.intermediate)
        return 2 * self.layers * 3 * h * (self.active * self.intermediate + shared)

    @property
    def is_moe(self) -> bool:
        return self.experts > 1


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    attention: tuple[AttnGroup, ...]
    ffn: tuple[FFNGroup, ...]

    @property
    def layers(self) -> int:
        return sum(g.layers for g in self.attention)

    @property
    def sparsity(self) -> float:
        """S = activated / total experts of the MoE layers, the shared expert counted (Step-3 §5.4); 1 if dense."""
        moe = [f for f in self.ffn if f.is_moe]
        if not moe:
            return 1.0
        f = moe[0]
        return (f.active + f.shared) / (f.experts + f.shared)

    def with_kv_dtype(self, kv_dtype: str | None) -> "ModelSpec":
        if kv_dtype is None:
            return self
        if kv_dtype not in ("fp8", "bf16"):
            raise ConfigError("--kv-dtype must be fp8 or bf16")
        b = 1.0 if kv_dtype == "fp8" else 2.0
        return replace(self, attention=tuple(g if g.kind == "linear" else replace(g, kv_bytes=b)
                                             for g in self.attention))

    def per_token(self, context: int) -> dict:
        if context <= 0:
            raise ConfigError("context must be a positive number of tokens")
        kv = sum(g.kv_bytes_per_token(context) for g in self.attention)
        attn = sum(g.attention_flops(context) for g in self.attention)
        return {"kv_bytes": kv, "attention_flops": attn,
                "linear_flops": sum(g.linear_flops(self.hidden) for g in self.attention),
                "ffn_flops": sum(f.flops(self.hidden) for f in self.ffn),
                "arithmetic_intensity": attn / kv}


def _gqa(layers, heads, kv, d=128, **kw):
    return AttnGroup("gqa", layers, heads, kv, d, **kw)


def _mla(layers, heads):
    return AttnGroup("mla", layers, heads, q_lora=1536, kv_lora=512, rope_dim=64, nope_dim=128, v_dim=128)


PRESETS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("deepseek-v3", 7168, (_mla(61, 128),),
              (FFNGroup(3, 18432), FFNGroup(58, 2048, active=8, experts=256, shared=1))),
    ModelSpec("kimi-k2", 7168, (_mla(61, 64),),
              (FFNGroup(1, 18432), FFNGroup(60, 2048, active=8, experts=384, shared=1))),
    ModelSpec("qwen3-235b-a22b", 4096, (_gqa(94, 64, 4),), (FFNGroup(94, 1536, active=8, experts=128),)),
    ModelSpec("qwen3-32b", 5120, (_gqa(64, 64, 8),), (FFNGroup(64, 25600),)),
    ModelSpec("llama-4-maverick", 5120,
              (_gqa(36, 40, 8, window=8192), _gqa(12, 40, 8, kv_bytes=2.0)),       # chunked FP8 + global BF16
              (FFNGroup(24, 16384), FFNGroup(24, 8192, active=1, experts=128, shared=1))),
    ModelSpec("minimax-m1", 6144,
              (_gqa(10, 64, 8, kv_bytes=2.0), AttnGroup("linear", 70, 64, head_dim=128, linear_width=8192)),
              (FFNGroup(80, 9216, active=2, experts=32),)),
    ModelSpec("ernie-4.5-300b-a47b", 8192, (_gqa(54, 64, 8),),
              (FFNGroup(3, 28672), FFNGroup(51, 3584, active=8, experts=64))),
    ModelSpec("pangu-pro-moe", 5120, (_gqa(48, 40, 8),),
              (FFNGroup(48, 1344, active=8, experts=64, shared=1, shared_intermediate=5376),)),
    ModelSpec("step3", 7168, (AttnGroup("mfa", 61, 64, kv_heads=1, head_dim=256, q_rank=2048),),
              (FFNGroup(5, 18432), FFNGroup(56, 5120, active=3, experts=48, shared=1))),
)}


def get_preset(name: str) -> ModelSpec:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)} (or pass a config.json)")
    return PRESETS[name]
