"""Entropy coding against exact model probabilities.

A model's next-symbol distribution is first quantized to integer frequencies by `frequencies` (afford's
own fixed rule: PRECISION bits, every symbol >= 1, the rounding remainder on the most likely symbol), so
the numbers both ends code against are integers computed by one deterministic function of the model's
output. The coding itself is constriction's range coder (a maintained Rust library, `constriction.stream`):
a queue, so symbols decode in the order they were encoded and a long input streams through the model one
step at a time -- rANS, constriction's other coder, is a stack and would have to hold every distribution of
a stretch until it can encode the stretch backwards. `benchmarks/compress.py` measures the coded size
against the model's cross-entropy.
"""
from __future__ import annotations

import numpy as np
import torch

PRECISION = 24          # frequencies of one distribution sum to 2**PRECISION (constriction's default precision)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> softmax in float64 on the host, (B, V)."""
    return torch.softmax(logits.to("cpu", torch.float64), dim=-1)


def frequencies(logits: torch.Tensor, precision: int = PRECISION) -> np.ndarray:
    """logits (B, V) -> integer frequencies (B, V), int64, each row summing to 2**precision, every entry >= 1:
    `quantize(probabilities(logits))`. Pure function of the logits' bits: encoder and decoder get the same
    integers from the same logits."""
    return quantize(probabilities(logits), precision)


def quantize(p: torch.Tensor, precision: int = PRECISION) -> np.ndarray:
    """floor(p * (2**precision - V)) + 1 per symbol, and what the floors left over goes to the row's most
    likely symbol."""
    B, V = p.shape
    total = 1 << precision
    if V >= total:
        raise ValueError(f"a vocabulary of {V} symbols needs more than {precision} bits of precision")
    f = torch.floor(p * (total - V)).to(torch.int64) + 1                       # (B, V), >= 1
    left = total - f.sum(-1)                                                   # (B,), >= 0
    f[torch.arange(B), p.argmax(-1)] += left
    return f.numpy()


def _model_family():
    import constriction
    # probabilities given per symbol at coding time; perfect=False: constriction rescales them to its own
    # fixed-point grid with its fast rule -- deterministic, every symbol kept nonzero
    return constriction.stream.model.Categorical(perfect=False)


def _as_probs(freqs: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(freqs, dtype=np.float64)         # integers < 2**53: exact in float64


class Encoder:
    """Appends symbols coded against their frequencies; `words()` is the compressed stream (uint32)."""

    def __init__(self):
        import constriction
        self._enc = constriction.stream.queue.RangeEncoder()
        self._family = _model_family()

    def encode(self, symbols, freqs: np.ndarray) -> None:
        """symbols (B,) coded in order, symbol i against freqs[i] (B, V)."""
        self._enc.encode(np.asarray(symbols, dtype=np.int32), self._family, _as_probs(freqs))

    def words(self) -> np.ndarray:
        return self._enc.get_compressed()                                      # (W,) uint32

    @property
    def num_bits(self) -> int:
        return int(self._enc.num_bits())


class Decoder:
    """Reads symbols back in the order the Encoder wrote them, given the same frequencies."""

    def __init__(self, words: np.ndarray):
        import constriction
        self._dec = constriction.stream.queue.RangeDecoder(np.ascontiguousarray(words, dtype=np.uint32))
        self._family = _model_family()

    def decode(self, freqs: np.ndarray) -> list[int]:
        """One symbol per row of freqs (B, V)."""
        return self._dec.decode(self._family, _as_probs(freqs)).tolist()


def ideal_bits(freqs: np.ndarray, symbols, precision: int = PRECISION) -> float:
    """-log2 of the coded symbols' quantized probabilities: what a perfect coder of these frequencies spends."""
    f = freqs[np.arange(len(freqs)), np.asarray(symbols)]
    return float(precision * len(f) - np.log2(f).sum())
