"""Triton where it is installed (every CUDA build of torch brings it), None elsewhere: afford's kernels
(attention/triton_paged.py, models/triton_int8.py, triton_int4.py, triton_ops.py, triton_gemv.py) import it
from here and define themselves only when it is there; the CPU runs torch.

Programmatic dependent launch (PDL, Hopper and later): a kernel launched with it may start while the kernel
before it in the stream is still finishing; it must wait (griddepcontrol.wait, `gdc_wait`) before it reads
anything an earlier kernel wrote. The decode step's own kernels -- the one-row GEMVs (which load their first
weights, written by no kernel, before the wait), the fused RoPE + K/V store, paged attention and its merge --
take a `PDL` constexpr and launch with `**pdl_args(tensor)`. Every such kernel waits in all its programs
before it writes or reads a predecessor's output, so an earlier kernel's writes are visible to a later one
through the chain of waits; a kernel launched without PDL (torch's, cuBLAS) waits for the whole stream as
always. On by default where the card has it (AFFORD_PDL=0, or `triton_lib.PDL = False` before a graph is
captured, switches it off): on an H200 it made the batch-1 decode step 1.09-1.18x faster in bf16 and
1.08-1.18x in int4 with the same logits bit for bit (BENCHMARKS.md, GPU decode runs 10 and 11)."""
from __future__ import annotations

import functools
import os

try:
    import triton
    import triton.language as tl
except ImportError:                     # CPU-only installs
    triton = tl = None

PDL = os.environ.get("AFFORD_PDL", "1") != "0"


def available() -> bool:
    return triton is not None


def nvidia(t) -> bool:
    """t lives on an NVIDIA card (inline PTX can run; ROCm builds of torch call their GPUs "cuda" too)."""
    import torch
    return t.is_cuda and torch.version.hip is None


@functools.lru_cache(maxsize=None)
def _pdl_capable(index: int) -> bool:
    import torch
    from triton.language.extra import cuda as tl_cuda
    return torch.version.hip is None and torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(tl_cuda, "gdc_wait")


def torch_current() -> int:
    import torch
    return torch.cuda.current_device()


def pdl_args(t) -> dict:
    """The launch arguments of a PDL-aware kernel for tensors on t's device: the kernel's PDL constexpr, and
    Triton's launch_pdl where PDL is switched on and the card has it (compute capability 9.0+)."""
    if PDL and t.is_cuda and _pdl_capable(t.device.index if t.device.index is not None else torch_current()):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


rope = rope_halves = None
if triton is not None:
    @triton.jit
    def rope(x, partner, c, s, sign):
        """HF's rotate-half RoPE of x, x * cos + cat(-x2, x1) * sin: `partner` holds x's element of the other
        half, `sign` is -1 on the first half; rounded to x's dtype after each product and after the sum as
        torch's separate operators round."""
        dt = x.dtype
        a = (x.to(tl.float32) * c).to(dt).to(tl.float32)
        b = (sign * partner.to(tl.float32) * s).to(dt).to(tl.float32)
        return (a + b).to(dt)

    @triton.jit
    def rope_halves(x1, x2, COS, SIN, pos, stride_cos, i, m, HALF: tl.constexpr):
        """rope() of a head's two halves at once: x1 its elements i, x2 its elements i + HALF (m: which exist),
        cos / sin from the tables' row `pos` -> the rotated (x1, x2)."""
        c1 = tl.load(COS + pos * stride_cos + i, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(COS + pos * stride_cos + HALF + i, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + pos * stride_cos + i, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + pos * stride_cos + HALF + i, mask=m, other=0.0).to(tl.float32)
        return rope(x1, x2, c1, s1, -1.0), rope(x2, x1, c2, s2, 1.0)
