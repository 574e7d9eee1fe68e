"""FineQuant-style weight-only int8 / int4 quantization with an adaptive group size per matrix.

Granularity (a re-creation: the paper's exact rule is not public, see reference other-methods.md §1):
every matrix starts per output channel (one scale per row over all K inputs); while halving the group
along K cuts the matrix's relative reconstruction error ||W - Q(W)|| / ||W|| by more than `tau`
(default 15 %), the group is halved, down to a floor of 32. Outlier columns make halving pay; a
well-behaved matrix stays per channel.

Formats: int8 symmetric (w = q * s, q in [-127, 127]); int4 asymmetric as torch's int4 kernels want it
(w = (q - 8) * s + z, q in [0, 15]). Kernels, chosen at load time by device, all with bf16 activations:
torch's `_weight_int8pack_mm` (per channel, so a group-wise int8 matrix is a sum over its K-chunks) on
the CPU, afford's Triton int8 kernel on CUDA (triton_int8.py; torch's CUDA int8pack measured 4x slower
than bf16), `_weight_int4pack_mm_for_cpu` on the CPU and the tinygemm `_weight_int4pack_mm` on CUDA
(groups 32-256; a per-channel scale is repeated over kernel groups). A CUDA kernel is checked against the
dequantized product on a random input when it is set up, and not used if it disagrees. Elsewhere (odd
shapes, no kernel) a dequantize-then-matmul fallback that gives the same numbers up to bf16 rounding.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from afford.config import ConfigError

FORMAT_VERSION = 1
INT4_KERNEL_GROUPS = (256, 128, 64, 32)
# int4 on CUDA (AFFORD_INT4_KERNEL): "tinygemm" (torch's, the default); "auto" -- tinygemm, except one-row
# products (a batch-1 decode step) of matrices where afford's Triton row kernel (triton_int4.py) was faster
# on this card, timed once per shape at load inside a CUDA graph; "triton": afford's kernels for every
# product. On an H200 (benchmarks/gpu_decode.py, 1.1 B Llama, batch 1): auto 1055 tok/s, tinygemm 1064,
# triton 875 (and 0.31x tinygemm at batch 16), so tinygemm stays the default
CUDA_INT4_KERNEL = os.environ.get("AFFORD_INT4_KERNEL", "tinygemm")
_ROW_KERNEL_FASTER: dict[tuple, bool] = {}      # (N, K, group, card) -> the Triton row kernel won


def _graph_us(fn, n: int = 10) -> float:
    """GPU microseconds per call of fn, n calls captured in one CUDA graph, replayed three times."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        g.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / (3 * n)


def _bf16_up(s: torch.Tensor) -> torch.Tensor:
    """Round scales to bf16 (what the kernels read), never below the exact value, so no code clips."""
    b = s.to(torch.bfloat16).float()
    return torch.where(b < s, (s * (1 + 2 ** -7)).to(torch.bfloat16).float(), b)


