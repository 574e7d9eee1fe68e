"""The step loop: the ONLY place that wires levers into a step.

    schedule -> (prefill | decode) batched forward -> sample -> append/stop -> free finished -> StepStats

With async scheduling (the default with CUDA graphs) a plain greedy decode step runs one ahead: it is
launched with the step before's argmax still on the device, and the host appends/stops/frees for the step
before while the GPU runs it (`_continue_async`).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from afford.config import KV_BUDGET_BYTES, ConfigError, EngineConfig, LossyConfig, ModelConfig, SpeculativeConfig
from afford.core.outputs import RequestOutput
from afford.core.params import SamplingParams
from afford.core.runner import ModelRunner
from afford.core.sampler import Sampler, top_logprobs
from afford.core.scheduler import Scheduler
from afford.core.sequence import Sequence
from afford.core.stats import EngineStats, StepStats, add_counts
from afford.kv.paged import BlockPool
from afford.models.loader import load_for_inference, load_tokenizer, resolve_model_path
from afford.speculative.speculator import Speculator

AFD_QUANTIZED = ("afd with quantization is not implemented: the FFN workers load full-precision weights; drop "
                 "quantization= or give the full-precision model")


@dataclass
class _InFlight:
    """A decode step launched and not yet taken in (async scheduling): its sampled tokens stay on the
    device, feeding the next step, until the host reads them one step later."""
    seqs: list[Sequence]
    positions: list[int]          # where each sequence's fed token sits
    tokens: torch.Tensor          # (n,) the greedy tokens, on the device
    host: torch.Tensor            # their copy in (pinned) host memory, complete once `ready` has passed
    ready: object                 # a CUDA event, None on the CPU (the copy is the tensor itself)
    stats: StepStats


class Engine:
    def __init__(self, cfg: EngineConfig, speculative: SpeculativeConfig | None = None,
                 lossy: LossyConfig | None = None):
        self.cfg = cfg
        if lossy is not None and lossy.any and speculative is not None:
            raise ConfigError("the lossy levers (cascade, rerank, grad) do not combine with speculative decoding: "
                              "drop draft= or the lever")
        path = resolve_model_path(cfg.model)
        self.model_path = path
        mcfg = ModelConfig.from_dir(path)              # first: an empty folder is "no config.json"
        self.tokenizer = load_tokenizer(path)
        model_max = mcfg.max_position_embeddings
        if cfg.max_model_len is not None and cfg.max_model_len > model_max:
            raise ConfigError(f"max_model_len {cfg.max_model_len} exceeds the model's {model_max} positions")
        self.max_model_len = cfg.max_model_len or model_max
        if cfg.afd is not None and (cfg.quantization or (path / "quantization.json").is_file()):
            raise ConfigError(AFD_QUANTIZED)
        # an AFD attention side never reads the FFN / expert weights: its workers load those
        self.model = load_for_inference(path, cfg.device, cfg.dtype, max_len=self.max_model_len,
                                        quantization=cfg.quantization, quant_group=cfg.quant_group,
                                        ffn=cfg.afd is None, quantize_head=cfg.quantize_head)
        self.model_config = mcfg
        per_token = mcfg.kv_bytes_per_token(next(self.model.parameters()).element_size())
        bs = cfg.block_size
        min_blocks = -(-(self.max_model_len + 1) // bs)
        blocks = cfg.kv_blocks or max(min_blocks, min(cfg.max_num_seqs * -(-min(self.max_model_len, 2048) // bs),
                                                      KV_BUDGET_BYTES // (per_token * bs)))
        if blocks < min_blocks:
            raise ConfigError(f"kv_blocks={blocks} cannot hold one sequence of max_model_len={self.max_model_len} "
                              f"tokens; give at least {min_blocks} blocks or lower max_model_len")
        self.pool = BlockPool(blocks, bs, prefix_caching=cfg.enable_prefix_caching)
        if cfg.afd is not None:                        # the FFN half of every layer on worker processes
            self._check_afd(lossy)
            from afford.afd.protocol import AFDSpec
            from afford.afd.runner import AFDRunner
            self.runner = AFDRunner(self.model, self.pool, str(path), AFDSpec.parse(cfg.afd), cfg.micro_batches,
                                    cfg.attention, cfg.afd_address, str(next(self.model.parameters()).device), cfg.dtype,
                                    attention_options=cfg.attention_options, native=cfg.native)
        else:
            self.runner = ModelRunner(self.model, self.pool, cfg.attention, cfg.native, graphs=not cfg.enforce_eager,
                                      max_batch=cfg.max_num_seqs,
                                      max_q=1 + speculative.num_speculative_tokens if speculative else 1,
                                      attention_options=cfg.attention_options, kv_mmap_dir=cfg.kv_mmap_dir)
        budget = self.step_token_budget(cfg, self.runner.device)
        decoding = cfg.decode_token_budget or (64 if self.runner.device.type == "cpu" else budget)
        self.scheduler = Scheduler(self.pool, cfg.max_num_seqs, budget, self.max_model_len,
                                   chunked_prefill=cfg.enable_chunked_prefill,
                                   decode_token_budget=min(decoding, budget))
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.sampler = Sampler()
        eos = set(mcfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = tuple(sorted(eos))
        self.stats = EngineStats()
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.fault_hook = None           # tests only: called with each sequence as it takes its new tokens
        self.speculator = Speculator.build(speculative, self) if speculative is not None else None
        if self.speculator is not None:
            self.stats.draft_counters = self.speculator.proposer.counters
        self.levers = None
        if lossy is not None and lossy.any:
            from afford.levers import Levers
            self.levers = Levers(lossy, self)
        self.own_source = "small" if self.levers and self.levers.cascade else "target"   # provenance of its tokens
        if self.speculator and self.speculator.controller.wants_profile:
            self._profile_step_times()
        # async scheduling (vLLM's async scheduling, SGLang's overlap scheduler): a plain greedy decode step
        # is launched with the step before's tokens still on the device, and the host takes that step's
        # tokens in (stop checks, detokenizing, outputs) while the GPU runs the new one. Default: on with CUDA
        # graphs. The tokens are the synchronous loop's; a sequence that stopped costs one discarded row.
        on = cfg.async_scheduling
        if on and cfg.afd is not None:
            raise ConfigError("async_scheduling does not combine with afd (the AFD runner feeds host tokens); "
                              "drop one of them")
        self.async_scheduling = bool(on if on is not None else
                                     (getattr(self.runner, "graphs", None) is not None and cfg.afd is None))
        self._inflight: _InFlight | None = None
        self.steps_ahead = 0             # decode steps launched before the host had read the step before
        self.cost_hw = self.cost_spec = None
        if cfg.cost_hardware:
            from afford.cost.hardware import get_hardware
            from afford.cost.hf import spec_from_model_config
            self.cost_hw = get_hardware(cfg.cost_hardware)[0]
            self.cost_spec = spec_from_model_config(mcfg, self.runner.kv[0][0].element_size())

    def _check_afd(self, lossy: LossyConfig | None) -> None:
        from afford.models.quant import quant_settings
        dev = next(self.model.parameters()).device
        if dev.type != "cpu":
            raise ConfigError(f"afd runs its messages over gloo on the CPU in this build; the model is on {dev}: use "
                              f"--device cpu (NCCL on GPUs is not implemented)")
        if quant_settings(self.model):                 # quantization= or a quantized checkpoint
            raise ConfigError(AFD_QUANTIZED)
        if self.cfg.kv_mmap_dir is not None:
            raise ConfigError("afd with kv_mmap_dir is not implemented (the attention side allocates its KV pool in "
                              "RAM); drop one of them")
        if lossy is not None and lossy.grad is not None:
            raise ConfigError("afd with grad_corpus is not implemented (GRAD runs the whole model on its documents "
                              "in this process); drop one of them")
        from afford.afd.protocol import AFDSpec
        if AFDSpec.parse(self.cfg.afd).attention > 1 and self.cfg.enable_prefix_caching:
            raise ConfigError("afd attention=N>1 with prefix caching is not implemented (a cached block's K/V lives on "
                              "the attention worker that wrote it): add --no-enable-prefix-caching "
                              "(enable_prefix_caching=False) or use attention=1")

    @property
    def broken(self) -> Exception | None:
        """Why this engine can finish no forward any more (an AFD worker died), else None."""
        return getattr(self.runner, "broken", None)

    def close(self) -> None:
        """Release what outlives the engine object: AFD worker processes (a no-op otherwise)."""
        if hasattr(self.runner, "close"):
            self.runner.close()

    @staticmethod
    def step_token_budget(cfg: EngineConfig, device: torch.device) -> int:
        """Tokens one step may feed: the configured budget, else 512 on a CPU (a prompt chunk there costs about
        its tokens' arithmetic, and a small budget keeps running decodes from stalling) and 2048 on a GPU
        (vLLM's serving default: a prefill forward runs eagerly, and its fixed cost of 6-15 ms for a 1.1 B
        model's 22 layers on an H200 machine is paid once per chunk -- benchmarks/gpu_decode.py)."""
        if cfg.max_num_batched_tokens is not None:
            return cfg.max_num_batched_tokens
        return 512 if device.type == "cpu" else 2048

    PROFILE_SHAPES = ((1, 1, 32), (1, 2, 96), (1, 4, 64), (1, 6, 32), (2, 1, 64), (2, 3, 32), (4, 1, 96),
                      (4, 5, 32), (8, 2, 64), (16, 1, 32), (16, 3, 64), (32, 1, 32))   # (batch, 1 + k, context)

    def _profile_step_times(self) -> None:
        """Time synthetic target verifies and draft steps (batch sizes, drafts per sequence, contexts; the
        draft caught up and catching up) on fake sequences, and hand them to the speculation controller as
        anchors of its step-time model."""
        ctl, pool, runner = self.speculator.controller, self.pool, self.runner
        prop = self.speculator.proposer
        drafter = getattr(prop, "runner", None)
        cuda = runner.device.type == "cuda"
        # on CUDA a shape's first forward captures its graph (and may compile kernels): run it once untimed,
        # and wait for the GPU before reading the clock
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for batch, per, ctx in self.PROFILE_SHAPES:
            ids = [-(i + 1) for i in range(batch)]
            if pool.num_free < batch * pool.blocks_for(ctx + per) or batch > self.cfg.max_num_seqs \
                    or ctx + per > self.max_model_len:
                continue
            for i in ids:
                pool.prepare_write(i, ctx + per)
            runner.forward(ids, [0] * batch, [[1] * ctx] * batch)
            if cuda:
                runner.forward(ids, [ctx] * batch, [[1] * per] * batch, [list(range(per))] * batch)
            best = float("inf")
            for _ in range(2):          # the faster of two: one stall on a shared machine must not set an anchor
                sync()
                t = time.perf_counter()
                runner.forward(ids, [ctx] * batch, [[1] * per] * batch, [list(range(per))] * batch)
                sync()
                best = min(best, time.perf_counter() - t)
            ctl.observe_timing(batch * per, batch, batch * (ctx + per), best, 0, 0, 0.0,
                               anchor=True, drafting=batch if per > 1 else 0)
            for i in ids:
                pool.free(i)
            if drafter is None:
                continue
            for catchup in (False, True):
                for i in ids:
                    prop.pool.prepare_write(i, ctx + per)
                if not catchup:
                    drafter.forward(ids, [0] * batch, [[1] * ctx] * batch)
                if cuda:
                    drafter.forward(ids, [ctx] * batch, [[1]] * batch)     # the decode bucket's capture
                sync()
                t = time.perf_counter()
                for j in range(per):
                    if catchup and j == 0:
                        drafter.forward(ids, [0] * batch, [[1] * ctx] * batch)
                    else:
                        drafter.forward(ids, [ctx + j] * batch, [[1]] * batch)
                sync()
                ctl.observe_timing(0, batch, 0, None, per, batch * per, time.perf_counter() - t,
                                   batch * (ctx - 1) if catchup else 0, anchor=True)
                for i in ids:
                    prop.pool.free(i)

    def modeled_usd_per_1m(self, context: int) -> float | None:
        """The Step-3 cost model's USD per 1M decoded tokens of this model at `context` on cost_hardware."""
        if self.cost_spec is None:
            return None
        from afford.cost.model import cost_per_token_usd
        return 1e6 * cost_per_token_usd(self.cost_spec, max(context, 1), self.cost_hw)

    # ---- requests ----
    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            text = prompt
        else:
            ids, text = [int(t) for t in prompt], None
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ConfigError(f"prompt token ids {bad[:3]} are outside the vocabulary (size "
                                  f"{self.model_config.vocab_size})")
        if not ids:
            raise ConfigError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ConfigError(f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                              f"shorten the prompt or raise max_model_len (nothing is truncated silently)")
        if params.n > 1 and getattr(self.runner, "attention", 1) > 1:
            raise ConfigError(f"n={params.n} with afd attention=N>1 is not implemented (the n choices share K/V "
                              f"blocks, which live on one attention worker): send n=1 requests or use attention=1")
        if -(-(len(ids) + 1) // self.pool.block_size) * params.n > self.pool.num_blocks:
            raise ConfigError(f"n={params.n} copies of a {len(ids)}-token prompt do not fit the KV pool; lower n")
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self.seqs:
            raise ConfigError(f"request id {rid!r} is already in use")
        seqs = [self._new_seq(rid if i == 0 else f"{rid}/{i}", text, ids, params, i) for i in range(params.n)]
        if self.levers is not None:
            try:
                fed = self.levers.on_request(seqs, text if text is not None else self.tokenizer.decode(ids))
            except Exception:
                for s in seqs:                 # refused at admission: nothing of it stays
                    self.seqs.pop(s.request_id, None)
                    self.levers.forget(s)
                raise
            self.stats.flops += 2.0 * self.model_config.active_parameters * fed       # GRAD's document forwards
        parent = seqs[0]
        parent.children = seqs[1:]       # forked from the parent's prompt blocks right after its prefill
        parent.siblings = seqs[1:]       # kept: an abort stops all n choices, forked or not
        self.scheduler.add(parent)
        return parent

    def _new_seq(self, rid: str, text, ids, params: SamplingParams, index: int) -> Sequence:
        # every sequence owns a generator: its seed (+ its index among n), or one drawn from the engine's stream
        seed = params.seed + index if params.seed is not None else int(torch.randint(1 << 62, (1,), generator=self.rng))
        seq = Sequence(next(self._ids), rid, text, ids, params, self.tokenizer, torch.Generator().manual_seed(seed))
        seq.index = index
        self.seqs[rid] = seq
        return seq

    def abort(self, request_id: str) -> None:
        """Stop a request (and its n > 1 siblings) and free its blocks now."""
        seq = self.seqs.get(request_id)
        # its first choice may have finished (and left self.seqs) while the others run
        group = [seq] + seq.siblings if seq is not None else \
            [s for s in self.seqs.values() if s.index > 0 and s.request_id.rsplit("/", 1)[0] == request_id]
        for s in group:
            if not s.finished:
                s.finish("abort")
                self._release(s)
                self.stats.aborted += 1

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # ---- the step ----
    def step(self) -> list[RequestOutput]:
        """One engine step: every scheduled sequence advances through ONE batched target forward (prompt
        chunks and decodes together) -- or two when speculation drafts for the decodes: the prompt chunks'
        forward, then the verification of the drafts. Returns an output for each sequence that advanced."""
        if self._inflight is not None:
            return self._continue_async()
        spec = self.speculator
        sched = self.scheduler.schedule(lookahead=spec.k if spec else 0)
        for s in sched.preempted:
            if spec:
                spec.proposer.free(s)
        if not sched.seqs:
            return []
        self.runner.copy_blocks(sched.copies)
        if self._async_eligible(sched):
            t0 = time.perf_counter()
            seqs = sched.seqs
            self._inflight = self._launch(seqs, [s.num_computed for s in seqs], [[s.token_ids[-1]] for s in seqs])
            self._inflight.stats.preempted = len(sched.preempted)
            return self._continue_async(t0)
        parts = [(sched.kind, sched.seqs, sched.chunks)]
        if (spec or (self.levers and self.levers.cascade)) and sched.kind == "mixed":
            pre = [(s, n) for s, n in zip(sched.seqs, sched.chunks) if s.in_prefill]
            dec = [s for s in sched.seqs if not s.in_prefill]
            parts = [("prefill", [s for s, _ in pre], [n for _, n in pre]), ("decode", dec, [1] * len(dec))]
        outs = []
        for i, (kind, seqs, chunks) in enumerate(parts):
            outs += self._run(kind, seqs, chunks, len(sched.preempted) if i == 0 else 0)
        self._refresh_counters()
        return outs

    def _refresh_counters(self) -> None:
        self.stats.prefix_hit_tokens = self.pool.hit_tokens
        if hasattr(self.runner.backend, "counters"):
            self.stats.sparse = self.runner.backend.counters()

    def _run(self, kind: str, seqs: list[Sequence], chunks: list[int], preempted: int) -> list[RequestOutput]:
        t0 = time.perf_counter()
        spec = self.speculator if kind == "decode" else None
        ks, catchup = spec.ks(seqs, self.max_model_len) if spec else ([0] * len(seqs), [])
        if any(ks):
            outs, st = self._speculative_step(seqs, ks, catchup)
        elif kind == "decode" and self.levers and self.levers.cascade:
            outs, st = self._cascade_step(seqs)
        else:
            outs, st = self._plain(seqs, chunks)
        if spec:
            st.predicted_seconds = spec.controller.last_prediction
        self._record(st, kind, time.perf_counter() - t0, preempted)
        return outs

    def _record(self, st: StepStats, kind: str, seconds: float, preempted: int) -> None:
        """A step's stats into the engine's totals (and the speculation controller's estimates)."""
        st.kind, st.seconds, st.preempted = kind, seconds, preempted
        st.weight_bytes = (self.runner.weight_bytes if st.tokens_in else 0) + st.side_bytes
        st.kv_bytes = st.context_tokens * self.runner.kv_bytes_per_token
        st.flops = 2.0 * self.model_config.active_parameters * st.tokens_in + st.side_flops
        self.stats.add(st)
        if self.speculator:
            self.speculator.controller.observe(st)
            if st.drafted:
                self.speculator.proposer.observe(st)
        if self.cost_spec is not None and kind == "decode":
            self.stats.modeled_usd_per_1m = self.modeled_usd_per_1m(st.context_tokens // st.num_seqs)
            self.stats.cost_hardware = self.cost_hw.key

    # ---- async scheduling: decode steps one ahead of the host ----
    def _async_eligible(self, sched) -> bool:
        """A step that may run ahead: plain greedy decodes whose tokens nothing but the argmax decides."""
        return self.async_scheduling and sched.kind == "decode" and self.speculator is None \
            and self.levers is None \
            and all(s.params.greedy and s.params.logprobs is None and not s.children for s in sched.seqs)

    def _launch(self, seqs: list[Sequence], positions: list[int], tokens: list[list[int]],
                ids_dev: torch.Tensor | None = None) -> _InFlight:
        """Queue one decode forward and its argmax without waiting for either (ids_dev: the fed tokens
        on the device, the step before's argmax; then `tokens` are placeholders)."""
        logits = self.runner.forward([s.seq_id for s in seqs], positions, tokens, ids_dev=ids_dev)   # (n, V)
        tok = logits.argmax(-1)
        host, ready = tok, None
        if tok.is_cuda:
            host = torch.empty(tok.shape, dtype=tok.dtype, pin_memory=True)
            host.copy_(tok, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        st = StepStats.of_forward("", [s.seq_id for s in seqs], positions, [1] * len(seqs))
        return _InFlight(list(seqs), list(positions), tok, host, ready, st)

    def _continue_async(self, t0: float | None = None) -> list[RequestOutput]:
        """Launch the step after the one in flight where nothing the host has not read yet could change
        it, then take the one in flight in: its tokens, stops, outputs."""
        t0 = time.perf_counter() if t0 is None else t0
        cur, nxt = self._inflight, None
        keep = self._continuing(cur)
        if keep:
            seqs = [cur.seqs[i] for i in keep]
            copies = [c for s in seqs for c in self.pool.prepare_write(s.seq_id, len(s.token_ids) + 1)]
            self.runner.copy_blocks(copies)
            ids = cur.tokens
            if len(keep) < len(cur.seqs):      # from pinned memory: a pageable copy would wait for the GPU
                at = torch.tensor(keep)
                at = at.pin_memory().to(ids.device, non_blocking=True) if ids.is_cuda else at
                ids = ids.index_select(0, at)
            nxt = self._launch(seqs, [len(s.token_ids) for s in seqs], [[0]] * len(seqs), ids)
            self.steps_ahead += 1
        self._inflight = nxt
        if cur.ready is not None:
            cur.ready.synchronize()
        outs = []
        for s, pos, tok in zip(cur.seqs, cur.positions, cur.host.tolist()):
            if s.finished:                     # stopped at the step before (its token was past the stop) or aborted
                continue
            self._computed(s, pos + 1)
            outs.append(self._emit(s, [tok], None))
        st = cur.stats
        st.tokens_out, st.k_per_seq, st.accepted_per_seq = len(outs), [0] * st.num_seqs, [0] * st.num_seqs
        self._record(st, "decode", time.perf_counter() - t0, st.preempted)
        self._refresh_counters()
        return outs

    def _continuing(self, cur: _InFlight) -> list[int] | None:
        """Which of the step in flight's sequences the next step feeds, one token past their last read one,
        or None when the next step must wait for the host: a request waits to be admitted, a running
        sequence is not in the step in flight, or the pool lacks the blocks. Sequences that stopped before
        (or were aborted) and those that stop by length at the step in flight are left out; those that
        will stop on a token (EOS, a stop string) cannot be known yet: their row is computed and dropped."""
        sch = self.scheduler
        live = [i for i, s in enumerate(cur.seqs) if not s.finished]
        if (sch.waiting and len(sch.running) < sch.max_num_seqs) or len(sch.running) != len(live):
            return None
        keep = [i for i in live if cur.seqs[i].num_output + 1 < cur.seqs[i].params.max_tokens
                and len(cur.seqs[i].token_ids) + 1 < self.max_model_len]
        need = sum(self.pool.extra_blocks(cur.seqs[i].seq_id, len(cur.seqs[i].token_ids) + 1) for i in keep)
        return keep if keep and need <= self.pool.num_free else None

    def _computed(self, s: Sequence, n: int) -> None:
        """s's first n tokens are in the cache and final: full blocks among them join the prefix cache."""
        s.num_computed = n
        self.pool.register(s.seq_id, s.token_ids, n)

    def _plain(self, seqs: list[Sequence], chunks: list[int]) -> tuple[list[RequestOutput], StepStats]:
        """Feed each sequence its next chunks[i] tokens; those whose chunk reaches their last token sample."""
        starts = [s.num_computed for s in seqs]
        prefill = [s.in_prefill for s in seqs]
        tokens = [s.token_ids[st:st + n] for s, st, n in zip(seqs, starts, chunks)]
        done = [st + n == len(s.token_ids) for s, st, n in zip(seqs, starts, chunks)]
        logits_rows = [[] if not d else list(range(len(t))) if p and st == 0 and s.params.prompt_logprobs
                       and s.prompt_logprobs is None else [len(t) - 1]
                       for s, p, st, t, d in zip(seqs, prefill, starts, tokens, done)]
        logits = self.runner.forward([s.seq_id for s in seqs], starts, tokens, logits_rows)   # (R, V)
        if any(len(r) > 1 for r in logits_rows):
            self._prompt_logprobs(seqs, logits_rows, logits)
            ends = list(itertools.accumulate(len(r) for r in logits_rows))
            logits = logits[torch.tensor([e - 1 for e, r in zip(ends, logits_rows) if r])]      # (done, V)
        sampling = [s for s, d in zip(seqs, done) if d]
        if self.levers is not None and sampling:
            logits = self.levers.fuse(sampling, logits)
            next_tokens = iter(self.levers.pick(sampling, logits, self.sampler))
        else:
            next_tokens = iter(self.sampler(logits, [s.params for s in sampling], [s.generator for s in sampling])) \
                if sampling else iter(())
        row = -1                               # the sampled sequence's logits row (sliced only where logprobs need it)
        outs = []
        for s, p, st, toks, d in zip(seqs, prefill, starts, tokens, done):
            self._computed(s, st + len(toks))
            if not d:                          # a prompt chunk short of the end: nothing to sample yet
                continue
            tok = next(next_tokens)
            row += 1
            if self.speculator and not p:      # the scheduler reserved speculative slots left unused
                self.pool.truncate(s.seq_id, s.num_computed)
            s.in_prefill = False
            children, s.children = s.children, []
            if s.params.shared_prefix and children:
                s.children, children = children, []     # they fork after the shared tokens (_fork_shared)
            for c in children:                 # n > 1: share the prompt's blocks, sample independently
                self.pool.fork(s.seq_id, c.seq_id)
                c.num_computed = s.num_computed
                self.scheduler.admit_forked(c)
            outs.append(self._emit(s, [tok], logits, row))
            outs += self._fork_shared(s)
            for c in children:
                c_tok = self.sampler(logits[row:row + 1], [c.params], [c.generator])[0]
                outs.append(self._emit(c, [c_tok], logits, row))
        st = StepStats.of_forward("", [s.seq_id for s in seqs], starts, [len(t) for t in tokens])
        st.prefill_tokens = sum(len(t) for p, t in zip(prefill, tokens) if p)
        st.tokens_out, st.k_per_seq, st.accepted_per_seq = len(outs), [0] * len(seqs), [0] * len(seqs)
        return outs, st

    def _speculative_step(self, seqs: list[Sequence], ks: list[int],
                     catchup: list[int]) -> tuple[list[RequestOutput], StepStats]:
        """Draft k_i tokens per sequence, verify all of them in ONE target forward, keep the accepted
        prefix plus one token, roll both KV caches back past it."""
        sp = self.speculator
        t0 = time.perf_counter()
        drafts = sp.proposer.propose(seqs, ks)
        draft_s = time.perf_counter() - t0
        starts = [len(s.token_ids) - 1 for s in seqs]
        tokens = [[s.token_ids[-1]] + d.tokens for s, d in zip(seqs, drafts)]
        logits = self.runner.forward([s.seq_id for s in seqs], starts, tokens,
                                     [list(range(len(t))) for t in tokens])        # (sum(k_i + 1), V)
        st = StepStats.of_forward("decode", [s.seq_id for s in seqs], starts, [len(t) for t in tokens])
        st.k_per_seq, st.draft_seconds = [len(d.tokens) for d in drafts], draft_s
        st.draft_catchup = sum(c for c, k in zip(catchup, ks) if k)
        outs, at = [], 0
        for s, start, d in zip(seqs, starts, drafts):
            own = logits[at:at + len(d.tokens) + 1]                                     # (k_i + 1, V)
            at += len(d.tokens) + 1
            policy = sp.greedy if s.params.greedy else sp.policy
            n, nxt = policy.accept(own, d, s.params, s.generator)
            valid = start + 1 + n                  # K/V positions that hold kept tokens
            self.pool.truncate(s.seq_id, valid)
            sp.proposer.rollback(s, valid)
            s.num_computed = valid                 # the accepted drafts join token_ids in _emit: register them now
            self.pool.register(s.seq_id, s.token_ids, valid, pending=d.tokens[:n])
            before = s.num_output
            outs.append(self._emit(s, d.tokens[:n] + [nxt], own, 0, ["draft"] * n + ["target"]))
            outs += self._fork_shared(s)
            st.tokens_out += s.num_output - before
            st.drafted += len(d.tokens)
            st.accepted += n
            st.accepted_per_seq.append(n)
            s.metrics.drafted += len(d.tokens)
            s.metrics.accepted += n
            for holder in (st, s.metrics):
                add_counts(holder.accepted_per_position, [1] * n + [0] * (len(d.tokens) - n))
                add_counts(holder.drafted_per_position, [1] * len(d.tokens))
        return outs, st

    def _cascade_step(self, seqs: list[Sequence]) -> tuple[list[RequestOutput], StepStats]:
        """EAD (afford/levers/cascade.py): each sequence's next token comes from its active model, which
        first catches up on the tokens the other model produced; the token's entropy updates the switch."""
        from afford.levers.cascade import LARGE, SMALL, entropy_bits
        lv = self.levers
        casc, side = lv.cascade, lv.side
        large = [s for s in seqs if casc.active(s.seq_id) == LARGE]
        if large and not side.fits([(s.seq_id, len(s.token_ids)) for s in large]):
            for s in large:                     # the large model's pool is full: stay small this step
                casc.stay_small(s.seq_id)
            large = []
        small = [s for s in seqs if casc.active(s.seq_id) == SMALL]
        starts = [s.num_computed for s in small]
        fed = [s.token_ids[st:] for s, st in zip(small, starts)]
        rows = {}
        if small:
            for s, row in zip(small, self.runner.forward([s.seq_id for s in small], starts, fed)):   # (b, V)
                rows[s.seq_id] = row
        side_before = side.fed
        side_prompt = sum(max(0, s.num_prompt - side.computed.get(s.seq_id, 0)) for s in large)
        if large:
            for s, row in zip(large, side.feed([s.seq_id for s in large], [s.token_ids for s in large])):
                rows[s.seq_id] = row
        logits = torch.stack([rows[s.seq_id] for s in seqs])                             # (B, V)
        entropy = entropy_bits(logits).tolist()
        logits = lv.fuse(seqs, logits)
        tokens = lv.pick(seqs, logits, self.sampler)
        st = StepStats.of_forward("decode", [s.seq_id for s in small], starts, [len(f) for f in fed])
        st.side_tokens, st.side_prompt_tokens = side.fed - side_before, side_prompt
        st.side_flops = 2.0 * side.cfg.active_parameters * st.side_tokens
        st.side_bytes = side.runner.weight_bytes if large else 0     # one forward reads its weights once
        st.large_tokens = len(large)
        st.catchup_tokens = st.tokens_in - len(small) + st.side_tokens - len(large)
        outs, switches, on_large = [], casc.switches, {s.seq_id for s in large}
        st.num_seqs = len(seqs)                  # both models' sequences (of_forward counted the small one's)
        st.context_tokens += sum(len(s.token_ids) for s in large)
        for i, (s, tok, h) in enumerate(zip(seqs, tokens, entropy)):
            src = LARGE if s.seq_id in on_large else SMALL
            if src == SMALL:
                self._computed(s, len(s.token_ids))
            casc.observe(s.seq_id, h)
            outs.append(self._emit(s, [tok], logits, i, [src]))
            outs += self._fork_shared(s)
        st.switches = casc.switches - switches
        st.tokens_out, st.k_per_seq, st.accepted_per_seq = len(outs), [0] * len(small), [0] * len(small)
        return outs, st

    def _fork_shared(self, s: Sequence) -> list[RequestOutput]:
        """n > 1 with shared_prefix=m (HoneyBee-style test-time scaling): once s has sampled its first m
        tokens, the request's other choices fork from it -- its KV blocks and its m tokens -- and sample on
        their own from there; the m tokens were decoded once, not n times. Each choice is still an exact
        sample of the model; the n are no longer independent (they share the prefix). If s finished
        within the prefix, every choice ends the same way."""
        if not s.children or (s.num_output < s.params.shared_prefix and not s.finished):
            return []
        children, s.children = s.children, []
        outs = []
        for c in children:
            if not s.finished:
                self.pool.fork(s.seq_id, c.seq_id)
                c.num_computed = s.num_computed
            delta = "".join(c.append(t, self.eos_ids, self.max_model_len) for t in s.output_ids)
            c.sources = list(s.sources)
            c.logprobs = list(s.logprobs)
            if s.finished and not c.finished:          # aborted or failed inside the prefix: so do they
                c.finish(s.finish_reason or "abort")
            if c.finished:
                self._release(c)
            else:
                self.scheduler.admit_forked(c)
            outs.append(RequestOutput.from_seq(c, delta))
        return outs

    def _emit(self, s: Sequence, new_tokens: list[int], logits: torch.Tensor, at: int = 0,
              sources: list[str] | None = None) -> RequestOutput:
        """Append tokens to s until it stops (logits[at + i]: the row new_tokens[i] came from). What
        fails here is this sequence's own work (its logprobs, detokenization, stop strings): it fails
        this sequence alone -- finished with reason "error" and the exception in its output -- and the
        batch goes on."""
        try:
            return self._append(s, new_tokens, logits, at, sources)
        except Exception as e:
            if not s.finished:
                s.finish("error")
            self._release(s)
            out = RequestOutput.from_seq(s)
            out.error = e
            return out

    def _append(self, s: Sequence, new_tokens: list[int], logits: torch.Tensor, at: int,
                sources: list[str] | None) -> RequestOutput:
        """sources[i]: who produced new_tokens[i] ("target", "draft" -- an accepted draft token --, "small" /
        "large" under a cascade); None: the engine's own model."""
        if self.fault_hook is not None:
            self.fault_hook(s)
        if isinstance(new_tokens[0], Exception):   # a lever could not choose this sequence's token (Levers.pick)
            raise new_tokens[0]
        s.metrics.forward_passes += 1
        delta = ""
        for i, tok in enumerate(new_tokens):
            if s.params.logprobs is not None:
                s.logprobs.append(top_logprobs(torch.log_softmax(logits[at + i].float(), -1), tok, s.params.logprobs))
            s.sources.append(sources[i] if sources else self.own_source)
            delta += s.append(tok, self.eos_ids, self.max_model_len)
            if s.finished:
                break
        if s.finished:
            s.metrics.usd_per_1m_tokens = self.modeled_usd_per_1m(len(s.token_ids))
            self._release(s)
        return RequestOutput.from_seq(s, delta)

    def _release(self, s: Sequence) -> None:
        """The one place a finished or aborted sequence gives back what it holds: its entry among the
        engine's requests, its KV blocks, the proposer's state and the controller's estimates."""
        self.seqs.pop(s.request_id, None)
        self.scheduler.finish(s)
        if self.speculator:
            self.speculator.proposer.free(s)
            self.speculator.controller.forget(s.seq_id)
        if self.levers is not None:
            self.levers.forget(s)

    def _prompt_logprobs(self, seqs, logits_rows, logits) -> None:
        at = 0
        for s, r in zip(seqs, logits_rows):
            if len(r) > 1:
                lp = torch.log_softmax(logits[at:at + len(r) - 1].float(), -1)       # (n-1, V)
                nxt = torch.tensor(s.token_ids[1:len(r)], device=lp.device)
                s.prompt_logprobs = lp.gather(1, nxt.unsqueeze(1)).squeeze(1).tolist()
            at += len(r)
