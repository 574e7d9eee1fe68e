"""Sequence: one request's tokens, state and per-request metrics; incremental detokenization."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from afford.core.params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Detokenizer:
    """vLLM-style incremental decoding: re-decode a short window so multi-byte characters and
    leading-space merges come out right, and emit only complete characters."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.prefix = self.read = len(prompt_ids)
        self.window_start = max(0, len(prompt_ids) - 5)
        # the Rust tokenizer's own decode where transformers would return its text unchanged (no clean-up
        # of tokenization spaces): the same string without transformers' per-call wrapping (~2x per token)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
            self.decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)

    def step(self, ids: list[int]) -> str:
        prev = self.decode(ids[self.window_start:self.read])
        new = self.decode(ids[self.window_start:])
        if len(new) > len(prev) and not new.endswith("\ufffd"):
            self.window_start, self.read = self.read, len(ids)
            return new[len(prev):]
        return ""


@dataclass
class SeqMetrics:
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None
    forward_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    preemptions: int = 0
    usd_per_1m_tokens: float | None = None     # modeled (Step-3 cost model) at the final context


class Sequence:
    def __init__(self, seq_id: int, request_id: str, prompt: str | None, prompt_ids: list[int],
                 params: SamplingParams, tokenizer, generator: torch.Generator):
        self.seq_id, self.request_id, self.prompt = seq_id, request_id, prompt
        self.prompt_ids = list(prompt_ids)
        self.token_ids = list(prompt_ids)      # prompt + output
        self.params = params
        self.status = Status.WAITING
        self.num_computed = 0                  # tokens whose K/V is in the cache
        self.in_prefill = False                # admitted and computing its tokens, none sampled since
        self.text = ""
        self.streamed = 0                      # characters of text already handed out as deltas
        self.finish_reason: str | None = None
        self.logprobs: list[dict] = []
        self.prompt_logprobs: list[float] | None = None
        self.generator = generator
        self.index = 0                         # which of the request's n choices
        self.children: list[Sequence] = []     # n > 1: choices still to fork from this one after prefill
        self.siblings: list[Sequence] = []     # n > 1: the request's other choices (on its first sequence)
        self.metrics = SeqMetrics()
        self.sources: list[str] = []           # who produced each output token: target, draft, small, large
        self.pieces: list[str] | None = [] if params.provenance else None   # each token's text (provenance)
        self.graph = None                      # GRAD: the request's token graph (afford/levers/grad.py)
        self.retrieved: list[str] = []         # GRAD: the documents it was built from
        self.detok = Detokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        self._stop_tail = max((len(s) for s in params.stop), default=0)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    def draft_room(self, max_model_len: int) -> int:
        """Tokens it may draft this step: never past max_tokens (the last token comes from the target)
        nor past the context."""
        return max(0, min(self.params.max_tokens - self.num_output - 1, max_model_len - len(self.token_ids) - 1))

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token: int, eos_ids: tuple[int, ...], max_len: int) -> str:
        """Add one generated token, update text and stop state; returns the text that may be streamed now.
        With stop strings, the last len(longest stop) - 1 characters are held back until they cannot
        start a stop string, so a stream never shows text the final output cuts."""
        self.token_ids.append(token)
        if self.metrics.first_token is None:
            self.metrics.first_token = time.perf_counter()
        p = self.params
        piece = self.detok.step(self.token_ids) if self.detok else ""
        if self.pieces is not None:
            self.pieces.append(piece)
        if piece:
            start = max(0, len(self.text) - self._stop_tail)
            self.text += piece
            hits = [at for at in (self.text.find(s, start) for s in p.stop) if at >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.finish("stop")
        if not self.finished:
            if (not p.ignore_eos and token in eos_ids) or token in p.stop_token_ids:
                self.finish("stop")
            elif self.num_output >= p.max_tokens or len(self.token_ids) >= max_len:
                self.finish("length")
        upto = len(self.text) if self.finished else max(self.streamed, len(self.text) - max(self._stop_tail - 1, 0))
        delta, self.streamed = self.text[self.streamed:upto], upto
        return delta

    def finish(self, reason: str) -> None:
        """Mark finished ("stop" | "length" | "abort" | "error"); the engine frees what it holds (Engine._release)."""
        self.finish_reason = reason
        self.status = Status.FINISHED
        self.metrics.finished = time.perf_counter()
