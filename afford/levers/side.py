"""SideModel: a second model beside the engine's own (the large model of a cascade, the guide of a
re-ranker), sharing its tokenizer, with its own paged KV pool that it schedules itself (as the draft
proposer does). It keeps, per key, how many tokens of a token list it has computed, and catches up on
the rest in one ragged forward -- a prefill over its own paged cache.
"""
from __future__ import annotations

import torch

from afford.config import ConfigError, ModelConfig
from afford.core.runner import ModelRunner
from afford.kv.paged import BlockPool
from afford.models.loader import load_for_inference, load_tokenizer, resolve_model_path


class SideModel:
    def __init__(self, path: str, main_tokenizer, main_vocab: int, max_len: int, num_blocks: int,
                 block_size: int, device: str, dtype: str, role: str, attention: str = "auto", native: bool = True,
                 budget_bytes: int = 2 << 30, attention_options: dict | None = None):
        """num_blocks: the KV blocks its pool wants, capped where they pass budget_bytes of this model's K/V
        (never below one max_len sequence)."""
        path = resolve_model_path(path, role="target")
        cfg = ModelConfig.from_dir(path)
        if cfg.vocab_size != main_vocab:
            raise ConfigError(f"the {role} model's vocabulary ({cfg.vocab_size}) differs from the main model's "
                              f"({main_vocab}); both models must share one tokenizer")
        if load_tokenizer(path).get_vocab() != main_tokenizer.get_vocab():
            raise ConfigError(f"the {role} model's tokenizer differs from the main model's; both models must "
                              f"share one tokenizer")
        if cfg.max_position_embeddings < max_len:
            raise ConfigError(f"the {role} model handles {cfg.max_position_embeddings} positions but the engine "
                              f"runs with max_model_len={max_len}; lower max_model_len")
        self.cfg, self.path, self.max_len = cfg, path, max_len
        self.model = load_for_inference(path, device, dtype, max_len=max_len)
        per_token = cfg.kv_bytes_per_token(next(self.model.parameters()).element_size())
        least = -(-(max_len + 1) // block_size)
        self.pool = BlockPool(max(least, min(num_blocks, budget_bytes // (per_token * block_size))), block_size)
        self.runner = ModelRunner(self.model, self.pool, attention, native, graphs=False,
                                  attention_options=attention_options)
        self.computed: dict[int, int] = {}     # key -> tokens whose K/V this model holds
        self.fed = 0                           # tokens fed through this model, all forwards
        self.seconds = 0.0                     # time in its forwards

    def lag(self, key: int, n_tokens: int) -> int:
        """Tokens this model would feed to reach n_tokens for key."""
        return n_tokens - self.computed.get(key, 0)

    def fits(self, keys_lens: list[tuple[int, int]]) -> bool:
        """Whether its pool has the blocks to grow every key to its length."""
        return sum(self.pool.extra_blocks(k, n) for k, n in keys_lens) <= self.pool.num_free

    def feed(self, keys: list[int], tokens: list[list[int]], want_logits: bool = True) -> torch.Tensor:
        """Catch key i up on tokens[i] (its whole token list: what it has computed is skipped); logits
        (len(keys), V) of each list's last token (empty when not want_logits). Each list must hold at least
        one token it has not computed."""
        import time
        t = time.perf_counter()
        starts = [self.computed.get(k, 0) for k in keys]
        for k, toks in zip(keys, tokens):
            self.runner.copy_blocks(self.pool.prepare_write(k, len(toks)))
        fed = [toks[s:] for s, toks in zip(starts, tokens)]
        rows = [[len(f) - 1] if want_logits else [] for f in fed]
        logits = self.runner.forward(keys, starts, fed, rows)                       # (B, V) or (0, V)
        for k, toks in zip(keys, tokens):
            self.computed[k] = len(toks)
        self.fed += sum(len(f) for f in fed)
        self.seconds += time.perf_counter() - t
        return logits

    def fork(self, src: int, dst: int) -> None:
        """dst starts as a copy-on-write copy of src's cache."""
        self.pool.fork(src, dst)
        self.computed[dst] = self.computed[src]

    def free(self, key: int) -> None:
        self.computed.pop(key, None)
        self.pool.free(key)
