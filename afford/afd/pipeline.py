"""One attention worker's side of an AFD forward (rank 0's AFDRunner and the other attention workers run the
same loop): its micro-batches' layers, with each layer's FFN half on the FFN workers.

    for layer l:  for micro-batch i:  wait for i's FFN output of layer l-1, add it to the residual,
                                      attention of i at layer l (writes its K/V), norm, route (MoE),
                                      send to the FFN workers (asynchronously)

While the workers run micro-batch i's FFN, this worker runs micro-batch i+1's attention.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from afford.afd.protocol import Link, send, tag


def run_layers(model, pg, ffn_ranks: range, xs: list[torch.Tensor], moe: list[bool],
               attn: Callable[[int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
               attn_s: torch.Tensor | None = None, wait_s: torch.Tensor | None = None,
               link: Link | None = None) -> list[torch.Tensor]:
    """xs: each micro-batch's residual stream entering layer 0 (n_i, hidden); attn(i, layer, x) -> (x plus
    the layer's attention output, its post-attention norm). Returns the streams after the last layer. attn_s /
    wait_s (per layer) accumulate the seconds spent computing here and waiting for the FFN workers. link: an
    emulated network under the sends (protocol.Link)."""
    layers = model.model.layers
    pending: list = [None] * len(xs)
    sends = []
    for li, layer in enumerate(layers):
        for i in range(len(xs)):
            if pending[i] is not None:
                xs[i] = _collect(xs[i], pending[i], wait_s, li - 1)
            t0 = time.perf_counter()
            x, h = attn(i, li, xs[i])                                                    # (n_i, hidden) each
            if moe[li]:
                w, idx = layer.mlp.route(h)                                              # (n_i, k) each
                payload = torch.cat([h.float(), w.float(), idx.float()], dim=-1)        # (n_i, hidden + 2k)
            else:
                payload = h.contiguous()
            payload = payload.cpu()
            xs[i] = x
            t = tag(li, i)
            sends += [(payload, send(pg, payload, r, t, link)) for r in ffn_ranks]
            bufs = [torch.empty(len(h), h.shape[1], dtype=h.dtype) for _ in ffn_ranks]
            pending[i] = [(b, pg.recv([b], r, t)) for r, b in zip(ffn_ranks, bufs)]
            if attn_s is not None:
                attn_s[li] += time.perf_counter() - t0
    last = len(layers) - 1
    xs = [_collect(x, p, wait_s, last) for x, p in zip(xs, pending)]
    for _, work in sends:
        work.wait()
    return xs


def _collect(x: torch.Tensor, pending, wait_s: torch.Tensor | None, layer: int) -> torch.Tensor:
    """x plus every FFN worker's partial output of `layer` (waiting for them)."""
    t0 = time.perf_counter()
    for _, work in pending:
        work.wait()
    if wait_s is not None:
        wait_s[layer] += time.perf_counter() - t0
    partial = pending[0][0]
    for buf, _ in pending[1:]:
        partial = partial + buf
    return x + partial.to(x.device)
