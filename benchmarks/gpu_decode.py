"""GPU decode against the bandwidth roofline (issue: GPU decode fast path).

The model: a 1.1 B Llama of TinyLlama's shape (22 layers, hidden 2048, 32 heads, 4 KV heads, FFN 5632,
vocabulary 32,000) with random bf16 weights (std 0.02) built on the GPU and saved once to a temporary
folder with a synthetic word-level tokenizer -- nothing is downloaded. Prompts: random token ids, 64
each; 128 new tokens, greedy, ignore_eos. In one run, same card:
- `bare`: a gpt-fast-style static-cache loop (fused q|k|v and gate|up, SDPA over the whole static cache,
  ~50 lines below) on the same weights, eager and with one CUDA graph per decode step -- the anchor;
- afford with CUDA graphs (the default) and with enforce_eager, at batch 1, 16, 64;
- transformers' eager `generate` on the same weights;
- afford int8 / int4 (weight-only, quantized on load) with graphs at batch 1 and 16 (int4: the default --
  tinygemm, with the fused one-row int4 GEMV of triton_gemv.py for the roles GEMV_W4_CONFIGS names; tinygemm
  alone; the sweep's tiles where they differ from the defaults; "auto" -- tinygemm, one-row products
  through afford's Triton row kernel where it timed faster; afford's Triton kernels alone; `afford_int4_head`:
  the LM head int4 too, quantize_head);
- afford draft speculation (k = 4) with a 2-layer draft cut from the target (its first 2 layers, the same
  embeddings and head: the same vocabulary) at batch 1;
- the card's copy bandwidth (device-to-device, read + write counted), the weight bytes one decode step
  reads, and from them the roofline share of afford's batch-1 decode step (`roofline_share`);
- `gpu_busy_share`: the GPU time of one captured batch-1 decode step (its graph replayed back to back,
  timed with CUDA events) over the wall time of a decode step inside afford's engine loop (and the
  same at every batch);
- A/B arms: torch's RoPE + index_copy_ instead of the fused Triton kernel; the CPU's 512-token step budget;
  torch's residual add, RMSNorm, SiLU and product instead of the fused kernels (afford/models/triton_ops.py);
  synchronous scheduling (the host reads each step's tokens before it launches the next) instead of async;
- `gemv_sweep` / `afford_graphs_gemv_b1`: afford's fused one-row Triton GEMV (residual add, RMSNorm and
  SwiGLU inside the product's kernel; afford/models/triton_gemv.py) per matrix role (the LM head too, the final
  norm fused) against cuBLAS, then
  the whole batch-1 step with it (A/B against the default, its roofline share and kernel profile);
- `afford_graphs_nopdl_b*` / `afford_int4_nopdl`: programmatic dependent launch of afford's decode kernels
  (afford/models/triton_lib.py) switched against the default (on since run 10; the arms were `*_pdl` while
  it was off), bf16 at every batch and int4 at batch 1 / 16; `afford_int4_swept_nopdl` both the sweep's int4
  tiles and PDL switched;
- `int4_sweep`: the batch-1 int4 kernels per matrix of the model (tinygemm, cuBLAS bf16, afford's Triton
  GEMV over a grid of tiles), inside CUDA graphs;
- `kernel_profile`: torch.profiler's CUDA kernels of batch-1 decode steps (afford eager / graphs / torch's
  RoPE, the bare loop eager; int4 and int8 in their arms); `host_profile`: cProfile of the engine at
  the largest batch.

tok/s counts generated tokens over the whole generate call (prefill included, the same for every arm);
`decode_ms` is the time of one decode step: (wall of 128 new tokens - wall of 8) / 120, the faster of
two runs each (transformers: one run).
Usage: python benchmarks/gpu_decode.py [--out DIR] [--budget SECONDS] [--tiny (a CPU smoke test)]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from afford import LLM, SamplingParams  # noqa: E402

TINYLLAMA = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False)
TINY = dict(TINYLLAMA, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, vocab_size=512)
PROMPT, NEW, SHORT = 64, 128, 8


def matrix_roles(shape: dict) -> dict[str, tuple[int, int, bool, bool]]:
    """The matrices of a layer by role: (N, K, the add + RMSNorm fused before it, SwiGLU after it)."""
    H, I = shape["hidden_size"], shape["intermediate_size"]
    D = H // shape["num_attention_heads"]
    return {"qkv": (H + 2 * shape["num_key_value_heads"] * D, H, True, False), "o": (H, H, False, False),
            "gate_up": (2 * I, H, True, True), "down": (H, I, False, False)}


# the LM head in the GEMV sweeps: the final add + RMSNorm fused before it; timed over HEAD_COPIES distinct copies
# (4 x 32.8 MB of int4 codes for TinyLlama's head: more than an H100's or H200's L2), not one per layer
HEAD_COPIES = 4


def head_role(shape: dict) -> dict[str, tuple[int, int, bool, bool]]:
    return {"head": (shape["vocab_size"], shape["hidden_size"], True, False)}


def unfused_chain(x, a, gam, fused: bool, swiglu: bool, products):
    """What the fused one-row GEMV replaces, over a list of products p(h): the add + RMSNorm kernel before each
    (where it fuses them), SwiGLU's product after (gate|up)."""
    from afford.models.triton_ops import add_rmsnorm, silu_mul

    def run():
        for p in products:
            y = p(add_rmsnorm(x, a, gam, 1e-5)[1] if fused else x)
            if swiglu:
                silu_mul(y)
    return run


