"""Paged KV bookkeeping: a pool of fixed-size blocks, one block table per sequence, reference counts
so forked sequences share their common prefix, copy-on-write when a shared block is written.

This file only does integer bookkeeping; the K/V tensors live in the ModelRunner, which applies the
(src, dst) copies `prepare_write` returns before the forward that writes the tokens.
A slot is `block * block_size + offset`; a sequence's table lists its blocks in token order.
"""
from __future__ import annotations

from collections import deque


def table_slots(table: list[int], block_size: int, start: int, end: int) -> list[int]:
    """Flat slots of positions start..end-1 of the sequence whose block table this is."""
    return [table[i // block_size] * block_size + i % block_size for i in range(start, end)]


class OutOfBlocks(RuntimeError):
    """The pool has too few free blocks; the scheduler preempts before this can happen."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref = [0] * num_blocks
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}     # tokens of each sequence whose K/V is (or is being) written

    # ---- queries ----
    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def extra_blocks(self, seq_id: int, new_len: int) -> int:
        """Free blocks needed to grow `seq_id` to new_len tokens (new blocks plus one copy-on-write)."""
        table, old = self.tables.get(seq_id, []), self.lens.get(seq_id, 0)
        need = max(0, self.blocks_for(new_len) - len(table))
        if old % self.block_size and old < new_len and self.ref[table[old // self.block_size]] > 1:
            need += 1
        return need

    def can_grow(self, seq_id: int, new_len: int) -> bool:
        return self.extra_blocks(seq_id, new_len) <= self.num_free

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        return table_slots(self.tables[seq_id], self.block_size, start, end)

    # ---- changes ----
    def _take(self) -> int:
        if not self.free_blocks:
            raise OutOfBlocks("KV block pool exhausted")
        b = self.free_blocks.popleft()
        self.ref[b] = 1
        return b

    def _release(self, b: int) -> None:
        self.ref[b] -= 1
        if self.ref[b] == 0:
            self.free_blocks.appendleft(b)     # reused first: a sequence that gave back rejected
                                               # speculative blocks gets the same ones again (stays consecutive)

    def prepare_write(self, seq_id: int, new_len: int) -> list[tuple[int, int]]:
        """Make room to write tokens [lens[seq], new_len); returns (src, dst) block copies to apply first."""
        if self.extra_blocks(seq_id, new_len) > self.num_free:
            raise OutOfBlocks(f"sequence {seq_id} needs {self.extra_blocks(seq_id, new_len)} blocks, "
                              f"{self.num_free} free")
        table = self.tables.setdefault(seq_id, [])
        old = self.lens.get(seq_id, 0)
        copies = []
        bs = self.block_size
        for i in range(old // bs, min(len(table), self.blocks_for(new_len))):
            if self.ref[table[i]] > 1:      # shared with a fork: copy before writing
                new = self._take()
                copies.append((table[i], new))
                self._release(table[i])
                table[i] = new
        while len(table) < self.blocks_for(new_len):
            table.append(self._take())
        self.lens[seq_id] = max(old, new_len)
        return copies

    def truncate(self, seq_id: int, new_len: int) -> None:
        """Forget tokens from new_len on (rejected speculation); frees blocks past the new end."""
        table = self.tables[seq_id]
        keep = self.blocks_for(new_len)
        for b in table[keep:]:
            self._release(b)
        del table[keep:]
        self.lens[seq_id] = min(self.lens[seq_id], new_len)

    def fork(self, src: int, dst: int) -> None:
        """dst shares all of src's blocks (reference counted); the first write into a shared block copies it."""
        if dst in self.tables:
            raise ValueError(f"sequence {dst} already has blocks")
        self.tables[dst] = list(self.tables[src])
        self.lens[dst] = self.lens[src]
        for b in self.tables[dst]:
            self.ref[b] += 1

    def free(self, seq_id: int) -> None:
        for b in self.tables.pop(seq_id, []):
            self._release(b)
        self.lens.pop(seq_id, None)

    def check(self) -> None:
        """Invariants: reference counts equal table membership; free list holds exactly the unreferenced."""
        counts = [0] * self.num_blocks
        for t in self.tables.values():
            for b in t:
                counts[b] += 1
        assert counts == self.ref, "reference counts disagree with block tables"
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is free twice"
        assert free == {b for b in range(self.num_blocks) if counts[b] == 0}, "free list wrong"
