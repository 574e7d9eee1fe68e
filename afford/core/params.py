"""SamplingParams: what one request asks for. Validated at construction with messages that say what to do."""
from __future__ import annotations

from dataclasses import dataclass, field

from afford.config import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                     # 0 or -1: off
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] | list[int] = field(default_factory=tuple)
    seed: int | None = None
    logprobs: int | None = None        # n: return the chosen token's logprob and the top-n
    prompt_logprobs: bool = False
    ignore_eos: bool = False
    n: int = 1
    shared_prefix: int = 0             # n > 1: the choices share their first m sampled tokens (decoded once)
    provenance: bool = False           # RequestOutput.sources: who produced each token (target, draft, small, large)

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ConfigError(f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ConfigError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if not isinstance(self.shared_prefix, int) or self.shared_prefix < 0:
            raise ConfigError(f"shared_prefix must be an integer >= 0 (tokens the n choices share), "
                              f"got {self.shared_prefix!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not
                                      -(1 << 63) <= self.seed <= (1 << 64) - self.n):
            raise ConfigError(f"seed must be an integer in [-2**63, 2**64 - n] (choice i uses seed + i), "
                              f"got {self.seed!r}")
        stop = self.stop
        stop = () if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop))
        if any(not isinstance(s, str) or not s for s in stop):
            raise ConfigError("stop must be a non-empty string or a list of them")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
