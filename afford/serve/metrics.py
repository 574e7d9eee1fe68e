"""Prometheus metrics of one server: its own registry, request counters and latency histograms, and
gauges read from the engine at scrape time (StepStats totals, queue and KV-pool state)."""
from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _SpeculativeCollector:
    """Speculation and prefix-cache counters straight from the engine's EngineStats and block pool (one
    source of truth)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        st = self.engine.stats
        yield CounterMetricFamily("afford_speculative_drafted_tokens", "draft tokens proposed", value=st.drafted)
        yield CounterMetricFamily("afford_speculative_accepted_tokens", "draft tokens accepted", value=st.accepted)
        pos = CounterMetricFamily("afford_speculative_accepted_by_position", "accepted draft tokens by position",
                                  labels=["position"])
        for i, n in enumerate(st.accepted_per_position):
            pos.add_metric([str(i + 1)], n)
        yield pos
        ks = CounterMetricFamily("afford_speculative_k_chosen", "speculation length chosen per sequence and step",
                                 labels=["k"])
        for k, n in enumerate(st.k_histogram):
            ks.add_metric([str(k)], n)
        yield ks
        yield CounterMetricFamily("afford_engine_steps", "engine steps", value=st.steps)
        yield CounterMetricFamily("afford_preemptions", "sequences preempted by recompute", value=st.preemptions)
        yield CounterMetricFamily("afford_aborted_sequences", "sequences stopped by an abort (client gone, "
                                  "shutdown)", value=st.aborted)
        pool = self.engine.pool
        yield CounterMetricFamily("afford_prefix_cache_queries", "tokens of admitted prompts looked up in the "
                                  "prefix cache", value=pool.queried_tokens)
        yield CounterMetricFamily("afford_prefix_cache_hits", "prompt tokens whose KV came from the prefix cache",
                                  value=pool.hit_tokens)
        sparse = self.engine.runner.backend.counters() if hasattr(self.engine.runner.backend, "counters") else None
        if sparse is not None:                       # attention="sparse" and its two-tier KV store
            for key, text in (("read_bytes", "K/V bytes decode attention read"),
                              ("dense_bytes", "K/V bytes dense attention would have read"),
                              ("moved_bytes", "K/V bytes moved into the fast tier"),
                              ("hits", "selected blocks found in the fast tier"),
                              ("misses", "selected blocks copied into the fast tier")):
                yield CounterMetricFamily(f"afford_sparse_{key}", text, value=sparse[key])
            yield GaugeMetricFamily("afford_sparse_fast_tier_blocks", "blocks resident in the fast tier, all layers",
                                    value=sparse["fast_blocks"])
        draft = st.draft
        if draft and "exit_tokens" in draft:         # a sorted (S2D) draft: where its tokens stopped, its thresholds
            ex = CounterMetricFamily("afford_draft_exit_tokens", "drafted tokens by the exit (layers) they stopped at",
                                     labels=["exit"])
            th = GaugeMetricFamily("afford_draft_exit_threshold", "top-probability threshold of each exit before "
                                   "the last (absent while calibrating)", labels=["exit"])
            for i, (e, n) in enumerate(zip(draft["exits"], draft["exit_tokens"])):
                ex.add_metric([str(e)], n)
                if draft["thresholds"] and i < len(draft["thresholds"]):
                    th.add_metric([str(e)], draft["thresholds"][i])
            yield ex
            yield th
        if self.engine.levers is not None:          # the lossy levers (afford/levers/)
            yield CounterMetricFamily("afford_side_model_tokens", "tokens fed through the second model (EAD's "
                                      "large model, the re-ranker's guide)", value=st.side_tokens)
            yield CounterMetricFamily("afford_cascade_large_tokens", "generated tokens the EAD large model "
                                      "produced", value=st.large_tokens)
            yield CounterMetricFamily("afford_cascade_catchup_tokens", "tokens EAD's models fed to catch up",
                                      value=st.catchup_tokens)
            yield CounterMetricFamily("afford_cascade_switches", "EAD model switches", value=st.switches)


class ServerMetrics:
    def __init__(self, llm):
        eng = llm.engine
        self.registry = r = CollectorRegistry()
        self.requests = Counter("afford_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.ttft = Histogram("afford_time_to_first_token_seconds", "time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("afford_time_per_output_token_seconds", "time per output token after the first",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("afford_e2e_request_latency_seconds", "request latency", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.prompt_tokens = Counter("afford_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("afford_generation_tokens", "tokens generated", registry=r)
        Gauge("afford_running_sequences", "sequences running", registry=r).set_function(
            lambda: len(eng.scheduler.running))
        Gauge("afford_waiting_sequences", "sequences waiting", registry=r).set_function(
            lambda: len(eng.scheduler.waiting))
        Gauge("afford_kv_blocks_used", "KV blocks in use", registry=r).set_function(lambda: eng.pool.num_used)
        Gauge("afford_kv_blocks_free", "KV blocks free (empty or cached and unused)", registry=r).set_function(
            lambda: eng.pool.num_free)
        Gauge("afford_kv_blocks_cached", "KV blocks in the prefix cache", registry=r).set_function(
            lambda: eng.pool.num_cached)
        Gauge("afford_requests_in_flight", "requests admitted and not finished", registry=r).set_function(
            lambda: llm.in_flight)
        r.register(_SpeculativeCollector(eng))

    def observe_finished(self, metrics: dict) -> None:
        self.prompt_tokens.inc(metrics["prompt_tokens"])
        self.generated_tokens.inc(metrics["generated_tokens"])
        if metrics.get("ttft_s") is not None:
            self.ttft.observe(metrics["ttft_s"])
        if metrics.get("latency_s") is not None:
            self.e2e.observe(metrics["latency_s"])
            n = metrics["generated_tokens"]
            if n > 1 and metrics.get("ttft_s") is not None:
                self.tpot.observe((metrics["latency_s"] - metrics["ttft_s"]) / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
