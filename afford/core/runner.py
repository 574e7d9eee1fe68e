"""ModelRunner: owns the model and its paged K/V tensors and runs one batched forward over sequences of
different lengths, each feeding a different number of new tokens (prefill: its prompt; decode: 1;
speculative verification: 1 + k). The fed tokens are flattened into 1-D inputs (N tokens, no padding)
held in persistent buffers; the attention backend turns the block tables into its metadata once per
forward. The runner only READS block tables: the scheduler (or a proposer, for its own pool) allocates
every block a forward writes and hands the copy-on-write copies to `copy_blocks` first.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from afford.attention import ForwardBatch, get_backend
from afford.config import ConfigError
from afford.kv.paged import BlockPool, table_slots
from afford.models.native import NativeDecoder
from afford.models.quant import quant_bytes
from afford.models.transformer import Transformer


def default_attention(device: torch.device) -> str:
    """The backend `attention="auto"` picks: in-place paged reads on the CPU (benchmarks/decode_vs_hf.py
    measures it against the gather + SDPA reference), the block-table kernel (Triton) that CUDA graphs
    capture elsewhere."""
    return "cpu_paged" if device.type == "cpu" else "paged"


class StepBuffers:
    """Persistent 1-D input buffers (token ids, positions, slot mapping), grown on demand and reused every
    forward. On the CPU they are numpy-backed (filled from Python lists without a tensor per list); on a
    GPU the host side is pinned, and `upload()` copies it whole (one contiguous copy, non_blocking) into the
    device buffers when an eager forward needs them -- a graph replay reads the host side itself; the next
    fill waits for that copy's event before it writes the host side again."""

    def __init__(self, device: torch.device, capacity: int = 256):
        self.device = device
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        self.host = np.zeros((3, capacity), dtype=np.int64)                     # ids, positions, slots
        host_t = torch.from_numpy(self.host)
        if self.device.type == "cuda":
            host_t = host_t.pin_memory()
            self.host = host_t.numpy()
            self.dev = torch.zeros(3, capacity, dtype=torch.long, device=self.device)
        else:
            self.dev = host_t
        self.host_t = host_t
        self.views: dict[int, tuple[torch.Tensor, ...]] = {}   # n -> the first n of each row (slicing costs ~9 us)
        self.copied = torch.cuda.Event() if self.device.type == "cuda" else None

    def fill(self, n: int, ids, positions, slots) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if n > self.capacity:
            self._alloc(max(n, 2 * self.capacity))
        h = self.host
        if self.copied is not None:
            self.copied.synchronize()            # the last forward's copy has left the host buffer
        h[0, :n], h[1, :n], h[2, :n] = ids, positions, slots
        views = self.views.get(n)
        if views is None:
            views = self.views[n] = (self.dev[0, :n], self.dev[1, :n], self.dev[2, :n])
        return views

    def upload(self) -> None:
        """The filled host side into the device views fill() returned (a no-op on the CPU: they are one)."""
        if self.copied is not None:
            self.dev.copy_(self.host_t, non_blocking=True)
            self.copied.record()


