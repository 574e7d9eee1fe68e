"""One readable Llama-family transformer: RMSNorm, RoPE (default/linear/llama3/yarn), GQA/MQA,
SwiGLU, tied or untied embeddings. Parameter names follow Hugging Face's, so a Llama, Qwen2 or
Mistral checkpoint loads by name and a model we train saves as an ordinary HF folder.

Two ways to run it:
- `forward(ids)`: dense causal attention over a (B, T) batch, no cache (training, reference checks);
- `forward(ids, meta=AttnMeta)`: the engine's paged path. New K/V are written into the paged
  pool at `meta.slots`, then each sequence attends to the slots of its own block table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from afford.config import ModelConfig, RopeConfig


def rope_inv_freq(rope: RopeConfig, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) and the attention scaling factor for a rope variant."""
    base = rope.theta
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if rope.type == "default":
        return inv, 1.0
    if rope.type == "linear":
        return inv / rope.factor, 1.0
    old = rope.original_max_position_embeddings or max_pos
    if rope.type == "llama3":
        low_wl, high_wl = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn (Peng et al. 2023), as Qwen2 long-context checkpoints use it
    attn_factor = rope.attention_factor or (0.1 * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0)

    def corr_dim(n_rot: float) -> float:
        return dim * math.log(old / (n_rot * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(corr_dim(rope.beta_fast)), 0)
    high = min(math.ceil(corr_dim(rope.beta_slow)), dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrap = 1 - ramp
    return (inv / rope.factor) * (1 - extrap) + inv * extrap, attn_factor


class PackedLinear(nn.Module):
    """Inference-only linear layer holding W^T contiguous (in, out), optionally several HF matrices
    concatenated along `out` (q|k|v, gate|up). x @ W^T on a pre-transposed weight runs the CPU GEMV
    up to ~2x faster than F.linear at batch 1 (benchmarks/decode_vs_hf.py), and one fused matmul
    replaces three."""

    def __init__(self, *linears: nn.Linear):
        super().__init__()
        w = torch.cat([lin.weight for lin in linears], dim=0)                    # (out, in)
        self.weight_t = nn.Parameter(w.t().contiguous(), requires_grad=False)    # (in, out)
        biases = [lin.bias if lin.bias is not None else torch.zeros(lin.out_features, dtype=w.dtype,
                                                                    device=w.device) for lin in linears]
        has_bias = any(lin.bias is not None for lin in linears)
        self.bias = nn.Parameter(torch.cat(biases), requires_grad=False) if has_bias else None
        self.sizes = [lin.out_features for lin in linears]

    def forward(self, x):
        y = x @ self.weight_t
        return y + self.bias if self.bias is not None else y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, D); cos/sin: (B, T, 1, D)
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


@dataclass
class AttnMeta:
    """Per-step inputs of the paged attention, shared by every layer.

    slots:   (N,) flat slot (block * block_size + offset) where each real new token's K/V goes
    rows:    (N,) which of the B*T fed positions those are (None: all of them, no padding)
    gather:  (B, L) flat slots of every context token of each sequence (its block table, expanded)
    mask:    (B, 1, T, L) bool, True where query t may attend to context position l
    kv:      per layer, (k_pool, v_pool) each (num_slots, n_kv_heads, head_dim)
    """
    slots: torch.Tensor
    rows: torch.Tensor | None
    gather: torch.Tensor
    mask: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]


