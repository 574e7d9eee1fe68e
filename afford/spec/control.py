"""SpecController: how many tokens to draft for each running sequence this step.

Contract: `choose(seqs, k_max) -> list[int]`, each in 0..k_max. The Speculator then clips each k so a
sequence never drafts past its max_tokens or the context.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from afford.core.sequence import Sequence

CONTROLLERS: dict[str, type["SpecController"]] = {}


def register(name: str):
    def deco(cls):
        CONTROLLERS[name] = cls
        cls.name = name
        return cls
    return deco


class SpecController(ABC):
    name = "abstract"

    @abstractmethod
    def choose(self, seqs: list[Sequence], k_max: int) -> list[int]: ...

    def observe(self, step_stats) -> None:
        """Called after each step with its StepStats (adaptive controllers learn from it)."""


@register("fixed")
class FixedK(SpecController):
    def choose(self, seqs, k_max):
        return [k_max] * len(seqs)


@register("off")
class Off(SpecController):
    def choose(self, seqs, k_max):
        return [0] * len(seqs)
