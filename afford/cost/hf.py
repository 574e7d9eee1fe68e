"""ModelSpec from a Hugging Face config.json of the families in step3.md: Llama, Mistral, Qwen2/Qwen3
dense and MoE, Mixtral, DeepSeek-V3 / Kimi-K2 (MLA), Llama-4 (chunked attention), MiniMax-M1 (hybrid
linear attention), ERNIE-4.5, Pangu Pro MoE, Step-3 (MFA). KV is costed in FP8 unless told otherwise."""
from __future__ import annotations

import json
from pathlib import Path

from afford.config import ConfigError
from afford.cost.specs import AttnGroup, FFNGroup, ModelSpec


def _need(cfg: dict, family: str, *keys: str) -> list:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ConfigError(f"this looks like a {family} config.json but lacks {', '.join(missing)}")
    return [cfg[k] for k in keys]


def _gqa(cfg: dict, layers: int, **kw) -> AttnGroup:
    heads = cfg["num_attention_heads"]
    return AttnGroup("gqa", layers, heads, cfg.get("num_key_value_heads") or heads,
                     cfg.get("head_dim") or cfg["hidden_size"] // heads, **kw)


def spec_from_config(cfg: dict, name: str = "config.json") -> ModelSpec:
    cfg = dict(cfg.get("text_config") or {}, **{k: v for k, v in cfg.items() if k != "text_config"}) \
        if cfg.get("text_config") else cfg
    mt = (cfg.get("model_type") or "").lower()
    arch = " ".join(cfg.get("architectures") or []).lower()
    if "kv_lora_rank" in cfg:                                               # DeepSeek-V3 / Kimi-K2 MLA
        L, h, heads, ff = _need(cfg, "MLA", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
        attn = AttnGroup("mla", L, heads, q_lora=cfg.get("q_lora_rank") or 0, kv_lora=cfg["kv_lora_rank"],
                         rope_dim=cfg["qk_rope_head_dim"], nope_dim=cfg["qk_nope_head_dim"], v_dim=cfg["v_head_dim"])
        dense = cfg.get("first_k_dense_replace", 0)
        moe = FFNGroup(L - dense, cfg["moe_intermediate_size"], active=cfg["num_experts_per_tok"],
                       experts=cfg["n_routed_experts"], shared=cfg.get("n_shared_experts") or 0)
        return ModelSpec(name, h, (attn,), tuple(f for f in (FFNGroup(dense, ff), moe) if f.layers))
    if "step3" in mt or "share_q_dim" in cfg:                               # Step-3 MFA
        L, h, heads, d, q = _need(cfg, "Step-3", "num_hidden_layers", "hidden_size", "num_attention_heads",
                                  "head_dim", "share_q_dim")
        moe_layers = cfg.get("moe_layers_enum")
        moe_layers = [int(x) for x in moe_layers.split(",")] if isinstance(moe_layers, str) else \
            (moe_layers or list(range(4, L - 1)))
        attn = AttnGroup("mfa", L, heads, kv_heads=cfg.get("num_attention_groups", 1), head_dim=d, q_rank=q)
        return ModelSpec(name, h, (attn,), (
            FFNGroup(L - len(moe_layers), cfg["intermediate_size"]),
            FFNGroup(len(moe_layers), cfg["moe_intermediate_size"], active=cfg["moe_top_k"],
                     experts=cfg["moe_num_experts"], shared=1 if cfg.get("share_expert_dim") else 0,
                     shared_intermediate=cfg.get("share_expert_dim"))))
    if "minimax" in mt or "attn_type_list" in cfg:                          # hybrid lightning + softmax
        L, h, heads = _need(cfg, "MiniMax", "num_hidden_layers", "hidden_size", "num_attention_heads")
        types = cfg.get("attn_type_list") or [1 if (i + 1) % 8 == 0 else 0 for i in range(L)]
        n_soft = sum(1 for t in types if t == 1)
        d = cfg.get("head_dim") or h // heads
        attn = (_gqa(cfg, n_soft, kv_bytes=2.0),
                AttnGroup("linear", L - n_soft, heads, head_dim=d, linear_width=heads * d))
        return ModelSpec(name, h, attn, (FFNGroup(L, cfg["intermediate_size"], active=cfg["num_experts_per_tok"],
                                                  experts=cfg["num_local_experts"]),))
    if "llama4" in mt or "interleave_moe_layer_step" in cfg:                # Llama-4: chunked + global NoPE
        L, h = _need(cfg, "Llama-4", "num_hidden_layers", "hidden_size")
        nope = cfg.get("no_rope_layers")
        n_global = (L - sum(nope)) if nope else L // 4
        chunk = cfg.get("attention_chunk_size", 8192)
        step = cfg.get("interleave_moe_layer_step", 1)
        n_moe = L // step
        return ModelSpec(name, h, (_gqa(cfg, L - n_global, window=chunk), _gqa(cfg, n_global, kv_bytes=2.0)),
                         tuple(f for f in (
                             FFNGroup(L - n_moe, cfg.get("intermediate_size_mlp", cfg["intermediate_size"])),
                             FFNGroup(n_moe, cfg["intermediate_size"], active=cfg.get("num_experts_per_tok", 1),
                                      experts=cfg["num_local_experts"], shared=1)) if f.layers))
    if "ernie" in mt or "moe_num_experts" in cfg:                           # ERNIE-4.5
        L, h, ff = _need(cfg, "ERNIE-4.5", "num_hidden_layers", "hidden_size", "intermediate_size")
        start = cfg.get("moe_layer_start_index", 0)
        return ModelSpec(name, h, (_gqa(cfg, L),), tuple(f for f in (
            FFNGroup(start, ff),
            FFNGroup(L - start, cfg["moe_intermediate_size"], active=cfg["moe_k"], experts=cfg["moe_num_experts"],
                     shared=cfg.get("moe_num_shared_experts", 0))) if f.layers))
    if "num_local_experts" in cfg:                                          # Mixtral
        L, h, ff = _need(cfg, "Mixtral", "num_hidden_layers", "hidden_size", "intermediate_size")
        return ModelSpec(name, h, (_gqa(cfg, L),), (FFNGroup(L, ff, active=cfg["num_experts_per_tok"],
                                                             experts=cfg["num_local_experts"]),))
    if "num_experts" in cfg and cfg.get("num_experts"):                     # Qwen2/3-MoE, Pangu Pro MoE
        L, h = _need(cfg, "MoE", "num_hidden_layers", "hidden_size")
        shared_i = cfg.get("shared_expert_intermediate_size") or 0
        dense_layers = len(cfg.get("mlp_only_layers") or [])
        moe = FFNGroup(L - dense_layers, cfg["moe_intermediate_size"], active=cfg["num_experts_per_tok"],
                       experts=cfg["num_experts"], shared=1 if shared_i else 0, shared_intermediate=shared_i or None)
        return ModelSpec(name, h, (_gqa(cfg, L),), tuple(f for f in (
            FFNGroup(dense_layers, cfg.get("intermediate_size", 0)), moe) if f.layers))
    if mt in ("llama", "mistral", "qwen2", "qwen3") or any(a in arch for a in ("llama", "mistral", "qwen")):
        L, h, ff = _need(cfg, mt or "dense", "num_hidden_layers", "hidden_size", "intermediate_size")
        _need(cfg, mt or "dense", "num_attention_heads")
        return ModelSpec(name, h, (_gqa(cfg, L),), (FFNGroup(L, ff),))
    raise ConfigError(f"config.json of model_type {mt!r} is not a family the cost model knows (Llama, Mistral, "
                      f"Qwen2/3 dense or MoE, Mixtral, DeepSeek-V3/Kimi-K2, Llama-4, MiniMax-M1, ERNIE-4.5, "
                      f"Pangu Pro MoE, Step-3)")


def load_spec(name_or_path: str) -> ModelSpec:
    """A preset name, a config.json, or a folder holding one."""
    from afford.cost.specs import PRESETS, get_preset
    if name_or_path in PRESETS:
        return get_preset(name_or_path)
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        return get_preset(name_or_path)          # raises with the list of presets
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not valid JSON: {e}") from e
    return spec_from_config(cfg, name=str(p.parent.name if p.name == "config.json" else p.stem))


def spec_from_model_config(cfg, kv_bytes: float) -> ModelSpec:
    """The cost-model view of a model the engine has loaded (afford.config.ModelConfig)."""
    if cfg.attention == "mfa":
        attn = AttnGroup("mfa", cfg.num_layers, cfg.num_heads, kv_heads=1, head_dim=cfg.head_dim, kv_bytes=kv_bytes,
                         q_rank=cfg.q_rank)
    else:
        attn = AttnGroup("gqa", cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, kv_bytes=kv_bytes)
    if not cfg.num_experts:
        return ModelSpec(cfg.architecture, cfg.hidden_size, (attn,), (FFNGroup(cfg.num_layers, cfg.intermediate_size),))
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    shared = cfg.shared_expert_intermediate_size
    ffn = (FFNGroup(cfg.num_layers - moe_layers, cfg.intermediate_size),
           FFNGroup(moe_layers, cfg.moe_intermediate_size, active=cfg.num_experts_per_tok, experts=cfg.num_experts,
                    shared=1 if shared else 0, shared_intermediate=shared or None))
    return ModelSpec(cfg.architecture, cfg.hidden_size, (attn,), tuple(f for f in ffn if f.layers))