def time_tiles(configs, first, chain, ref, layers: int, nbytes: int, tol: float = 0.05) -> dict:
    """Each tile c: first(c) -> the product of the first matrix (its error against ref), chain(c) -> the
    product over all `layers` matrices, timed in a CUDA graph (us per matrix; None where the card refuses
    the tile, or where its error passes tol -- a wrong kernel is not a fast one); the fastest one's config,
    time and TB/s."""
    from afford.models.quant import _graph_us
    row = {"triton_us": [], "rel_err": [], "max_rel_err": 0.0}
    for c in configs:
        err = us = None
        try:
            y = first(c).float()
            err = float((y - ref).abs().max() / ref.abs().max())
            row["max_rel_err"] = max(row["max_rel_err"], err)
            if not err <= tol:
                raise ValueError(f"relative error {err:.3g} against the reference")
            us = _graph_us(chain(c), 2) / layers
        except Exception as e:                       # a tile this card cannot hold, or a wrong one
            row.setdefault("errors", []).append(f"{c}: {type(e).__name__}: {str(e)[:120]}")
        row["rel_err"].append(err)                   # (per tile, in the order of configs)
        row["triton_us"].append(us)
    us, i = min((t, i) for i, t in enumerate(row["triton_us"]) if t is not None)
    row["best"] = {"config": list(configs[i]), "us": us, "tb_s": nbytes / us / 1e6}
    return row


W4_PROBE = """
import sys, torch
from afford.models import triton_gemv as tg
from afford.models.quant import quantize
sys.path.insert(0, {bench!r})
import gpu_decode
configs, dev, dt = {configs!r}, {device!r}, getattr(torch, {dtype!r})
g = torch.Generator(device=dev).manual_seed(0)
probs = []
for N, K, fused, swiglu in gpu_decode.matrix_roles(getattr(gpu_decode, {shape!r})).values():
    q, sc, z = quantize(torch.randn(N, K, generator=g, device=dev) * 0.02, 4, K)
    x, a = (torch.randn(1, K, generator=g, device=dev).to(dt) for _ in range(2))
    kw = dict(add=a, norm=torch.ones(K, device=dev, dtype=dt), eps=1e-5, swiglu=swiglu) if fused else {{}}
    probs.append((q, sc, z, x, K, kw))
for i, c in enumerate(configs):
    for q, sc, z, x, K, kw in probs:
        tg.gemv_w4(x, tg.w4_pack(q, tg.w4_kind(c)[0]), sc, z, K, c, **kw)
    if dev == "cuda":
        torch.cuda.synchronize()
    print("ok", i, flush=True)
"""


