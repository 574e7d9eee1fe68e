"""The fixed cost of one decode forward, where weight bytes are negligible: a 1-layer 64-wide Llama and
the bundled 0.89 M draft, plus the bundled 5.5 M target for the draft/target ratio (engine wall time,
the median of interleaved rounds). Per token, batch 1, greedy, side by side in one run:

- bare: a ~40-line gpt-fast-style PyTorch loop over the same weights (fused q|k|v and gate|up, static
  contiguous KV cache, SDPA) -- what eager PyTorch costs with nothing else around it;
- runner: afford's ModelRunner.prepare_decode + run (inputs, attention metadata, model, LM head), with the
  native forward (one C++ call, the default on CPU fp32) and with the Python path (native=False);
- engine: afford's whole step (scheduling, forward, sampling, detokenizing, stats), from LLM.generate;
- transformers: `generate` on the same checkpoint.

    python benchmarks/forward_overhead.py [--tokens 128] [--reps 3]

Writes benchmarks/results/forward_overhead.json.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ROOT, save


def tiny_llama(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=128, vocab_size=4096, max_position_embeddings=1024, eos_token_id=0,
                      bos_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok = ROOT / "afford" / "assets" / "default" / "target"
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok / f).exists():
            (out / f).write_bytes((tok / f).read_bytes())
    return out


class BareLoop:
    """Minimal eager decode of an HF Llama state dict at batch 1 (no paging, no scheduler)."""

    def __init__(self, path: Path, max_len: int):
        from afford.config import ModelConfig
        from afford.models.loader import load_state_dict
        from afford.models.transformer import Transformer
        c = ModelConfig.from_dir(path)
        sd = {k: v.float() for k, v in load_state_dict(path).items()}
        self.c, self.eps = c, c.rms_norm_eps
        self.emb = sd["model.embed_tokens.weight"]
        self.head_t = sd.get("lm_head.weight", self.emb).t().contiguous()                 # (hidden, V)
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            w = lambda n: sd[p + n]  # noqa: E731
            qkv = torch.cat([w("self_attn.q_proj.weight"), w("self_attn.k_proj.weight"), w("self_attn.v_proj.weight")])
            gu = torch.cat([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")])
            self.layers.append((w("input_layernorm.weight"), qkv.t().contiguous(), w("self_attn.o_proj.weight").t().contiguous(),
                                w("post_attention_layernorm.weight"), gu.t().contiguous(), w("mlp.down_proj.weight").t().contiguous()))
        self.norm = sd["model.norm.weight"]
        cos, sin = Transformer.rope_tables(c, max_len)
        self.cos, self.sin = cos, sin
        self.k = torch.zeros(c.num_layers, 1, c.num_kv_heads, max_len, c.head_dim)        # (layers, 1, KV, L, D)
        self.v = torch.zeros_like(self.k)

    @torch.inference_mode()
    def step(self, tok: int, pos: int) -> int:
        H, KV, D = self.c.num_heads, self.c.num_kv_heads, self.c.head_dim
        x = self.emb[tok].view(1, -1)                                                     # (1, hidden)
        cos, sin = self.cos[pos].view(1, 1, D), self.sin[pos].view(1, 1, D)
        for i, (n1, qkv_t, o_t, n2, gu_t, d_t) in enumerate(self.layers):
            qkv = (F.rms_norm(x, (x.shape[-1],), n1, self.eps) @ qkv_t).view(1, H + 2 * KV, D)
            qk = qkv[:, :H + KV]
            qk = qk * cos + torch.cat((-qk[..., D // 2:], qk[..., :D // 2]), -1) * sin     # (1, H + KV, D)
            self.k[i, 0, :, pos] = qk[0, H:]
            self.v[i, 0, :, pos] = qkv[0, H + KV:]
            o = F.scaled_dot_product_attention(qk[:, :H].view(1, H, 1, D), self.k[i, :, :, :pos + 1],
                                               self.v[i, :, :, :pos + 1], enable_gqa=KV != H)   # (1, H, 1, D)
            x = x + o.view(1, H * D) @ o_t
            g, u = (F.rms_norm(x, (x.shape[-1],), n2, self.eps) @ gu_t).chunk(2, -1)
            x = x + (F.silu(g) * u) @ d_t
        return int((F.rms_norm(x, (x.shape[-1],), self.norm, self.eps) @ self.head_t).argmax())


def per_token(f, reps):
    f()                                                   # warm-up
    return statistics.median(f() for _ in range(reps))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    from afford import LLM, SamplingParams
    from afford.models.loader import resolve_model_path
    tmp = Path(tempfile.mkdtemp())
    models = {"llama-1x64": tiny_llama(tmp / "tiny"), "default draft": resolve_model_path("default", "draft"),
              "default target": resolve_model_path("default", "target")}
    prompt = list(range(5, 37))                           # 32 tokens
    n = a.tokens
    rows, walls = [], {}
    for name, path in models.items():
        llm = LLM(str(path), max_model_len=len(prompt) + n + 8)
        eng = llm.engine
        sp = SamplingParams(max_tokens=n + 1, temperature=0, ignore_eos=True)

        def engine_run(llm=llm, eng=eng, sp=sp):          # bound now: walls keeps it past this iteration
            before_s, before_n = eng.stats.decode_seconds, eng.stats.decode_tokens
            t = time.perf_counter()
            llm.generate([prompt], sp)
            wall = time.perf_counter() - t
            return wall / n, (eng.stats.decode_seconds - before_s) / (eng.stats.decode_tokens - before_n)

        def runner_run(native=True):
            runner, pool = eng.runner, eng.pool
            kept = runner.native
            runner.native = kept if native else None
            pool.prepare_write(-1, len(prompt) + n)
            runner.forward([-1], [0], [prompt])
            tok = 7
            t = time.perf_counter()
            for i in range(n):
                batch, ids = runner.prepare_decode([-1], [len(prompt) + i], [tok])
                tok = int(runner.run(batch, ids).argmax())
            dt = (time.perf_counter() - t) / n
            pool.free(-1)
            runner.native = kept
            return dt

        bare = BareLoop(path, len(prompt) + n + 8)

        def bare_run():
            for i, t in enumerate(prompt):
                bare.step(t, i)
            tok, t0 = 7, time.perf_counter()
            for i in range(n):
                tok = bare.step(tok, len(prompt) + i)
            return (time.perf_counter() - t0) / n

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.tensor([prompt])

        def hf_run():
            t = time.perf_counter()
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n + 1, min_new_tokens=n + 1,
                        do_sample=False, pad_token_id=0)
            return (time.perf_counter() - t) / n

        eng_wall = statistics.median(engine_run()[0] for _ in range(a.reps + 1))
        eng_step = statistics.median(engine_run()[1] for _ in range(a.reps))
        r = {"model": name, "params": eng.model_config.num_parameters,
             "bare_us": round(1e6 * per_token(bare_run, a.reps), 1),
             "runner_us": round(1e6 * per_token(runner_run, a.reps), 1),
             "runner_python_us": round(1e6 * per_token(lambda: runner_run(native=False), a.reps), 1),
             "engine_step_us": round(1e6 * eng_step, 1), "engine_wall_us": round(1e6 * eng_wall, 1),
             "transformers_us": round(1e6 * per_token(hf_run, a.reps), 1)}
        r["engine_over_bare"] = round(r["engine_wall_us"] / r["bare_us"], 2)
        rows.append(r)
        walls[name] = engine_run
        print(r, flush=True)

    d, t = rows[1], rows[2]
    # the ratio from interleaved runs (draft, target, draft, ...): this machine's speed drifts by more
    # than the difference between rounds, so each round's ratio compares the two at the same moment
    ratios = [walls["default draft"]()[0] / walls["default target"]()[0] for _ in range(2 * a.reps + 1)]
    summary = {"draft_over_target_time": round(statistics.median(ratios), 3),
               "draft_over_target_rounds": [round(x, 3) for x in ratios],
               "draft_over_target_params": round(d["params"] / t["params"], 3)}
    print(summary)
    out = save("forward_overhead", {"settings": vars(a), "rows": rows, **summary})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
