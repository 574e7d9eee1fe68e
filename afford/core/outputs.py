"""RequestOutput: what a finished (or streaming) request returns to the user."""
from __future__ import annotations

from dataclasses import dataclass, field

from afford.core.sequence import Sequence


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]                  # the sequence's own list (never mutated): not copied per step
    text: str
    token_ids: list[int]
    finish_reason: str | None
    finished: bool
    logprobs: list[dict] | None = None          # per generated token: {"token", "logprob", "top": {id: lp}}
    prompt_logprobs: list[float] | None = None  # one per prompt token after the first
    metrics: dict = field(default_factory=dict)
    delta: str = ""                             # text added by the step that produced this output
    index: int = 0                              # which of the request's n choices
    outputs: list["RequestOutput"] = field(default_factory=list)   # LLM.generate: all n choices (this one first)
    error: Exception | None = None              # set when this request failed alone (finish_reason "error")
    sources: list[str] | None = None            # SamplingParams(provenance=True): who produced each token so far
    pieces: list[str] | None = None             # ... and the text each token added (a multi-byte character's
                                                #     text goes with the token that completes it)
    shown: int = 0                              # characters of text handed out so far (deltas; stop hold-back)

    @staticmethod
    def from_seq(seq: Sequence, delta: str = "") -> "RequestOutput":
        """The output of a step: while the request runs, metrics holds its token counts; once it has
        finished, every metric (timings, speculation, modeled cost)."""
        m = seq.metrics
        n_out = seq.num_output
        if not seq.finished:                    # every running sequence gets one per step: keep it cheap
            return RequestOutput(seq.request_id, seq.prompt, seq.prompt_ids, seq.text, seq.output_ids, None, False,
                                 list(seq.logprobs) if seq.params.logprobs is not None else None,
                                 seq.prompt_logprobs, {"prompt_tokens": seq.num_prompt, "generated_tokens": n_out,
                                                       "forward_passes": m.forward_passes, "drafted": m.drafted,
                                                       "accepted": m.accepted}, delta, seq.index,
                                 sources=seq.sources[:n_out] if seq.params.provenance else None,
                                 pieces=list(seq.pieces) if seq.pieces is not None else None, shown=seq.streamed)
        decode_s = (m.finished or m.first_token or 0) - (m.first_token or 0)
        metrics = {
            "prompt_tokens": seq.num_prompt, "generated_tokens": n_out, "forward_passes": m.forward_passes,
            "ttft_s": (m.first_token - m.arrival) if m.first_token else None,
            "latency_s": (m.finished - m.arrival) if m.finished else None,
            "decode_tokens_per_s": (n_out - 1) / decode_s if decode_s > 0 and n_out > 1 else None,
            "preemptions": m.preemptions,
        }
        if m.usd_per_1m_tokens is not None:
            metrics["modeled_usd_per_1m_tokens"] = m.usd_per_1m_tokens
        if m.drafted:
            metrics.update(drafted=m.drafted, accepted=m.accepted, acceptance_rate=m.accepted / m.drafted,
                           accepted_per_position=list(m.accepted_per_position),
                           drafted_per_position=list(m.drafted_per_position),
                           tokens_per_forward=n_out / max(m.forward_passes, 1))
        if "small" in seq.sources:              # EAD: which model produced each token, and the large one's share
            metrics.update(sources=list(seq.sources[:n_out]),
                           large_share=seq.sources[:n_out].count("large") / max(n_out, 1))
        if seq.retrieved:                       # GRAD: the documents the request's graph came from
            metrics["retrieved"] = list(seq.retrieved)
        return RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_ids,
            text=seq.text, token_ids=seq.output_ids, finish_reason=seq.finish_reason, finished=seq.finished,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            prompt_logprobs=seq.prompt_logprobs, metrics=metrics, delta=delta, index=seq.index,
            sources=seq.sources[:n_out] if seq.params.provenance else None,
            pieces=list(seq.pieces) if seq.pieces is not None else None, shown=seq.streamed)
