"""Speculator: the proposer, the acceptance policies and the controller, built from one SpeculativeConfig."""
from __future__ import annotations

from afford.config import ConfigError, ModelConfig, SpeculativeConfig
from afford.core.sequence import Sequence
from afford.models.loader import resolve_model_path
from afford.speculative import goodput  # noqa: F401  (registers the goodput controller)
from afford.speculative.acceptance import POLICIES, GreedyAcceptance
from afford.speculative.control import CONTROLLERS
from afford.speculative.proposers import DraftModelProposer, NgramProposer, Proposer
from afford.speculative.sorted import SortedDraftProposer


class Speculator:
    def __init__(self, cfg: SpeculativeConfig, proposer: Proposer):
        if cfg.acceptance not in POLICIES:
            raise ConfigError(f"unknown acceptance policy {cfg.acceptance!r}; known: {', '.join(POLICIES)}")
        if cfg.controller not in CONTROLLERS:
            raise ConfigError(f"unknown speculation controller {cfg.controller!r}; known: {', '.join(CONTROLLERS)}")
        self.cfg = cfg
        self.k = cfg.num_speculative_tokens
        self.proposer = proposer
        self.policy = POLICIES[cfg.acceptance]()
        self.greedy = GreedyAcceptance()
        self.controller = CONTROLLERS[cfg.controller]()

    @staticmethod
    def build(cfg: SpeculativeConfig, engine) -> "Speculator":
        if cfg.draft == "ngram":
            if str(cfg.draft_exit) != "auto":
                raise ConfigError("draft_exit is for a multi-exit draft model, not draft='ngram'")
            return Speculator(cfg, NgramProposer(cfg.ngram_max, cfg.ngram_min))
        e = engine.cfg
        path = resolve_model_path(cfg.draft, role="draft")
        multi_exit = bool(ModelConfig.from_dir(path).exits)
        if not multi_exit and str(cfg.draft_exit) != "auto":
            raise ConfigError(f"draft_exit={cfg.draft_exit!r} needs a multi-exit draft (config.json 'exits'); this "
                              f"draft has one exit (train one with `afford zoo distill --exits ...`)")
        kw = dict(vocab_size=engine.model_config.vocab_size, quantization=cfg.draft_quantization, attention=e.attention,
                  prefix_caching=e.enable_prefix_caching, native=e.native, graphs=not e.enforce_eager,
                  max_batch=e.max_num_seqs, max_q=1 + cfg.num_speculative_tokens, attention_options=e.attention_options)
        if multi_exit:                           # S2D: confidence exits over one sorted draft
            kw["draft_exit"] = cfg.draft_exit
        cls = SortedDraftProposer if multi_exit else DraftModelProposer
        proposer = cls(str(path), engine.tokenizer, engine.max_model_len, engine.pool.num_blocks,
                       engine.pool.block_size, e.device, cfg.draft_dtype, **kw)
        return Speculator(cfg, proposer)

    def ks(self, seqs: list[Sequence], max_model_len: int) -> tuple[list[int], list[int]]:
        """Each sequence's k this step, and the catch-up tokens its proposer must feed first."""
        catchup = [self.proposer.catchup(s) for s in seqs]
        chosen = self.controller.choose(seqs, self.k, catchup)
        return [min(k, s.draft_room(max_model_len)) for k, s in zip(chosen, seqs)], catchup
