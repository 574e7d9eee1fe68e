"""One readable Llama-family transformer: RMSNorm, RoPE (default/linear/llama3/yarn), GQA/MQA/MFA,
SwiGLU or a mixture of SwiGLU experts (Mixtral / Qwen2-MoE), tied or untied embeddings. Parameter names follow Hugging Face's, so a Llama, Qwen2 or
Mistral checkpoint loads by name and a model we train saves as an ordinary HF folder.

Two ways to run it:
- `forward(ids)`: dense causal attention over a (B, T) batch, no cache (training, reference checks);
- `forward(ids, positions, meta=AttnMetadata)`: the engine's paged path over N flattened tokens
  (ids and positions 1-D). The attention backend named in the metadata writes the new K/V into the
  paged pool and attends (afford/attention/).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from afford.attention.backend import AttnMetadata
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


# fp32 on the CPU (benchmarks/matmul_micro.py, BENCHMARKS.md): a one-row product streams an (in, out)
# weight faster than F.linear on (out, in), and faster still split in two halves (one GEMV per core);
# 2+ rows run faster through oneDNN's pre-packed weight than through MKL's sgemm or F.linear. Below this
# many bytes of weights the CPU keeps those layouts beside the (out, in) one; bf16 keeps F.linear.
DUAL_LAYOUT_MAX_BYTES = 2 << 30       # the CPU fp32 layouts hold each matrix three times
# ...except that a model whose weights fit in the last-level cache is latency-bound, not bandwidth-bound:
# oneDNN's packed product has a floor of ~40 us a call, and for up to this many rows MKL's (W @ x^T)^T
# makes a verify forward of the bundled target 0.82-0.85x / 0.90-0.93x as long (2 / 3 rows, two runs of
# benchmarks/verify_rows.py), while on a 34 M model (118 MB, streamed) it is 0.95-1.19x at 2-3 rows and
# up to 1.27x slower at 5-8
CACHE_RESIDENT_MM_ROWS = 3


def last_level_cache_bytes() -> int:
    """The CPU's last-level cache size (Linux sysfs; 0 when unknown)."""
    from pathlib import Path
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * mult)
        except ValueError:
            pass
    return max(sizes, default=0)


