"""Block-sparse decode attention over a two-tier KV store (NOSA / InfLLM-V2, ../shared/reference/
other-methods.md §2-3) -- LOSSY once a context has more blocks than the budget.

Blocks are the KV pool's blocks (`block_size`; NOSA uses 64 tokens). Each full block keeps a compressed
key, the mean of its keys, computed once when the block fills. A decode query of a sequence longer than
`dense_below` tokens attends to `budget` blocks (the same for every head of a layer):
- always the first `sink` block(s) and the last `local` blocks (the one being written among them);
- of the rest, a `locality` share by a query-independent score -- the attention mass each block received
  when it was last attended (an exponential moving average) -- so consecutive steps select mostly the same
  blocks;
- the remaining budget by an upper bound of q . k over the block's keys, summed over the heads
  (`score="bound"`, the default, after Quest: per channel the block's min and max key, sum_d max(q_d min_d,
  q_d max_d) -- a block holding one key that matches the query is not averaged away among 63 that do not),
  or by q . its compressed key (`score="mean"`, InfLLM-V2's mean-pooled key: it lost a pass key 4K tokens
  back that the bound keeps, BENCHMARKS.md).
Full selected blocks are read through the fast tier (kv/offload.py): only those not already resident move.
Prefill and verification rows attend densely (the cpu_paged path). With a budget that covers every
block the output equals dense attention.

Counters (read by the engine's stats and /metrics): K/V bytes attention read and what dense attention would
have read, blocks moved into the fast tier, its hits, misses and size.
"""
from __future__ import annotations

import torch

from afford.attention.backend import AttnMetadata, register
from afford.attention.paged_cpu import PagedCPUBackend
from afford.kv.offload import FastTier


