"""StepStats: what one engine step did, cost and saved. The engine, the CLI stats line, the server's
/metrics and the bench all read this one record (and EngineStats, its running sum)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


def add_counts(total: list[int], more: list[int]) -> None:
    """Element-wise total += more, growing total as needed."""
    total.extend([0] * (len(more) - len(total)))
    for i, n in enumerate(more):
        total[i] += n


@dataclass
class StepStats:
    kind: str                      # "prefill" | "decode" | "mixed" (prompt chunks and decodes in one forward)
    num_seqs: int
    tokens_in: int                 # tokens fed through the target this step
    tokens_out: int                # tokens appended to sequences this step
    context_tokens: int            # K/V positions attended (sum over sequences)
    seconds: float = 0.0           # the engine fills this and the three below after the step
    weight_bytes: int = 0          # bytes of target weights read by this step's forward
    kv_bytes: int = 0              # bytes of K/V read by attention
    flops: float = 0.0             # ~2 * params * tokens_in + attention
    drafted: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    k_per_seq: list[int] = field(default_factory=list)        # drafted tokens per sequence (decode)
    seq_ids: list[int] = field(default_factory=list)
    accepted_per_seq: list[int] = field(default_factory=list)
    draft_seconds: float = 0.0                                 # part of `seconds` spent proposing
    draft_catchup: int = 0         # tokens the proposer fed to catch up (beyond one per drafting sequence)
    predicted_seconds: float | None = None                     # the goodput controller's step-time forecast
    preempted: int = 0
    prefill_tokens: int = 0        # of tokens_in, those of prompts being prefilled
    side_tokens: int = 0           # lossy levers: tokens fed through the second (large / guide) model
    side_flops: float = 0.0        # ... and their FLOPs (~2 * its params * side_tokens; part of `flops`)
    side_bytes: int = 0            # ... and the weight bytes its forwards read (part of `weight_bytes`)
    side_prompt_tokens: int = 0    # ... of side_tokens, prompt tokens (EAD: the large model's first catch-up)
    large_tokens: int = 0          # EAD: tokens the large model produced this step
    catchup_tokens: int = 0        # EAD: tokens either model fed to catch up (beyond one per sequence)
    switches: int = 0              # EAD: model switches this step

    @staticmethod
    def of_forward(kind: str, seq_ids: list[int], starts: list[int], fed: list[int]) -> "StepStats":
        """What a step's target forward knows: sequence i fed fed[i] tokens after starts[i] cached ones."""
        return StepStats(kind=kind, num_seqs=len(seq_ids), tokens_in=sum(fed), tokens_out=0,
                         context_tokens=sum(starts) + sum(fed), seq_ids=list(seq_ids))