def quantize(w: torch.Tensor, bits: int, group: int):
    """w: (N, K) float -> codes (N, K) int8, scales (N, K/group), zeros (N, K/group) or None.
    Scales and zeros are bf16-representable, so every kernel and the fallback see the same numbers."""
    N, K = w.shape
    if bits not in (4, 8):
        raise ConfigError(f"bits must be 4 or 8, got {bits}")
    if group < 1 or K % group:
        raise ConfigError(f"group size {group} does not divide the input dimension {K}")
    wg = w.float().reshape(N, K // group, group)                                   # (N, G, g)
    if bits == 8:
        s = _bf16_up((wg.abs().amax(-1) / 127).clamp_min(1e-12))                   # (N, G)
        q = torch.round(wg / s.unsqueeze(-1)).clamp(-127, 127)
        return q.reshape(N, K).to(torch.int8), s, None
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = _bf16_up(((hi - lo) / 15).clamp_min(1e-12))
    z = (lo + 8 * s).to(torch.bfloat16).float()
    q = torch.round((wg - z.unsqueeze(-1)) / s.unsqueeze(-1) + 8).clamp(0, 15)
    return q.reshape(N, K).to(torch.int8), s, z


def dequantize(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    N, K = q.shape
    G = s.shape[1]
    qg = q.float().reshape(N, G, K // G)
    w = qg * s.unsqueeze(-1) if z is None else (qg - 8) * s.unsqueeze(-1) + z.unsqueeze(-1)
    return w.reshape(N, K)


def rel_error(w: torch.Tensor, bits: int, group: int) -> float:
    q, s, z = quantize(w, bits, group)
    return float((dequantize(q, s, z) - w.float()).norm() / w.float().norm().clamp_min(1e-12))


def choose_group(w: torch.Tensor, bits: int, tau: float = 0.15, floor: int = 32) -> int:
    """Per channel, halved while halving cuts the relative reconstruction error by more than tau."""
    K = w.shape[1]
    g, err = K, rel_error(w, bits, K)
    while g % 2 == 0 and g // 2 >= floor:
        e2 = rel_error(w, bits, g // 2)
        if e2 >= err * (1 - tau):
            break
        g, err = g // 2, e2
    return g


class QuantLinear(nn.Module):
    """A linear layer with int8/int4 weights. Holds the exact codes and scales (what a checkpoint
    stores) and, on the CPU, the packed form the kernel reads."""

    def __init__(self, codes, scales, zeros, bits: int, bias: torch.Tensor | None = None, kernel: str = "auto"):
        super().__init__()
        self.bits = bits
        self.out_features, self.in_features = codes.shape
        self.group = self.in_features // scales.shape[1]
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales.float())      # bf16-representable values (see quantize)
        self.register_buffer("zeros", zeros.float() if zeros is not None else None)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._setup(kernel)

    @staticmethod
    def from_linear(lin: nn.Linear, bits: int, group: int | str = "auto", tau: float = 0.15) -> "QuantLinear":
        w = lin.weight.detach().float()
        K = w.shape[1]
        if group == "auto":
            g = choose_group(w, bits, tau)
        elif group == "per-channel":
            g = K
        else:
            g = int(group)
        q, s, z = quantize(w, bits, g)
        return QuantLinear(q, s, z, bits, lin.bias)

    def _pick_kernel(self, want: str) -> str:
        if want != "auto":
            return want
        if self.codes.device.type == "cuda":
            from afford.models import triton_int8
            if self.bits == 8 and triton_int8.available() and triton_int8.block_k(self.in_features, self.group):
                return "int8triton"
            if self.bits == 8 and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
                return "int8pack"
            from afford.models import triton_int4
            if self.bits == 4 and CUDA_INT4_KERNEL == "triton" and triton_int4.available() \
                    and triton_int4.block_k(self.in_features, self.group):
                return "int4triton"
            if self.bits == 4 and hasattr(torch.ops.aten, "_weight_int4pack_mm") and self.out_features % 8 == 0 \
                    and self._int4_kernel_group() is not None and self.in_features % 32 == 0:
                return "int4cuda"
            return "dequant"
        if self.codes.device.type != "cpu":
            return "dequant"
        if self.bits == 8 and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return "int8pack"
        if self.bits == 4 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and self.out_features % 16 == 0:
            if self._int4_kernel_group() is not None:
                return "int4pack"
        return "dequant"

    def refresh(self) -> None:
        """Re-pick the kernel and rebuild its packed form after a move to another device."""
        self._setup("auto")

    def _setup(self, want: str) -> None:
        self._w4 = None                       # the fused one-row GEMV's layout (triton_gemv), rebuilt on demand
        self.kernel = self._pick_kernel(want)
        try:
            self._prepare()
        except RuntimeError:                  # a kernel this build or this card lacks
            self.kernel = "dequant"
        if want == "auto" and self.codes.device.type == "cuda" and self.kernel != "dequant" \
                and not self._kernel_agrees():
            import logging
            logging.getLogger("afford").warning("the %s kernel disagrees with the dequantized product on %s; "
                                                "this layer uses the dequantize fallback", self.kernel,
                                                tuple(self.codes.shape))
            self.kernel = "dequant"

    def _kernel_agrees(self) -> bool:
        """The kernel's product of a random input equals the dequantized product up to bf16 rounding."""
        g = torch.Generator(device=self.codes.device).manual_seed(0)
        for rows in (1, 3, 64):                  # a decode's rows and a large bucket's (other kernel tiles)
            x = torch.randn(rows, self.in_features, generator=g, device=self.codes.device)
            try:
                y = self.forward(x).float()
            except Exception:                    # RuntimeError, or Triton's OutOfResources on a smaller card
                return False
            kernel, self.kernel = self.kernel, "dequant"
            ref = self.forward(x).float()
            self.kernel = kernel
            if not bool((y - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-3):
                return False
        return True

    def _int4_kernel_group(self) -> int | None:
        for kg in INT4_KERNEL_GROUPS:             # largest kernel group that tiles ours
            if self.group % kg == 0 and self.in_features % kg == 0:
                return kg
        return None

    def _prepare(self) -> None:
        G = self.scales.shape[1]
        if self.kernel == "int8pack":
            # one contiguous (N, g) chunk per group: y = sum_c x_c @ (q_c * s_c)^T
            self._chunks = [self.codes[:, c * self.group:(c + 1) * self.group].contiguous() for c in range(G)]
            self._chunk_scales = [self.scales[:, c].to(torch.bfloat16).contiguous() for c in range(G)]
        elif self.kernel == "int4pack":
            kg = self._int4_kernel_group()
            rep = self.group // kg
            s = self.scales.float().repeat_interleave(rep, dim=1)                   # (N, K / kg)
            z = self.zeros.float().repeat_interleave(rep, dim=1)
            self._kg = kg
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes.to(torch.int32), 1)
            self._sz = torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()   # (K/kg, N, 2)
        elif self.kernel == "int8triton":
            self._s16 = self.scales.to(torch.bfloat16).contiguous()
        elif self.kernel == "int4triton":
            from afford.models.triton_int4 import pack
            self._p4 = pack(self.codes)
            self._s32, self._z32 = self.scales.float().contiguous(), self.zeros.float().contiguous()
        elif self.kernel == "int4cuda":        # tinygemm: uint8 (N, K/2), even k in the high nibble
            kg = self._int4_kernel_group()
            rep = self.group // kg
            s = self.scales.float().repeat_interleave(rep, dim=1)                   # (N, K / kg)
            z = self.zeros.float().repeat_interleave(rep, dim=1)
            self._kg = kg
            u = self.codes.to(torch.uint8)
            inner = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
            self._packed = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).contiguous(), inner)
            self._sz = torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()   # (K/kg, N, 2)
            self._row = None                   # one-row products: afford's Triton kernel where it was faster
            if CUDA_INT4_KERNEL == "auto":
                self._row = self._row_kernel_if_faster()

    def _row_kernel_if_faster(self):
        """The Triton row kernel's operands when it beats tinygemm on a one-row product of this matrix's
        shape on this card (timed once per shape), else None."""
        from afford.models import triton_int4
        if not triton_int4.available() or triton_int4.gemv_block_k(self.in_features, self.group,
                                                                   triton_int4.GEMV_CONFIG[1]) is None:
            return None
        dev = self.codes.device
        ops = (triton_int4.pack(self.codes), self.scales.float().contiguous(), self.zeros.float().contiguous())
        key = (self.out_features, self.in_features, self.group, torch.cuda.get_device_name(dev), triton_int4.GEMV_CONFIG)
        if key not in _ROW_KERNEL_FASTER:
            x = torch.randn(1, self.in_features, device=dev).to(torch.bfloat16)
            try:
                tri = _graph_us(lambda: triton_int4.int4_mm(x, *ops, self.group))
                tiny = _graph_us(lambda: torch.ops.aten._weight_int4pack_mm(x, self._packed, self._kg, self._sz))
                _ROW_KERNEL_FASTER[key] = tri < tiny
            except Exception:                      # a capture or a kernel this card refuses: tinygemm
                _ROW_KERNEL_FASTER[key] = False
        return ops if _ROW_KERNEL_FASTER[key] else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)                                        # (M, K)
        if self.kernel == "int8pack":
            xb = x2.to(torch.bfloat16)
            g = self.group
            if len(self._chunks) == 1:
                y = torch.ops.aten._weight_int8pack_mm(xb, self._chunks[0], self._chunk_scales[0])
            else:                                  # group-wise: sum the chunks in fp32
                y = sum(torch.ops.aten._weight_int8pack_mm(xb[:, c * g:(c + 1) * g].contiguous(), qc, sc).float()
                        for c, (qc, sc) in enumerate(zip(self._chunks, self._chunk_scales)))
        elif self.kernel == "int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), self._packed,
                                                          self._kg, self._sz)
        elif self.kernel == "int4triton":
            from afford.models.triton_int4 import int4_mm
            y = int4_mm(x2.to(torch.bfloat16).contiguous(), self._p4, self._s32, self._z32, self.group)
        elif self.kernel == "int8triton":
            from afford.models.triton_int8 import int8_mm
            y = int8_mm(x2.to(torch.bfloat16).contiguous(), self.codes, self._s16, self.group)
        elif self.kernel == "int4cuda" and self._row is not None and x2.shape[0] == 1:
            from afford.models.triton_int4 import int4_mm
            y = int4_mm(x2.to(torch.bfloat16).contiguous(), *self._row, self.group)
        elif self.kernel == "int4cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self._packed, self._kg, self._sz)
        else:   # same numbers as the kernels: bf16 activations, exact dequantized weights, fp32 accumulate
            y = x2.to(torch.bfloat16).float() @ dequantize(self.codes, self.scales.float(),
                                                          None if self.zeros is None else self.zeros.float()).t()
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def error_bound(self) -> torch.Tensor:
        """Per-element bound on |W - Q(W)|, (N, K): half a quantization step of the weight's group, plus
        (int4) the bf16 rounding of the group's zero point."""
        b = self.scales / 2
        if self.zeros is not None:
            b = b + self.zeros.abs() * 2 ** -8
        return b.repeat_interleave(self.group, dim=1)


