"""A two-tier KV store for block-sparse attention (NOSA, ../shared/reference/other-methods.md §2-3).

The slow tier is the paged pool itself (all K/V of every sequence; on an accelerator it would be host
memory -- here both tiers are CPU memory, and the point is what moves between them). The fast tier is a
bounded buffer of `capacity` blocks per layer: each decode step the sparse backend asks for the blocks it
selected; those already resident are hits, the others are copied in (misses), evicting the least recently
used blocks not needed by this step. A block written again (its sequence grew into it, or it was rolled
back and rewritten) is invalidated, so the fast tier never serves stale K/V.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class FastTier:
    def __init__(self, capacity: int, num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, lazy: bool = False):
        """lazy: allocate the buffers at the first fetch (a backend whose contexts stay short never needs them)."""
        if capacity < 1:
            raise ValueError("the fast tier needs room for at least one block")
        self.capacity, self.block_size = capacity, block_size
        self._shape = (num_layers, capacity, block_size, kv_heads, head_dim)            # (layers, C, bs, KV, D)
        self._dtype, self._device = dtype, device
        self.k = self.v = None
        if not lazy:
            self._allocate()
        self.resident: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(num_layers)]  # block -> slot, LRU
        self.free_slots: list[list[int]] = [list(range(capacity - 1, -1, -1)) for _ in range(num_layers)]
        self.block_bytes = 2 * block_size * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
        self.hits = self.misses = self.bytes_moved = 0

    def _allocate(self) -> None:
        self.k = torch.zeros(self._shape, dtype=self._dtype, device=self._device)
        self.v = torch.zeros(self._shape, dtype=self._dtype, device=self._device)

    def fetch(self, layer: int, blocks: list[int], k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """Make `blocks` (physical pool blocks) resident in this layer's fast tier; returns their fast slots
        (len(blocks),) in order. Only blocks not resident are copied from the pool."""
        if self.k is None:
            self._allocate()
        if len(blocks) > self.capacity:
            raise ValueError(f"a step needs {len(blocks)} blocks but the fast tier holds {self.capacity}")
        res, free, bs = self.resident[layer], self.free_slots[layer], self.block_size
        need = set(blocks)
        slots, missing = [], []
        for b in blocks:
            s = res.get(b)
            if s is None:
                missing.append(b)
                slots.append(-1)
            else:
                res.move_to_end(b)
                slots.append(s)
        self.hits += len(blocks) - len(missing)
        if missing:
            for b in missing:
                if not free:                             # evict the least recently used block this step does not need
                    old = next(x for x in res if x not in need)
                    free.append(res.pop(old))
                res[b] = free.pop()
            src = torch.tensor(missing, device=k_pool.device)
            dst = torch.tensor([res[b] for b in missing], device=k_pool.device)
            kv_shape = k_pool.shape[1:]
            self.k[layer].index_copy_(0, dst, k_pool.view(-1, bs, *kv_shape).index_select(0, src))
            self.v[layer].index_copy_(0, dst, v_pool.view(-1, bs, *kv_shape).index_select(0, src))
            self.misses += len(missing)
            self.bytes_moved += len(missing) * self.block_bytes
            slots = [res[b] for b in blocks]
        return torch.tensor(slots, dtype=torch.long, device=self._device)

    def invalidate(self, blocks) -> None:
        """Blocks whose K/V changed: forget their fast copies in every layer."""
        for res, free in zip(self.resident, self.free_slots):
            for b in blocks:
                s = res.pop(b, None)
                if s is not None:
                    free.append(s)

    @property
    def size(self) -> int:
        """Blocks resident, all layers."""
        return sum(len(r) for r in self.resident)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0
