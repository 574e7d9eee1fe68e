"""CUDA graphs for decode, speculative verify and the draft's forwards (after nano-vllm's
`ModelRunner.capture_cudagraph` / `run_model` and mini-sglang's `GraphRunner`).

A forward where every sequence feeds at most `max_q` tokens after a cached prefix (decode: 1; verify:
1 + k; a draft step: 1) runs as the replay of a graph captured for (batch bucket, q): the batch is padded
up to the bucket (1, 2, 4, 8, 16, 32, 48, ...), each sequence's tokens up to q. Inputs live in static
buffers -- token ids, positions, slots (padding: -1, which the KV write sends to a scratch slot),
the row -> sequence map, each row's context limit, and the block tables -- filled from the host (pinned)
with one non_blocking copy each; the graph writes its logits into one static buffer shared by all graphs.
Graphs are captured on first use of their shape, into one shared memory pool (they never run at once and
keep no memory alive between replays). Prefill, batches above the largest bucket and rows longer than
max_q run eagerly.

`capture=False` runs the very same static forward without a graph: on the CPU that is how the padding,
the buffers and the -1 slots are tested (tests/test_graphs.py).
"""
from __future__ import annotations

import numpy as np
import torch


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class _Shape:
    """Static buffers of one (bucket, q) graph: host (5, R) int64 pinned -- ids, positions, slots, row ->
    sequence, row limit -- and their device copy, whose rows the captured forward reads."""

    def __init__(self, bucket: int, q: int, device: torch.device):
        self.bucket, self.q, self.rows = bucket, q, bucket * q
        host = torch.zeros(5, self.rows, dtype=torch.long)
        if device.type == "cuda":
            host = host.pin_memory()
        self.host_t, self.host = host, host.numpy()
        self.dev = host if device.type != "cuda" else torch.zeros(5, self.rows, dtype=torch.long, device=device)
        self.row_of_seq = np.repeat(np.arange(bucket), q)          # row -> its sequence (padding too)
        self.graph = None
        self.failed = False                                         # its capture failed: it runs eagerly