def fuse_quantized(linears: list[QuantLinear]) -> QuantLinear | None:
    """One QuantLinear computing the given ones side by side (q|k|v, gate|up: one kernel call instead of
    several): codes stacked along the outputs, each matrix's scales and zeros repeated down to the finest
    group among them, so every weight dequantizes to exactly the value it had. None when the groups do not
    nest or the formats differ."""
    g = min(m.group for m in linears)
    if len({m.bits for m in linears}) != 1 or len({m.in_features for m in linears}) != 1 \
            or any(m.group % g for m in linears) or len({m.zeros is None for m in linears}) != 1:
        return None

    def finer(t, m):
        return t.repeat_interleave(m.group // g, dim=1)
    scales = torch.cat([finer(m.scales, m) for m in linears])
    zeros = None if linears[0].zeros is None else torch.cat([finer(m.zeros, m) for m in linears])
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, device=m.codes.device)
                          for m in linears])
    fused = QuantLinear(torch.cat([m.codes for m in linears]), scales, zeros, linears[0].bits, bias)
    fused.sizes = [m.out_features for m in linears]
    return fused


def quantizable(model, head: bool = False) -> list[str]:
    """Names of the matrices that get quantized: every linear layer of the blocks, and the LM head where
    `head` (the embeddings stay in full precision -- a tied head gets its own low-bit copy, the lookup keeps the
    table -- and so do MoE routers: a low-bit router would move tokens between experts)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")
             and not n.endswith((".mlp.gate", ".shared_expert_gate"))]
    return names + ["lm_head"] * (head and isinstance(model.lm_head, nn.Linear))


def quantize_model(model, bits: int, group: int | str = "auto", tau: float = 0.15, head: bool = False) -> dict[str, int]:
    """Replace the blocks' nn.Linear layers (and the LM head's, with head=True) in place; returns the group
    size chosen per matrix."""
    if bits not in (4, 8):
        raise ConfigError(f"bits must be 4 or 8, got {bits}")
    if group not in ("auto", "per-channel"):
        try:
            group = int(group)
        except (TypeError, ValueError):
            raise ConfigError(f"group must be auto, per-channel or an integer, got {group!r}") from None
    chosen = {}
    for name in quantizable(model, head):
        parent, _, leaf = name.rpartition(".")
        lin = model.get_submodule(name)
        if isinstance(group, int) and lin.in_features % group:
            raise ConfigError(f"group size {group} does not divide {name}'s input dimension {lin.in_features}")
        ql = QuantLinear.from_linear(lin, bits, group, tau)
        setattr(model.get_submodule(parent), leaf, ql)
        chosen[name] = ql.group
    return chosen


def quant_settings(model) -> dict | None:
    """{"bits", "groups": {matrix name: group}} read off the model's QuantLinear layers; None if it has none."""
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not qmods:
        return None
    return {"bits": next(iter(qmods.values())).bits, "groups": {n: m.group for n, m in qmods.items()}}


