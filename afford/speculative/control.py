"""SpeculativeController: how many tokens to draft for each running sequence this step.

Contract: `choose(seqs, k_max, catchup) -> list[int]`, each in 0..k_max. The Speculator then clips each k so a
sequence never drafts past its max_tokens or the context.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from afford.core.sequence import Sequence
from afford.registry import registry

CONTROLLERS, register = registry()


class SpeculativeController(ABC):
    name = "abstract"
    last_prediction: float | None = None     # forecast seconds of the step just chosen (adaptive controllers)
    wants_profile = False                    # True: at start-up the engine times synthetic steps and hands
                                             # them to observe_timing(..., anchor=True)

    @abstractmethod
    def choose(self, seqs: list[Sequence], k_max: int, catchup: list[int] | None = None) -> list[int]:
        """catchup[i]: tokens the proposer must feed for seqs[i] before drafting, beyond the usual one."""

    def observe(self, step_stats) -> None:
        """Called after each step with its StepStats (adaptive controllers learn from it)."""

    def forget(self, seq_id: int) -> None:
        """A sequence finished or was preempted."""

    def observe_timing(self, rows: int, seqs: int, context_tokens: int, verify_s: float, max_k: int,
                       sum_k: int, draft_s: float, catchup: int = 0, anchor: bool = False,
                       drafting: int | None = None) -> None:
        """A measured target verify time (None: not measured) and draft time (when max_k > 0);
        adaptive controllers fit their step-time model to it."""


@register("fixed")
class FixedK(SpeculativeController):
    def choose(self, seqs, k_max, catchup=None):
        return [k_max] * len(seqs)


@register("off")
class Off(SpeculativeController):
    def choose(self, seqs, k_max, catchup=None):
        return [0] * len(seqs)
