"""Frozen configuration: ModelConfig ⊂ EngineConfig. Derived values are properties.

ModelConfig is read from a Hugging Face config.json (`ModelConfig.from_hf`); nothing
here imports torch, so the cost planner and the CLI can use it cheaply.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "AffordMFAForCausalLM",
                           "MixtralForCausalLM", "Qwen2MoeForCausalLM")
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral",
               "AffordMFAForCausalLM": "afford_mfa", "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


KV_BUDGET_BYTES = 2 << 30     # default KV pool size cap when kv_blocks is not given (per model)


class ConfigError(ValueError):
    """A user-facing configuration problem; the message says what to do."""


def number_arg(kind: type = int, lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """An argparse `type=` for a finite number in [lo, hi] ((lo, hi] with lo_open): a bad value is
    argparse's one-line usage error naming the flag, never a silent default or a traceback."""
    import argparse
    import math

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if (kind is float and not math.isfinite(v)) or (lo is not None and (v <= lo if lo_open else v < lo)) or \
                (hi is not None and v > hi):
            side = f"> {lo}" if lo_open else f">= {lo}"
            rng = f"{side} and <= {hi}" if lo is not None and hi is not None else side if lo is not None else f"<= {hi}"
            raise argparse.ArgumentTypeError(f"must be a finite number {rng}, got {text}")
        return v
    parse.__name__ = kind.__name__          # argparse names the type in its messages
    return parse


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0          # llama3
    high_freq_factor: float = 4.0         # llama3
    original_max_position_embeddings: int | None = None  # llama3, yarn
    beta_fast: float = 32.0               # yarn
    beta_slow: float = 1.0                # yarn
    attention_factor: float | None = None  # yarn

    @staticmethod
    def from_hf(cfg: dict) -> "RopeConfig":
        # transformers 5 writes `rope_parameters`; 4.x wrote `rope_theta` + `rope_scaling`.
        params = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or {}
        params = {**scaling, **params}
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rtype = params.get("rope_type", params.get("type", "default")) or "default"
        if rtype not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope type {rtype!r} is not supported; afford supports {', '.join(SUPPORTED_ROPE_TYPES)}")
        return RopeConfig(
            theta=theta, type=rtype, factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=params.get("original_max_position_embeddings"),
            beta_fast=float(params.get("beta_fast", 32.0)), beta_slow=float(params.get("beta_slow", 1.0)),
            attention_factor=params.get("attention_factor"),
        )


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    attention: str = "gqa"               # "gqa" (MHA/GQA/MQA) or "mfa" (Step-3 multi-matrix factorization)
    q_rank: int = 0                      # MFA: low-rank query dimension
    # mixture of experts (Mixtral / Qwen2-MoE): a router picks num_experts_per_tok of num_experts SwiGLU
    # experts per token; Qwen2-MoE adds an always-on shared expert behind a sigmoid gate
    num_experts: int = 0                 # 0: every layer is a dense MLP
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0       # each expert's intermediate size (intermediate_size: dense layers)
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True          # renormalize the top-k routing weights to sum to 1 (Mixtral: always)
    dense_layers: tuple[int, ...] = ()   # MoE models: layers that keep a dense MLP (Qwen2-MoE mlp_only_layers)
    # S2D multi-exit model: after each of these layer counts the final norm and the LM head give logits too
    # (strictly increasing, the last = num_layers); () is an ordinary single-exit model
    exits: tuple[int, ...] = ()

    def __post_init__(self):
        if self.exits and (list(self.exits) != sorted(set(self.exits)) or self.exits[0] < 1
                           or self.exits[-1] != self.num_layers):
            raise ConfigError(f"exits {list(self.exits)} must be strictly increasing layer counts from >= 1 to the "
                              f"model's {self.num_layers} layers (the last exit is the whole model)")

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    @property
    def kv_values_per_token(self) -> int:
        """K and V values stored per token per layer."""
        return 2 * self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, bytes_per_value: int) -> int:
        """Bytes of K/V one token holds in the cache, all layers."""
        return self.num_layers * self.kv_values_per_token * bytes_per_value

    @functools.cached_property                 # read every engine step (FLOP counts); the config is frozen
    def num_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2
        if self.attention == "mfa":
            attn = h * self.q_rank + self.q_rank + self.q_rank * self.num_heads * d + 2 * h * d + self.num_heads * d * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + 2 * h) + sum(self.ffn_parameters(i) for i in range(self.num_layers)) + emb + h

    def ffn_parameters(self, layer: int, active: bool = False) -> int:
        """Parameters of one layer's MLP or MoE (active: only the experts one token runs through)."""
        h = self.hidden_size
        if not self.is_moe_layer(layer):
            return 3 * h * self.intermediate_size
        experts = self.num_experts_per_tok if active else self.num_experts
        shared = 3 * h * self.shared_expert_intermediate_size + (h if self.shared_expert_intermediate_size else 0)
        return h * self.num_experts + experts * 3 * h * self.moe_intermediate_size + shared

    @functools.cached_property
    def active_parameters(self) -> int:
        """Parameters one decoded token runs through (MoE: top-k experts only; dense: all of them)."""
        return self.num_parameters - sum(self.ffn_parameters(i) - self.ffn_parameters(i, active=True)
                                         for i in range(self.num_layers))

    @staticmethod
    def from_hf(cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else {t: a for a, t in MODEL_TYPES.items()}.get(cfg.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"architecture {arch or cfg.get('model_type')!r} is not supported; afford loads "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in cfg]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {cfg['hidden_act']!r} is not supported (afford implements SwiGLU/silu)")
        heads = cfg["num_attention_heads"]
        if arch == "AffordMFAForCausalLM" and (cfg.get("attention") != "mfa" or not cfg.get("q_rank")
                                                or cfg.get("num_key_value_heads", 1) != 1):
            raise ConfigError("an AffordMFAForCausalLM config needs attention='mfa', q_rank > 0 and one KV head")
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if arch in ("MistralForCausalLM", "MixtralForCausalLM") and cfg.get("sliding_window") and \
                cfg["sliding_window"] < cfg.get("max_position_embeddings", 0):
            # We attend to the full context; cap the usable length at the window so outputs stay exact.
            max_pos = cfg["sliding_window"]
        else:
            max_pos = cfg.get("max_position_embeddings", 2048)
        return ModelConfig(
            architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=max_pos, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=RopeConfig.from_hf(cfg), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", cfg.get("qkv_bias", arch.startswith("Qwen2")))),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos,
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
            attention=cfg.get("attention", "gqa"), q_rank=cfg.get("q_rank", 0), **_moe_fields(arch, cfg),
            exits=tuple(int(e) for e in cfg.get("exits") or ()),
        )

    def to_hf(self, dtype: str = "float32") -> dict:
        """The Hugging Face config.json this config reads back from (and transformers loads)."""
        rope = {"rope_theta": self.rope.theta, "rope_type": self.rope.type}
        return {
            "architectures": [self.architecture],
            "model_type": MODEL_TYPES[self.architecture],
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope.theta, "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "hidden_act": "silu", "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "dtype": dtype,
            **({"attention": "mfa", "q_rank": self.q_rank} if self.attention == "mfa" else {}),
            **self._moe_hf(),
            **({"exits": list(self.exits)} if self.exits else {}),
        }

    def _moe_hf(self) -> dict:
        if self.architecture == "MixtralForCausalLM":
            return {"num_local_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
                    "intermediate_size": self.moe_intermediate_size, "sliding_window": None}
        if self.architecture == "Qwen2MoeForCausalLM":
            return {"num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
                    "moe_intermediate_size": self.moe_intermediate_size, "norm_topk_prob": self.norm_topk_prob,
                    "shared_expert_intermediate_size": self.shared_expert_intermediate_size,
                    "mlp_only_layers": list(self.dense_layers), "decoder_sparse_step": 1,
                    "qkv_bias": self.attention_bias, "use_sliding_window": False}
        return {}

    @staticmethod
    def from_dir(path: str | Path) -> "ModelConfig":
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ConfigError(f"no config.json in {path}: pass a Hugging Face model folder "
                              f"(config.json, *.safetensors, tokenizer.json)")
        return ModelConfig.from_hf(json.loads(p.read_text()))


def _moe_fields(arch: str, cfg: dict) -> dict:
    """ModelConfig's MoE fields from a Mixtral / Qwen2-MoE config.json (empty for dense architectures)."""
    if arch == "MixtralForCausalLM":
        return dict(num_experts=cfg.get("num_local_experts", 8), num_experts_per_tok=cfg.get("num_experts_per_tok", 2),
                    moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True)
    if arch != "Qwen2MoeForCausalLM":
        return {}
    n, step = cfg.get("num_experts", 60), cfg.get("decoder_sparse_step", 1) or 1
    dense = tuple(i for i in range(cfg["num_hidden_layers"])
                  if i in (cfg.get("mlp_only_layers") or []) or n == 0 or (i + 1) % step)
    if cfg.get("moe_intermediate_size") is None:
        raise ConfigError("a Qwen2MoeForCausalLM config.json needs moe_intermediate_size")
    return dict(num_experts=n, num_experts_per_tok=cfg.get("num_experts_per_tok", 4),
                moe_intermediate_size=cfg["moe_intermediate_size"],
                shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 0) or 0,
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), dense_layers=dense)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model: device, dtype, KV pool and batch limits."""
    model: str
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    kv_blocks: int | None = None        # None: enough for max_num_seqs full-length sequences
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None   # tokens fed per step: decodes first, then prompt chunks;
                                                # None: 512 on a CPU, 2048 on a GPU (Engine.step_token_budget)
    decode_token_budget: int | None = None      # chunked prefill: tokens a step may feed while sequences are
                                                # decoding (their TPOT bound); None: 64 on a CPU (a ~10 ms
                                                # prompt chunk here), max_num_batched_tokens on a GPU
    enable_chunked_prefill: bool = True  # split long prompts over steps so running decodes never wait
    enable_prefix_caching: bool = True   # reuse the KV blocks of a prompt's cached leading tokens
    seed: int = 0
    cost_hardware: str | None = None     # report modeled USD per 1M tokens on this hardware (afford cost keys)
    quantization: str | None = None      # "int8" | "int4": weight-only, quantized on load (FineQuant)
    quant_group: str = "auto"            # auto | per-channel | 32 | 64 | 128 ...
    quantize_head: bool = False          # with quantization: the LM head too (gpt-fast's int4 does; lossy)
    attention: str = "auto"              # attention backend: auto | paged | cpu_paged | sdpa (afford/attention/)
    native: bool = True                  # CPU fp32 forwards as one C++ call, batch-invariant (afford/models/native.py)
    enforce_eager: bool = False          # CUDA: no CUDA graphs (afford/core/graphs.py); the CPU never captures
    async_scheduling: bool | None = None  # greedy decode steps launched before the host reads the step before's
                                          # tokens (Engine._continue_async); None: on with CUDA graphs
    sparse_budget: int = 16              # attention="sparse" (lossy past the budget): KV blocks per decode query
    sparse_locality: float = 0.25        # ... share of the budget chosen by past attention mass (steps overlap)
    sparse_fast_blocks: int | None = None    # ... fast-tier blocks per layer (None: budget x max_num_seqs)
    sparse_dense_below: int | None = None    # ... contexts of at most this many tokens attend densely
                                             #     (None: budget x block_size, when every block fits)
    sparse_score: str = "bound"          # ... how the query picks blocks: "bound" (Quest's per-channel min / max
                                         #     bound on q . k) or "mean" (q . mean-pooled key, InfLLM-V2)
    kv_mmap_dir: str | None = None       # the K/V pool (sparse attention's slow tier) in a memory-mapped file in
                                         # this folder instead of RAM (CPU); the file is unlinked at once
    afd: str | None = None               # attention-FFN disaggregation "attention=N,ffn=M": the MLPs / experts
                                         # run on M worker processes over torch.distributed (afford/afd/), the
                                         # sequences' attention on N data-parallel attention workers (rank 0 too)
    micro_batches: int = 3               # ... micro-batches per step, pipelined between the two sides
    afd_address: str | None = None       # ... host:port where `afford afd-worker` processes join (None: spawn
                                         #     the workers on this host)

    @property
    def attention_options(self) -> dict:
        """Options of the attention backend (the sparse one's; the others take none)."""
        if self.attention != "sparse":
            return {}
        return {"budget": self.sparse_budget, "locality": self.sparse_locality, "fast_blocks": self.sparse_fast_blocks,
                "dense_below": self.sparse_dense_below, "max_seqs": self.max_num_seqs, "score": self.sparse_score}

    def __post_init__(self):
        if self.block_size < 1:
            raise ConfigError("block_size must be >= 1")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise ConfigError("kv_blocks must be >= 1")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("max_model_len must be >= 1 (leave it out for the model's own length)")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be >= 1")
        if self.decode_token_budget is not None and self.decode_token_budget < 1:
            raise ConfigError("decode_token_budget must be >= 1")
        if self.afd is None and self.afd_address is not None:
            raise ConfigError("afd_address is for afd deployments: give afd='attention=N,ffn=M' too")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: who drafts, how many tokens, how the target accepts them."""
    draft: str                          # a model folder, "default" (the bundled draft), or "ngram"
    num_speculative_tokens: int = 4     # k (the upper bound when the controller adapts it)
    acceptance: str = "rejection"       # for sampled requests; greedy requests always use "greedy"
    controller: str = "fixed"
    ngram_max: int = 3
    ngram_min: int = 1
    draft_dtype: str = "auto"
    draft_quantization: str | None = None
    draft_exit: str = "auto"            # a multi-exit (S2D) draft: "auto" thresholds, an exit's layers, or "t1,t2"

    def __post_init__(self):
        if not isinstance(self.num_speculative_tokens, int) or not 1 <= self.num_speculative_tokens <= 32:
            raise ConfigError(f"num_speculative_tokens must be between 1 and 32, got {self.num_speculative_tokens!r}")


@dataclass(frozen=True)
class CascadeConfig:
    """EAD (lossy): the engine's model is the small one; `large` takes over while the rolling mean entropy
    (bits, over `window` tokens) is >= tau, switching at most once every `dwell` tokens."""
    large: str
    tau: float = 2.5
    window: int = 5
    dwell: int = 10

    def __post_init__(self):
        if not self.tau >= 0:          # +inf is allowed: never switch
            raise ConfigError(f"tau must be a number >= 0 (bits; inf: never use the large model), got {self.tau}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ConfigError(f"window must be an integer >= 1, got {self.window!r}")
        if not isinstance(self.dwell, int) or self.dwell < 1:
            raise ConfigError(f"dwell must be an integer >= 1, got {self.dwell!r}")


@dataclass(frozen=True)
class RerankConfig:
    """Guided re-ranking after AMBEDKAR (lossy, steering): the engine's model proposes top_k tokens, the
    `large` guide penalises each by alpha * its JS divergence under a counterfactual rewrite of the prompt."""
    large: str
    counterfactual: object = None      # a dict of word swaps or a function str -> str
    alpha: float = 1.0
    top_k: int = 5

    MAX_TOP_K = 31                     # the guide keys a sequence's forks in 64 slots: 2 contexts + 2 x top_k

    def __post_init__(self):
        if not self.alpha >= 0:
            raise ConfigError(f"alpha must be >= 0 (0: plain decoding), got {self.alpha}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.MAX_TOP_K:
            raise ConfigError(f"rerank_top_k must be an integer between 1 and {self.MAX_TOP_K}, got {self.top_k!r}")


@dataclass(frozen=True)
class GradConfig:
    """GRAD (lossy): fuse a token graph built from the top_docs BM25-retrieved documents of `corpus`."""
    corpus: str
    weight: float = 16.0             # weight and top_docs: chosen on the fact-QA set's dev split
    top_docs: int = 1

    def __post_init__(self):
        if not self.weight >= 0:
            raise ConfigError(f"grad_weight must be >= 0 (0: plain decoding), got {self.weight}")
        if not isinstance(self.top_docs, int) or self.top_docs < 1:
            raise ConfigError(f"grad_top_docs must be an integer >= 1, got {self.top_docs!r}")


@dataclass(frozen=True)
class LossyConfig:
    """The opt-in levers that change the output distribution (afford/levers/); all off by default."""
    cascade: CascadeConfig | None = None
    rerank: RerankConfig | None = None
    grad: GradConfig | None = None

    def __post_init__(self):
        if self.cascade is not None and self.rerank is not None:
            raise ConfigError("cascade='entropy' and rerank='guided' do not combine: pick one")

    @property
    def side_model(self) -> str | None:
        """The second model these levers load, if any (re-ranking at alpha = 0 is off: it loads none)."""
        if self.cascade:
            return self.cascade.large
        return self.rerank.large if self.rerank and self.rerank.alpha != 0 else None

    @property
    def any(self) -> bool:
        return any((self.cascade, self.rerank, self.grad))