@dataclass
class EngineStats:
    steps: int = 0
    prefill_steps: int = 0
    max_step_tokens: int = 0       # the most tokens one forward fed (<= max_num_batched_tokens when chunking)
    max_batch: int = 0             # the most sequences one forward fed
    decode_rows: int = 0           # sequence-steps of decoding: tokens fed for sequences past their prefill
    aborted: int = 0               # sequences stopped by an abort (client gone, shutdown), not by finishing
    decode_steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    bytes_read: int = 0
    flops: float = 0.0
    drafted: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    preemptions: int = 0
    k_histogram: list[int] = field(default_factory=list)       # how often each k was chosen (decode steps)
    modeled_usd_per_1m: float | None = None     # Step-3 cost model at the last decode step's mean context
    cost_hardware: str | None = None
    side_tokens: int = 0            # lossy levers: tokens fed through the second model (see StepStats)
    side_prompt_tokens: int = 0     # ... of which prompt tokens
    large_tokens: int = 0           # EAD: generated tokens the large model produced
    catchup_tokens: int = 0         # EAD: catch-up tokens fed by either model
    switches: int = 0               # EAD: model switches
    sparse: dict | None = None      # attention="sparse": the backend's counters (bytes read vs dense, fast tier)
    draft_counters: Callable[[], dict | None] | None = None   # the proposer's own counters, read when asked
    prefix_hit_tokens: int = 0      # prompt tokens whose KV came from the prefix cache (the engine copies
    last: StepStats | None = None   # the pool's count here after each step)

    def add(self, s: StepStats) -> None:
        self.steps += 1
        self.last = s
        self.bytes_read += s.weight_bytes + s.kv_bytes
        self.flops += s.flops
        self.preemptions += s.preempted
        self.prompt_tokens += s.prefill_tokens
        self.max_step_tokens = max(self.max_step_tokens, s.tokens_in)
        self.max_batch = max(self.max_batch, s.num_seqs)
        self.decode_rows += s.tokens_in - s.prefill_tokens
        if s.kind == "prefill":
            self.prefill_steps += 1
            self.prefill_seconds += s.seconds
        else:                          # a mixed step counts as decoding: its decodes waited for nothing else
            self.decode_steps += 1
            self.decode_seconds += s.seconds
            self.decode_tokens += s.tokens_out
        self.generated_tokens += s.tokens_out
        self.drafted += s.drafted
        self.accepted += s.accepted
        self.side_tokens += s.side_tokens
        self.side_prompt_tokens += s.side_prompt_tokens
        self.large_tokens += s.large_tokens
        self.catchup_tokens += s.catchup_tokens
        self.switches += s.switches
        add_counts(self.accepted_per_position, s.accepted_per_position)
        add_counts(self.drafted_per_position, s.drafted_per_position)
        if s.kind == "decode":
            hist = [0] * (max(s.k_per_seq, default=0) + 1)
            for k in s.k_per_seq:
                hist[k] += 1
            add_counts(self.k_histogram, hist)

    @property
    def draft(self) -> dict | None:
        """The proposer's counters (a sorted draft: tokens per exit, thresholds), None without one."""
        return self.draft_counters() if self.draft_counters is not None else None

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def bandwidth_gbs(self) -> float:
        t = self.prefill_seconds + self.decode_seconds
        return self.bytes_read / t / 1e9 if t else 0.0

    @property
    def gflops(self) -> float:
        t = self.prefill_seconds + self.decode_seconds
        return self.flops / t / 1e9 if t else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def line(self) -> str:
        s = (f"prompt {self.prompt_tokens} tok | generated {self.generated_tokens} tok | "
             f"decode {self.decode_tokens_per_s:.1f} tok/s | {self.bandwidth_gbs:.2f} GB/s | "
             f"{self.gflops:.1f} GFLOP/s | {self.steps} steps")
        if self.drafted:
            s += f" | accepted {self.accepted}/{self.drafted} ({self.acceptance_rate:.0%})"
        if self.large_tokens or self.switches:
            s += (f" | cascade: large model {self.large_tokens}/{self.generated_tokens} tok, {self.switches} "
                  f"switches, {self.catchup_tokens} catch-up tok")
        if self.sparse and self.sparse["dense_bytes"]:
            sp = self.sparse
            s += (f" | sparse attention: K/V read {sp['read_bytes'] / sp['dense_bytes']:.0%} of dense, "
                  f"fast tier hit rate {sp['hits'] / max(sp['hits'] + sp['misses'], 1):.0%}, "
                  f"{sp['moved_bytes'] / 1e6:.1f} MB moved")
        d = self.draft
        if d and "exit_tokens" in d:
            s += (" | draft exits " + ", ".join(f"{e}L {n}" for e, n in zip(d["exits"], d["exit_tokens"])) +
                  (f" (thresholds {', '.join(f'{t:g}' for t in d['thresholds'])})" if d["thresholds"] else ""))
        if self.preemptions:
            s += f" | {self.preemptions} preemptions"
        if self.prefix_hit_tokens:
            s += f" | prefix cache {self.prefix_hit_tokens} tok reused"
        if self.modeled_usd_per_1m is not None:
            s += f" | modeled ${self.modeled_usd_per_1m:.4g}/1M tok on {self.cost_hardware}"
        return s