class PackedLinear(nn.Module):
    """Inference-only linear layer, optionally several HF matrices concatenated along `out` (q|k|v,
    gate|up: one matmul instead of three). Holds W (out, in); on the CPU in fp32 also W^T in two halves
    (2, in, out/2) for the one-row decode product and oneDNN's packed W for 2+ rows."""

    def __init__(self, *linears: nn.Linear, one_row_copy: bool = False):
        super().__init__()
        w = torch.cat([lin.weight for lin in linears], dim=0)                    # (out, in)
        self.weight = nn.Parameter(w.contiguous(), requires_grad=False)
        # the same matrix in the other layout, split in two halves of `out` -- (2, in, out/2) -- so that the
        # one-row product is a batch of two GEMVs, one per core (MKL runs a lone GEMV at about one core's
        # read rate: benchmarks/matmul_micro.py). A buffer, so weight-byte counts see one copy.
        parts = 2 if w.shape[0] % 2 == 0 else 1
        wt = w.t().reshape(w.shape[1], parts, w.shape[0] // parts).permute(1, 0, 2).contiguous() if one_row_copy else None
        self.register_buffer("weight_t", wt, persistent=False)
        biases = [lin.bias if lin.bias is not None else torch.zeros(lin.out_features, dtype=w.dtype,
                                                                    device=w.device) for lin in linears]
        has_bias = any(lin.bias is not None for lin in linears)
        self.bias = nn.Parameter(torch.cat(biases), requires_grad=False) if has_bias else None
        self.sizes = [lin.out_features for lin in linears]
        self.cpu_fp32 = w.device.type == "cpu" and w.dtype == torch.float32
        # and for 2+ rows oneDNN's pre-packed (blocked) layout (an opaque tensor, not a buffer)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None) \
            if one_row_copy and torch.backends.mkldnn.is_available() else None
        self.mm_rows = 0          # up to this many rows MKL's (W @ x^T)^T instead (a cache-resident model)

    def drop_fast_copies(self) -> None:
        """Free the two extra CPU layouts (the native forward packs its own); forwards take torch.mm."""
        self.weight_t, self.packed = None, None

    def forward(self, x):
        if self.weight_t is not None and x.numel() == x.shape[-1]:
            y = torch.matmul(x.reshape(1, 1, -1), self.weight_t)                 # one row: (parts, 1, out/parts)
            y = y.transpose(0, 1).reshape(*x.shape[:-1], -1)
        elif self.packed is not None and x.dim() == 2 and x.shape[0] > self.mm_rows:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")   # (N, out)
        elif self.cpu_fp32 and x.dim() == 2:
            y = torch.mm(self.weight, x.t()).t().contiguous()                    # (N, out)
        else:
            y = F.linear(x, self.weight)
        return y + self.bias if self.bias is not None else y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused op (it accumulates in fp32 for bf16/fp16 inputs): HF's formula (upcast, normalize,
        # cast back, scale) is seven kernels on a GPU, which a 1.1 B model's CUDA-graph step paid ~14 times
        # a layer (benchmarks/gpu_decode.py)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (..., heads, D); cos/sin: (..., 1, D) -- HF's rotate-half convention
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


@torch.no_grad()
def sparse_train_mask(q: torch.Tensor, k: torch.Tensor, budget: int, block: int) -> torch.Tensor:
    """The block-sparse pattern the `sparse` attention backend decodes with, for every query of a training
    window at once (NOSA-style sparse fine-tuning): query t (context t + 1 tokens) attends to the first
    block, the last two (its own among them) and, of the blocks between, the budget - 3 with the largest
    Quest bound on q . k (afford/attention/sparse.py, score "bound"; the locality share needs decoding's
    history and is not modelled); all of them when they fit the budget. q (B, T, H, D), k (B, T, KV, D) ->
    a boolean mask (B, 1, T, T), True where a query may attend, causal."""
    B, T, H, D = q.shape
    KV = k.shape[2]
    nb = -(-T // block)
    # zero padding of a partial last block cannot change a choice: only blocks two or more before a query's
    # own are scored, and those are full
    kb = F.pad(k, (0, 0, 0, 0, 0, nb * block - T)).view(B, nb, block, KV, D)
    kmax = kb.amax(2).repeat_interleave(H // KV, 2).float()                               # (B, nb, H, D)
    kmin = kb.amin(2).repeat_interleave(H // KV, 2).float()
    qf = q.float()          # Quest's bound sum_d max(q_d min_d, q_d max_d), as two products
    score = (torch.einsum("bthd,bjhd->btj", qf.clamp(min=0), kmax)
             - torch.einsum("bthd,bjhd->btj", (-qf).clamp(min=0), kmin))                   # (B, T, nb)
    own = torch.arange(T, device=q.device) // block                                     # (T,) query's block
    j = torch.arange(nb, device=q.device)
    middle = (j[None, :] >= 1) & (j[None, :] <= own[:, None] - 2)                         # (T, nb)
    room = budget - 3
    picked = torch.zeros(B, T, nb, dtype=torch.bool, device=q.device)
    if room > 0:
        top = score.masked_fill(~middle, float("-inf")).topk(min(room, nb), dim=-1).indices   # (B, T, room)
        picked.scatter_(2, top, True)
        picked &= middle
    fits = middle.sum(1) <= room                                                         # (T,): all of them
    blocks = picked | (middle & fits[:, None]) | (j[None, :] == 0) | (j[None, :] >= own[:, None] - 1)
    tok = blocks.repeat_interleave(block, 2)[:, :, :T]                                   # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return (tok & causal).unsqueeze(1)


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
        self.train_sparse: tuple[int, int] | None = None    # (budget, block): dense forwards take sparse_train_mask

    def fuse_quantized(self) -> None:
        """q|k|v as one low-bit matrix (afford/models/quant.py fuse_quantized), where their formats allow."""
        from afford.models.quant import fuse_quantized
        if not self.mfa and (fused := fuse_quantized([self.q_proj, self.k_proj, self.v_proj])) is not None:
            self.qkv = fused
            del self.q_proj, self.k_proj, self.v_proj

    def pack(self, one_row_copy: bool) -> None:
        first = self.q_a_proj if self.mfa else self.q_proj
        self.qkv = PackedLinear(first, self.k_proj, self.v_proj, one_row_copy=one_row_copy)
        self.o_proj = PackedLinear(self.o_proj, one_row_copy=one_row_copy)
        if self.mfa:
            self.q_b_proj = PackedLinear(self.q_b_proj, one_row_copy=one_row_copy)
            del self.q_a_proj
        else:
            del self.q_proj
        del self.k_proj, self.v_proj

    def qkv_rope(self, x, cos, sin):
        """x: (..., hidden) -> q (..., H, D), k and v (..., KV, D), RoPE applied to q and k."""
        lead, H, KV, D = x.shape[:-1], self.h, self.kvh, self.d
        if self.qkv is not None and not self.mfa:          # fused: one matmul, one RoPE over q|k
            qkv = self.qkv(x).view(*lead, H + 2 * KV, D)                         # (..., H + 2KV, D)
            qk = apply_rope(qkv[..., :H + KV, :], cos, sin)                      # (..., H + KV, D)
            return qk[..., :H, :], qk[..., H:, :], qkv[..., H + KV:, :]
        if self.qkv is not None:
            q, k, v = self.qkv(x).split(self.qkv.sizes, dim=-1)
        else:
            q = self.q_a_proj(x) if self.mfa else self.q_proj(x)
            k, v = self.k_proj(x), self.v_proj(x)
        if self.mfa:
            q = self.q_b_proj(self.q_norm(q))                                    # (..., H * D)
        q = apply_rope(q.view(*lead, H, D), cos, sin)                            # (..., H, D)
        k = apply_rope(k.view(*lead, KV, D), cos, sin)                           # (..., KV, D)
        return q, k, v.view(*lead, KV, D)

    def forward(self, x, cos, sin, meta: AttnMetadata | None, layer: int, rope_tables=None):
        """Dense: x (B, T, hidden), causal over T. Paged: x (N, hidden), N tokens of a ForwardBatch."""
        if meta is not None and meta.extra.get("fused_rope") and self.qkv is not None and not self.mfa:
            qkv = self.qkv(x).view(-1, self.h + 2 * self.kvh, self.d)       # RoPE + K/V store in the backend
            o = meta.backend.forward_qkv(qkv, self.h, *rope_tables, layer, meta)
            return self.o_proj(o.reshape(-1, self.h * self.d))
        q, k, v = self.qkv_rope(x, cos, sin)
        if meta is None:
            B, T = x.shape[:2]
            mask = sparse_train_mask(q, k, *self.train_sparse) if self.train_sparse else None
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=self.kvh != self.h)   # (B, H, T, D)
            return self.o_proj(o.transpose(1, 2).reshape(B, T, self.h * self.d))          # (B, T, hidden)
        o = meta.backend.forward(q, k, v, layer, meta)                                    # (N, H, D)
        return self.o_proj(o.reshape(-1, self.h * self.d))                                 # (N, hidden)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate: int | None = None):
        super().__init__()
        inter = intermediate or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)
        self.gate_up: PackedLinear | None = None

    def fuse_quantized(self) -> None:
        from afford.models.quant import fuse_quantized
        if (fused := fuse_quantized([self.gate_proj, self.up_proj])) is not None:
            self.gate_up = fused
            del self.gate_proj, self.up_proj

    def pack(self, one_row_copy: bool) -> None:
        self.gate_up = PackedLinear(self.gate_proj, self.up_proj, one_row_copy=one_row_copy)
        self.down_proj = PackedLinear(self.down_proj, one_row_copy=one_row_copy)
        del self.gate_proj, self.up_proj

    def forward(self, x, fused: bool = False):
        if self.gate_up is not None:
            if fused:                                    # silu(gate) * up as one kernel (CUDA, triton_ops.py)
                from afford.models.triton_ops import silu_mul
                return self.down_proj(silu_mul(self.gate_up(x)))
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Mixture of SwiGLU experts (Qwen2-MoE names; the loader renames Mixtral's block_sparse_moe.experts.N.w1/w3/w2
    onto mlp.experts.N.gate_proj/up_proj/down_proj). The router `gate` scores experts, softmax in fp32, keeps the
    top k (renormalized when norm_topk_prob), and each token's output is the weighted sum of its k experts plus,
    in Qwen2-MoE, a shared expert scaled by sigmoid(shared_expert_gate(x)). Split in `route` / `experts_forward`
    / `shared_forward` so that attention-FFN disaggregation (afford/afd/) routes on the attention side and runs
    a subset of the experts on each FFN worker."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        shared = cfg.shared_expert_intermediate_size
        self.shared_expert = MLP(cfg, shared) if shared else None
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if shared else None

    def _mlps(self) -> list[MLP]:
        return [*self.experts, *([self.shared_expert] if self.shared_expert is not None else [])]

    def pack(self, one_row_copy: bool) -> None:
        for m in self._mlps():
            m.pack(one_row_copy)

    def fuse_quantized(self) -> None:
        for m in self._mlps():
            m.fuse_quantized()

    def route(self, x: torch.Tensor, probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, hidden) -> routing weights (N, k) in x's dtype and expert indices (N, k); `probs`: the router's
        softmax (N, E) when the caller has it already."""
        if probs is None:
            probs = F.softmax(self.gate(x).float(), dim=-1)                      # (N, E)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)                     # (N, k)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), idx

    def experts_forward(self, x, weights, idx, owned: range | None = None) -> torch.Tensor:
        """sum_j weights[:, j] * expert_{idx[:, j]}(x) over the experts in `owned` (default: all): (N, hidden)."""
        out = torch.zeros_like(x)
        owned = owned if owned is not None else range(len(self.experts))
        hit = torch.zeros(len(self.experts), dtype=torch.bool)
        hit[idx.flatten().cpu()] = True
        for e in owned:
            if not hit[e]:
                continue
            tok, slot = torch.where(idx == e)                                    # (n_e,), (n_e,)
            y = self.experts[e](x[tok]) * weights[tok, slot, None]               # (n_e, hidden)
            out.index_add_(0, tok, y)
        return out

    def shared_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.shared_expert is None:
            return None
        return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)    # (N, hidden)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])                                        # (N, hidden)
        probs = F.softmax(self.gate(flat).float(), dim=-1)                       # (N, E)
        weights, idx = self.route(flat, probs)
        if self.training:            # Switch-style load balancing: E * sum_e (share of tokens to e) * (mean prob of e)
            share = F.one_hot(idx, len(self.experts)).float().sum(1).mean(0) / self.top_k   # (E,)
            self.aux_loss = len(self.experts) * (share * probs.mean(0)).sum()
        out = self.experts_forward(flat, weights, idx)
        if (shared := self.shared_forward(flat)) is not None:
            out = out + shared
        return out.view_as(x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, meta, layer, rope_tables=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, layer, rope_tables)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """`model.*` in HF naming: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
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
        # on CUDA with Triton: each residual add fused with the RMSNorm after it, SwiGLU's silu * up as one
        # kernel (afford/models/triton_ops.py): 66 fewer kernels a step of a 1.1 B Llama, 1.09-1.14x tok/s
        # at batch 1 and 1.08-1.20x at 64 on an H200 (gpu_decode.py's A/B arm, two runs); False runs torch's
        self.fused_cuda = True
        # one-row forwards on CUDA (a batch-1 decode step): each matrix product as afford's Triton GEMV with
        # the residual add, RMSNorm and SwiGLU fused in (afford/models/triton_gemv.py; needs fused_cuda):
        # 165 kernels a step instead of 255, a batch-1 step 0.87-0.89 ms instead of 1.15-1.19 on an H200
        # (gpu_decode.py's A/B arm, runs 7-8: 1.31x tok/s); False: the fused-layer path above with cuBLAS
        self.fused_gemv = True
        # ... and the q|k|v GEMV of those forwards leaving what RoPE + the K/V store would (triton_gemv.gemv's
        # rope; the pairs / halves int4 layouts too): the rope_store kernel gone from each layer, the same
        # numbers bit for bit (the backend's fused_decode, where on, does that work in attention instead). Off
        # until a card times it (gpu_decode.py's afford_graphs_qkvrope_b1 arm)
        self.fused_qkv_rope = False
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
        """Fuse q|k|v and gate|up (inference only; training and saving use the HF-named layout). On the
        CPU, fp32 models up to DUAL_LAYOUT_MAX_BYTES also keep each matrix in the one-row (two halves) and the
        oneDNN-packed layouts (PackedLinear)."""
        p = next(self.parameters())
        dual = p.device.type == "cpu" and p.dtype == torch.float32 and \
            sum(q.numel() for q in self.parameters()) * p.element_size() <= DUAL_LAYOUT_MAX_BYTES
        for layer in self.model.layers:
            layer.self_attn.pack(dual)
            if layer.mlp is not None:                   # None: drop_ffn (an AFD attention side)
                layer.mlp.pack(dual)
        self.lm_head = PackedLinear(self.lm_head, one_row_copy=dual)
        if dual and self.weight_bytes() <= last_level_cache_bytes():
            for m in self.modules():
                if isinstance(m, PackedLinear):
                    m.mm_rows = CACHE_RESIDENT_MM_ROWS
        return self

    def drop_ffn(self) -> "Transformer":
        """Keep attention, norms, embeddings, head and the MoE routers only: what an attention-FFN
        disaggregated deployment's attention side holds (afford/afd/); the FFN workers hold the rest."""
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.experts = nn.ModuleList()
                layer.mlp.shared_expert = layer.mlp.shared_expert_gate = None
            else:
                layer.mlp = None
        return self

    def weight_bytes(self) -> int:
        """Bytes of the packed matrices (MoE: every expert, not only those one token reads)."""
        return sum(m.weight.numel() * m.weight.element_size() for m in self.modules() if isinstance(m, PackedLinear))

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
               meta: AttnMetadata | None = None) -> torch.Tensor:
        """Dense: ids (B, T) -> (B, T, hidden). Paged: ids, positions (N,) -> (N, hidden). Final-normed."""
        if positions is None:
            positions = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
        x = self.model.embed_tokens(ids)                                   # (..., hidden)
        if meta is not None and x.is_cuda and self.fused_cuda and x.dim() == 2:
            from afford.models import triton_ops
            if triton_ops.available():
                if self._one_row_gemv(x.shape[0], meta):
                    return self._hidden_gemv(x, meta, (self.rope_cos, self.rope_sin), triton_ops.add_rmsnorm)
                cos, sin = self._rope_at(positions, x.dtype)
                return self._hidden_fused(x, cos, sin, meta, (self.rope_cos, self.rope_sin), triton_ops.add_rmsnorm)
        return self.model.norm(self.run_layers(x, positions, meta, 0, len(self.model.layers)))

    def logits(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """Paged: logits (R, V) in the model's dtype at the flat token rows `rows` (None: every token) --
        hidden() and the LM head; a one-row CUDA forward runs the head as one more fused GEMV, the final add +
        RMSNorm in it (the "head" role of GEMV_CONFIGS / GEMV_W4_CONFIGS where one is set)."""
        if ids.dim() == 1 and ids.shape[0] == 1 and ids.is_cuda and meta is not None and self.fused_cuda:
            from afford.models import triton_ops
            if triton_ops.available() and self._one_row_gemv(1, meta):
                return self._hidden_gemv(self.model.embed_tokens(ids), meta, (self.rope_cos, self.rope_sin),
                                         triton_ops.add_rmsnorm, head=True)
        h = self.hidden(ids, positions, meta)
        return self.lm_head(h if rows is None else h.index_select(0, rows))

    def _one_row_gemv(self, rows: int, meta: AttnMetadata) -> bool:
        """A paged forward of `rows` tokens runs _hidden_gemv (one row, every product a fused GEMV)."""
        return rows == 1 and self.fused_gemv and bool(meta.extra.get("fused_rope")) and self._gemv_ready()

    def _rope_at(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.rope_cos[positions].unsqueeze(-2).to(dtype)             # (..., 1, D)
        return cos, self.rope_sin[positions].unsqueeze(-2).to(dtype)

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata | None,
                   lo: int, hi: int) -> torch.Tensor:
        """Layers lo..hi-1 on the residual stream x (..., hidden) -> the residual stream after layer hi - 1
        (not normed). A multi-exit model stops here at an exit and continues later from the same x."""
        cos, sin = self._rope_at(positions, x.dtype)
        tables = (self.rope_cos, self.rope_sin)
        for i in range(lo, hi):
            x = self.model.layers[i](x, cos, sin, meta, i, tables)
        return x

    def exit_logits(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Dense, for training a multi-exit model: ids (B, T) -> logits (B, T, V) at every exit (cfg.exits,
        or the last layer alone), each through the shared final norm and LM head."""
        positions = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
        x, lo, out = self.model.embed_tokens(ids), 0, []                   # (B, T, hidden)
        for e in self.cfg.exits or (len(self.model.layers),):
            x, lo = self.run_layers(x, positions, None, lo, e), e
            out.append(self.lm_head(self.model.norm(x)))                    # (B, T, V)
        return out

    def _hidden_fused(self, x, cos, sin, meta, tables, add_rmsnorm):
        """The paged layers with each residual add fused into the RMSNorm that follows it."""
        layers = self.model.layers
        h = layers[0].input_layernorm(x)
        for i, layer in enumerate(layers):
            a = layer.self_attn(h, cos, sin, meta, i, tables)
            norm = layer.post_attention_layernorm
            x, h = add_rmsnorm(x, a, norm.weight, norm.eps)
            m = layer.mlp(h, fused=True)
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            x, h = add_rmsnorm(x, m, norm.weight, norm.eps)
        return h

    def _gemv_ready(self) -> bool:
        """Every layer is what _hidden_gemv runs: packed q|k|v (no MFA) and gate|up, a dense SwiGLU MLP, no
        biases; dense matrices, or int4 ones whose q|k|v and gate|up have a GEMV_W4_CONFIGS tile their scale
        groups fit (o and down without one keep their own kernel). Prepares the int4 GEMV's code layout."""
        from afford.models import triton_gemv
        from afford.models.quant import QuantLinear
        layers = self.model.layers                    # the cached answer holds while the tiles and modules do
        key = (tuple(sorted(triton_gemv.GEMV_W4_CONFIGS.items())), self.model.embed_tokens.weight.device,
               id(self.lm_head),
               tuple((id(la.self_attn.qkv), id(la.self_attn.o_proj), id(la.mlp), id(getattr(la.mlp, "gate_up", None)),
                      id(getattr(la.mlp, "down_proj", None))) for la in layers))
        if getattr(self, "_gemv_key", None) == key:
            return self._gemv_ok

        def ok(m, role):
            if isinstance(m, QuantLinear):   # int4: the fused roles need a tile, o and down may keep tinygemm
                cfg = triton_gemv.GEMV_W4_CONFIGS.get(role)
                if m.bits != 4 or m.zeros is None or m.bias is not None \
                        or triton_gemv.w4_block_k(m.in_features, m.group, 32) is None:
                    return False
                layout = triton_gemv.w4_kind(cfg)[0] if cfg is not None else "pairs"
                fits = cfg is not None and m.group >= min(cfg[1] // (2 if layout == "halves" else 1), m.in_features) \
                    and triton_gemv.w4_plan(m.in_features, m.group, cfg) is not None \
                    and not (layout == "quads" and role == "gate_up" and m.out_features % 8)  # gate rows: groups of 4
                if not fits:
                    m._w4 = None
                    return role not in ("qkv", "gate_up")
                if getattr(m, "_w4", None) is None or m._w4_layout != layout:   # the GEMV's layout, beside tinygemm's
                    m._w4 = (triton_gemv.w4_pack(m.codes, layout), m.scales.float().contiguous(),
                             m.zeros.float().contiguous())
                    m._w4_layout = layout
                return True
            return isinstance(m, (PackedLinear, nn.Linear)) and m.bias is None and m.weight.stride(1) == 1
        self._gemv_ok = all(
            not layer.self_attn.mfa and layer.self_attn.qkv is not None and isinstance(layer.mlp, MLP)
            and layer.mlp.gate_up is not None and ok(layer.self_attn.qkv, "qkv") and ok(layer.self_attn.o_proj, "o")
            and ok(layer.mlp.gate_up, "gate_up") and ok(layer.mlp.down_proj, "down") for layer in layers)
        head = self.lm_head                           # the LM head as one more GEMV: a dense one, or an int4 one
        self._head_gemv = self._gemv_ok and ok(head, "head") \
            and (getattr(head, "_w4", None) is not None or not isinstance(head, QuantLinear))   # with a tile
        self._gemv_key = key
        return self._gemv_ok

    def _qkv_rope_tile(self) -> bool:
        """Every layer's q|k|v one-row GEMV can do RoPE and the K/V store (fused_qkv_rope): a dense tile, or
        an int4 one in the pairs or halves layout (not the tensor cores), an even number of rows a program."""
        from afford.models import triton_gemv
        from afford.models.quant import QuantLinear

        def ok(qkv):
            if isinstance(qkv, QuantLinear):
                cfg = triton_gemv.GEMV_W4_CONFIGS.get("qkv")
                return cfg is not None and cfg[0] % 2 == 0 and getattr(qkv, "_w4", None) is not None \
                    and triton_gemv.w4_kind(cfg) in (("pairs", False), ("halves", False))
            cfg = triton_gemv.GEMV_CONFIGS.get("qkv")
            return cfg is not None and cfg[0] % 2 == 0
        return all(ok(layer.self_attn.qkv) for layer in self.model.layers)

    def _hidden_gemv(self, x, meta, tables, add_rmsnorm, head: bool = False):
        """The paged layers for ONE row (1, hidden): every product a Triton GEMV (triton_gemv.py; int4 ones
        too) that also does the residual add and RMSNorm before it (q|k|v, gate|up) and SwiGLU after it
        (gate|up); a dense role configured None runs F.linear. Attention: the backend's fused RoPE + K/V store.
        Returns the final-normed hidden state (1, hidden), or with head=True the logits (1, V) in x's dtype:
        the LM head a GEMV with the final add + RMSNorm fused in where the "head" role has a tile, else the
        add_rmsnorm kernel and the head's own product (cuBLAS, or the QuantLinear's kernel). Runs on what
        _gemv_ready() prepared (the int4 layouts, whether the head has a tile): call it first."""
        from afford.models.quant import QuantLinear
        from afford.models.triton_gemv import GEMV_CONFIGS, GEMV_W4_CONFIGS, gemv, gemv_w4

        def mm(role, v, m, **kw):
            if isinstance(m, QuantLinear):
                if GEMV_W4_CONFIGS.get(role) is not None and getattr(m, "_w4", None) is not None:
                    return gemv_w4(v, *m._w4, m.group, GEMV_W4_CONFIGS[role], **kw)
            elif GEMV_CONFIGS.get(role) is not None:
                return gemv(v, m.weight, GEMV_CONFIGS[role], **kw)
            if kw.get("rope") is not None:    # (_qkv_rope_tile checked every layer's q|k|v has a tile)
                raise RuntimeError(f"{role}: no one-row GEMV tile to do RoPE and the K/V store")
            h = v if kw.get("add") is None else v + kw["add"]
            y = m(F.rms_norm(h, (h.shape[-1],), kw["norm"], kw["eps"]) if kw.get("norm") is not None else h)
            if kw.get("swiglu"):
                gate, up = y.chunk(2, dim=-1)
                y = F.silu(gate) * up
            return y, h
        a = None                      # the addend not yet in the residual stream x
        rope = self.fused_qkv_rope and self._qkv_rope_tile()
        for i, layer in enumerate(self.model.layers):
            att, n1, n2 = layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm
            to = meta.backend.qkv_rope(*tables, i, meta, att.h) if rope else None
            if to is not None:        # q rotated, k and v stored by the GEMV itself
                q, x = mm("qkv", x, att.qkv, add=a, norm=n1.weight, eps=n1.eps, rope=to)
                o = meta.backend.attend_rotated(q, i, meta)
            else:
                qkv, x = mm("qkv", x, att.qkv, add=a, norm=n1.weight, eps=n1.eps)
                o = meta.backend.forward_qkv(qkv.view(-1, att.h + 2 * att.kvh, att.d), att.h, *tables, i, meta)
            a, _ = mm("o", o.reshape(1, -1), att.o_proj)
            act, x = mm("gate_up", x, layer.mlp.gate_up, add=a, norm=n2.weight, eps=n2.eps, swiglu=True)
            a, _ = mm("down", act, layer.mlp.down_proj)
        norm = self.model.norm
        dense_tile = GEMV_CONFIGS.get("head") is not None
        if head and self._head_gemv and (isinstance(self.lm_head, QuantLinear) or dense_tile):
            return mm("head", x, self.lm_head, add=a, norm=norm.weight, eps=norm.eps)[0]
        h = add_rmsnorm(x, a, norm.weight, norm.eps)[1]
        return self.lm_head(h) if head else h

    def forward(self, ids, positions=None, meta=None):
        """Logits (..., V) for every position."""
        return self.lm_head(self.hidden(ids, positions, meta))
