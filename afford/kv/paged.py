"""Paged KV bookkeeping: a pool of fixed-size blocks, one block table per sequence, reference counts
so forked sequences share their common prefix, copy-on-write when a shared block is written, and
automatic prefix caching (vLLM's, SGLang's radix cache by another name): a FULL block whose tokens are
final is registered under (the cache node of the block before it, its tokens), so a later sequence with
the same leading tokens takes the same blocks instead of recomputing them. Keys compare the tokens
themselves and a parent node id that is never reused, so a match is exact (no hash collisions). A
registered block whose last user leaves stays cached (reference count 0, "evictable") and is reused in
least-recently-freed order only when no empty block is left -- or when it is the block right behind the
last one of a table that grows, which keeps that sequence's blocks consecutive (read in place).

This file only does integer bookkeeping; the K/V tensors live in the ModelRunner, which applies the
(src, dst) copies `prepare_write` returns before the forward that writes the tokens.
A slot is `block * block_size + offset`; a sequence's table lists its blocks in token order.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict, deque


def table_slots(table: list[int], block_size: int, start: int, end: int) -> list[int]:
    """Flat slots of positions start..end-1 of the sequence whose block table this is."""
    return [table[i // block_size] * block_size + i % block_size for i in range(start, end)]


class OutOfBlocks(RuntimeError):
    """The pool has too few free blocks; the scheduler preempts before this can happen."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int = 16, prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))      # empty, reference count 0
        self.ref = [0] * num_blocks
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}     # tokens of each sequence whose K/V is (or is being) written
        # prefix cache
        self.prefix_caching = prefix_caching
        self.cache: dict[tuple[int, tuple[int, ...]], int] = {}     # (parent node, tokens) -> block
        self.key_of: dict[int, tuple[int, tuple[int, ...]]] = {}    # registered block -> its key
        self.node_of: dict[int, int] = {}                           # registered block -> its node id
        self.evictable: OrderedDict[int, None] = OrderedDict()      # registered, reference count 0, LRU first
        self.chain: dict[int, list[int]] = {}   # seq -> cache node of each of its leading registered blocks
        self._nodes = itertools.count()
        self.queried_tokens = self.hit_tokens = 0       # tokens of admitted sequences / found cached (scheduler)

    # ---- queries ----
    @property
    def num_free(self) -> int:
        """Blocks a sequence can take: empty ones plus cached ones nobody uses (evicted on demand)."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Registered blocks (in use or evictable) a new sequence could reuse."""
        return len(self.cache)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def extra_blocks(self, seq_id: int, new_len: int) -> int:
        """Free blocks needed to grow `seq_id` to new_len tokens (new blocks plus one copy-on-write)."""
        table, old = self.tables.get(seq_id, []), self.lens.get(seq_id, 0)
        need = max(0, self.blocks_for(new_len) - len(table))
        if old % self.block_size and old < new_len and self._shared(table[old // self.block_size]):
            need += 1
        return need

    def can_grow(self, seq_id: int, new_len: int) -> bool:
        return self.extra_blocks(seq_id, new_len) <= self.num_free

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        return table_slots(self.tables[seq_id], self.block_size, start, end)

    # ---- changes ----
    def _take(self, after: int | None = None) -> int:
        """An empty block, else the least recently freed cached one. `after`: the last block of the table
        being grown -- the block right behind it is taken when it is cached and unused, so that the
        sequence's blocks stay consecutive and attention reads them in place (afford/attention/paged_cpu.py):
        a prompt sent again matches its cached blocks but recomputes its last one, and without this its
        next blocks would come from wherever the free list points."""
        nxt = after + 1 if after is not None else -1
        if 0 < nxt < self.num_blocks and nxt in self.evictable:
            del self.evictable[nxt]
            self._unregister(nxt)
            self.ref[nxt] = 1
            return nxt
        if self.free_blocks:
            b = self.free_blocks.popleft()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)           # the least recently freed cached block
            self._unregister(b)
        else:
            raise OutOfBlocks("KV block pool exhausted")
        self.ref[b] = 1
        return b

    def _release(self, b: int) -> None:
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if b in self.key_of:
                self.evictable[b] = None           # stays cached until its room is needed
            else:
                self.free_blocks.appendleft(b)     # reused first: a sequence that gave back rejected
                                                   # speculative blocks gets the same ones again (stays consecutive)

    def _shared(self, b: int) -> bool:
        """Writing into b would change what another sequence or the prefix cache reads."""
        return self.ref[b] > 1 or b in self.key_of

    def _unregister(self, b: int) -> None:
        del self.cache[self.key_of.pop(b)]
        del self.node_of[b]

    # ---- prefix cache ----
    def match_prefix(self, seq_id: int, tokens: list[int]) -> int:
        """Give a sequence that holds no blocks the longest chain of cached full blocks its tokens start
        with (all but its last token at most: one token is always computed, for the logits). Returns the
        number of tokens whose K/V it now has."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already has blocks")
        bs, nodes, blocks = self.block_size, [], []
        if self.prefix_caching:
            for i in range((len(tokens) - 1) // bs):
                b = self.cache.get((nodes[-1] if nodes else -1, tuple(tokens[i * bs:(i + 1) * bs])))
                if b is None:
                    break
                blocks.append(b)
                nodes.append(self.node_of[b])
        for b in blocks:
            if self.ref[b] == 0:
                del self.evictable[b]
            self.ref[b] += 1
        self.tables[seq_id] = blocks
        self.lens[seq_id] = len(blocks) * bs
        self.chain[seq_id] = nodes
        return len(blocks) * bs

    def count_admitted(self, tokens: int, hit: int) -> None:
        """A sequence of `tokens` tokens started computing with `hit` of them from the cache (metrics)."""
        self.queried_tokens += tokens
        self.hit_tokens += hit

    def register(self, seq_id: int, tokens: list[int], computed: int, pending: list[int] = ()) -> None:
        """The first `computed` tokens of the sequence (`tokens`, then `pending` ones not appended yet) are
        final (their K/V is written and they will not be rolled back): register every full block among them
        that is not registered yet."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        nodes = self.chain.setdefault(seq_id, [])
        if (len(nodes) + 1) * bs > computed:        # no new full block: the usual case, nothing to build
            return
        tokens = tokens + list(pending) if pending else tokens
        table = self.tables[seq_id]
        while (len(nodes) + 1) * bs <= computed:
            n = len(nodes)
            b = table[n]
            if b in self.node_of:                      # already registered (a reused or forked block)
                nodes.append(self.node_of[b])
                continue
            key = (nodes[-1] if nodes else -1, tuple(tokens[n * bs:(n + 1) * bs]))
            same = self.cache.get(key)
            if same is not None:                       # computed twice: keep the first, chain through it
                nodes.append(self.node_of[same])
            else:
                node = next(self._nodes)
                self.cache[key], self.key_of[b], self.node_of[b] = b, key, node
                nodes.append(node)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block: the evictable ones become empty, in-use ones stop being shared."""
        for b in list(self.key_of):
            self._unregister(b)
        self.free_blocks.extend(self.evictable)
        self.evictable.clear()
        for nodes in self.chain.values():
            nodes.clear()

    def prepare_write(self, seq_id: int, new_len: int) -> list[tuple[int, int]]:
        """Make room to write tokens [lens[seq], new_len); returns (src, dst) block copies to apply first."""
        table, old, bs = self.tables.get(seq_id), self.lens.get(seq_id, 0), self.block_size
        if table is not None and old < new_len and old // bs == (new_len - 1) // bs < len(table):
            b = table[old // bs]                 # a decode's common case: inside one block it holds alone
            if self.ref[b] == 1 and b not in self.key_of:
                self.lens[seq_id] = new_len
                return []
        if self.extra_blocks(seq_id, new_len) > self.num_free:
            raise OutOfBlocks(f"sequence {seq_id} needs {self.extra_blocks(seq_id, new_len)} blocks, "
                              f"{self.num_free} free")
        table = self.tables.setdefault(seq_id, [])
        old = self.lens.get(seq_id, 0)
        copies = []
        bs = self.block_size
        for i in range(old // bs, min(len(table), self.blocks_for(new_len))):
            if self._shared(table[i]):      # shared with a fork, or cached: copy before writing
                new = self._take()
                copies.append((table[i], new))
                self._release(table[i])
                table[i] = new
        while len(table) < self.blocks_for(new_len):
            table.append(self._take(table[-1] if table else None))
        self.lens[seq_id] = max(old, new_len)
        return copies

    def truncate(self, seq_id: int, new_len: int) -> None:
        """Forget tokens from new_len on (rejected speculation); frees blocks past the new end."""
        table = self.tables[seq_id]
        keep = self.blocks_for(new_len)
        for b in reversed(table[keep:]):     # last first: the free list's head is then the lowest block
            self._release(b)
        del table[keep:]
        self.lens[seq_id] = min(self.lens[seq_id], new_len)
        del self.chain.get(seq_id, [])[new_len // self.block_size:]     # rolled back into registered blocks

    def fork(self, src: int, dst: int) -> None:
        """dst shares all of src's blocks (reference counted); the first write into a shared block copies it."""
        if dst in self.tables:
            raise ValueError(f"sequence {dst} already has blocks")
        self.tables[dst] = list(self.tables[src])
        self.lens[dst] = self.lens[src]
        self.chain[dst] = list(self.chain.get(src, []))
        for b in self.tables[dst]:
            self.ref[b] += 1

    def free(self, seq_id: int) -> None:
        for b in reversed(self.tables.pop(seq_id, [])):   # last first: they come back in table order
            self._release(b)
        self.lens.pop(seq_id, None)
        self.chain.pop(seq_id, None)

    def check(self) -> None:
        """Invariants: reference counts equal table membership; free list holds exactly the unreferenced."""
        counts = [0] * self.num_blocks
        for t in self.tables.values():
            for b in t:
                counts[b] += 1
        assert counts == self.ref, "reference counts disagree with block tables"
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is free twice"
        assert not free & set(self.evictable), "a block is both empty and cached"
        assert free | set(self.evictable) == {b for b in range(self.num_blocks) if counts[b] == 0}, "free list wrong"
        assert all(b in self.key_of for b in self.evictable), "an evictable block is not cached"
        assert {b: k for k, b in self.cache.items()} == self.key_of, "cache and its keys disagree"
        assert self.key_of.keys() == self.node_of.keys(), "a cached block has no node"