def quant_bytes(model) -> int:
    """Bytes of weights one decode step reads: low-bit codes at their bit width plus bf16 scales/zeros,
    every full-precision parameter, but not the input embedding table (a step reads one row of it) —
    unless it is tied to the LM head, which reads all of it."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.codes.numel() * m.bits // 8 + m.scales.numel() * 2 * (2 if m.zeros is not None else 1)
    embed = model.model.embed_tokens.weight
    head = getattr(model.lm_head, "weight", None)
    for p in model.parameters():                # tied parameters are listed once
        if p is not embed or p is head:
            total += p.numel() * p.element_size()
    return total


def save_quantized(model, out, extra_files=()) -> None:
    """A quantized checkpoint: model.safetensors (full-precision tensors plus, per quantized matrix,
    .qweight (int8 codes, or int4 codes two per byte), .scales and .zeros in bf16), quantization.json
    (format version, bits, the group chosen per matrix) and config.json."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors, groups = {}, {}
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, m in qmods.items():
        codes = m.codes
        if m.bits == 4:
            u = codes.to(torch.uint8)
            codes = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()                  # (N, K/2)
        tensors[f"{name}.qweight"] = codes
        tensors[f"{name}.scales"] = m.scales.to(torch.bfloat16).contiguous()
        if m.zeros is not None:
            tensors[f"{name}.zeros"] = m.zeros.to(torch.bfloat16).contiguous()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().contiguous()
        groups[name] = m.group
    for n, p in model.state_dict().items():
        owner = n.rsplit(".", 1)[0]
        if owner in qmods or (n == "lm_head.weight" and model.cfg.tie_word_embeddings):
            continue
        tensors[n] = p.detach().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    bits = next(iter(qmods.values())).bits
    (out / "quantization.json").write_text(json.dumps({"format": "afford-quant", "version": FORMAT_VERSION,
                                                       "bits": bits, "groups": groups}, indent=1) + "\n")
    cfg = model.cfg.to_hf(str(next(model.parameters()).dtype).replace("torch.", ""))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in extra_files:
        shutil.copy(f, out / Path(f).name)