class Attention(nn.Module):
    """GQA/MQA/MHA, or MFA (Step-3): the query goes through a low-rank bottleneck
    (q_a_proj: hidden -> q_rank, RMSNorm, q_b_proj: q_rank -> heads * head_dim) and all heads share ONE
    key head and ONE value head, so the cache holds 2 * head_dim values per token per layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.kvh, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.mfa = cfg.attention == "mfa"
        bias = cfg.attention_bias
        if self.mfa:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_rank, self.h * self.d, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kvh * self.d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kvh * self.d, bias=bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)
        self.qkv: PackedLinear | None = None

    def pack(self) -> None:
        first = self.q_a_proj if self.mfa else self.q_proj
        self.qkv = PackedLinear(first, self.k_proj, self.v_proj)
        self.o_proj = PackedLinear(self.o_proj)
        if self.mfa:
            self.q_b_proj = PackedLinear(self.q_b_proj)
            del self.q_a_proj
        else:
            del self.q_proj
        del self.k_proj, self.v_proj

    def forward(self, x, cos, sin, meta: AttnMeta | None, layer: int):
        B, T, _ = x.shape
        if self.qkv is not None:
            q, k, v = self.qkv(x).split(self.qkv.sizes, dim=-1)
        else:
            q = self.q_a_proj(x) if self.mfa else self.q_proj(x)
            k, v = self.k_proj(x), self.v_proj(x)
        if self.mfa:
            q = self.q_b_proj(self.q_norm(q))                                    # (B, T, H * D)
        q = apply_rope(q.view(B, T, self.h, self.d), cos, sin)                   # (B, T, H, D)
        k = apply_rope(k.view(B, T, self.kvh, self.d), cos, sin)                 # (B, T, KV, D)
        v = v.view(B, T, self.kvh, self.d)                                       # (B, T, KV, D)
        if meta is None:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=self.kvh != self.h)
        else:
            k_pool, v_pool = meta.kv[layer]
            k_new, v_new = k.reshape(-1, self.kvh, self.d), v.reshape(-1, self.kvh, self.d)   # (B*T, KV, D)
            if meta.rows is not None:
                k_new, v_new = k_new.index_select(0, meta.rows), v_new.index_select(0, meta.rows)
            k_pool.index_copy_(0, meta.slots, k_new.to(k_pool.dtype))
            v_pool.index_copy_(0, meta.slots, v_new.to(v_pool.dtype))
            L = meta.gather.shape[1]
            idx = meta.gather.reshape(-1)
            kc = k_pool.index_select(0, idx).view(B, L, self.kvh, self.d).transpose(1, 2)   # (B, KV, L, D)
            vc = v_pool.index_select(0, idx).view(B, L, self.kvh, self.d).transpose(1, 2)   # (B, KV, L, D)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), kc, vc, attn_mask=meta.mask,
                                               enable_gqa=self.kvh != self.h)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.h * self.d))    # (B, T, hidden)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up: PackedLinear | None = None

    def pack(self) -> None:
        self.gate_up = PackedLinear(self.gate_proj, self.up_proj)
        self.down_proj = PackedLinear(self.down_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x):
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, meta, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """`model.*` in HF naming: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.max_len = max_len or cfg.max_position_embeddings
        cos, sin = self.rope_tables(cfg, self.max_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @staticmethod
    def rope_tables(cfg: ModelConfig, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: (max_len, head_dim) fp32, scaled by the rope variant's attention factor."""
        with torch.device("cpu"):
            inv, scale = rope_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
            freqs = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)   # (P, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)                                # (P, D)
            return (emb.cos() * scale).float(), (emb.sin() * scale).float()

    def pack_for_inference(self) -> "Transformer":
        """Fuse q|k|v and gate|up and pre-transpose every matrix (inference only; training and saving
        use the HF-named layout)."""
        for layer in self.model.layers:
            layer.self_attn.pack()
            layer.mlp.pack()
        self.lm_head = PackedLinear(self.lm_head)
        return self

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
               meta: AttnMeta | None = None) -> torch.Tensor:
        """ids, positions: (B, T) -> final-normed hidden states (B, T, hidden)."""
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.model.embed_tokens(ids)                                   # (B, T, hidden)
        cos = self.rope_cos[positions].unsqueeze(2).to(x.dtype)            # (B, T, 1, D)
        sin = self.rope_sin[positions].unsqueeze(2).to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, meta, i)
        return self.model.norm(x)

    def forward(self, ids, positions=None, meta=None):
        """Logits (B, T, V) for every position."""
        return self.lm_head(self.hidden(ids, positions, meta))
