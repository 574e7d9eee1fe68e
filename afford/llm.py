"""LLM: the offline API. `LLM(model).generate(prompts, SamplingParams(...))` runs every prompt as
one continuous batch and returns one RequestOutput per prompt, in order."""
from __future__ import annotations

from afford.config import CascadeConfig, ConfigError, EngineConfig, GradConfig, LossyConfig, RerankConfig, SpeculativeConfig
from afford.core.outputs import RequestOutput
from afford.core.params import SamplingParams
from afford.engine import Engine


class LLM:
    """The offline engine. engine: the Engine built from the configs (the keyword arguments below, or
    `LLM.from_config`); tokenizer: that engine's tokenizer."""

    def __init__(self, model: str = "default", *, device: str = "auto", dtype: str = "auto",
                 max_model_len: int | None = None, kv_blocks: int | None = None, seed: int = 0,
                 block_size: int | None = None, max_num_seqs: int = 64, draft: str | None = None,
                 num_speculative_tokens: int = 4, speculation: str = "fixed", acceptance: str = "rejection",
                 draft_exit: str | int = "auto",
                 cost_hardware: str | None = None, quantization: str | None = None, quant_group: str = "auto",
                 quantize_head: bool = False, draft_quantization: str | None = None, attention: str = "auto",
                 max_num_batched_tokens: int | None = None, decode_token_budget: int | None = None,
                 enable_chunked_prefill: bool = True,
                 enable_prefix_caching: bool = True, native: bool = True, enforce_eager: bool = False,
                 async_scheduling: bool | None = None,
                 cascade: str | None = None, large: str | None = None, tau: float = 2.5, window: int = 5,
                 dwell: int = 10, rerank: str | None = None, alpha: float = 1.0, rerank_top_k: int = 5,
                 counterfactual=None, grad_corpus: str | None = None, grad_weight: float = 16.0,
                 grad_top_docs: int = 1, sparse_budget: int = 16, sparse_locality: float = 0.25,
                 sparse_fast_blocks: int | None = None, sparse_dense_below: int | None = None,
                 sparse_score: str = "bound", kv_mmap_dir: str | None = None, afd: str | None = None, micro_batches: int = 3, afd_address: str | None = None):
        """draft: a draft model folder, "default" (the bundled draft) or "ngram" (prompt lookup) turns on
        lossless speculative decoding with num_speculative_tokens drafted per step. A multi-exit (S2D) draft
        stops each drafted token at its first confident exit: draft_exit="auto" calibrates the thresholds on
        this target, an exit's layer count always drafts from that exit, "t1,t2" fixes the thresholds.
        cost_hardware (e.g. "h100") adds the Step-3 cost model's USD per 1M tokens of this model on that
        hardware to metrics and stats.
        quantization="int8"|"int4" quantizes the weights on load (lossy, weight-only; see `afford quantize`);
        the blocks' matrices, and the LM head too with quantize_head=True (more lossy, fewer bytes a token).
        attention: the attention backend (afford/attention/): "auto", "paged", "cpu_paged" or "sdpa".
        enforce_eager: on CUDA, no CUDA graphs (decode, verify and draft steps are captured by default).
        async_scheduling: launch each greedy decode step while the host still takes the step before's tokens
        in (None: on with CUDA graphs); the same tokens either way.
        max_num_batched_tokens: tokens fed per step (None: 512 on a CPU, 2048 on a GPU, where an eager prefill
        forward costs more than its tokens' arithmetic); with enable_chunked_prefill running decodes take theirs
        first and long prompts are split over steps, and while sequences decode a step feeds at most
        decode_token_budget tokens (None: 64 on a CPU, which bounds their time per token). enable_prefix_caching reuses the KV of cached leading
        prompt blocks (exact: the same tokens, the same positions). native: on the CPU in fp32, each forward is
        one C++ call on afford's own kernels (a token's logits bitwise the same in any batch and in a verify).

        LOSSY levers (off by default; each changes the output, see afford/levers/):
        cascade="entropy" with large=PATH: EAD -- this model is the small one, the large model takes over while
        the rolling mean entropy (bits, over `window` tokens) is >= tau, switching at most every `dwell` tokens.
        rerank="guided" with large=PATH and counterfactual=(word swaps dict | str -> str function): AMBEDKAR-style
        steering -- this model's top rerank_top_k tokens re-scored by alpha * the guide's JS divergence under the
        counterfactual prompt. grad_corpus=FOLDER: GRAD -- logits fused (grad_weight) with a token graph of the
        grad_top_docs documents BM25 retrieves for each prompt. attention="sparse": NOSA-style block-sparse decode
        attention (lossy once a context has more than sparse_budget blocks; block_size defaults to 64 with it)
        over a two-tier KV store whose fast tier holds sparse_fast_blocks blocks per layer; sparse_score="bound"
        (the default) picks the query's blocks by Quest's min / max bound on q . k, "mean" by the mean-pooled key. kv_mmap_dir=FOLDER
        keeps the KV pool (the slow tier) in a memory-mapped file there instead of RAM (CPU; removed at once).

        afd="attention=1,ffn=M": attention-FFN disaggregation (lossless) -- the MLPs (a MoE's experts, split
        between the workers) run on M processes over torch.distributed, each step pipelined in micro_batches;
        afd_address="host:port" waits there for `afford afd-worker` processes instead of spawning them. Call
        close() (or use `with LLM(...) as llm:`) to stop the workers; they also stop when this process exits."""
        if block_size is None:
            block_size = 64 if attention == "sparse" else 16
        speculative = (SpeculativeConfig(draft=str(draft), num_speculative_tokens=num_speculative_tokens,
                                         controller=speculation, acceptance=acceptance,
                                         draft_quantization=draft_quantization, draft_exit=str(draft_exit))
                       if draft is not None else None)
        self._attach(Engine(EngineConfig(model=str(model), device=device, dtype=dtype, max_model_len=max_model_len,
                                         kv_blocks=kv_blocks, seed=seed, block_size=block_size,
                                         max_num_seqs=max_num_seqs, cost_hardware=cost_hardware,
                                         quantization=quantization, quant_group=quant_group,
                                         quantize_head=quantize_head, attention=attention, max_num_batched_tokens=max_num_batched_tokens,
                                         decode_token_budget=decode_token_budget,
                                         enable_chunked_prefill=enable_chunked_prefill,
                                         enable_prefix_caching=enable_prefix_caching, native=native,
                                         enforce_eager=enforce_eager, async_scheduling=async_scheduling,
                                         sparse_budget=sparse_budget,
                                         sparse_locality=sparse_locality, sparse_fast_blocks=sparse_fast_blocks,
                                         sparse_dense_below=sparse_dense_below, sparse_score=sparse_score,
                                         kv_mmap_dir=kv_mmap_dir, afd=afd,
                                         micro_batches=micro_batches, afd_address=afd_address), speculative,
                            lossy_config(cascade, large, tau, window, dwell, rerank, alpha, rerank_top_k,
                                         counterfactual, grad_corpus, grad_weight, grad_top_docs)))

    @classmethod
    def from_config(cls, cfg: EngineConfig, speculative: SpeculativeConfig | None = None,
                    lossy: LossyConfig | None = None) -> "LLM":
        """An LLM on configs already built (what `afford generate` does), as AsyncLLM.from_config."""
        llm = cls.__new__(cls)
        llm._attach(Engine(cfg, speculative, lossy))
        return llm

    def _attach(self, engine: Engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer

    def close(self) -> None:
        """Stop what the engine started outside this process (AFD workers); the LLM is unusable after."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stats(self):
        return self.engine.stats

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or lists of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ConfigError("give one SamplingParams, or one per prompt")
        eng = self.engine
        rids = []
        try:
            for p, sp in zip(prompts, params):
                rids.append(eng.add_request(p, sp).request_id)
        except ConfigError:
            for r in rids:
                eng.abort(r)
            raise
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(rids), unit="req")
        while eng.has_unfinished():
            for out in eng.step():
                if out.error is not None:          # one request failed: stop the others, raise its error
                    for r in rids:
                        eng.abort(r)
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}") from out.error
                if out.finished:
                    done[out.request_id] = out
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        outs = []
        for r, sp in zip(rids, params):
            out = done[r]
            out.outputs = [out] + [done[f"{r}/{i}"] for i in range(1, sp.n)]   # n > 1: every choice
            outs.append(out)
        return outs


def lossy_config(cascade, large, tau, window, dwell, rerank, alpha, rerank_top_k, counterfactual,
                 grad_corpus, grad_weight, grad_top_docs) -> LossyConfig | None:
    """The LossyConfig of LLM's keyword arguments (None when no lossy lever is on)."""
    if cascade not in (None, "entropy"):
        raise ConfigError(f"cascade must be 'entropy' or None, got {cascade!r}")
    if rerank not in (None, "guided"):
        raise ConfigError(f"rerank must be 'guided' or None, got {rerank!r}")
    if large is not None and not (cascade or rerank):
        raise ConfigError("large= is the model of cascade='entropy' or rerank='guided': turn one on, or drop large=")
    if counterfactual is not None and not rerank:
        raise ConfigError("counterfactual= is used by rerank='guided' only: turn it on, or drop counterfactual=")
    if (cascade or rerank) and large is None:
        raise ConfigError(f"{'cascade' if cascade else 'rerank'} needs large=: the larger model's folder "
                          f"(or 'default' for the bundled target)")
    cfg = LossyConfig(cascade=CascadeConfig(large, float(tau), window, dwell) if cascade else None,
                      rerank=RerankConfig(large, counterfactual, float(alpha), rerank_top_k) if rerank else None,
                      grad=GradConfig(str(grad_corpus), float(grad_weight), grad_top_docs) if grad_corpus else None)
    return cfg if cfg.any else None