def w4_runnable(configs: list, device: str = "cuda", shape: str = "TINYLLAMA", dtype: str = "bfloat16",
                env: dict | None = None) -> tuple[list, list]:
    """(the int4 tiles that run on this card, those that crashed): each is first run on every role's shape in a
    child process, since an illegal address poisons the CUDA context of the process that meets it; a child that
    dies marks the tile it was on, and a new one goes on from the next. The compiled kernels land in Triton's
    cache, so the sweep does not compile them again."""
    import subprocess
    todo, good, bad = list(configs), [], []
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), **(env or {}))
    while todo:
        code = W4_PROBE.format(bench=str(Path(__file__).resolve().parent), configs=[tuple(c) for c in todo],
                               device=device, shape=shape, dtype=dtype)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=400)
        done = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("ok ")]
        good += [todo[i] for i in done]
        if out.returncode == 0:
            break
        crashed = todo[len(done)]
        bad.append((tuple(crashed), out.stderr.strip().splitlines()[-1][:200] if out.stderr.strip() else "died"))
        todo = todo[len(done) + 1:]
    return good, bad


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(root: Path, shape: dict, device: str):
    """HF Llama with random bf16 weights on the device, saved with a word-level tokenizer; plus a 2-layer
    draft cut from it. Returns (hf model, target dir, draft dir)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    V = shape["vocab_size"]
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2")
    cfg = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    target, draft = root / "target", root / "draft"
    hf.save_pretrained(target)
    fast.save_pretrained(target)
    dcfg = LlamaConfig(**dict(shape, num_hidden_layers=min(2, shape["num_hidden_layers"])), bos_token_id=1,
                       eos_token_id=2, pad_token_id=0)
    with torch.device("meta"):
        dm = LlamaForCausalLM(dcfg)
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith("model.layers.")
             or int(k.split(".")[2]) < 2}
    dm.load_state_dict(state, assign=True)
    dm.save_pretrained(draft)
    fast.save_pretrained(draft)
    del dm, state
    return hf, target, draft


class Bare:
    """gpt-fast's decode loop in miniature: a static (L, B, KV, T_max, D) cache, fused q|k|v and gate|up,
    SDPA over the whole cache with a position mask, greedy; the step can be captured in one CUDA graph."""

    def __init__(self, model, B: int, max_len: int):
        self.m, self.B, self.T = model, B, max_len
        c = model.cfg
        self.H, self.KV, self.D = c.num_heads, c.num_kv_heads, c.head_dim
        dev, dt = model.rope_cos.device, next(model.parameters()).dtype
        self.k = torch.zeros(c.num_layers, B, self.KV, max_len, self.D, device=dev, dtype=dt)
        self.v = torch.zeros_like(self.k)
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph = None

    def forward(self, ids, pos):
        """ids (B, T), pos (T,) -> next token (B,) from the last position."""
        m, H, KV, D = self.m, self.H, self.KV, self.D
        B, T = ids.shape
        x = m.model.embed_tokens(ids)
        cos = m.rope_cos[pos].view(1, T, 1, D).to(x.dtype)
        sin = m.rope_sin[pos].view(1, T, 1, D).to(x.dtype)
        mask = (torch.arange(self.T, device=ids.device).view(1, -1) <= pos.view(-1, 1)).view(1, 1, T, self.T)
        for i, layer in enumerate(m.model.layers):
            a = layer.self_attn
            h = F.rms_norm(x, (x.shape[-1],), layer.input_layernorm.weight, layer.input_layernorm.eps)
            qkv = F.linear(h, a.qkv.weight).view(B, T, H + 2 * KV, D)
            qk = qkv[..., :H + KV, :]
            half = D // 2
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            q, k, v = qk[..., :H, :], qk[..., H:, :], qkv[..., H + KV:, :]
            self.k[i].index_copy_(2, pos, k.transpose(1, 2))
            self.v[i].index_copy_(2, pos, v.transpose(1, 2))
            o = F.scaled_dot_product_attention(q.transpose(1, 2), self.k[i], self.v[i], attn_mask=mask,
                                               enable_gqa=True)
            x = x + F.linear(o.transpose(1, 2).reshape(B, T, H * D), a.o_proj.weight)
            n2 = layer.post_attention_layernorm
            h = F.rms_norm(x, (x.shape[-1],), n2.weight, n2.eps)
            g, u = F.linear(h, layer.mlp.gate_up.weight).chunk(2, -1)
            x = x + F.linear(F.silu(g) * u, layer.mlp.down_proj.weight)
        x = F.rms_norm(x[:, -1], (x.shape[-1],), m.model.norm.weight, m.model.norm.eps)
        return F.linear(x, m.lm_head.weight).argmax(-1)

    def capture(self):
        self.out = self.forward(self.ids, self.pos)                  # warm up
        sync()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.forward(self.ids, self.pos)
        sync()

    @torch.inference_mode()
    def generate(self, prompts: torch.Tensor, n: int) -> torch.Tensor:
        P = prompts.shape[1]
        tok = self.forward(prompts, torch.arange(P, device=prompts.device))
        out = [tok]
        for i in range(n - 1):
            if self.graph is not None:
                self.ids.copy_(tok.view(-1, 1))
                self.pos.fill_(P + i)
                self.graph.replay()
                tok = self.out.clone()
            else:
                tok = self.forward(tok.view(-1, 1), torch.tensor([P + i], device=prompts.device))
            out.append(tok)
        return torch.stack(out, 1)


def timed(fn):
    sync()
    t = time.perf_counter()
    r = fn()
    sync()
    return time.perf_counter() - t, r


def arm(fn_for_n, B: int, reps: int = 2) -> dict:
    """Warm up, then time 8 and 128 new tokens, the faster of `reps` runs each: tok/s over the whole call,
    decode_ms per step from the difference."""
    fn_for_n(SHORT)
    short = min(timed(lambda: fn_for_n(SHORT))[0] for _ in range(reps))
    runs = [timed(lambda: fn_for_n(NEW)) for _ in range(reps)]
    wall, out = min(runs, key=lambda r: r[0])
    return {"batch": B, "tok_s": B * NEW / wall, "wall_s": wall,
            "decode_ms": 1e3 * (wall - short) / (NEW - SHORT)}, out


def profile_kernels(step, n: int = 8) -> dict:
    """torch.profiler over n calls of step(): CUDA kernels per call (count, time, the top ones)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):
        step()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        sync()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if str(getattr(e, "device_type", "")).endswith("CUDA") and t > 0:
            rows.append((e.key[:90], e.count / n, t / n))
    rows.sort(key=lambda x: -x[2])
    return {"kernels_per_step": sum(r[1] for r in rows), "kernel_us_per_step": sum(r[2] for r in rows),
            "top": [[k, round(c, 2), round(t, 1)] for k, c, t in rows[:14]]}


