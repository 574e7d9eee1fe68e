"""Load a Hugging Face folder (config.json + *.safetensors, sharded too) into our Transformer,
and save one back. Weight names map one to one onto HF's Llama/Qwen2/Mistral names."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from afford.config import ConfigError, ModelConfig
from afford.models.quant import QuantLinear, load_quantized, quant_settings, quantize_model
from afford.models.transformer import Transformer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_model_path(name: str | Path, role: str = "target") -> Path:
    """'default' means the bundled pair (this role's half of it); 'default-target' and 'default-draft' name
    one half whatever the role (a cascade runs the bundled draft as its small model), 'default-large' the
    bundled second target (2x the parameters, the same tokenizer) and 'default-sorted' the multi-exit (S2D)
    draft distilled from both targets; anything else is a local HF folder."""
    if str(name) in ("default", "default-target", "default-draft", "default-large", "default-sorted"):
        role = role if str(name) == "default" else str(name).split("-", 1)[1]
        path = ASSETS / "default" / role
        if not (path / "config.json").is_file():
            raise ConfigError(f"the bundled default {role} is missing at {path}; train it with the zoo "
                              f"recipe in the README or pass --model PATH")
        return path
    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(f"model folder {str(path)!r} does not exist: pass a local Hugging Face folder "
                          f"(config.json, *.safetensors, tokenizer.json) or 'default'")
    if not path.is_dir():
        raise ConfigError(f"{str(path)!r} is a file, not a model folder")
    return path


def dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype or torch.float32).replace("torch.", "")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device {device!r}: {e}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this torch has no usable CUDA (torch.cuda.is_available() is "
                          f"False); use --device cpu, or install a CUDA build of torch on a GPU machine")
    return dev


def resolve_dtype(dtype: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """"auto": float32 on a CPU -- exact (a bf16/fp16 checkpoint upcasts without loss, and fp32 kernels that
    see a different number of rows round differently only at ~1e-7 relative, where bf16's rounding
    flipped greedy choices between batch sizes and under speculation)
    and the fastest here (benchmarks/matmul_micro.py: bf16 GEMV reads 2-30x slower than fp32 on these
    CPUs); the checkpoint's own dtype on an accelerator."""
    if dtype == "auto":
        dtype = "float32" if device.type == "cpu" else (cfg.torch_dtype or "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors in {path}: afford loads safetensors checkpoints "
                          f"(convert .bin with transformers' save_pretrained(safe_serialization=True))")
    return files


# Mixtral's names for what afford (and Qwen2-MoE) call mlp.gate / mlp.experts.N.gate_proj|up_proj|down_proj
MIXTRAL_NAMES = ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj."))


def rename_weights(state: dict, cfg: ModelConfig, to_hf: bool = False) -> dict:
    """A checkpoint's weight names onto afford's (to_hf: back); only Mixtral's differ."""
    if cfg.architecture != "MixtralForCausalLM":
        return state
    pairs = [(b, a) for a, b in MIXTRAL_NAMES] if to_hf else MIXTRAL_NAMES
    out = {}
    for k, v in state.items():
        if ".block_sparse_moe." in k or ".mlp." in k:
            for a, b in pairs:
                k = k.replace(a, b)
        out[k] = v
    return out


def load_tensors(path: Path, cfg: ModelConfig, names: dict[str, tuple | None]) -> dict[str, torch.Tensor]:
    """Only the named weights (afford's names), each whole (None) or a slice (a tuple of slices), read through
    safetensors' safe_open: a process that holds part of a model (an AFD FFN worker) reads only that part."""
    from safetensors import safe_open
    out = {}
    for f in _weight_files(Path(path)):
        with safe_open(str(f), "pt") as fh:
            for ours, theirs in rename_weights({k: k for k in fh.keys()}, cfg).items():    # afford name -> file's
                if ours in names:
                    out[ours] = fh.get_tensor(theirs) if names[ours] is None else fh.get_slice(theirs)[names[ours]]
    missing = set(names) - set(out)
    if missing:
        raise ConfigError(f"checkpoint {path} lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
    return out


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # corrupted or truncated file
            raise ConfigError(f"cannot read {f}: {e}") from e
    return state


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto",
               max_len: int | None = None, ffn: bool = True) -> Transformer:
    """ffn=False: without the FFN / expert weights (Transformer.drop_ffn), which are then never read from the
    checkpoint -- an AFD attention side holds no copy of what its FFN workers hold."""
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    dev = resolve_device(device)
    with torch.device("meta"):
        model = Transformer(cfg, max_len=max_len)
    if not ffn:
        if (path / "quantization.json").is_file():
            raise ConfigError(f"{path} is quantized; loading it without its FFN weights (afd) is not implemented")
        model.drop_ffn()
        wanted = {k: None for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        try:
            state = load_tensors(path, cfg, wanted)
        except ConfigError:
            raise
        except Exception as e:  # corrupted or truncated file
            raise ConfigError(f"cannot read the checkpoint in {path}: {e}") from e
    else:
        state = rename_weights(load_state_dict(path), cfg)
    model = model.to_empty(device="cpu")
    model.rope_cos, model.rope_sin = Transformer.rope_tables(cfg, model.max_len)  # buffers were on meta
    if (path / "quantization.json").is_file():
        load_quantized(path, model, state)
    qmods = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    expected = {k for k in model.state_dict() if k.rsplit(".", 1)[0] not in qmods}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing = expected - set(state)
    if missing:
        raise ConfigError(f"checkpoint {path} lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
    unknown = set(state) - expected - {"lm_head.weight"}
    unknown = {k for k in unknown if not k.endswith("rotary_emb.inv_freq")}
    if unknown:
        raise ConfigError(f"checkpoint {path} has weights afford does not know, e.g. {sorted(unknown)[:3]}")
    model.load_state_dict(state, strict=False)
    if cfg.tie_word_embeddings and not isinstance(model.lm_head, QuantLinear):   # (a quantized head: its own copy)
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(device=dev, dtype=resolve_dtype(dtype, cfg, dev)).eval()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.refresh()                          # pick the kernel for the device the model now lives on
    return model


def load_for_inference(path: str | Path, device: str = "auto", dtype: str = "auto",
                       max_len: int | None = None, quantization: str | None = None,
                       quant_group: str = "auto", ffn: bool = True, quantize_head: bool = False) -> Transformer:
    """load_model, then either quantize it (quantization="int8"|"int4", weight-only, FineQuant-style; the LM
    head too with quantize_head) or fuse and pre-transpose its matrices for fast full-precision decoding."""
    with torch.no_grad():
        model = load_model(path, device, dtype, max_len, ffn=ffn)
        done = quant_settings(model)
        if done and (quantization or quantize_head):            # a quantized checkpoint
            raise ConfigError(f"{path} is already quantized ({done['bits']}-bit); drop quantization= and "
                              f"quantize_head= (a checkpoint's LM head is quantized when `afford quantize --head` "
                              f"wrote it)")
        if quantization:
            if quantization not in ("int8", "int4"):
                raise ConfigError(f"quantization must be int8 or int4, got {quantization!r}")
            quantize_model(model, 8 if quantization == "int8" else 4, quant_group, head=quantize_head)
        elif quantize_head:
            raise ConfigError("quantize_head quantizes the LM head along with the blocks: it needs "
                              "quantization='int8' or 'int4'")
        if quant_settings(model):
            if next(model.parameters()).device.type == "cuda":   # fewer, larger kernel calls (graph steps)
                for layer in model.model.layers:
                    layer.self_attn.fuse_quantized()
                    layer.mlp.fuse_quantized()
            return model
        return model.pack_for_inference()


def save_model(model: Transformer, out: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors in Hugging Face layout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = rename_weights(state, cfg, to_hf=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_hf(dtype_name(dtype)), indent=2) + "\n")


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ConfigError(f"cannot load a tokenizer from {path} ({e}); the folder needs tokenizer.json "
                          f"or the tokenizer files of its model") from e