def kv_pool_tensors(layers: int, slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                    device: torch.device, mmap_dir: str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The paged K/V pool: per layer (slots, KV, D) for K and for V, zeros. With mmap_dir, all of it is one
    memory-mapped file in that folder -- the slow tier of sparse attention on disk, paged in by the OS as
    blocks are read, not held in RAM -- unlinked at once, so nothing is left behind when the process
    ends (the mapping keeps it until then)."""
    if mmap_dir is None:
        return [(torch.zeros(slots, kv_heads, head_dim, device=device, dtype=dtype),
                 torch.zeros(slots, kv_heads, head_dim, device=device, dtype=dtype)) for _ in range(layers)]
    if device.type != "cpu":
        raise ConfigError(f"kv_mmap_dir maps the KV pool into host memory; the model is on {device}: use it on "
                          f"the CPU")
    folder = Path(mmap_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="afford-kv-", suffix=".bin", dir=folder)
    except OSError as e:
        raise ConfigError(f"kv_mmap_dir {str(folder)!r}: cannot create the KV file there ({e.strerror}); give a "
                          f"writable folder") from e
    os.close(fd)
    try:
        flat = torch.from_file(name, shared=True, size=layers * 2 * slots * kv_heads * head_dim, dtype=dtype)
    finally:
        os.unlink(name)
    pools = flat.view(layers, 2, slots, kv_heads, head_dim)
    return [(pools[i, 0], pools[i, 1]) for i in range(layers)]


class ModelRunner:
    def __init__(self, model: Transformer, pool: BlockPool, attention: str = "auto", native: bool = True,
                 graphs: bool = True, max_batch: int = 64, max_q: int = 1, attention_options: dict | None = None,
                 kv_mmap_dir: str | None = None):
        """graphs: on CUDA with the paged backend, forwards of up to max_batch sequences feeding up to max_q
        tokens each replay CUDA graphs (afford/core/graphs.py); elsewhere they run eagerly. kv_mmap_dir: the
        K/V pool lives in a memory-mapped file there instead of anonymous memory (kv_pool_tensors)."""
        self.model = model
        self.pool = pool
        cfg = model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        n_slots = (pool.num_blocks + 1) * pool.block_size        # + one scratch block: graph padding writes there
        self.kv = kv_pool_tensors(cfg.num_layers, n_slots, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device,
                                  kv_mmap_dir)
        self.backend = get_backend(default_attention(self.device) if attention == "auto" else attention,
                                   **(attention_options or {}))
        if hasattr(self.backend, "max_ctx"):                   # the paged backend splits contexts up to this
            self.backend.max_ctx = pool.block_size * min(pool.num_blocks, -(-(model.max_len + max_q) // pool.block_size))
        self.buffers = StepBuffers(self.device)
        # every forward as one C++ call on afford's batch-invariant kernels (afford/models/native.py)
        self.native = NativeDecoder.build(model, self.kv, pool.block_size, self.backend.name) if native else None
        self.graphs = None
        if graphs and self.device.type == "cuda" and self.backend.name == "paged":
            from afford.core.graphs import GraphRunner
            self.graphs = GraphRunner(self, max_batch, max_q)
        self.weight_bytes = quant_bytes(model)     # bytes of weights one forward reads (low-bit counted as such)
        if self.native is not None:                # ... bf16 panels: half of each matrix's fp32 bytes
            self.weight_bytes -= self.native.bytes_saved
        self.kv_bytes_per_token = cfg.kv_bytes_per_token(self.kv[0][0].element_size())

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Apply the scheduler's copy-on-write (src, dst) block copies before the forward that writes."""
        bs = self.pool.block_size
        self.backend.copy_blocks(copies)
        for src, dst in copies:
            for k, v in self.kv:
                k[dst * bs:(dst + 1) * bs] = k[src * bs:(src + 1) * bs]
                v[dst * bs:(dst + 1) * bs] = v[src * bs:(src + 1) * bs]

    def _tables(self, seq_ids: list[int]) -> list[list[int]]:
        try:
            return [self.pool.tables[s] for s in seq_ids]
        except KeyError as e:
            raise RuntimeError(f"sequence {e.args[0]} has no KV blocks: the scheduler (pool.prepare_write) "
                               f"allocates them before a forward; the runner only reads tables") from None

    # ---- per-phase input preparation ----
    def prepare_decode(self, seq_ids: list[int], positions: list[int], ids: list[int]) -> tuple[ForwardBatch, torch.Tensor]:
        """One token per sequence at `positions`."""
        bs = self.pool.block_size
        tbls = self._tables(seq_ids)
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tbls, positions)]
        n = len(seq_ids)
        ids_t, pos_t, slot_t = self.buffers.fill(n, ids, positions, slots)
        return ForwardBatch("decode", list(seq_ids), list(positions), [1] * n, tbls, bs, slot_t, pos_t), ids_t

    def prepare_ragged(self, seq_ids: list[int], starts: list[int],
                       tokens: list[list[int]]) -> tuple[ForwardBatch, torch.Tensor]:
        """Prefill (every start 0) or verify (1 + k tokens after each sequence's cache)."""
        bs = self.pool.block_size
        tbls = self._tables(seq_ids)
        lens = [len(t) for t in tokens]
        pos = [p for s, n in zip(starts, lens) for p in range(s, s + n)]                # (N,)
        slots = [x for t, s, n in zip(tbls, starts, lens) for x in table_slots(t, bs, s, s + n)]
        flat = [t for toks in tokens for t in toks]
        ids_t, pos_t, slot_t = self.buffers.fill(len(flat), flat, pos, slots)
        phase = "prefill" if not any(starts) else "verify"
        return ForwardBatch(phase, list(seq_ids), list(starts), lens, tbls, bs, slot_t, pos_t), ids_t

    @torch.inference_mode()
    def run(self, batch: ForwardBatch, ids: torch.Tensor, logits_rows: list[int] | None = None,
            ids_dev: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (R, V) float32 of the fed tokens at flat indices `logits_rows` (None: every fed token).
        ids_dev: the fed token ids as a tensor on the model's device, in place of the host ones (async
        scheduling feeds the step before's argmax without reading it)."""
        if self.graphs is not None:                                                # a CUDA graph's replay
            logits = self.graphs.run(batch, self.buffers.host[:, :batch.num_tokens], logits_rows, ids_dev)
            if logits is not None:
                return logits
        self.buffers.upload()                                                      # eager: inputs to the device
        if ids_dev is not None:
            ids.copy_(ids_dev)
        rows = None if logits_rows is None else torch.tensor(logits_rows or [0], device=self.device)
        if self.native is not None and not batch.padded:                           # one C++ call
            logits = self.native.step(ids, batch, rows)                           # (R, V); [] -> one row
            return logits if logits_rows != [] else logits[:0]
        meta = self.backend.prepare_metadata(batch, self.kv)
        if logits_rows == []:                                                      # prompt chunks only
            self.model.hidden(ids, batch.positions, meta)
            return torch.empty(0, self.model.cfg.vocab_size, device=self.device)
        return self.model.logits(ids, batch.positions, meta, rows).float()         # (R, V)

    def prepare(self, seq_ids: list[int], starts: list[int], tokens: list[list[int]]) -> tuple[ForwardBatch, torch.Tensor]:
        if all(len(t) == 1 for t in tokens):
            return self.prepare_decode(seq_ids, starts, [t[0] for t in tokens])
        return self.prepare_ragged(seq_ids, starts, tokens)

    @torch.inference_mode()
    def segment(self, seq_ids: list[int], starts: list[int], tokens: list[list[int]], lo: int, hi: int,
                x: torch.Tensor | None = None, logits_rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A multi-exit model's layers lo..hi-1 (S2D): feed sequence i's len(tokens[i]) positions from
        starts[i], entering as the residual stream x (N, hidden) -- or, when lo == 0, as the embeddings of
        `tokens` (otherwise only their lengths count). Their K/V at those layers is written (blocks allocated
        first, as for `forward`). Returns the residual stream after layer hi - 1 (N, hidden) and the logits
        (R, V) float32 at the flat rows `logits_rows` through the shared final norm and head (None: none)."""
        if lo > 0 and (x is None or x.shape[0] != sum(len(t) for t in tokens)):
            raise ValueError("segment: layers past the first continue from x, one residual row per fed token")
        batch, ids = self.prepare(seq_ids, starts, tokens)
        self.buffers.upload()
        rows = torch.tensor(logits_rows or [], dtype=torch.long)
        if self.native is not None:
            return self.native.segment(ids, None if lo == 0 else x.contiguous(), batch, lo, hi, rows)
        meta = self.backend.prepare_metadata(batch, self.kv)
        h = self.model.model.embed_tokens(ids) if lo == 0 else x.to(self.dtype)          # (N, hidden)
        h = self.model.run_layers(h, batch.positions, meta, lo, hi)
        if not logits_rows:
            return h, torch.empty(0, self.model.cfg.vocab_size)
        rows = rows.to(self.device)
        return h, self.model.lm_head(self.model.model.norm(h.index_select(0, rows))).float()   # (R, V)

    @torch.inference_mode()
    def draft_exits(self, seq_ids: list[int], starts: list[int], tokens: list[list[int]], ks: list[int],
                    fills: list[list[int]], bounds: list[int], thresholds: list[float], fixed: int, probe: bool,
                    resid: torch.Tensor):
        """A sorted draft's greedy drafts in one native call (see NativeDecoder.draft_exits); None without
        the native forward."""
        if self.native is None:
            return None
        batch, ids = self.prepare(seq_ids, starts, tokens)
        return self.native.draft_exits(ids, batch, ks, fills, bounds, thresholds, fixed, probe, resid)

    @torch.inference_mode()
    def draft_greedy(self, seq_ids: list[int], starts: list[int], tokens: list[list[int]],
                     ks: list[int]) -> list[list[int]] | None:
        """Greedy drafting as one native call: feed tokens[i] at starts[i].., take the argmax, feed it back,
        ks[i] tokens in all (every block those forwards write allocated first). None where there is no
        native forward (the caller then drafts forward by forward)."""
        if self.native is None:
            return None
        batch, ids = self.prepare(seq_ids, starts, tokens)
        return self.native.draft_greedy(ids, batch, ks)

    def forward(self, seq_ids: list[int], starts: list[int], tokens: list[list[int]],
                logits_rows: list[list[int]] | None = None, ids_dev: torch.Tensor | None = None) -> torch.Tensor:
        """Feed tokens[i] at positions starts[i].. of sequence seq_ids[i]; their K/V are written into the
        pool (whose blocks must already be allocated). logits_rows[i]: which of sequence i's fed tokens need
        logits (default: its last). Returns logits (sum of len(logits_rows[i]), V) in float32, in order.
        ids_dev: one token per sequence, already on the device (then `tokens` only give the lengths)."""
        batch, ids = self.prepare(seq_ids, starts, tokens)
        at, flat = 0, []
        for i, toks in enumerate(tokens):
            flat.extend(at + r for r in (logits_rows[i] if logits_rows else [len(toks) - 1]))
            at += len(toks)
        if ids_dev is not None and batch.num_tokens != len(seq_ids):
            raise ValueError("ids_dev feeds one token per sequence (a decode step)")
        rows = None if flat == list(range(at)) else flat
        return self.run(batch, ids, rows) if ids_dev is None else self.run(batch, ids, rows, ids_dev=ids_dev)