def engine_kernels(llm, prompt: list[int], graphs: bool) -> dict:
    """profile_kernels over batch-1 decode steps of an LLM's engine (after its prefill)."""
    eng, runner = llm.engine, llm.engine.runner
    keep = runner.graphs
    runner.graphs = keep if graphs else None
    eng.add_request(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    eng.step()                                                   # the prefill
    try:
        return profile_kernels(eng.step)
    finally:
        while eng.has_unfinished():
            eng.step()
        runner.graphs = keep


def replay_ms(graphs, key, n: int = 50) -> float | None:
    """GPU time of one replay of the graph captured for key = (bucket, tokens per row), replayed back to
    back between two synchronizations; None where no graph was captured."""
    shape = graphs.shapes.get(key) if graphs is not None else None
    if shape is None or shape.graph is None:
        return None
    for _ in range(5):
        shape.graph.replay()
    t, _ = timed(lambda: [shape.graph.replay() for _ in range(n)])
    return 1e3 * t / n


def copy_bandwidth(device) -> float:
    """Device-to-device copy rate, bytes read + written per second."""
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    t, _ = timed(lambda: [y.copy_(x) for _ in range(10)])
    return 2 * n * 10 / t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--budget", type=float, default=330.0, help="seconds; arms past it are skipped")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: a smoke test of this script")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--skip", default="", help="comma-separated prefixes of arm names to leave out")
    a = ap.parse_args()
    t_start = time.perf_counter()
    device = "cpu" if a.tiny else "cuda"
    shape = TINY if a.tiny else TINYLLAMA
    batches = [int(b) for b in a.batches.split(",")]
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import subprocess
    commit = os.environ.get("AFFORD_COMMIT")    # a GPU machine's copy of the tree may hold a stale .git
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip()
        except OSError:
            commit = ""
    res = {"commit": commit, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__,
           "model": "TinyLlama-1.1B shape, random bf16 weights" if not a.tiny else "tiny smoke test",
           "prompt_tokens": PROMPT, "new_tokens": NEW, "arms": {}, "errors": {}, "skipped": []}

    def save():
        res["elapsed_s"] = time.perf_counter() - t_start
        (out_dir / ("gpu_decode.json" if not a.tiny else "gpu_decode_tiny.json")).write_text(json.dumps(res, indent=1))

    skip = tuple(x for x in a.skip.split(",") if x)

    def run_arm(name, fn):
        if skip and name.startswith(skip):
            return None
        if time.perf_counter() - t_start > a.budget:
            res["skipped"].append(name)
            return None
        try:
            r = fn()
            if r is not None:
                res["arms"][name] = r
            print(name, json.dumps(r), flush=True)
            return r
        except Exception as e:
            res["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            return None
        finally:
            save()
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()

    tmp = Path(tempfile.mkdtemp(prefix="afford_gpu_"))
    hf, target, draft = build(tmp, shape, device)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, shape["vocab_size"], (max(batches), PROMPT), generator=g)
    if device == "cuda":
        res["copy_bandwidth_gbs"] = copy_bandwidth(device) / 1e9
    greedy = {}

    def afford_fn(llm, B):
        ps = [p.tolist() for p in prompts[:B]]
        return lambda n: llm.generate(ps, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

    common = dict(device=device, max_model_len=PROMPT + NEW + 16, max_num_seqs=max(batches))
    llm = LLM(str(target), **common)
    res["weight_bytes"] = llm.engine.runner.weight_bytes
    runner = llm.engine.runner
    bare_model = llm.engine.model

    for B in batches:                                      # the anchor: a bare static-cache loop
        for graphs in (False, True):
            def bare_arm(B=B, graphs=graphs):
                bare = Bare(bare_model, B, PROMPT + NEW + 16)
                if graphs:
                    bare.capture()
                p = prompts[:B].to(device)
                r, out = arm(lambda n: bare.generate(p, n), B)
                greedy[f"bare_b{B}"] = out.cpu()
                return r
            run_arm(f"bare_{'graph' if graphs else 'eager'}_b{B}", bare_arm)

    graph_runner = runner.graphs
    for B in batches:
        for graphs in (True, False):
            def afford_arm(B=B, graphs=graphs):
                runner.graphs = graph_runner if graphs else None
                r, outs = arm(afford_fn(llm, B), B)
                toks = torch.tensor([o.token_ids for o in outs])
                if f"bare_b{B}" in greedy:                 # bf16: batch-shape rounding may flip near-ties
                    r["same_tokens_as_bare"] = float((toks == greedy[f"bare_b{B}"]).float().mean())
                if not graphs and f"afford_graphs_b{B}" in greedy:
                    r["same_tokens_as_graphs"] = float((toks == greedy[f"afford_graphs_b{B}"]).float().mean())
                greedy[f"afford_{'graphs' if graphs else 'eager'}_b{B}"] = toks
                r["graphs"] = graphs and graph_runner is not None
                r["triton_attention"] = getattr(runner.backend, "use_triton", False) is not False and graphs is not None
                return r
            run_arm(f"afford_{'graphs' if graphs else 'eager'}_b{B}", afford_arm)
    runner.graphs = graph_runner

    def busy():
        """GPU time of each captured decode bucket (replayed back to back) against the engine's decode step."""
        if graph_runner is None or device != "cuda":
            return None
        out = {}
        for B in batches:
            arm_b, gpu_ms = res["arms"].get(f"afford_graphs_b{B}"), replay_ms(graph_runner, (B, 1))
            if gpu_ms is None or arm_b is None:
                continue
            out[f"graph_replay_ms_b{B}"] = gpu_ms
            out[f"engine_decode_ms_b{B}"] = arm_b["decode_ms"]
            out[f"gpu_busy_share_b{B}"] = gpu_ms / arm_b["decode_ms"]
        if "gpu_busy_share_b1" in out:
            res["gpu_busy_share"] = out["gpu_busy_share_b1"]
            res["roofline_tok_s_b1"] = res["copy_bandwidth_gbs"] * 1e9 / res["weight_bytes"]
            res["roofline_share"] = (1e3 / out["engine_decode_ms_b1"]) / res["roofline_tok_s_b1"]
            res["graph_roofline_share"] = (1e3 / out["graph_replay_ms_b1"]) / res["roofline_tok_s_b1"]
        return out
    run_arm("busy", busy)

    def switched(B, obj, attr, value):
        """afford with graphs at batch B with obj.attr = value, graphs recaptured; restored after."""
        keep = getattr(obj, attr)
        setattr(obj, attr, value)
        graph_runner.shapes = {}
        try:
            r, outs = arm(afford_fn(llm, B), B)
            r["graph_replay_ms"] = replay_ms(graph_runner, (B, 1))
        finally:
            setattr(obj, attr, keep)
            graph_runner.shapes = {}
        toks = torch.tensor([o.token_ids for o in outs])
        r["same_tokens_as_default"] = float((toks == greedy[f"afford_graphs_b{B}"]).float().mean())
        return r

    def gemv_sweep():
        """The batch-1 product of each matrix role over 22 distinct matrices in a row (one per layer, so they
        stream from memory as in a step; the chain twice in a CUDA graph): cuBLAS, with the fused add + RMSNorm
        before it and SwiGLU's product after it where afford's fused GEMV does that work, against the fused
        Triton GEMV (afford/models/triton_gemv.py) over its SWEEP_CONFIGS. Each role's choice: its fastest tile,
        or cuBLAS (None) where that wins; the arms run with the defaults (GEMV_CONFIGS), and
        afford_graphs_swept_b1 with the choice where it differs."""
        if device != "cuda":
            return None
        from afford.models import triton_gemv as tg
        from afford.models.quant import _graph_us
        from afford.models.triton_ops import add_rmsnorm, silu_mul
        L, roles = shape["num_hidden_layers"], matrix_roles(shape)
        gen = torch.Generator(device=device).manual_seed(2)
        out = {"configs": [list(c) for c in tg.SWEEP_CONFIGS], "layers": L, "roles": {}, "chosen": {}}
        for role, (N, K, fused, swiglu) in {**roles, **head_role(shape)}.items():
            n = HEAD_COPIES if role == "head" else L           # distinct matrices streamed, one per layer
            ws = [(torch.randn(N, K, generator=gen, device=device) * 0.02).to(torch.bfloat16) for _ in range(n)]
            x, a = (torch.randn(1, K, generator=gen, device=device).to(torch.bfloat16) for _ in range(2))
            gam = (1 + 0.1 * torch.randn(K, generator=gen, device=device)).to(torch.bfloat16)
            kw = dict(add=a, norm=gam, eps=1e-5, swiglu=swiglu) if fused else {}
            ref = F.linear(add_rmsnorm(x, a, gam, 1e-5)[1] if fused else x, ws[0]).float()
            if swiglu:
                ref = silu_mul(ref.to(torch.bfloat16)).float()
            row = {"shape": [N, K], "weight_bytes": N * K * 2, "fused": ["add", "rmsnorm"] * fused + ["swiglu"] * swiglu,
                   "cublas_us": _graph_us(unfused_chain(x, a, gam, fused, swiglu, [partial(F.linear, weight=w)
                                                                                   for w in ws]), 2) / n}
            row.update(time_tiles(tg.SWEEP_CONFIGS, lambda c: tg.gemv(x, ws[0], c, **kw)[0],
                                  lambda c: lambda: [tg.gemv(x, w, c, **kw) for w in ws], ref, n, N * K * 2))
            row["cublas_tb_s"] = row["weight_bytes"] / row["cublas_us"] / 1e6
            # the fused layer roles remove launches, so they take the fused kernel at any tile; the plain ones and
            # the head (one product a step) the faster
            choice = row["best"]["config"] if (fused and role != "head") or row["best"]["us"] < row["cublas_us"] \
                else None
            out["chosen"][role] = list(choice) if choice else None
            out["roles"][role] = row
        return out
    run_arm("gemv_sweep", gemv_sweep)

    def gemv_arm():
        """The fused one-row GEMVs (model.fused_gemv, the default tiles) switched against the default, batch 1,
        graphs recaptured; GPU busy, roofline share and the kernel profile of the switched step."""
        model = llm.engine.model
        on = not model.fused_gemv
        r = switched(batches[0], model, "fused_gemv", on)
        from afford.models import triton_gemv as tg
        r["fused_gemv"], r["configs"] = on, {k: (list(v) if v else None) for k, v in tg.GEMV_CONFIGS.items()}
        r["roofline_share"] = (1e3 / r["decode_ms"]) / (res["copy_bandwidth_gbs"] * 1e9 / res["weight_bytes"])
        if r.get("graph_replay_ms"):
            r["gpu_busy_share"] = r["graph_replay_ms"] / r["decode_ms"]
        keep = model.fused_gemv
        model.fused_gemv, graph_runner.shapes = on, {}
        try:
            r["kernel_profile"] = engine_kernels(llm, prompts[0].tolist(), graphs=False)
        finally:
            model.fused_gemv, graph_runner.shapes = keep, {}
        return r
    if graph_runner is not None and device == "cuda":
        run_arm("afford_graphs_gemv_b1" if not llm.engine.model.fused_gemv else "afford_graphs_nogemv_b1", gemv_arm)

    def swept_arm():
        """The default (fused GEMV on) with the sweep's tiles instead of GEMV_CONFIGS, where they differ."""
        from afford.models import triton_gemv as tg
        chosen = {k: tuple(v) if v else None for k, v in res["arms"]["gemv_sweep"]["chosen"].items()}
        if chosen == {k: tg.GEMV_CONFIGS.get(k) for k in chosen} or not llm.engine.model.fused_gemv:
            return None
        keep = dict(tg.GEMV_CONFIGS)
        tg.GEMV_CONFIGS.update(chosen)
        try:
            r = switched(batches[0], llm.engine.model, "fused_gemv", True)
        finally:
            tg.GEMV_CONFIGS.clear()
            tg.GEMV_CONFIGS.update(keep)
        r["configs"] = {k: (list(v) if v else None) for k, v in chosen.items()}
        return r
    if graph_runner is not None and "gemv_sweep" in res["arms"]:
        run_arm("afford_graphs_swept_b1", swept_arm)

    from afford.models import triton_lib

    def pdl_arm(B):
        """Programmatic dependent launch (triton_lib.PDL: each decode kernel of afford's starts while the one
        before it finishes, its first weights loaded before it waits) switched against the default, graphs
        recaptured."""
        if device != "cuda" or not triton_lib._pdl_capable(torch.cuda.current_device()):
            return None
        r = switched(B, triton_lib, "PDL", not triton_lib.PDL)
        r["pdl"] = not triton_lib.PDL
        r["gpu_busy_share"] = r["graph_replay_ms"] / r["decode_ms"] if r.get("graph_replay_ms") else None
        return r
    if graph_runner is not None:
        for B in batches:
            run_arm(f"afford_graphs_{'nopdl' if triton_lib.PDL else 'pdl'}_b{B}", partial(pdl_arm, B))

    if graph_runner is not None and hasattr(runner.backend, "fused_rope"):
        for B in (batches[0], batches[-1]):
            # A/B: RoPE and the K/V store as torch's operators; residual add + RMSNorm and silu * up as torch's
            run_arm(f"afford_graphs_unfusedrope_b{B}", lambda B=B: switched(B, runner.backend, "fused_rope", False))
            # decode attention as attend_decode's one kernel against three (rope_store, split, merge), switched
            # from the default (run 12 named the arm for three kernels: one was the default then)
            fd = runner.backend.fused_decode
            run_arm(f"afford_graphs_{'unfused' if fd else 'fused'}decode_b{B}",
                    lambda B=B, fd=fd: switched(B, runner.backend, "fused_decode", not fd))
            run_arm(f"afford_graphs_unfusedlayers_b{B}", lambda B=B: switched(B, llm.engine.model, "fused_cuda", False))
        # the q|k|v GEMV doing RoPE + the K/V store against the rope_store kernel (one-row steps: batch 1 only)
        qr = llm.engine.model.fused_qkv_rope
        if batches[0] == 1:
            run_arm(f"afford_graphs_{'no' if qr else ''}qkvrope_b1", lambda: switched(1, llm.engine.model,
                                                                                      "fused_qkv_rope", not qr))
        for B in batches:                  # A/B: the host reads each step's tokens before the next launches
            run_arm(f"afford_graphs_sync_b{B}", lambda B=B: switched(B, llm.engine, "async_scheduling", False))

        def budget_arm(B=batches[-1]):
            """The step token budget's A/B: the CPU's 512 instead of the GPU default (prompt chunks)."""
            sched = llm.engine.scheduler
            keep, sched.max_num_batched_tokens = sched.max_num_batched_tokens, 512
            try:
                r, _ = arm(afford_fn(llm, B), B)
            finally:
                sched.max_num_batched_tokens = keep
            r["default_budget"] = keep
            return r
        run_arm(f"afford_graphs_b{batches[-1]}_budget512", budget_arm)

    def kernel_profile():
        """CUDA kernels of batch-1 decode steps: afford eager (fused RoPE), with graphs (kernels inside a
        replay are traced too where CUPTI allows), eager with torch's RoPE, and the bare loop eager."""
        if device != "cuda":
            return None
        out = {}
        p0 = prompts[0].tolist()
        out["afford_eager"] = engine_kernels(llm, p0, graphs=False)
        out["afford_graphs"] = engine_kernels(llm, p0, graphs=True)
        runner.backend.fused_rope = False
        try:
            out["afford_eager_unfusedrope"] = engine_kernels(llm, p0, graphs=False)
        finally:
            runner.backend.fused_rope, graph_runner.shapes = True, {}
        bare = Bare(bare_model, 1, PROMPT + NEW + 16)
        p = prompts[:1].to(device)
        with torch.inference_mode():
            bare.forward(p, torch.arange(PROMPT, device=device))
            tok = torch.zeros(1, 1, dtype=torch.long, device=device)
            pos = torch.tensor([PROMPT], device=device)
            out["bare_eager"] = profile_kernels(lambda: bare.forward(tok, pos))
        return out
    run_arm("kernel_profile", kernel_profile)

    def host_profile():
        """Where the engine's host time goes at the largest batch (cProfile of 32 new tokens, graphs on)."""
        import cProfile
        import io
        import pstats
        B = batches[-1]
        ps = [p.tolist() for p in prompts[:B]]
        prof = cProfile.Profile()
        prof.enable()
        llm.generate(ps, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        return {"batch": B, "top_tottime": text.getvalue().splitlines()[:45]}
    run_arm("host_profile", host_profile)
    llm = runner = graph_runner = bare_model = None                  # free the GPU for the arms below
    gc.collect()

    def int4_sweep():
        """The batch-1 int4 kernel on each of the model's matrices (q|k|v, o, gate|up, down; per-channel
        scales, as the model's auto group picks for these weights): tinygemm, cuBLAS bf16 and afford's
        Triton GEMV over a grid of tiles, each timed as 20 calls inside one CUDA graph (launches excluded,
        as in the engine's captured step). The config with the least time over one layer's four matrices
        becomes the kernel's for the int4 arms below."""
        if device != "cuda":
            return None
        from afford.models import triton_int4 as t4
        from afford.models.quant import QuantLinear, _graph_us, dequantize, quantize
        H, I, D = shape["hidden_size"], shape["intermediate_size"], shape["hidden_size"] // shape["num_attention_heads"]
        mats = {"qkv": (H + 2 * shape["num_key_value_heads"] * D, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}
        # variant 1 (any few rows; run 5's best: (4, 2048, 4, 1)) around run 5's best tiles, variant 2 (one row)
        configs = [(4, 2048, 4, 1, 1), (2, 2048, 2, 1, 1), (2, 1024, 2, 3, 1), (8, 1024, 4, 2, 1)]
        configs += [(bn, bk, w, st, 2) for bn, bk, w, st in ((2, 2048, 2, 1), (4, 2048, 4, 1), (8, 2048, 4, 1),
                                                               (4, 1024, 4, 2), (8, 1024, 4, 2), (16, 1024, 8, 2),
                                                               (2, 1024, 2, 3), (4, 512, 4, 3), (8, 512, 4, 3),
                                                               (16, 2048, 8, 1), (32, 1024, 8, 2))]
        out = {"configs": [list(c) for c in configs], "matrices": {}}
        gen = torch.Generator(device=device).manual_seed(1)
        for name, (N, K) in mats.items():
            w = torch.randn(N, K, generator=gen, device=device) * 0.02
            q, sc, z = quantize(w, 4, K)
            x = torch.randn(1, K, generator=gen, device=device).to(torch.bfloat16)
            p, sc, z = t4.pack(q), sc.contiguous(), z.contiguous()
            ref = x.float() @ dequantize(q, sc, z).t()
            wb = w.to(torch.bfloat16)
            row = {"shape": [N, K], "code_bytes": N * K // 2, "bf16_us": _graph_us(lambda: F.linear(x, wb), 20)}
            ql = QuantLinear(q, sc, z, 4, kernel="int4cuda")
            row["tinygemm_us"] = _graph_us(lambda: ql(x), 20)
            row["triton_us"], row["max_rel_err"] = [], 0.0
            for c in configs:
                try:
                    y = t4.int4_mm(x, p, sc, z, K, c).float()
                    row["max_rel_err"] = max(row["max_rel_err"], float((y - ref).abs().max() / ref.abs().max()))
                    row["triton_us"].append(_graph_us(lambda: t4.int4_mm(x, p, sc, z, K, c), 20))
                except Exception as e:                       # a tile this card cannot hold
                    row["triton_us"].append(None)
                    row.setdefault("errors", []).append(f"{c}: {type(e).__name__}: {str(e)[:120]}")
            best = min((t, i) for i, t in enumerate(row["triton_us"]) if t is not None)
            row["best"] = {"config": list(configs[best[1]]), "us": best[0],
                           "gb_s": row["code_bytes"] / best[0] / 1e3}
            row["tinygemm_gb_s"] = row["code_bytes"] / row["tinygemm_us"] / 1e3
            out["matrices"][name] = row
        totals = [sum(r["triton_us"][i] for r in out["matrices"].values())
                  if all(r["triton_us"][i] is not None for r in out["matrices"].values()) else float("inf")
                  for i in range(len(configs))]
        i = min(range(len(configs)), key=totals.__getitem__)
        out["layer_us"] = {"triton_best": totals[i], "triton_default": totals[configs.index(t4.GEMV_CONFIG)]
                           if t4.GEMV_CONFIG in configs else None,
                           "tinygemm": sum(r["tinygemm_us"] for r in out["matrices"].values()),
                           "bf16": sum(r["bf16_us"] for r in out["matrices"].values())}
        out["chosen"] = list(configs[i])
        t4.GEMV_CONFIG = configs[i]                           # the int4 Triton arms below run with it
        return out
    run_arm("int4_sweep", int4_sweep)

    def gemv_w4_sweep():
        """gemv_sweep for int4 (per-channel scales, what the model's auto group picks for these weights): the
        fused int4 GEMV (triton_gemv.gemv_w4, every code layout and kernel) over W4_SWEEP_CONFIGS against tinygemm, with
        the fused add + RMSNorm and SwiGLU kernels around it where the GEMV does that work, over 22 matrices per
        role. Each role's choice: its fastest tile where it beats tinygemm (afford_int4_swept runs with the
        choice where it differs from GEMV_W4_CONFIGS)."""
        if device != "cuda":
            return None
        from afford.models import triton_gemv as tg
        from afford.models.quant import QuantLinear, _graph_us, dequantize, quantize
        from afford.models.triton_ops import add_rmsnorm, silu_mul
        L, roles = shape["num_hidden_layers"], matrix_roles(shape)
        gen = torch.Generator(device=device).manual_seed(3)
        configs, crashed = w4_runnable(tg.W4_SWEEP_CONFIGS)
        out = {"configs": [list(c) for c in configs], "layers": L, "roles": {}, "chosen": {},
               "crashed": [[list(c), why] for c, why in crashed]}
        for role, (N, K, fused, swiglu) in {**roles, **head_role(shape)}.items():
            n = HEAD_COPIES if role == "head" else L           # (the head: afford_int4_head quantizes it)
            mats = [quantize(torch.randn(N, K, generator=gen, device=device) * 0.02, 4, K) for _ in range(n)]
            qls = [QuantLinear(q, s_, z, 4, kernel="int4cuda") for q, s_, z in mats]
            ops = {lay: [(tg.w4_pack(q, lay), s_.contiguous(), z.contiguous()) for q, s_, z in mats]
                   for lay in sorted({tg.w4_kind(c)[0] for c in configs})}
            x, a = (torch.randn(1, K, generator=gen, device=device).to(torch.bfloat16) for _ in range(2))
            gam = (1 + 0.1 * torch.randn(K, generator=gen, device=device)).to(torch.bfloat16)
            kw = dict(add=a, norm=gam, eps=1e-5, swiglu=swiglu) if fused else {}
            h = add_rmsnorm(x, a, gam, 1e-5)[1] if fused else x
            ref = h.float() @ dequantize(*mats[0]).t()
            if swiglu:
                ref = silu_mul(ref.to(torch.bfloat16)).float()
            row = {"shape": [N, K], "code_bytes": N * K // 2, "fused": ["add", "rmsnorm"] * fused + ["swiglu"] * swiglu,
                   "tinygemm_us": _graph_us(unfused_chain(x, a, gam, fused, swiglu, qls), 2) / n}

            def w4(c, ms):                           # a fifth element: the layout (and kernel), tg.w4_kind
                return [tg.gemv_w4(x, *op, K, c, **kw)[0] for op in ops[tg.w4_kind(c)[0]][:ms]]
            row.update(time_tiles(configs, lambda c: w4(c, 1)[0], lambda c: lambda: w4(c, n), ref, n, N * K // 2))
            row["tinygemm_tb_s"] = row["code_bytes"] / row["tinygemm_us"] / 1e6
            choice = row["best"]["config"] if row["best"]["us"] < row["tinygemm_us"] else None
            out["chosen"][role] = list(choice) if choice else None
            out["roles"][role] = row
        return out
    w4 = run_arm("gemv_w4_sweep", gemv_w4_sweep)

    from afford.models import quant, triton_gemv
    w4_chosen = {k: tuple(v) for k, v in (w4 or {}).get("chosen", {}).items() if v}

    def quant_measure(qllm, int4):
        kernels = sorted({m.kernel for m in qllm.engine.model.modules() if hasattr(m, "kernel")})
        out = {"kernels": kernels, "weight_bytes": qllm.engine.runner.weight_bytes,
               "groups": sorted({m.group for m in qllm.engine.model.modules() if hasattr(m, "group")}),
               "fused_gemv_w4": {k: list(v) for k, v in triton_gemv.GEMV_W4_CONFIGS.items() if v},
               "row_kernel_layers": sum(getattr(m, "_row", None) is not None for m in qllm.engine.model.modules()),
               "quantized_head": isinstance(qllm.engine.model.lm_head, quant.QuantLinear)}
        if int4 in ("triton", "auto"):
            from afford.models import triton_int4
            out["gemv_config"] = list(triton_int4.GEMV_CONFIG)
        for B in batches[:2]:
            out[f"b{B}"], _ = arm(afford_fn(qllm, B), B)
            out[f"b{B}"]["graph_replay_ms"] = replay_ms(qllm.engine.runner.graphs, (B, 1))
        if device == "cuda":
            out["kernel_profile_eager_b1"] = engine_kernels(qllm, prompts[0].tolist(), graphs=False)
        return out

    # run 6 (309dbd7) named the auto arm afford_int4 and the default afford_int4_tinygemm; run 8 (4e77d7c), before
    # the fused int4 GEMV was a default, named tinygemm alone afford_int4 and the fused one afford_int4_gemv
    defaults_w4 = dict(triton_gemv.GEMV_W4_CONFIGS)
    sw = "nopdl" if triton_lib.PDL else "pdl"      # the arms with PDL switched, named for what they run
    # afford_int4_head: the LM head int4 too (quantize_head; gpt-fast's int4 quantizes it, afford's default keeps
    # it bf16), with the sweep's tiles where they ran (else the defaults) and its head tile where one beat tinygemm
    swept_all = w4_chosen if {"qkv", "gate_up"} <= set(w4_chosen) else defaults_w4
    head_w4 = dict(swept_all)
    if w4:                                  # the sweep ran: its head tile, or tinygemm where none beat it
        head_w4["head"] = w4_chosen.get("head")
    for name, q, mode in (("afford_int4", "int4", "default"), (f"afford_int4_{sw}", "int4", "pdl"),
                          ("afford_int4_head", "int4", "head"),
                          (f"afford_int4_{'no' if bare_model.fused_qkv_rope else ''}qkvrope", "int4", "qkvrope"),
                          ("afford_int4_tinygemm", "int4", "tinygemm"),
                          ("afford_int4_swept", "int4", "swept"), (f"afford_int4_swept_{sw}", "int4", "swept_pdl"),
                          ("afford_int4_auto", "int4", "auto"), ("afford_int4_triton", "int4", "triton"),
                          ("afford_int8", "int8", "default")):
        def quant_arms(q=q, mode=mode):
            w4_cfg = {"default": defaults_w4, "pdl": defaults_w4, "swept": w4_chosen, "swept_pdl": w4_chosen,
                      "head": head_w4, "qkvrope": defaults_w4}.get(mode, {})
            if mode.startswith("swept") and (w4_chosen == defaults_w4 or not {"qkv", "gate_up"} <= set(w4_chosen)):
                return None                 # the defaults ran already, or no fused tile beat tinygemm
            pdl = triton_lib.PDL
            if mode.endswith("pdl"):        # programmatic dependent launch switched
                if device != "cuda" or not triton_lib._pdl_capable(torch.cuda.current_device()):
                    return None
                triton_lib.PDL = not pdl
            keep = quant.CUDA_INT4_KERNEL
            quant.CUDA_INT4_KERNEL = mode if mode in ("auto", "triton", "tinygemm") else keep
            triton_gemv.GEMV_W4_CONFIGS.clear()           # the fused int4 GEMV's tiles for this arm
            triton_gemv.GEMV_W4_CONFIGS.update(w4_cfg)
            try:
                qllm = LLM(str(target), quantization=q, quantize_head=mode == "head", **common)
                if mode == "qkvrope":       # the q|k|v GEMV doing RoPE + the K/V store, switched from the default
                    qllm.engine.model.fused_qkv_rope = not qllm.engine.model.fused_qkv_rope
                r = quant_measure(qllm, mode)
                r["fused_qkv_rope"] = qllm.engine.model.fused_qkv_rope
                r["pdl"] = triton_lib.PDL
                return r
            finally:
                triton_lib.PDL = pdl
                quant.CUDA_INT4_KERNEL = keep
                triton_gemv.GEMV_W4_CONFIGS.clear()
                triton_gemv.GEMV_W4_CONFIGS.update(defaults_w4)

        run_arm(name, quant_arms)

    def spec_arm():
        sllm = LLM(str(target), draft=str(draft), num_speculative_tokens=4, **common)
        r, _ = arm(afford_fn(sllm, 1), 1)
        r["acceptance_rate"] = sllm.stats.acceptance_rate
        return r
    run_arm("afford_spec_k4_b1", spec_arm)
    for B in batches:                                      # transformers' eager generate
        def hf_arm(B=B):
            p = prompts[:B].to(device)
            mask = torch.ones_like(p)

            def gen(n):
                with torch.inference_mode():
                    return hf.generate(input_ids=p, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=0)
            r, _ = arm(gen, B, reps=1)                   # ~7 s a run: once
            return r
        run_arm(f"hf_b{B}", hf_arm)
    hf = None
    gc.collect()

    save()
    print(json.dumps({k: v for k, v in res.items() if k != "arms"}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
