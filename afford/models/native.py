"""The native forward (native_decode.cpp): a whole forward of a CPU fp32 model -- prefill, decode, verify,
a prompt chunk -- as one C++ call on afford's own kernels (tiled matrix-vector products, fused norm / RoPE /
SiLU, paged attention reading blocks in place). Each output element is computed in an order that depends
only on its own inputs, so a token's logits are bitwise the same alone, in any batch and in a speculative
verify (tests/test_native.py); against the Python path (torch operators, the reference) they agree to
fp32 rounding. A model whose weights are all bf16 values (a bf16 checkpoint loaded as fp32, as the bundled
models are) keeps its packed weights in bf16: the kernels widen them to fp32 in registers (exact), so
the arithmetic and the logits are bitwise those of fp32 panels, with half the bytes streamed per forward.

It is built once per machine by torch.utils.cpp_extension (a C++ compiler and ninja are needed; ~1
minute, cached under ~/.cache/torch_extensions), for this CPU's instruction set. AFFORD_NATIVE=0 or
`native=False` turns it off. Where it cannot be built or does not apply (a GPU, bf16, int8/int4 weights,
MFA, MoE, another attention backend) the Python path runs.
"""
from __future__ import annotations

import logging
import os
import platform
import threading
from pathlib import Path

import torch

log = logging.getLogger("afford")

_SOURCE = Path(__file__).with_name("native_decode.cpp")
_lock = threading.Lock()
_module: object | None = None
_error: str | None = None


# AVX2 + FMA kernels where the CPU has them (a portable path otherwise); OpenMP so that at::parallel_for
# runs on torch's threads (without it the header falls back to one thread)
# (-ffp-contract=off: no multiply-add the source does not write, so no result depends on how the compiler
# split a loop into vector body and scalar tail)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]
STALE_LOCK_S = 600        # a build takes about a minute; a lock this old belongs to a build that was killed


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build_dir() -> Path:
    """One build folder per source text (checkouts at other paths or commits do not rebuild each other's,
    which made every other process wait on the build lock), with a killed build's stale lock removed
    (torch's loader would wait on it forever)."""
    import hashlib
    import time

    from torch.utils.cpp_extension import _get_build_directory
    # the build targets this CPU (-march=native): its capability is part of the key, so a cache shared
    # between machines never loads code for another instruction set
    cpu = f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} {_cpu_flags()}"
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(FLAGS).encode() + cpu.encode()).hexdigest()[:12]
    path = Path(_get_build_directory("afford_native_decode", verbose=False)).with_name(f"afford_native_decode_{digest}")
    path.mkdir(parents=True, exist_ok=True)
    lock = path / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    return path