class GraphRunner:
    def __init__(self, runner, max_batch: int, max_q: int = 9, capture: bool = True):
        self.runner = runner
        model, pool = runner.model, runner.pool
        self.device = runner.device
        self.capture = capture and self.device.type == "cuda"
        self.buckets = bucket_sizes(max_batch)
        self.max_q = max_q
        self.block_size = pool.block_size
        self.scratch = pool.num_blocks * pool.block_size           # the runner's block past the pool's last
        self.max_blocks = min(pool.num_blocks, -(-(model.max_len + max_q) // pool.block_size))
        tables = torch.zeros(self.buckets[-1], self.max_blocks, dtype=torch.int32)
        if self.device.type == "cuda":
            tables = tables.pin_memory()
        self.tables_host_t, self.tables_host = tables, tables.numpy()
        self.tables = tables if self.device.type != "cuda" else torch.zeros_like(tables, device=self.device)
        self.table_rows: list[list[int]] = [[] for _ in range(self.buckets[-1])]   # the table each row holds
        self.logits = torch.zeros(self.buckets[-1] * max_q, model.cfg.vocab_size, device=self.device)
        self.shapes: dict[tuple[int, int], _Shape] = {}
        self.mempool = torch.cuda.graph_pool_handle() if self.capture else None
        self.copied = torch.cuda.Event() if self.device.type == "cuda" else None   # host buffers free again
        self.replays = 0

    def applies(self, batch) -> tuple[int, int] | None:
        """(bucket, q) of the graph that runs this forward, or None (it runs eagerly)."""
        n, q = len(batch.query_lens), max(batch.query_lens)
        if q > self.max_q or n > self.buckets[-1] or (q > 1 and not all(batch.starts)):
            return None
        if any(len(t) > self.max_blocks for t in batch.tables):
            return None
        return next(b for b in self.buckets if b >= n), q

    def run(self, batch, host: np.ndarray, logits_rows: list[int] | None,
            ids_dev: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits (R, V) float32 of the flat fed tokens `logits_rows` (None: all), or None when this forward
        does not fit a graph. host: (3, N) ids, positions, slots of the fed tokens (the runner's buffers).
        ids_dev: a decode's fed ids on the device (copied in after the host rows; async scheduling)."""
        key = self.applies(batch)
        if key is None or logits_rows == []:
            return None
        bucket, q = key
        shape = self.shapes.get(key)
        if shape is None:
            shape = self.shapes[key] = _Shape(bucket, q, self.device)
        if shape.failed:
            return None
        lens = batch.query_lens
        n_seqs, N = len(lens), host.shape[1]
        if q == 1 or all(x == q for x in lens):
            dst = slice(0, N)
        else:                                                     # ragged: token j of sequence i -> row i*q + j
            offs = np.repeat(np.cumsum([0] + lens[:-1]), lens)
            dst = np.repeat(np.arange(n_seqs) * q, lens) + np.arange(N) - offs
        if self.copied is not None:
            self.copied.synchronize()
        h = shape.host
        if N != shape.rows:                                       # padding rows: slot -1, context 1
            h[0], h[1], h[2], h[4] = 0, 0, -1, 1
        h[0, dst], h[1, dst], h[2, dst] = host[0], host[1], host[2]
        h[3] = shape.row_of_seq
        h[4, dst] = host[1] + 1
        tb, held = self.tables_host, self.table_rows
        for i, t in enumerate(batch.tables):
            if held[i] != t:                      # a table changes when it gains (or copies) a block: only then
                tb[i, :len(t)] = t
                held[i] = list(t)
        if self.device.type == "cuda":
            shape.dev.copy_(shape.host_t, non_blocking=True)
            self.tables[:bucket].copy_(self.tables_host_t[:bucket], non_blocking=True)
            self.copied.record()
        if ids_dev is not None:                                   # one token per sequence: rows 0..N-1
            shape.dev[0, :N].copy_(ids_dev)
        if shape.graph is None and self.capture and not shape.failed:
            try:
                self._capture(shape)
            except Exception as e:                # out of memory, an op that cannot be captured: eager, said once
                import logging
                logging.getLogger("afford").warning("CUDA graph capture failed for batch %d x %d tokens (%s: %s); "
                                                    "that shape runs eagerly", bucket, q, type(e).__name__, e)
                shape.failed = True
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                return None
        if shape.graph is not None:
            shape.graph.replay()
        else:
            self._forward(shape)
        self.replays += 1
        if logits_rows is None:
            rows = dst if isinstance(dst, slice) else torch.from_numpy(dst).to(self.device)
        else:
            sel = np.asarray(logits_rows) if isinstance(dst, slice) else dst[logits_rows]
            rows = torch.from_numpy(np.asarray(sel, dtype=np.int64)).to(self.device, non_blocking=True)
        if isinstance(rows, slice):
            return self.logits[rows].clone()
        return self.logits.index_select(0, rows)

    def _forward(self, shape: _Shape) -> None:
        """The static forward: reads only shape's buffers and the tables, writes self.logits[:rows]."""
        model, runner = self.runner.model, self.runner
        d = shape.dev
        meta = runner.backend.prepare_for_capture(runner.kv, d[2], d[1], self.tables[:shape.bucket], d[3], d[4],
                                                  self.block_size, self.scratch, decode=shape.q == 1)
        self.logits[:shape.rows].copy_(model.logits(d[0], d[1], meta))   # (one kernel: copy and widen to fp32)

    def _capture(self, shape: _Shape) -> None:
        self._forward(shape)                        # warm up (Triton compiles, cuBLAS picks); idempotent writes
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            self._forward(shape)
        torch.cuda.synchronize(self.device)
        shape.graph = graph