@register("sparse")
class SparseBackend(PagedCPUBackend):
    sink, local, decay = 1, 2, 0.9

    def __init__(self, budget: int = 16, locality: float = 0.25, dense_below: int | None = None,
                 fast_blocks: int | None = None, max_seqs: int = 1, score: str = "bound"):
        if budget < self.sink + self.local + 1:
            raise ValueError(f"sparse_budget must be >= {self.sink + self.local + 1} blocks (sink + local window + 1)")
        if not 0.0 <= locality <= 1.0:
            raise ValueError(f"sparse_locality must be in [0, 1], got {locality}")
        if score not in ("mean", "bound"):
            raise ValueError(f"sparse_score must be 'mean' or 'bound', got {score!r}")
        if fast_blocks is not None and fast_blocks < budget:
            raise ValueError(f"sparse_fast_blocks ({fast_blocks}) must hold one query's sparse_budget ({budget})")
        self.budget, self.locality, self.dense_below, self.score = budget, locality, dense_below, score
        self.fast_blocks = fast_blocks or budget * max(max_seqs, 1)
        self.kmean = self.kmin = self.kmax = self.mass = self.tier = None
        self.read_bytes = self.dense_bytes = 0          # K/V bytes decode attention read / dense would have read

    def _alloc(self, kv) -> None:
        k_pool = kv[0][0]
        n, KV, D = k_pool.shape
        blocks = n // self._bs
        shape = (len(kv), blocks, KV, D)                     # a block's compressed key(s): what its score reads
        if self.score == "bound":
            self.kmin = torch.zeros(shape, dtype=k_pool.dtype, device=k_pool.device)
            self.kmax = torch.zeros_like(self.kmin)
        else:
            self.kmean = torch.zeros(shape, dtype=k_pool.dtype, device=k_pool.device)
        self.mass = torch.zeros(len(kv), blocks, dtype=torch.float32, device=k_pool.device)
        # never larger than the pool it caches; its buffers are allocated at the first sparse query
        self.tier = FastTier(min(self.fast_blocks, blocks), len(kv), self._bs, KV, D, k_pool.dtype, k_pool.device,
                             lazy=True)
        self.token_bytes = 2 * KV * D * k_pool.element_size()               # K and V of one token, one layer

    def prepare(self, meta: AttnMetadata) -> None:
        b = meta.batch
        self._bs = bs = b.block_size
        if self.tier is None:
            self._alloc(meta.kv)
        pos, slots = b.positions, meta.slots
        if meta.write_rows is not None:
            pos = pos.index_select(0, meta.write_rows)
        written = torch.unique(slots // bs)
        self.tier.invalidate(written.tolist())                   # their K/V changes now: no stale fast copy
        self.mass[:, slots[pos % bs == 0] // bs] = 0.0           # a block (re)started: its history is gone
        meta.extra["completed"] = slots[pos % bs == bs - 1] // bs       # blocks this forward fills
        threshold = self.budget * bs if self.dense_below is None else self.dense_below
        if b.phase == "decode":
            meta.extra["sparse"] = [n > threshold for n in b.context_lens]
            return
        super().prepare(meta)

    def forward(self, q, k, v, layer, meta):
        if "sparse" in meta.extra:
            self.write_kv(k, v, layer, meta)
            o = self._decode(q, layer, meta)
        else:
            o = super().forward(q, k, v, layer, meta)
        done = meta.extra["completed"]
        if len(done):
            k_pool = meta.kv[layer][0]
            keys = k_pool.view(-1, self._bs, *k_pool.shape[1:]).index_select(0, done)        # (blocks, bs, KV, D)
            if self.kmin is not None:
                self.kmin[layer, done], self.kmax[layer, done] = keys.amin(1), keys.amax(1)
            else:
                self.kmean[layer, done] = keys.mean(1)
        return o

    def select(self, layer: int, table: list[int], n: int, q: torch.Tensor, kv_of_head: torch.Tensor) -> list[int]:
        """The logical blocks (in order) a query of a sequence with n tokens attends to."""
        bs = self._bs
        nb = -(-n // bs)
        keep = set(range(min(self.sink, nb))) | set(range(max(nb - self.local, 0), nb))
        middle = [i for i in range(nb) if i not in keep]
        room = self.budget - len(keep)
        if room >= len(middle):
            return sorted(keep | set(middle))
        phys = torch.tensor([table[i] for i in middle], device=q.device)
        n_loc = int(self.locality * room + 0.5)             # half up: a share of 0.5 of one block is that block
        if n_loc:
            top = torch.topk(self.mass[layer, phys], n_loc).indices.tolist()
            keep |= {middle[i] for i in top}
        rest = [i for i, b in enumerate(middle) if b not in keep]
        if room - n_loc > 0 and rest:
            pick = phys[rest]
            if self.kmin is None:
                keys = self.kmean[layer].index_select(0, pick)[:, kv_of_head]               # (m, H, D)
                score = torch.einsum("hd,mhd->m", q.to(keys.dtype), keys)                   # (m,)
            else:                                        # Quest's bound on max_k q . k, summed over the heads
                qd = q.to(self.kmin.dtype)
                lo = self.kmin[layer].index_select(0, pick)[:, kv_of_head] * qd             # (m, H, D)
                hi = self.kmax[layer].index_select(0, pick)[:, kv_of_head] * qd
                score = torch.maximum(lo, hi).sum((1, 2))
            top = torch.topk(score, min(room - n_loc, len(rest))).indices.tolist()
            keep |= {middle[rest[i]] for i in top}
        return sorted(keep)

    def _decode(self, q, layer, meta):
        b, bs = meta.batch, self._bs
        k_pool, v_pool = meta.kv[layer]
        H, (KV, D) = q.shape[1], k_pool.shape[1:]
        kv_of_head = torch.arange(H, device=q.device) // (H // KV)
        outs = []
        for i, (table, n, sparse) in enumerate(zip(b.tables, b.context_lens, meta.extra["sparse"])):
            nb = -(-n // bs)
            picked = self.select(layer, table, n, q[i], kv_of_head) if sparse else list(range(nb))
            full = [j for j in picked if (j + 1) * bs <= n]
            tail = nb - 1 if n % bs else None                     # the block being written: read from the pool
            if sparse:
                fast = self.tier.fetch(layer, [table[j] for j in full], k_pool, v_pool)
                kc, vc = self.tier.k[layer].index_select(0, fast), self.tier.v[layer].index_select(0, fast)
            else:
                idx = torch.tensor([table[j] for j in full], device=q.device, dtype=torch.long)
                kc = k_pool.view(-1, bs, KV, D).index_select(0, idx)
                vc = v_pool.view(-1, bs, KV, D).index_select(0, idx)
            kc, vc = kc.reshape(-1, KV, D), vc.reshape(-1, KV, D)                          # (len(full) * bs, KV, D)
            if tail is not None:
                s0 = table[tail] * bs
                kc = torch.cat([kc, k_pool[s0:s0 + n - tail * bs]])
                vc = torch.cat([vc, v_pool[s0:s0 + n - tail * bs]])
            kh, vh = kc[:, kv_of_head].to(q.dtype), vc[:, kv_of_head].to(q.dtype)         # (T, H, D)
            p = torch.softmax(torch.einsum("hd,thd->ht", q[i], kh) * D ** -0.5, -1)        # (H, T)
            outs.append(torch.einsum("ht,thd->hd", p, vh))                                 # (H, D)
            if sparse:
                got = p.sum(0)[:len(full) * bs].view(len(full), bs).sum(1) / H               # mass per full block
                phys = torch.tensor([table[j] for j in full], device=q.device, dtype=torch.long)
                self.mass[layer, phys] = self.decay * self.mass[layer, phys] + (1 - self.decay) * got.float()
            self.read_bytes += (kh.shape[0] + (nb if sparse else 0)) * self.token_bytes
            self.dense_bytes += n * self.token_bytes
        return torch.stack(outs)                                                          # (B, H, D)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """A copy-on-write copy carries its block's compressed key and attention mass."""
        if self.mass is None or not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.mass.device)
        dst = torch.tensor([d for _, d in copies], device=self.mass.device)
        for keys in (self.kmean, self.kmin, self.kmax):
            if keys is not None:
                keys[:, dst] = keys[:, src]
        self.mass[:, dst] = self.mass[:, src]
        self.tier.invalidate(dst.tolist())

    def counters(self) -> dict:
        t = self.tier
        return {"read_bytes": self.read_bytes, "dense_bytes": self.dense_bytes,
                "moved_bytes": t.bytes_moved if t else 0, "hits": t.hits if t else 0,
                "misses": t.misses if t else 0, "fast_blocks": t.size if t else 0}