def native_module():
    """The compiled extension, built on first call; None when AFFORD_NATIVE=0 or when it cannot be built
    (the reason: `native_error()`)."""
    global _module, _error
    if os.environ.get("AFFORD_NATIVE", "1") == "0":
        return None
    with _lock:
        if _module is None and _error is None:
            try:
                from torch.utils.cpp_extension import load
                log.info("building afford's native forward (once per machine, about a minute)")
                build = _build_dir()
                src = build / _SOURCE.name             # compiled from a copy there: the same path for every
                if not src.exists() or src.read_bytes() != _SOURCE.read_bytes():   # checkout, so none rebuilds
                    src.write_bytes(_SOURCE.read_bytes())
                _module = load(name="afford_native_decode", sources=[str(src)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                               build_directory=str(build), verbose=False)
            except Exception as e:                    # no compiler, no headers: the Python path runs
                _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                log.warning("afford's native forward could not be built (%s); forwards run the Python path "
                            "(same results, more time per step)", _error)
        return _module


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """logits.argmax(-1).tolist() for (R, V) logits (same ties and NaN rule): the native module's vectorized
    pass once it is built (torch's CPU argmax costs ~50 us on 5 x 4096, per step), torch otherwise."""
    if _module is not None and logits.dim() == 2 and logits.dtype == torch.float32 and logits.device.type == "cpu" \
            and logits.shape[1] > 0:
        return _module.argmax_rows(logits)
    return logits.argmax(-1).tolist()


def native_error() -> str | None:
    return _error


def _linear_tensors(lin, bf16: bool = False) -> list[torch.Tensor]:
    bias = lin.bias.detach() if lin.bias is not None else torch.empty(0)
    w = lin.weight.detach()
    return [w.bfloat16() if bf16 else w, bias]


def bf16_exact(model) -> bool:
    """Whether every matrix the native forward multiplies by holds bf16 values only (a checkpoint stored in
    bf16 and loaded as fp32, as the bundled models are): then its panels are kept in bf16 -- half the bytes
    per forward, the same fp32 products bitwise. AFFORD_NATIVE_BF16=0 keeps fp32 panels (for comparisons)."""
    if os.environ.get("AFFORD_NATIVE_BF16", "1") == "0":
        return False
    return all(torch.equal(w, w.bfloat16().float()) for w in (m.weight.detach() for m in _linears(model)))


def _attention_only(model) -> bool:
    """A model whose FFN weights live elsewhere (Transformer.drop_ffn: an AFD attention side)."""
    from afford.models.transformer import MoE
    return all(layer.mlp is None or (isinstance(layer.mlp, MoE) and not len(layer.mlp.experts))
               for layer in model.model.layers)


def _linears(model) -> list:
    ffn = not _attention_only(model)
    return [model.lm_head] + [m for layer in model.model.layers
                              for m in (layer.self_attn.qkv, layer.self_attn.o_proj,
                                        *((layer.mlp.gate_up, layer.mlp.down_proj) if ffn else ()))]


def unsupported(model, backend_name: str) -> str | None:
    """Why the native forward does not apply to this model / backend (None: it does). A model without its
    FFN weights (an AFD attention side) gets attention halves only (NativeDecoder.attn_half)."""
    from afford.models.transformer import DUAL_LAYOUT_MAX_BYTES, PackedLinear
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        return f"runs on CPU fp32 models only (this one: {p.device.type} {p.dtype})"
    if backend_name != "cpu_paged":
        return f"implements the cpu_paged attention backend, not {backend_name}"
    if model.cfg.attention == "mfa":
        return "does not implement MFA attention"
    if model.cfg.num_experts and not _attention_only(model):
        return "does not implement mixture-of-experts layers"
    if not all(isinstance(m, PackedLinear) for m in _linears(model)):
        return "needs plain fp32 weights (this model is quantized)"
    size = sum(q.numel() for q in model.parameters()) * 4
    if size > DUAL_LAYOUT_MAX_BYTES:
        return (f"keeps a packed copy of the weights, and this model's {size / 2**30:.1f} GiB is above "
                f"{DUAL_LAYOUT_MAX_BYTES / 2**30:.0f} GiB (the limit on duplicated CPU layouts)")
    return None


class NativeDecoder:
    """Holds the C++ decoder: its own panel-packed copy of the weights (the Python path's extra layouts are
    freed), and views of the runner's K/V pool tensors."""

    def __init__(self, module, model, kv: list[tuple[torch.Tensor, torch.Tensor]], block_size: int):
        cfg = model.cfg
        self.bf16 = b = bf16_exact(model)
        self.attention_only = _attention_only(model)
        none = [torch.empty(0, 0), torch.empty(0)]                  # no FFN weights: attention halves only
        layers = []
        for layer, (k_pool, v_pool) in zip(model.model.layers, kv):
            a, m = layer.self_attn, layer.mlp
            ffn = none * 2 if self.attention_only else [*_linear_tensors(m.gate_up, b), *_linear_tensors(m.down_proj, b)]
            layers.append([layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                           *_linear_tensors(a.qkv, b), *_linear_tensors(a.o_proj, b), *ffn, k_pool, v_pool])
        self.impl = module.NativeDecoder(model.model.embed_tokens.weight.detach(), model.rope_cos, model.rope_sin,
                                         model.model.norm.weight.detach(), _linear_tensors(model.lm_head, b), layers,
                                         cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, block_size)
        # bytes one forward does not read thanks to bf16 panels (the LM head may be the tied embedding)
        self.bytes_saved = sum(m.weight.numel() * 2 for m in _linears(model)) if b else 0
        self._empty = torch.empty(0, dtype=torch.long)
        self._empty_f = torch.empty(0, 0)
        for lin in _linears(model):              # the native forward packed its own copy of each weight
            if not (self.attention_only and lin is model.lm_head):      # (AFD runs the head in Python)
                lin.drop_fast_copies()

    @classmethod
    def build(cls, model, kv, block_size: int, backend_name: str) -> "NativeDecoder | None":
        why = unsupported(model, backend_name)
        if why is not None:
            log.debug("native forward off: it %s", why)
            return None
        module = native_module()
        return None if module is None else cls(module, model, kv, block_size)

    def step(self, ids: torch.Tensor, batch, rows: torch.Tensor | None) -> torch.Tensor:
        """Logits (R, V) of the forward a ForwardBatch describes, for the flat token indices `rows` (None:
        all). The batch must have no padding rows (CUDA graph buckets only)."""
        return self.impl.step(ids, batch.positions, batch.slot_mapping, batch.query_lens, batch.tables,
                              self._empty if rows is None else rows)

    def attn_half(self, x: torch.Tensor, batch, layer: int) -> torch.Tensor:
        """Attention-FFN disaggregation: layer `layer`'s attention half over the batch's tokens. x (N, hidden),
        the residual stream entering the layer, becomes x + attention output in place; returns the
        post-attention norm of it (N, hidden), what the FFN workers take."""
        return self.impl.attn_half(x, batch.positions, batch.slot_mapping, batch.query_lens, batch.tables, layer)

    def segment(self, ids: torch.Tensor, x: torch.Tensor | None, batch, lo: int, hi: int,
                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A multi-exit model's layers lo..hi-1 over the batch's tokens, entering as the residual stream x
        (N, hidden), or embedded from ids when lo == 0: the stream after layer hi - 1 and the logits (R, V)
        of the flat rows `rows` (final norm + head; R may be 0)."""
        x_out, logits = self.impl.segment(ids, self._empty_f if x is None else x, batch.positions,
                                          batch.slot_mapping, batch.query_lens, batch.tables, lo, hi, rows)
        return x_out, logits

    def draft_exits(self, ids: torch.Tensor, batch, ks: list[int], fills: list[list[int]], bounds: list[int],
                    thresholds: list[float], fixed: int, probe: bool, resid: torch.Tensor):
        """A sorted (multi-exit) draft's greedy drafts with confidence exits and lazy fill in one call
        (native_decode.cpp draft_exits): (drafts, each draft's exit, updated fills, probe records)."""
        return self.impl.draft_exits(ids, batch.positions, batch.slot_mapping, batch.query_lens, batch.tables, ks,
                                     fills, bounds, thresholds, fixed, probe, resid)

    def draft_greedy(self, ids: torch.Tensor, batch, ks: list[int]) -> list[list[int]]:
        """Greedy drafts of ks[i] tokens per sequence in one call: the forward `batch` describes (each
        sequence's last fed token predicts its first draft), then the k - 1 one-token forwards that feed
        each draft back (their blocks allocated by the caller)."""
        return self.impl.draft_greedy(ids, batch.positions, batch.slot_mapping, batch.query_lens, batch.tables, ks)