def load_quantized(path, model, state: dict) -> None:
    """Install the QuantLinear layers of a quantized checkpoint into a freshly built model."""
    import json
    meta = json.loads((path / "quantization.json").read_text())
    if meta.get("format") != "afford-quant" or meta.get("version") != FORMAT_VERSION:
        raise ConfigError(f"{path} holds a quantized checkpoint of format {meta.get('format')!r} version "
                          f"{meta.get('version')!r}; this afford reads afford-quant version {FORMAT_VERSION}: "
                          f"quantize the original model again with `afford quantize`")
    bits = meta["bits"]
    for name, group in meta["groups"].items():
        codes = state.pop(f"{name}.qweight")
        if bits == 4:
            codes = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(codes.shape[0], -1)   # (N, K)
        codes = codes.to(torch.int8)
        zeros = state.pop(f"{name}.zeros", None)
        ql = QuantLinear(codes, state.pop(f"{name}.scales").float(), zeros.float() if zeros is not None else None,
                         bits, state.pop(f"{name}.bias", None))
        if ql.group != group:
            raise ConfigError(f"{path}: {name} has scales for group {ql.group}, metadata says {group}")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, ql)


__all__ = ["QuantLinear", "quantize", "dequantize", "choose_group", "quantize_model", "quant_settings", "save_quantized",
           "fuse_quantized",
           "load_quantized", "FORMAT_VERSION"]
