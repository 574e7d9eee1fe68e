"""Self-consistency helpers: the numeric answer of a sampled solution, and the majority over n of them
(Wang et al.'s self-consistency; what `n` + `shared_prefix` sampling is for).

    from afford import LLM, SamplingParams, vote
    out = llm.generate(question, SamplingParams(n=8, temperature=0.8, shared_prefix=16, max_tokens=256))[0]
    answer, votes = vote.majority([vote.numeric_answer(o.text) for o in out.outputs])
"""
from __future__ import annotations

import re
from collections import Counter

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def numeric_answer(text: str) -> str | None:
    """The answer of a GSM8K-style solution: the number after the last "####" if there is one, else the
    last number in the text; commas dropped, a trailing ".0" dropped. None when there is no number."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    x = found[0 if "####" in text else -1].replace(",", "")
    return x[:-2] if x.endswith(".0") else x


def majority(answers: list[str | None]) -> tuple[str | None, int]:
    """The most frequent answer that is not None (the earliest among ties) and its count; (None, 0) if none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0
    best = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == best)
    return winner, best
