"""The CUDA-graph path, tested on the CPU: the graph runner's static forward (bucket padding, the static
buffers, -1 slots sent to the scratch block, ragged verify rows laid out per sequence) run without a
capture gives the eager path's logits and greedy tokens; the Triton paged kernel, run by Triton's
interpreter, equals the torch reference. The captured graphs themselves run in benchmarks/gpu_check.sh."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from afford import LLM, SamplingParams
from afford.core.graphs import GraphRunner, bucket_sizes
from afford.core.runner import ModelRunner
from afford.kv.paged import BlockPool
from afford.models.loader import load_for_inference

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def interpret(code: str) -> None:
    """Run `code` in a fresh interpreter with TRITON_INTERPRET=1 (Triton's kernels on the CPU); it prints "ok"."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# the interpreter tests' one-row decode step of a model `m` after a 7-token prefill: its metadata and the
# torch path's hidden state `ref`
ONE_ROW_STEP = """from afford.core.runner import ModelRunner
from afford.kv.paged import BlockPool
runner = ModelRunner(m, BlockPool(16, 4), attention="paged", native=False)
runner.pool.prepare_write(0, 12)
runner.forward([0], [0], [[3, 4, 5, 6, 7, 8, 9]])
batch, ids = runner.prepare_ragged([0], [7], [[11]])
meta = runner.backend.prepare_metadata(batch, runner.kv)
ref = m.hidden(ids, batch.positions, meta)
"""


def test_bucket_sizes():
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(5) == [1, 2, 4, 5]
    assert bucket_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


def _runners(path, graphs_q=5):
    model = load_for_inference(path, "cpu", "float32")
    eager = ModelRunner(model, BlockPool(40, 4), native=False)
    static = ModelRunner(model, BlockPool(40, 4), attention="paged", native=False)
    static.graphs = GraphRunner(static, max_batch=8, max_q=graphs_q, capture=False)
    return eager, static


def test_static_forward_equals_eager(random_pair):
    eager, static = _runners(random_pair[0])
    g = torch.Generator().manual_seed(0)
    lens = [7, 12, 3]
    prompts = [torch.randint(2, 500, (n,), generator=g).tolist() for n in lens]
    for r in (eager, static):
        for s, n in enumerate(lens):
            r.pool.prepare_write(s, n + 16)
        r.forward([0, 1, 2], [0, 0, 0], prompts)                              # prefill: eager in both
    assert static.graphs.replays == 0
    # decode: 3 sequences in the bucket of 4 (one padding row)
    a = eager.forward([0, 1, 2], lens, [[5], [6], [7]])
    b = static.forward([0, 1, 2], lens, [[5], [6], [7]])
    assert static.graphs.replays == 1 and (a - b).abs().max() < 1e-5
    # verify with ragged k: rows padded per sequence to q = 4, logits of every real row, in order
    toks = [[8, 9, 10, 11], [12], [13, 14]]
    starts = [n + 1 for n in lens]
    rows = [list(range(len(t))) for t in toks]
    a = eager.forward([0, 1, 2], starts, toks, rows)
    b = static.forward([0, 1, 2], starts, toks, rows)
    assert static.graphs.replays == 2 and b.shape == a.shape == (7, 512) and (a - b).abs().max() < 1e-5
    # the pools agree on every real block, and the padding wrote only the scratch block
    n_real = static.pool.num_blocks * static.pool.block_size
    for (ke, ve), (ks, vs) in zip(eager.kv, static.kv):
        assert (ke[:n_real] - ks[:n_real]).abs().max() < 1e-5
        assert ke[n_real:].abs().sum() == 0 and ks[n_real:].abs().sum() > 0
    # too many tokens per row for a graph: eager, the same numbers
    c = static.forward([0], [starts[0] + 4], [[1] * 6], [list(range(6))])
    assert static.graphs.replays == 2 and c.shape == (6, 512)


def test_engine_with_static_graph_path_gives_the_same_greedy_tokens(random_pair):
    g = torch.Generator().manual_seed(2)
    ps = [torch.randint(2, 500, (int(n),), generator=g).tolist() for n in torch.randint(3, 30, (5,), generator=g)]
    params = SamplingParams(max_tokens=24, temperature=0)
    ref = [o.token_ids for o in LLM(random_pair[0]).generate(ps, params)]
    for kw in ({}, dict(draft=str(random_pair[1]), num_speculative_tokens=3)):
        llm = LLM(random_pair[0], attention="paged", native=False, max_num_seqs=8, **kw)
        llm.engine.runner.graphs = GraphRunner(llm.engine.runner, 8, 4, capture=False)
        runners = [llm.engine.runner.graphs]
        if kw:
            drafter = llm.engine.speculator.proposer.runner
            drafter.graphs = GraphRunner(drafter, 8, 4, capture=False)
            runners.append(drafter.graphs)
        assert [o.token_ids for o in llm.generate(ps, params)] == ref, kw
        assert all(r.replays > 0 for r in runners)


@needs_triton
def test_triton_paged_kernel_in_the_interpreter():
    code = """
import torch
from afford.attention import triton_paged
from afford.attention.paged import attend_rows_reference
g = torch.Generator().manual_seed(0)
# (heads, K/V heads, head dim, block size, dtype, max context): one split, 16 splits, GQA with fp16 products
for H, KV, D, BS, dt, mc in ((4, 2, 16, 4, torch.float32, None), (4, 2, 16, 4, torch.float32, 2048),
                             (6, 6, 24, 16, torch.float32, None), (32, 4, 64, 16, torch.float16, None)):
    nb = 24
    kp, vp = torch.randn(nb * BS, KV, D, generator=g).to(dt), torch.randn(nb * BS, KV, D, generator=g).to(dt)
    tables = torch.randperm(nb, generator=g)[:12].view(2, 6).to(torch.int32)
    row_seq = torch.tensor([0, 1, 1, 1, 0])
    limits = torch.tensor([17, 1, 5, 6 * BS, 3])
    q = torch.randn(5, H, D, generator=g).to(dt)
    a = triton_paged.attend_rows(q, kp, vp, tables, row_seq, limits, BS, D ** -0.5, mc).float()
    b = attend_rows_reference(q.float(), kp.float(), vp.float(), tables, row_seq, limits, BS, D ** -0.5)
    tol = 1e-5 if dt == torch.float32 else 3e-3
    assert (a - b).abs().max() < tol, (H, KV, D, BS, dt, mc, (a - b).abs().max())
print("ok")
"""
    interpret(code)


@needs_triton
def test_fused_rope_store_kernel_in_the_interpreter():
    """RoPE on q|k and the K/V store as one kernel: bitwise what torch's apply_rope and index_copy_ give,
    in fp32 and in half precision (rounded where torch's separate operators round); -1 slots go to the
    scratch slot."""
    code = """
import torch
from afford.attention.triton_paged import rope_store
from afford.models.transformer import apply_rope
g = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.float16):
    H, KV, D, N, S = 4, 2, 16, 5, 40
    cos, sin = torch.randn(64, D // 2, generator=g).repeat(1, 2).to(dt), torch.randn(64, D // 2, generator=g).repeat(1, 2).to(dt)
    qkv = torch.randn(N, H + 2 * KV, D, generator=g).to(dt)
    pos, slots = torch.tensor([3, 7, 8, 0, 63]), torch.tensor([5, -1, 9, 30, 2])
    kp, vp = torch.zeros(S + 4, KV, D, dtype=dt), torch.zeros(S + 4, KV, D, dtype=dt)
    q = rope_store(qkv, cos, sin, pos, slots, kp, vp, S, H)
    qk = apply_rope(qkv[:, :H + KV], cos[pos].unsqueeze(-2), sin[pos].unsqueeze(-2))
    kr, vr = torch.zeros_like(kp), torch.zeros_like(vp)
    kr.index_copy_(0, torch.where(slots >= 0, slots, S), qk[:, H:])
    vr.index_copy_(0, torch.where(slots >= 0, slots, S), qkv[:, H + KV:])
    assert torch.equal(q, qk[:, :H]) and torch.equal(kp, kr) and torch.equal(vp, vr), dt
print("ok")
"""
    interpret(code)


@needs_triton
def test_fused_decode_attention_kernel_in_the_interpreter():
    """RoPE, the K/V store, paged attention and the splits' merge as one kernel for decode rows
    (attend_decode): the pools rope_store writes and the output of rope_store + attend_rows (the three-kernel
    path), with one split and sixteen (the last program merging; its counters zero again after a call, twice
    in a row), rows at the first token of a split and the last, a padding row (slot -1: the scratch slot),
    GQA; fp32 and fp16."""
    code = """
import torch
from afford.attention import triton_paged as tp
g = torch.Generator().manual_seed(0)
# (dtype, heads, K/V heads, head dim, block size, table width, max context): 1, 16, 16 and 4 splits
for dt, H, KV, D, BS, W, mc in ((torch.float32, 4, 2, 16, 4, 8, None), (torch.float32, 4, 2, 16, 4, 32, 2048),
                                (torch.float16, 8, 2, 32, 16, 32, 2048), (torch.float32, 6, 6, 24, 16, 8, None)):
    nb, R = 160, 5
    S = nb * BS
    splits = tp.split_count(max(mc or 0, W * BS))
    chunk = 32 * -(-W * BS // splits // 32)       # the split length of a context of the table's width
    cos = torch.randn(1024, D // 2, generator=g).repeat(1, 2)
    sin = torch.randn(1024, D // 2, generator=g).repeat(1, 2)
    tables = torch.randperm(nb, generator=g)[:R * W].view(R, W).to(torch.int32)
    pos = torch.tensor([0, chunk - 1, chunk, 3 * chunk + 5, 17]) % (W * BS)
    slots = (tables[torch.arange(R), (pos // BS)].long() * BS + pos % BS)
    slots[4] = -1                                                   # a padding row
    row_seq = torch.arange(R)
    limits = pos + 1
    pools = [torch.randn(S + BS, KV, D, generator=g).to(dt) for _ in range(2)]
    qkv = torch.randn(R, H + 2 * KV, D, generator=g).to(dt)
    ref_k, ref_v = (p.clone() for p in pools)
    q = tp.rope_store(qkv, cos, sin, pos, slots, ref_k, ref_v, S, H)
    ref = tp.attend_rows(q, ref_k, ref_v, tables, row_seq, limits, BS, D ** -0.5, mc)
    for _ in range(2):
        kp, vp = (p.clone() for p in pools)
        out = tp.attend_decode(qkv, cos, sin, pos, slots, kp, vp, S, H, tables, row_seq, limits, BS, mc)
        assert torch.equal(kp, ref_k) and torch.equal(vp, ref_v), dt
        assert (out.float() - ref.float()).abs().max() <= 1e-6, (dt, splits, (out.float() - ref.float()).abs().max())
        if splits > 1:
            assert not tp._COUNTERS[torch.device("cpu")].any()
print("ok")
"""
    interpret(code)


@needs_triton
def test_fused_layer_kernels_in_the_interpreter(random_pair):
    """Residual add + RMSNorm and silu * up as Triton kernels (the CUDA step's), run by Triton's interpreter
    through a whole model: the hidden states of torch's operators."""
    code = f"""
import torch
from afford.core.runner import ModelRunner
from afford.kv.paged import BlockPool
from afford.models.loader import load_for_inference
from afford.models.triton_ops import add_rmsnorm
m = load_for_inference({str(random_pair[0])!r}, "cpu", "float32")
runner = ModelRunner(m, BlockPool(16, 4), native=False)
runner.pool.prepare_write(0, 10)
batch, ids = runner.prepare_ragged([0], [0], [[3, 4, 5, 6, 7, 8, 9]])
ref = m.hidden(ids, batch.positions, runner.backend.prepare_metadata(batch, runner.kv))
x = m.model.embed_tokens(ids)
cos, sin = m.rope_cos[batch.positions].unsqueeze(-2), m.rope_sin[batch.positions].unsqueeze(-2)
out = m._hidden_fused(x, cos, sin, runner.backend.prepare_metadata(batch, runner.kv), (m.rope_cos, m.rope_sin), add_rmsnorm)
assert (out - ref).abs().max() < 1e-5, (out - ref).abs().max()
print("ok")
"""
    interpret(code)


@needs_triton
def test_fused_gemv_kernel_in_the_interpreter():
    """The one-row product with the residual add, RMSNorm and SwiGLU fused in (triton_gemv.py): torch's
    operators, for K a multiple of the tile and not, N a multiple of the row tile and not, every
    combination of add / norm / swiglu; fp32 and fp16 (the interpreter mis-converts bf16)."""
    code = """
import torch
from afford.models.triton_gemv import gemv
from tests.gemv_reference import gemv_reference
g = torch.Generator().manual_seed(0)
for dt, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
    for N, K, cfg in ((24, 256, (8, 128, 4, 1)), (21, 200, (4, 64, 2, 1)), (40, 96, (16, 128, 4, 1))):
        for add, norm, swiglu in ((False, False, False), (True, True, False), (False, True, True),
                                  (True, True, True), (True, False, False)):
            x = torch.randn(1, K, generator=g).to(dt)
            a = torch.randn(1, K, generator=g).to(dt) if add else None
            w = (torch.randn(2 * N if swiglu else N, K, generator=g) * 0.1).to(dt)
            gam = (1 + 0.1 * torch.randn(K, generator=g)).to(dt) if norm else None
            y, h = gemv(x, w, cfg, add=a, norm=gam, eps=1e-5, swiglu=swiglu)
            yr, hr = gemv_reference(x, w, a, gam, swiglu)
            assert torch.equal(h, hr), (N, K, add)
            assert y.shape == yr.shape and (y.float() - yr).abs().max() <= tol * (1 + yr.abs().max()), \
                (dt, N, K, add, norm, swiglu, (y.float() - yr).abs().max())
print("ok")
"""
    interpret(code)


@needs_triton
def test_qkv_gemv_with_rope_in_the_interpreter():
    """A q|k|v GEMV that does RoPE and the K/V store itself (gemv / gemv_w4 with rope=): the q, the pools and
    the residual sum of the GEMV followed by rope_store, bit for bit -- dense, int4 pairs, halves and halves
    with x in the codes' layout, per-channel and grouped scales, a real slot and a padding one (-1: the scratch
    slot), GQA, a head dim of no power of two with rows that do not fill the last program; cos / sin tables
    whose halves differ; fp32 and fp16."""
    code = """
import torch
from afford.attention.triton_paged import rope_store
from afford.models.quant import quantize
from afford.models.triton_gemv import gemv, gemv_w4, w4_kind, w4_pack
g = torch.Generator().manual_seed(0)
K, S = 128, 40
for H, KV, D, dense, w4 in ((4, 2, 16, ((4, 64, 4, 1), (8, 128, 4, 1)),
                             ((K, (8, 128, 4, 1)), (32, (4, 32, 2, 1)), (K, (8, 64, 4, 1, 1)), (64, (4, 128, 4, 1, 1)),
                              (K, (8, 64, 4, 1, 4)))),
                            (3, 1, 24, ((16, 64, 4, 1),), ((K, (16, 128, 4, 1)), (K, (16, 64, 4, 1, 1))))):
    N = (H + 2 * KV) * D                         # (120 rows: the last program of 16 half full)
    cos, sin = torch.randn(64, D, generator=g), torch.randn(64, D, generator=g)
    for dt in (torch.float32, torch.float16):
        x, a = (torch.randn(1, K, generator=g).to(dt) for _ in range(2))
        gam = (1 + 0.1 * torch.randn(K, generator=g)).to(dt)
        w = (torch.randn(N, K, generator=g) * 0.1).to(dt)
        products = [(lambda cfg: (lambda **kw: gemv(x, w, cfg, add=a, norm=gam, eps=1e-5, **kw)))(cfg) for cfg in dense]
        for group, cfg in w4:
            q4, s4, z4 = quantize(w.float(), 4, group)
            op = (w4_pack(q4, w4_kind(cfg)[0]), s4, z4)
            products.append((lambda cfg, op, group: (lambda **kw: gemv_w4(x, *op, group, cfg, add=a, norm=gam,
                                                                          eps=1e-5, **kw)))(cfg, op, group))
        for run in products:
            for pos, slot in ((17, 9), (5, -1)):
                pos, slot = torch.tensor([pos]), torch.tensor([slot])
                pools = [torch.randn(S + 1, KV, D, generator=g).to(dt) for _ in range(2)]
                y, h = run()
                kr, vr = (p.clone() for p in pools)
                qr = rope_store(y.view(1, H + 2 * KV, D), cos, sin, pos, slot, kr, vr, S, H)
                kp, vp = (p.clone() for p in pools)
                q, h2 = run(rope=(cos, sin, pos, slot, kp, vp, S, H))
                assert torch.equal(h2, h) and q.shape == qr.shape and torch.equal(q, qr), (dt, D, (q - qr).abs().max())
                assert torch.equal(kp, kr) and torch.equal(vp, vr), (dt, D)
print("ok")
"""
    interpret(code)


# the one-row step again with the q|k|v GEMV doing RoPE and the K/V store (fused_qkv_rope): the same hidden
# state and the same K/V bit for bit (the new token's slot zeroed first, so the GEMV must write it)
ROPE_CHECK = """    kv_plain = [(k.clone(), v.clone()) for k, v in runner.kv]
    for k, v in runner.kv:
        k[meta.slots] = 0
        v[meta.slots] = 0
    m.fused_qkv_rope = True
    assert m._qkv_rope_tile()
    assert meta.backend.qkv_rope(m.rope_cos, m.rope_sin, 0, meta, m.model.layers[0].self_attn.h) is not None
    import afford.attention.paged as paged_mod
    keep, paged_mod.rope_store = paged_mod.rope_store, None       # the rope_store kernel must not run now
    out_rope = m._hidden_gemv(m.model.embed_tokens(ids), meta, (m.rope_cos, m.rope_sin), add_rmsnorm)
    paged_mod.rope_store = keep
    m.fused_qkv_rope = False
    assert torch.equal(out_rope, out), (out_rope - out).abs().max()
    for (k, v), (kp, vp) in zip(runner.kv, kv_plain):
        assert torch.equal(k, kp) and torch.equal(v, vp)
"""
ROPE_CHECK_I = "\n".join("    " + line if line else line for line in ROPE_CHECK.split("\n"))


@needs_triton
def test_fused_gemv_layers_in_the_interpreter(random_pair):
    """A one-row decode step through Transformer._hidden_gemv (every product a fused Triton GEMV, RoPE + K/V
    store and paged attention in Triton too, the interpreter running them all): the hidden state of the
    torch path, and the same K/V written; with a role on F.linear (config None) as well."""
    code = f"""
import torch
from afford.models import triton_gemv
from afford.models.loader import load_for_inference
from afford.models.triton_ops import add_rmsnorm
m = load_for_inference({str(random_pair[0])!r}, "cpu", "float32")
{ONE_ROW_STEP}kv_ref = [(k.clone(), v.clone()) for k, v in runner.kv]
for cfgs in (dict(triton_gemv.GEMV_CONFIGS), dict(triton_gemv.GEMV_CONFIGS, o=None, gate_up=None)):
    triton_gemv.GEMV_CONFIGS.update(cfgs)
    out = m._hidden_gemv(m.model.embed_tokens(ids), meta, (m.rope_cos, m.rope_sin), add_rmsnorm)
    assert out.shape == ref.shape and (out - ref).abs().max() < 1e-4 * (1 + ref.abs().max()), (out - ref).abs().max()
    for (k, v), (kr, vr) in zip(runner.kv, kv_ref):
        assert (k - kr).abs().max() < 1e-4 and (v - vr).abs().max() < 1e-4
{ROPE_CHECK}want = m.lm_head(ref)                            # the LM head: after the norm kernel, or a GEMV with it fused
assert m._gemv_ready() and m._head_gemv
for head in (None, (8, 64, 4, 1)):
    triton_gemv.GEMV_CONFIGS["head"] = head
    lg = m._hidden_gemv(m.model.embed_tokens(ids), meta, (m.rope_cos, m.rope_sin), add_rmsnorm, head=True)
    assert lg.shape == want.shape and (lg - want).abs().max() < 1e-4 * (1 + want.abs().max()), (lg - want).abs().max()
    if head is None:
        out = m._hidden_gemv(m.model.embed_tokens(ids), meta, (m.rope_cos, m.rope_sin), add_rmsnorm)
        assert torch.equal(lg, m.lm_head(out))
print("ok")
"""
    interpret(code)


@needs_triton
def test_fused_int4_gemv_kernel_in_the_interpreter():
    """The int4 one-row product with add / RMSNorm / SwiGLU fused (triton_gemv.gemv_w4), every code layout and
    kernel (pairs, halves, the tensor-core kernel -- its int4 -> 16-bit conversion in Triton ops here, the PTX
    form runs on the card, tests/test_gpu.py -- and octets, whose and-or is Triton ops here too): the same
    formula over the dequantized weights, one group per row (also with a last step past the row, masked) and
    several, tiles of one group and of part of one, the tensor-core and quads kernels with K split over three
    programs twice in a row (the workspace left zero); a halves layout whose groups do not divide K / 2, and an octets
    layout or a split K with more than one group a row, are refused."""
    code = """
import torch
from afford.models.quant import dequantize, quantize
from afford.models.triton_gemv import gemv_w4, w4_kind, w4_pack, w4_plan
from tests.gemv_reference import gemv_reference
g = torch.Generator().manual_seed(0)
splits = 0
for dt, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
    for N, K, group, cfg in ((24, 256, 256, (8, 128, 4, 1)), (21, 256, 64, (4, 128, 2, 1)), (40, 192, 64, (16, 64, 4, 1)),
                             (9, 512, 512, (4, 512, 4, 1)), (12, 384, 64, (4, 256, 4, 1)),
                             (9, 192, 192, (4, 128, 4, 1)), (5, 352, 352, (4, 256, 2, 1)),   # last step masked
                             (20, 1536, 1536, (16, 256, 1, 1)), (8, 1000, 1000, (8, 64, 1, 2))):  # (quads: 3 splits)
      for kind in ((0,), (1,), (2,), (2, 3), (3,), (4,), (5,), (5, "prefetch"), (5, 3)):  # (2, 3), (5, 3): K split
        cfg5 = (max(16, cfg[0]) if kind[0] == 2 else cfg[0],) + cfg[1:] + kind[:1 if kind[-1] == "prefetch" else 2]
        if kind[-1] == "prefetch":                                # over 3 programs; tensor cores: 16+ rows a program
            cfg5 = cfg5[:3] + (2, 5)                              # quads with the next step's codes loaded early
        layout, tc = w4_kind(cfg5)
        for add, norm, swiglu in ((False, False, False), (True, True, False), (True, True, True), (False, False, True)):
            rows = 2 * N if swiglu else N
            q, sc, z = quantize(torch.randn(rows, K, generator=g) * 0.1, 4, group)
            w = dequantize(q, sc, z)
            x = torch.randn(1, K, generator=g).to(dt)
            a = torch.randn(1, K, generator=g).to(dt) if add else None
            gam = (1 + 0.1 * torch.randn(K, generator=g)).to(dt) if norm else None
            packed = w4_pack(q, layout)
            if w4_plan(K, group, cfg5) is None or (layout == "quads" and swiglu and N % 4):
                try:                     # halves: the group must divide K / 2; a split K: one group; quads, SwiGLU:
                    gemv_w4(x, packed, sc.contiguous(), z.contiguous(), group, cfg5, swiglu=swiglu)
                    raise AssertionError("no error")                         # the gate rows in groups of 4
                except ValueError:
                    continue
            if kind == (5, 3):
                splits += w4_plan(K, group, cfg5)[2] > 1
            for _ in range(2 if len(kind) > 1 else 1):
                y, h = gemv_w4(x, packed, sc.contiguous(), z.contiguous(), group, cfg5, add=a, norm=gam, eps=1e-5,
                               swiglu=swiglu)
            # the tensor cores take x as a 16-bit operand: its rounding (~1e-3 relative in fp16) on top
            tol_v = max(tol, 2e-3) if tc else tol
            yr, hr = gemv_reference(x, w, a, gam, swiglu)
            assert torch.equal(h, hr)
            assert y.shape == yr.shape and (y.float() - yr).abs().max() <= tol_v * (1 + yr.abs().max()), \
                (dt, N, K, group, cfg5, add, norm, swiglu, (y.float() - yr).abs().max())
assert splits >= 4, splits                 # the quads tiles (5, 3) did split K (3 ways at K = 1536 and 1000, the
                                           # last split of 1000's partly past the row)
print("ok")
"""
    interpret(code)


def _run_ptx(asm: str, regs: dict) -> dict:
    """The few PTX instructions the quads kernel's inline asm uses, on 32-bit integers: regs maps "$i" and the
    asm's own registers to values; returns them after the asm ran."""
    def val(tok):
        tok = tok.strip()
        return regs[tok] if tok in regs else int(tok, 0) & 0xFFFFFFFF

    def s8(v):
        return v - 256 if v >= 128 else v
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." and not line.startswith(("and", "shr")):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        v = [val(a) for a in src]
        if op == "mov.b32":
            out = v[0]
        elif op == "and.b32":
            out = v[0] & v[1]
        elif op == "shr.u32":
            out = v[0] >> v[1]
        elif op == "prmt.b32":                   # default mode: selector nibble i picks byte i of {b, a}
            pool = v[0] | (v[1] << 32)
            out = sum(((pool >> (8 * ((v[2] >> (4 * i)) & 7))) & 255) << (8 * i) for i in range(4))
        elif op.startswith("dp4a."):             # d = c + sum of a.byte(i) * b.byte(i)
            sa, sb = (t == "s32" for t in op.split(".")[1:])
            out = v[2] + sum((s8 if sa else int)((v[0] >> 8 * i) & 255) * (s8 if sb else int)((v[1] >> 8 * i) & 255)
                             for i in range(4))
        elif op.startswith("dp2a."):             # d = c + a.half(0) * b.byte(h) + a.half(1) * b.byte(h + 1)
            h = 2 if op.split(".")[1] == "hi" else 0
            out = v[2] + ((v[0] & 0xFFFF) * ((v[1] >> 8 * h) & 255) + (v[0] >> 16) * ((v[1] >> 8 * (h + 1)) & 255))
        else:
            raise AssertionError(f"an instruction this emulator does not know: {line}")
        regs[d] = out & 0xFFFFFFFF
    return regs


@needs_triton
def test_quads_inline_ptx_computes_the_integer_dot_product():
    """The quads kernel's two inline PTX snippets (triton_gemv._Q_PIECES and _Q_DOT), run by a small emulator of
    their instructions -- the part of that kernel Triton's interpreter cannot run (it runs the same integers in
    Triton ops): for random code words and fixed-point x (|m| < 2^22, the kernel's range), four words' sums of
    q * H and q * ML (unsigned) put together equal the integer dot product of the nibbles with m. And each writes
    its outputs only after its last read of an input: LLVM may give an output an input's register (`=r`)."""
    import re

    from afford.models.triton_gemv import _Q_DOT, _Q_PIECES
    for asm, outs in ((_Q_PIECES.value, 3), (_Q_DOT.value, 2)):
        lines = [ln.strip() for ln in asm.splitlines() if "$" in ln]
        reads = [i for i, ln in enumerate(lines) if any(int(n) >= outs for n in re.findall(r"\$(\d+)", ln.split(",", 1)[1]))]
        writes = [i for i, ln in enumerate(lines) if re.match(r"\S+\s+\$\d+\s*,", ln)]
        assert writes and min(writes) > max(reads), asm
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        words = torch.randint(0, 1 << 32, (4,), generator=g, dtype=torch.int64).tolist()    # four steps' words
        m_lo = torch.randint(-(1 << 22) + 1, 1 << 22, (4, 4), generator=g).tolist()         # [word][byte]
        m_hi = torch.randint(-(1 << 22) + 1, 1 << 22, (4, 4), generator=g).tolist()
        aH = aL = 0
        want = 0
        for w, ml, mh in zip(words, m_lo, m_hi):
            pieces = []
            for m in (ml, mh):
                r = _run_ptx(_Q_PIECES.value, {f"${3 + i}": m[i] & 0xFFFFFFFF for i in range(4)})
                pieces.append((r["$0"], r["$1"], r["$2"]))
            (eH, e01, e23), (oH, o01, o23) = pieces
            r = _run_ptx(_Q_DOT.value, {"$2": w, "$3": eH, "$4": oH, "$5": e01, "$6": e23, "$7": o01, "$8": o23,
                                        "$9": aH, "$10": aL})
            aH, aL = r["$0"], r["$1"]
            want += sum(((w >> 8 * i) & 15) * ml[i] + ((w >> (8 * i + 4)) & 15) * mh[i] for i in range(4))
        aH = aH - (1 << 32) if aH >= 1 << 31 else aH
        assert aH * 65536 + aL == want


@needs_triton
def test_quads_fixed_point_in_the_interpreter():
    """The quads kernel's x in fixed point, where it is weakest (found in review): x with a large mean in fp32 (the
    sum of q * m less 8 * the sum of m cancels: taken per word column in int64 it stays at fp32 kernels' accuracy,
    6.7e-5 against 1e-5 before); a one-word step 512 times with every code 15 and ML 65535 (the q * ML sums'
    full unsigned 32 bits, exact; 513 such steps are refused); and one element 10^4 times the others (the fixed
    point's step is 2^-22 of it): fp32 within 1e-5, bf16 what the halves kernel gives."""
    code = """
import torch
from afford.models.quant import dequantize, quantize
from afford.models.triton_gemv import gemv_w4, w4_pack, w4_plan
from tests.gemv_reference import gemv_reference
g = torch.Generator().manual_seed(2)
for N, K, cfg, swiglu in ((8, 1024, (16, 256, 1, 2, 5), False), (8, 1024, (16, 256, 1, 2, 5), True),
                          (13, 1000, (16, 256, 1, 1, 5), False), (8, 1024, (16, 64, 1, 2, 5, 3), True)):  # K split
    q, sc, z = quantize(torch.randn(2 * N if swiglu else N, K, generator=g) * 0.1, 4, K)
    x = 0.9 + 0.1 * torch.rand(1, K, generator=g)
    y, _ = gemv_w4(x, w4_pack(q, "quads"), sc.contiguous(), z.contiguous(), K, cfg, swiglu=swiglu)
    yr, _ = gemv_reference(x, dequantize(q, sc, z), None, None, swiglu)
    assert (y - yr).abs().max() <= 1e-5 * (1 + yr.abs().max()), (N, K, cfg, swiglu, (y - yr).abs().max())
K = 4096
q = torch.full((4, K), 15, dtype=torch.int64)
x = torch.full((1, K), -2.0 ** -21)
x[0, 0] = 1.0
assert w4_plan(K, K, (4, 8, 1, 1, 5))[3] == 512 and w4_plan(K + 8, K + 8, (4, 8, 1, 1, 5)) is None
y, _ = gemv_w4(x, w4_pack(q, "quads"), torch.ones(4, 1), torch.zeros(4, 1), K, (4, 8, 1, 1, 5))
yr = x @ (q - 8).float().t()
assert (y - yr).abs().max() <= 1e-6 * yr.abs().max(), (y, yr)
q, sc, z = quantize(torch.randn(8, 512, generator=g) * 0.1, 4, 512)
x = torch.randn(1, 512, generator=g)
x[0, 7] = 1e4
yr, _ = gemv_reference(x, dequantize(q, sc, z))
for cfg in ((8, 256, 1, 2, 5), (8, 64, 1, 2, 5, 2)):       # (split: the outlier in one split's own fixed point)
    y, _ = gemv_w4(x, w4_pack(q, "quads"), sc.contiguous(), z.contiguous(), 512, cfg)
    assert (y - yr).abs().max() <= 1e-5 * (1 + yr.abs().max()), (cfg, (y - yr).abs().max())   # 2.7e-6 measured
x = x.to(torch.bfloat16)          # bf16: what the halves kernel gives, within the output's rounding
y, _ = gemv_w4(x, w4_pack(q, "quads"), sc.contiguous(), z.contiguous(), 512, (8, 256, 1, 2, 5))
yh, _ = gemv_w4(x, w4_pack(q, "halves"), sc.contiguous(), z.contiguous(), 512, (8, 256, 4, 1, 1))
assert ((y.float() - yh.float()).abs() <= 2.0 ** -8 * yh.float().abs()).all(), (y, yh)
print("ok")
"""
    interpret(code)


@needs_triton
def test_fused_int4_gemv_layers_in_the_interpreter(random_pair):
    """An int4 model (q|k|v and gate|up fused as on CUDA) through _hidden_gemv with the fused int4 GEMV (down
    on it and on its own kernel; both code layouts): the hidden state of its own unfused forward (the CPU's int4 kernel); without
    a tile for a role whose norm is fused the model is not taken down that path."""
    code = f"""
import torch
from afford.models import triton_gemv
from afford.models.loader import load_for_inference
from afford.models.triton_ops import add_rmsnorm
def load(group, head=False):
    m = load_for_inference({str(random_pair[0])!r}, "cpu", "float32", quantization="int4", quant_group=group,
                           quantize_head=head)
    for layer in m.model.layers:
        layer.self_attn.fuse_quantized()
        layer.mlp.fuse_quantized()
    return m
m = load("32")                                   # groups of 32: a tile of 64 would step through them, not taken
triton_gemv.GEMV_W4_CONFIGS.clear()
triton_gemv.GEMV_W4_CONFIGS.update(qkv=(8, 64, 4, 1), gate_up=(8, 64, 4, 1))
assert not m._gemv_ready()
triton_gemv.GEMV_W4_CONFIGS.update(qkv=(8, 32, 4, 1), gate_up=(8, 32, 4, 1))
assert m._gemv_ready()
triton_gemv.GEMV_W4_CONFIGS.update(qkv=(16, 32, 4, 1, 2, 2))     # a split K needs one group a row: not taken
assert not m._gemv_ready()
m = load("per-channel", head=True)              # the LM head int4 too
triton_gemv.GEMV_W4_CONFIGS.clear()
triton_gemv.GEMV_W4_CONFIGS.update(qkv=(8, 128, 4, 1), o=(4, 64, 2, 1))
assert not m._gemv_ready()                       # gate|up (norm and SwiGLU fused) has no tile
triton_gemv.GEMV_W4_CONFIGS["gate_up"] = (8, 128, 4, 1)
assert m._gemv_ready()                           # down keeps its own kernel
{ONE_ROW_STEP}halves = dict.fromkeys(("qkv", "o", "gate_up", "down"), (8, 64, 4, 1, 1))     # the halves code layout
tc = dict.fromkeys(("qkv", "o", "gate_up", "down"), (16, 64, 4, 1, 2))        # halves, tensor cores
octets = dict.fromkeys(("qkv", "o", "gate_up", "down"), (8, 64, 4, 1, 3))     # the octets code layout
tc_split = dict.fromkeys(("qkv", "o", "gate_up", "down"), (16, 64, 4, 1, 2, 2))   # tensor cores, K split in two
x2d = dict.fromkeys(("qkv", "o", "gate_up", "down"), (8, 64, 4, 1, 4))        # halves, x in the codes' layout
quads = dict.fromkeys(("qkv", "o", "gate_up", "down"), (8, 64, 1, 2, 5))      # integer dot products, prefetch
for cfgs, layout in ((dict(down=None), "pairs"), (dict(down=(8, 128, 4, 1)), "pairs"), (halves, "halves"),
                     (tc, "halves"), (octets, "octets"), (tc_split, "halves"), (x2d, "halves"), (quads, "quads")):
    triton_gemv.GEMV_W4_CONFIGS.update(cfgs)
    assert m._gemv_ready()
    assert all(mod._w4_layout == layout for mod in m.modules() if getattr(mod, "_w4", None))
    out = m._hidden_gemv(m.model.embed_tokens(ids), meta, (m.rope_cos, m.rope_sin), add_rmsnorm)
    # the CPU's int4 kernel rounds activations to bf16, the fused GEMV keeps them in fp32
    err = float((out - ref).abs().max() / ref.abs().max())
    assert out.shape == ref.shape and err < 1e-2, (cfgs, err)   # 0.004 measured
    if layout in ("pairs", "halves") and cfgs is not tc and cfgs is not tc_split:
{ROPE_CHECK_I}    head = dict(head=cfgs.get("qkv", (8, 64, 4, 1)))              # the LM head as one more fused GEMV, and not
    for h in (head, dict(head=None)):
        triton_gemv.GEMV_W4_CONFIGS.update(h)
        assert m._gemv_ready() and (m.lm_head._w4 is not None) == (h["head"] is not None)
        lg = m._hidden_gemv(m.model.embed_tokens(ids), meta, (m.rope_cos, m.rope_sin), add_rmsnorm, head=True)
        want = m.lm_head(ref)
        err = float((lg - want).abs().max() / want.abs().max())
        assert lg.shape == want.shape and err < 1e-2, (cfgs, h, err)
print("ok")
"""
    interpret(code)


@needs_triton
def test_int4_gemv_kernel_in_the_interpreter():
    """The few-row int4 kernels (tiles within one scale group, tiles over several groups, a group that is no
    power of two, rows padded to 2 / 4, rows past N masked; the one-row variant 2): the dequantized product. Interpreted with fp16
    activations (the interpreter mis-converts bf16; the card runs both, tests/test_gpu.py)."""
    code = """
import torch
from afford.models import triton_int4 as t4
from afford.models.quant import quantize, dequantize
g = torch.Generator().manual_seed(0)
for N, K, group, cfg in ((24, 256, 32, (8, 128, 4, 3)), (40, 512, 512, (8, 256, 4, 2)), (16, 256, 64, (4, 512, 4, 3)),
                         (8, 1408, 704, (8, 512, 4, 3)), (33, 512, 128, (16, 128, 2, 3)),
                         (24, 256, 32, (8, 128, 4, 3, 2)), (40, 512, 512, (8, 256, 4, 2, 2)),
                         (33, 512, 128, (16, 256, 2, 3, 2)), (8, 1408, 704, (4, 512, 4, 3, 2))):
    q, s, z = quantize(torch.randn(N, K, generator=g), 4, group)
    p, w = t4.pack(q), dequantize(q, s, z)
    for M in (1, 2, 3, 4):
        x = torch.randn(M, K, generator=g).half()
        y = t4.int4_mm(x, p, s.contiguous(), z.contiguous(), group, cfg).float()
        ref = x.float() @ w.t()
        assert y.shape == (M, N) and (y - ref).abs().max() < 2e-3 * ref.abs().max(), (N, K, group, cfg, M)
print("ok")
"""
    interpret(code)


def test_paged_forward_from_unrotated_qkv_equals_the_model_path():
    """PagedBackend.forward_qkv (what the model calls when RoPE is fused) falls back to torch's RoPE where
    Triton cannot run: the same output and the same pool as rotating first and calling forward."""
    from afford.attention import ForwardBatch
    from afford.attention.paged import PagedBackend
    from afford.models.transformer import apply_rope
    H, KV, D, BS = 4, 2, 8, 4
    g = torch.Generator().manual_seed(0)
    cos_t, sin_t = torch.randn(32, D // 2, generator=g).repeat(1, 2), torch.randn(32, D // 2, generator=g).repeat(1, 2)
    outs = []
    for fused_entry in (True, False):
        pool, backend = BlockPool(8, BS), PagedBackend(use_triton=False)
        pool.prepare_write(0, 9)
        kv = [(torch.zeros(9 * BS, KV, D), torch.zeros(9 * BS, KV, D))]
        qkv = torch.randn(9, H + 2 * KV, D, generator=torch.Generator().manual_seed(1))
        for start, n in ((0, 6), (6, 3)):                     # a prefill, then a verify of 3 rows
            pos = torch.arange(start, start + n)
            batch = ForwardBatch("verify", [0], [start], [n], [pool.tables[0]], BS,
                                 torch.tensor(pool.slots(0, start, start + n)), pos)
            meta = backend.prepare_metadata(batch, kv)
            x = qkv[start:start + n]
            if fused_entry and start:
                o = backend.forward_qkv(x, H, cos_t, sin_t, 0, meta)
            else:
                c, s = cos_t[pos].unsqueeze(-2), sin_t[pos].unsqueeze(-2)
                qk = apply_rope(x[:, :H + KV], c, s)
                o = backend.forward(qk[:, :H], qk[:, H:], x[:, H + KV:], 0, meta)
        outs.append((o, kv[0][0].clone(), kv[0][1].clone()))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_ragged_fresh_prefill_per_sequence_equals_the_padded_batch():
    """A ragged prefill too large for one padded, masked SDPA runs one causal SDPA per sequence: the same."""
    from afford.attention import ForwardBatch
    from afford.attention.paged import PagedBackend
    H, KV, D, BS = 4, 2, 8, 4
    g = torch.Generator().manual_seed(0)
    lens = [5, 11, 2]
    q, k, v = (torch.randn(sum(lens), n, D, generator=g) for n in (H, KV, KV))
    outs = []
    for limit in (1 << 26, 0):
        pool, backend = BlockPool(16, BS), PagedBackend(use_triton=False)
        backend.padded_scores_max = limit
        for s, n in enumerate(lens):
            pool.prepare_write(s, n)
        kv = [(torch.zeros(17 * BS, KV, D), torch.zeros(17 * BS, KV, D))]
        slots = torch.tensor([x for s, n in enumerate(lens) for x in pool.slots(s, 0, n)])
        pos = torch.cat([torch.arange(n) for n in lens])
        batch = ForwardBatch("prefill", [0, 1, 2], [0, 0, 0], lens, [pool.tables[s] for s in range(3)], BS, slots, pos)
        outs.append(backend.forward(q, k, v, 0, backend.prepare_metadata(batch, kv)))
    assert (outs[0] - outs[1]).abs().max() < 1e-5


def test_a_failed_capture_leaves_that_shape_eager(random_pair):
    """A graph capture that raises (out of memory, an op that cannot be captured) must not fail the step:
    that (bucket, tokens) shape runs eagerly from then on, with the eager path's tokens."""
    g = torch.Generator().manual_seed(4)
    ps = [torch.randint(2, 500, (int(n),), generator=g).tolist() for n in torch.randint(3, 30, (3,), generator=g)]
    params = SamplingParams(max_tokens=12, temperature=0)
    ref = [o.token_ids for o in LLM(random_pair[0]).generate(ps, params)]
    llm = LLM(random_pair[0], attention="paged", native=False, max_num_seqs=8)
    graphs = llm.engine.runner.graphs = GraphRunner(llm.engine.runner, 8, 1, capture=False)
    graphs.capture = True                                  # force the capture path, and make it raise

    def capture_fails(shape):
        raise RuntimeError("CUDA error: out of memory")
    graphs._capture = capture_fails
    assert [o.token_ids for o in llm.generate(ps, params)] == ref
    assert graphs.shapes and all(s.failed for s in graphs.shapes.values()) and graphs.replays == 0


@needs_triton
def test_pdl_kernels_load_their_first_weights_before_the_wait():
    """Programmatic dependent launch (triton_lib.PDL), compiled here for an sm_90 card (Triton's ptxas and
    nvdisasm, no GPU): each one-row GEMV kernel signals its dependents (PREEXIT), loads exactly its first step's
    weights -- the tile's bytes in 16-byte vectors, and for int4 the rows' scales and zero points, nothing else
    -- and only then waits for the kernel before it (ACQBULK), writing nothing before the wait; without PDL
    neither instruction is there."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gemv_sass
    picks = {("qkv", "bf16", (4, 2048, 4, 1)), ("qkv", "int4 pairs", (4, 2048, 4, 1)),
             ("gate_up", "bf16", (4, 2048, 4, 1)), ("gate_up", "int4 pairs", (16, 512, 4, 1)),
             ("gate_up", "int4 halves", (8, 1024, 4, 1, 1)), ("gate_up", "int4 tensor cores", (32, 512, 4, 1, 2)),
             ("down", "bf16", (4, 2048, 4, 1)), ("down", "int4 pairs", (8, 1024, 4, 1)),
             ("gate_up", "int4 octets", (8, 1024, 4, 1, 3)), ("down", "int4 octets", (16, 512, 4, 1, 3)),
             ("qkv", "int4 halves x2d", (8, 1024, 4, 1, 4)), ("gate_up", "int4 quads", (16, 256, 1, 1, 5)),
             ("qkv", "int4 quads", (16, 256, 1, 2, 5))}
    seen = 0
    for role, (N, K, fused, swiglu) in gemv_sass.ROLES.items():
        for pdl in (True, False):
            for kind, cfg, fn, sig, cst, steps, bn, F in gemv_sass.variants(N, K, fused, swiglu, pdl):
                if (role, kind, cfg) not in picks:
                    continue
                ops = [line.split("*/")[1].split(";")[0].strip() for line in
                       gemv_sass.sass(gemv_sass.build(fn, sig, cst, cfg[2], cfg[3])) if "*/" in line]
                names = [o.split()[1] if o.startswith("@") else o.split()[0] for o in ops if o]
                if not pdl:
                    assert "ACQBULK" not in names and "PREEXIT" not in names
                    continue
                seen += 1
                wait = names.index("ACQBULK")
                before = names[:wait]
                step = cst["BLOCK_C"] * 8 if "BLOCK_C" in cst else cst["BLOCK_K"]         # weights a row a step
                rows_bytes = step * (2 if kind == "bf16" else 0.5) * bn * (2 if swiglu else 1)
                assert "PREEXIT" in before and not any(n.startswith("STG") for n in before), (role, cfg)
                assert before.count("LDG.E.128") == rows_bytes / (cfg[2] * 32 * 16), (role, cfg, kind, before)
                extra = [n for n in before if n.startswith("LDG") and n != "LDG.E.128"]
                if kind == "bf16":
                    assert not extra, (role, cfg, before)
                else:       # and, int4 with one group a row, the rows' fp32 scales and zero points (_row_affine)
                    assert extra and set(extra) == {"LDG.E"}, (role, cfg, kind, before)
    assert seen == len(picks)


@needs_triton
def test_gpu_kernels_compile_for_sm90_in_every_dtype():
    """What tests/test_gpu.py and the card's sweep launch, compiled here for an sm_90 card (Triton's ptxas, no GPU),
    so that a kernel that would not compile is found before a card's few minutes: the four one-row GEMV kernels
    with fp32 / bf16 / fp16 activations and each add / norm / SwiGLU combination, grouped scales, the tensor-core
    kernel's both PTX forms and a split K, and paged attention, its merge and RoPE + K/V store -- all with PDL."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gemv_sass

    from afford.attention import triton_paged as tp
    from afford.models import triton_gemv as tg
    K, built = 256, 0
    for dt in ("fp32", "bf16", "fp16"):
        act = dict.fromkeys(("X", "A", "XO", "G", "Y"), "*" + dt)
        for add, norm, swiglu in ((False, False, False), (True, True, False), (True, True, True)):
            flags = dict(HAS_ADD=add, NORM=norm, SWIGLU=swiglu, PDL=True)
            kernels = [(tg._gemv_kernel, dict(act, W="*" + dt, N="i32", UP_OFF="i64", eps="fp32", stride_w="i32"),
                        dict(K=K, BLOCK_N=4, BLOCK_K=128, EVEN_K=True), 4)]
            # gemv_w4's own launch plans (w4_plan): pairs, halves, tensor cores (mma.sync's 32 rows, a warpgroup's
            # 64, K split in two), octets, halves with x in the codes' layout; per-channel and grouped scales (where
            # the tile takes them)
            for group in (K, 128):
                for cfg in ((8, 128, 4, 1), (8, 128, 4, 1, 1), (32, 128, 4, 1, 2), (64, 128, 4, 1, 2),
                            (64, 128, 4, 1, 2, 2), (8, 128, 4, 1, 3), (8, 128, 4, 1, 4), (16, 128, 1, 2, 5),
                            (16, 128, 1, 2, 5, 2)):
                    plan = tg.w4_plan(K, group, cfg, fp16=dt != "bf16")
                    if plan is None:
                        continue
                    kernels.append((plan[0], gemv_sass.w4_signature(plan[0], dt), dict(plan[1], BLOCK_N=cfg[0]),
                                    cfg[2]))
            for fn, sig, cst, warps in kernels:
                k = gemv_sass.build(fn, sig, dict(cst, **flags), warps, 1)
                assert k.asm["cubin"] and "griddepcontrol.wait" in k.asm["ptx"], (fn.__name__, dt, cst)
                built += 1
        pool = "*" + dt
        for fn, sig, cst, warps in (
                (tp._split_kernel, dict(Q=pool, K=pool, V=pool, O=pool, Acc="*fp32", Ml="*fp32", tables="*i32",
                                        row_seq="*i32", limits="*i32", scale="fp32", stride_qr="i32", stride_qh="i32",
                                        stride_ks="i32", stride_kh="i32", stride_or="i32", stride_oh="i32",
                                        stride_tb="i32"),
                 dict(H=32, BS=16, G=8, GP=16, D=64, D_PAD=64, BLOCK_N=32, SPLITS=4, IEEE=dt == "fp32"), 4),
                (tp._merge_kernel, dict(Acc="*fp32", Ml="*fp32", O=pool, limits="*i32", stride_or="i32",
                                        stride_oh="i32"), dict(H=32, D=64, D_PAD=64, SPLITS=4, S_PAD=4, BLOCK_N=32), 1),
                (tp._rope_store_kernel, dict(QKV=pool, COS="*fp32", SIN="*fp32", POS="*i32", SLOTS="*i32", KP=pool,
                                             VP=pool, QO=pool, scratch="i32", stride_n="i32", stride_h="i32",
                                             stride_cos="i32", stride_ks="i32", stride_kh="i32", stride_qn="i32",
                                             stride_qh="i32"),
                 dict(H=32, KV=4, HALF=32, HALF_PAD=32), 1),
                *[(tp._decode_kernel, dict(QKV=pool, COS="*fp32", SIN="*fp32", POS="*i32", SLOTS="*i32", KP=pool,
                                           VP=pool, O=pool, Acc="*fp32", Ml="*fp32", CNT="*i32", tables="*i32",
                                           row_seq="*i32", limits="*i32", scale="fp32", scratch="i32",
                                           stride_n="i32", stride_h="i32", stride_cos="i32", stride_ks="i32",
                                           stride_kh="i32", stride_or="i32", stride_oh="i32", stride_tb="i32"),
                   dict(H=32, KV=4, BS=16, G=8, GP=16, D=64, D_PAD=64, BLOCK_N=32, SPLITS=splits,
                        GM=8, S_PAD=max(2, splits), IEEE=dt == "fp32"), 4) for splits in (1, 16)]):
            k = gemv_sass.build(fn, sig, dict(cst, PDL=True), warps, 1)
            assert "griddepcontrol.wait" in k.asm["ptx"], (fn.__name__, dt)
            built += 1
    assert built == 3 * (3 * (1 + 9 + 5) + 5)                   # octets, quads and a split K: per-channel only
    # the q|k|v GEMVs with RoPE + the K/V store (fused_qkv_rope): dense, int4 pairs and halves, add + norm fused
    rope = dict(ROPE=True, RH=32, RKV=4, HALF=32, HAS_ADD=True, NORM=True, SWIGLU=False, PDL=True)
    for dt in ("bf16", "fp16"):
        act = dict.fromkeys(("X", "A", "XO", "G", "Y", "KP", "VP"), "*" + dt)
        k = gemv_sass.build(tg._gemv_kernel, dict(act, W="*" + dt, N="i32", UP_OFF="i64", eps="fp32", stride_w="i32"),
                            dict(rope, K=2048, BLOCK_N=4, BLOCK_K=2048, EVEN_K=True), 4, 1)
        assert "griddepcontrol.wait" in k.asm["ptx"]
        for cfg in ((8, 2048, 4, 1), (4, 2048, 4, 1, 1)):
            plan = tg.w4_plan(2048, 2048, cfg, fp16=dt != "bf16")
            k = gemv_sass.build(plan[0], dict(gemv_sass.w4_signature(plan[0], dt), KP="*" + dt, VP="*" + dt),
                                dict(plan[1], **rope, BLOCK_N=cfg[0]), cfg[2], cfg[3])
            assert "griddepcontrol.wait" in k.asm["ptx"], cfg


@needs_triton
def test_quads_kernel_hands_its_asm_whole_words():
    """The quads kernel's inline asm, compiled here for an sm_90 card (no GPU): no operand of it is undef -- with
    pack=4, Triton filled asm instances with undef wherever a step had fewer word columns than threads (found in
    review: every tile at K = 128, the 2- and 4-warp ones at 256) -- over the sweep's tiles at the 1.1 B model's
    shapes and at small K, with every fusion; and the code tile's layout conversions only rename registers (a
    real one would go through shared memory every step: what the kernel's (GN, 4C) code load avoids)."""
    import re
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gemv_sass

    from afford.models import triton_gemv as tg
    quads = [c for c in tg.W4_SWEEP_CONFIGS if len(c) > 4 and c[4] == 5] + [(8, 64, 1, 2, 5), (16, 128, 1, 2, 5)]
    shapes = list(gemv_sass.ROLES.values()) + [(48, 64, True, True), (24, 128, False, False), (48, 256, True, True),
                                               (24, 512, True, False)]
    checked = 0
    for N, K, fused, swiglu in shapes:
        for cfg in quads:
            fn, cst, _, _ = tg.w4_plan(K, K, cfg)
            cst = dict(cst, HAS_ADD=fused, NORM=fused, SWIGLU=swiglu, PDL=True, BLOCK_N=cfg[0])
            k = gemv_sass.build(fn, gemv_sass.w4_signature(fn), cst, cfg[2], cfg[3])
            calls = [ln for ln in k.asm["llir"].splitlines() if " asm " in ln and ("prmt" in ln or "dp4a" in ln)]
            assert calls and not any("undef" in ln or "poison" in ln for ln in calls), (N, K, cfg)
            ttgir = k.asm["ttgir"]
            layouts = dict(re.findall(r"^(#\w+) = (#ttg\.blocked<\{.*?\}>)", ttgir, re.M))
            for src, dst in re.findall(r"ttg\.convert_layout %\S+ : tensor<\d+x\d+x4xi32, (#\w+)> -> "
                                       r"tensor<\d+x\d+x4xi32, (#\w+)>", ttgir):
                assert re.sub(r", order = \[.*?\]", "", layouts[src]) == \
                    re.sub(r", order = \[.*?\]", "", layouts[dst]), (N, K, cfg, layouts[src], layouts[dst])
            checked += 1
    assert checked == len(shapes) * len(quads)


@needs_triton
def test_int4_sweep_isolates_a_crashing_tile():
    """gpu_decode.py's int4 sweep first runs each tile in a child process (on the card an illegal address would
    poison the sweep's own CUDA context): a tile whose child dies is set aside and the next child goes on from the
    tile after it. Here in Triton's interpreter, with a tile gemv_w4 refuses (tensor cores on 8 rows)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_decode
    good, bad = gpu_decode.w4_runnable([(4, 64, 4, 1), (8, 64, 4, 1, 2), (8, 64, 4, 1, 3)], device="cpu", shape="TINY",
                                       dtype="float16", env={"TRITON_INTERPRET": "1"})
    assert good == [(4, 64, 4, 1), (8, 64, 4, 1, 3)]
    assert [c for c, _ in bad] == [(8, 64, 4, 1, 2)] and "ValueError" in bad[0][1]


def test_gemv_scaling_fit_splits_fixed_and_streaming_time():
    """benchmarks/gemv_scaling.py's least squares: points on us = 3 + bytes / (2 TB/s) give back 3 us and 2 TB/s;
    one point or none gives no fit."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gemv_scaling
    pts = [(b, 3.0 + b / 2e6) for b in (1e6, 4e6, 2.3e7)]
    f = gemv_scaling.fit(pts + [(5e6, None)])
    assert abs(f["fixed_us"] - 3.0) < 1e-9 and abs(f["rate_tb_s"] - 2.0) < 1e-9 and f["worst_rel_residual"] < 1e-9
    assert gemv_scaling.fit(pts[:1]) is None
