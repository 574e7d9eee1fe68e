"""Entropy-adaptive decoding (EAD, ../shared/reference/decoding-methods.md §3) -- LOSSY.

The engine's own model is the small one; a SideModel holds the large one. Per sequence, the entropy (in
bits, of the active model's next-token distribution before temperature) of each decoded token joins a
rolling window; once `dwell` tokens have been produced since the last switch, the window's mean picks the
model for the next token: the large one when it is >= tau, the small one below. The output is not
verified: it differs from the large model's by design.

Each model keeps its own paged cache and computes only the tokens it needs: on a switch the newly
active model catches up on the tokens the other produced, in one forward over its own cache (the small
one through the engine's scheduler-owned pool, the large one through its own). The catch-up is part of
the measured and modeled cost (EAD's paper leaves it out).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

SMALL, LARGE = "small", "large"


def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) logits -> (B,) entropy in bits of softmax(logits) (no temperature)."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1) / math.log(2)


@dataclass
class CascadeState:
    active: str = SMALL
    since_switch: int = 0                     # tokens produced since the last switch (or the start)
    window: deque = field(default_factory=deque)


class EntropyCascade:
    """The switching rule and each sequence's state. `choose` is called with the entropy of every token a
    sequence decodes; it returns the model for that sequence's next token."""

    def __init__(self, tau: float, window: int, dwell: int):
        self.tau, self.window, self.dwell = tau, window, dwell
        self.states: dict[int, CascadeState] = {}
        self.switches = 0                         # all sequences, since the start

    def active(self, seq_id: int) -> str:
        return self.states.get(seq_id, CascadeState()).active

    def observe(self, seq_id: int, entropy: float) -> str:
        st = self.states.setdefault(seq_id, CascadeState())
        st.window.append(entropy)
        if len(st.window) > self.window:
            st.window.popleft()
        st.since_switch += 1
        if st.since_switch >= self.dwell:
            want = LARGE if sum(st.window) / len(st.window) >= self.tau else SMALL
            if want != st.active:
                st.active, st.since_switch = want, 0
                self.switches += 1
        return st.active

    def stay_small(self, seq_id: int) -> None:
        """The large model has no room for this sequence now: keep it on the small one."""
        st = self.states.get(seq_id)
        if st is not None and st.active == LARGE:
            st.active = SMALL

    def forget(self, seq_id: int) -> None:
        self.states.pop(seq_id, None)
