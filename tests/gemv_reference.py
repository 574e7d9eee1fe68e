"""The one-row GEMV's reference in torch, shared by the tests that check afford/models/triton_gemv.py's kernels in
Triton's interpreter (tests/test_graphs.py) and on the card (tests/test_gpu.py)."""
import torch.nn.functional as F


def gemv_reference(x, w, add=None, norm=None, swiglu=False, eps=1e-5):
    """(y, h): h = x + add (x without add), y = RMSNorm(h) @ w^T in fp32 (the norm only with its weight `norm`),
    silu(gate) * up of y's halves with swiglu."""
    h = x + add if add is not None else x
    v = F.rms_norm(h.float(), (h.shape[-1],), norm.float(), eps) if norm is not None else h.float()
    y = v @ w.float().t()
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y, h
