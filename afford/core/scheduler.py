"""Scheduler: waiting and running queues over one BlockPool.

Each step is either a prefill of newly admitted sequences (admitted first-come first-served when their
blocks fit and the token budget allows) or a decode of every running sequence. When a decode cannot
find blocks, the newest running sequence is preempted by recompute: its blocks are freed and it goes
back to the front of the waiting queue with its generated tokens, to be prefilled again.

The scheduler owns the block pool: `schedule` allocates every block the step's forward will write
(and the copy-on-write copies it needs, which the engine applies through the runner before the forward).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from afford.core.sequence import Sequence, Status
from afford.kv.paged import BlockPool


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    kind: str                                  # "prefill" | "decode"
    preempted: list[Sequence]
    copies: list[tuple[int, int]]              # (src, dst) blocks to copy before the forward


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        self.pool = pool
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, lookahead: int = 0) -> ScheduledStep:
        """The next step's sequences, with their blocks allocated: a prefill writes each prompt, a decode
        each sequence's last token plus `lookahead` speculative slots (the engine truncates what the
        verification does not keep)."""
        admitted, budget, free = [], self.max_num_batched_tokens, self.pool.num_free
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            seq = self.waiting[0]
            n = len(seq.token_ids)
            need = self.pool.extra_blocks(seq.seq_id, n + 1)
            if (admitted and n > budget) or need > free:
                break
            free -= need
            self.waiting.popleft()
            seq.status = Status.RUNNING
            admitted.append(seq)
            budget -= n
        if admitted:
            self.running.extend(admitted)
            return ScheduledStep(admitted, "prefill", [], self._allocate(admitted, 0))
        preempted = []
        # decode: every running sequence needs room for its next 1 + lookahead tokens (no more than it
        # may draft: near the end of its context or max_tokens that is fewer)
        while self.running:
            need = sum(self.pool.extra_blocks(s.seq_id, len(s.token_ids) + self._room(s, lookahead))
                       for s in self.running)
            if need <= self.pool.num_free:
                break
            preempted.append(self.running[-1])
            self.preempt(self.running[-1])
        return ScheduledStep(list(self.running), "decode", preempted, self._allocate(self.running, lookahead))

    def _room(self, s: Sequence, lookahead: int) -> int:
        return min(lookahead, s.draft_room(self.max_model_len)) if lookahead else 0

    def _allocate(self, seqs: list[Sequence], lookahead: int) -> list[tuple[int, int]]:
        return [c for s in seqs for c in self.pool.prepare_write(s.seq_id, len(s.token_ids) + self._room(s, lookahead))]

    def admit_forked(self, seq: Sequence) -> None:
        """A fork of a running sequence (n > 1) joins the running batch directly."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.metrics.preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Free a finished or aborted sequence wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.free(seq.seq_id)
