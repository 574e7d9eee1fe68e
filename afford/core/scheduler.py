"""Scheduler: waiting and running queues over one BlockPool.

Each step spends a token budget (`max_num_batched_tokens`). With chunked prefill (the default, as vLLM
and Sarathi-Serve) the running decodes come first -- one token each, plus the speculative slots they may
draft -- then the prompts being prefilled get what is left, a long prompt in chunks over several steps,
so decoding never waits for a long prefill. While sequences are decoding the step is held to the smaller
`decode_token_budget` (their time per output token is the step's time); a step with no decodes spends
the whole budget on prompts. Without it a step is either a prefill of newly admitted
whole prompts (first come first served while their blocks fit and the budget allows; a prompt larger
than the budget goes alone) or a decode of every running sequence.

When the decodes cannot find blocks, the newest running sequence is preempted by recompute: its blocks
are freed and it goes back to the front of the waiting queue with its generated tokens, to be prefilled
again. A sequence admitted with prefix caching on first takes the cached blocks its tokens start with
(BlockPool.match_prefix) and prefills only the rest.

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
    chunks: list[int]                          # tokens each sequence feeds (a decode: 1, before drafts)
    kind: str                                  # "prefill" | "decode" | "mixed" (prompt chunks and decodes)
    preempted: list[Sequence]
    copies: list[tuple[int, int]]              # (src, dst) blocks to copy before the forward


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 chunked_prefill: bool = True, decode_token_budget: int | None = None):
        self.pool = pool
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.decode_token_budget = decode_token_budget or max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, lookahead: int = 0) -> ScheduledStep:
        """The next step's sequences and how many tokens each feeds, with their blocks allocated: a prompt
        chunk writes its tokens, a decode its last token plus `lookahead` speculative slots (the engine
        truncates what the verification does not keep)."""
        if not self.chunked_prefill:
            return self._schedule_whole(lookahead)
        copies, preempted = [], []
        decodes = self._fit_decodes(lookahead, preempted)
        seqs, chunks = list(decodes), [1] * len(decodes)
        copies += self._allocate_decodes(decodes, lookahead)
        # while sequences decode, the step's prompt chunks are held to the smaller budget that bounds their TPOT
        # (never under half of it, so many decodes cannot starve the prompts); with nobody decoding a prompt
        # takes the whole budget (its time to first token is all that waits)
        used = sum(1 + self._room(s, lookahead) for s in decodes)
        budget = self.max_num_batched_tokens - used
        if decodes:
            budget = min(budget, max(self.decode_token_budget - used, self.decode_token_budget // 2))
        for s in [s for s in self.running if s.in_prefill]:         # prompts already part-way through
            n = min(len(s.token_ids) - s.num_computed, budget)
            if n <= 0 or self.pool.extra_blocks(s.seq_id, s.num_computed + n) > self.pool.num_free:
                break
            copies += self.pool.prepare_write(s.seq_id, s.num_computed + n)
            seqs.append(s)
            chunks.append(n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            s = self.waiting[0]
            rest = len(s.token_ids) - self._match(s)
            n = rest if s.params.prompt_logprobs else min(rest, budget)   # prompt logprobs need the whole prompt:
            if n > budget and any(x.in_prefill for x in seqs):            # it goes when no other prompt does
                self._unmatch(s)
                break
            if not self._admit(s, n, rest):
                break
            copies += self.pool.prepare_write(s.seq_id, s.num_computed + n)
            seqs.append(s)
            chunks.append(n)
            budget -= n
        kinds = {s.in_prefill for s in seqs}
        kind = "mixed" if len(kinds) == 2 else "prefill" if True in kinds else "decode"
        return ScheduledStep(seqs, chunks, kind, preempted, copies)

    def _schedule_whole(self, lookahead: int) -> ScheduledStep:
        admitted, chunks, copies, budget = [], [], [], self.max_num_batched_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            s = self.waiting[0]
            n = len(s.token_ids) - self._match(s)
            if admitted and n > budget:
                self._unmatch(s)
                break
            if not self._admit(s, n, n):
                break
            copies += self.pool.prepare_write(s.seq_id, len(s.token_ids))
            admitted.append(s)
            chunks.append(n)
            budget -= n
        if admitted:
            return ScheduledStep(admitted, chunks, "prefill", [], copies)
        preempted = []
        decodes = self._fit_decodes(lookahead, preempted)
        copies += self._allocate_decodes(decodes, lookahead)
        return ScheduledStep(decodes, [1] * len(decodes), "decode", preempted, copies)

    def _fit_decodes(self, lookahead: int, preempted: list[Sequence]) -> list[Sequence]:
        """The running sequences past their prefill, each with room for its next 1 + lookahead tokens (no
        more than it may draft: near the end of its context or max_tokens that is fewer); preempts the
        newest running sequences until they fit."""
        bs = self.pool.block_size
        while True:
            decodes = [s for s in self.running if not s.in_prefill]
            # each needs at most the blocks its 1 + lookahead tokens span plus one copy-on-write: when that
            # many are free for all of them, the exact count is not needed
            if len(decodes) * (-(-(1 + lookahead) // bs) + 2) <= self.pool.num_free:
                return decodes
            need = sum(self.pool.extra_blocks(s.seq_id, len(s.token_ids) + self._room(s, lookahead))
                       for s in decodes)
            if not decodes or need <= self.pool.num_free:
                return decodes
            preempted.append(self.running[-1])
            self.preempt(self.running[-1])

    def _allocate_decodes(self, decodes: list[Sequence], lookahead: int) -> list[tuple[int, int]]:
        """Blocks for each decode's next token and the speculative slots it may use; the COW copies."""
        return [c for s in decodes for c in self.pool.prepare_write(s.seq_id, len(s.token_ids) + self._room(s, lookahead))]

    def _match(self, s: Sequence) -> int:
        """Take the cached prefix blocks of a sequence about to be admitted; its tokens already computed."""
        if s.seq_id not in self.pool.tables and not s.params.prompt_logprobs:   # those need every position
            s.num_computed = self.pool.match_prefix(s.seq_id, s.token_ids)
        return s.num_computed

    def _unmatch(self, s: Sequence) -> None:
        """A sequence that stays waiting gives its cached blocks back (it matches again when admitted)."""
        self.pool.free(s.seq_id)
        s.num_computed = 0

    def _admit(self, s: Sequence, n: int, rest: int) -> bool:
        """Admit the head of the waiting queue to feed n of its `rest` remaining tokens, if the blocks fit
        (the last chunk also reserves room for the first generated token); else give back its cached
        blocks and leave it waiting."""
        if self.pool.extra_blocks(s.seq_id, s.num_computed + n + (n == rest)) > self.pool.num_free:
            self._unmatch(s)
            return False
        self.pool.count_admitted(len(s.token_ids), s.num_computed)
        self.waiting.popleft()
        s.status, s.in_prefill = Status.RUNNING, True
        self.running.append(s)
        return True

    def _room(self, s: Sequence, lookahead: int) -> int:
        return min(lookahead, s.draft_room(self.max_model_len)) if lookahead else 0

    def admit_forked(self, seq: Sequence) -> None:
        """A fork of a running sequence (n > 1) joins the running batch directly, past its prefill."""
        seq.status, seq.in_prefill = Status.RUNNING, False
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
