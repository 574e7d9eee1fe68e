"""GPU tests (skipped without CUDA; benchmarks/gpu_check.sh runs them on a GPU machine): CUDA graphs on
vs off give identical greedy tokens in fp32 for batch 1..64 and under speculation; the Triton paged
kernel equals the torch reference and the whole model with the paged backend equals the gather + SDPA
backend on ragged batches; the int4 / int8 CUDA kernels equal the dequantize fallback within the bound
that bf16 rounding of the products allows; `afford compress` round-trips on the card."""
import pytest
import torch
from gemv_reference import gemv_reference

from afford import LLM, SamplingParams
from afford.attention import triton_paged
from afford.attention.paged import attend_rows_reference
from afford.core.runner import ModelRunner
from afford.kv.paged import BlockPool
from afford.models.loader import load_for_inference
from afford.models.quant import QuantLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 500, (int(k),), generator=g).tolist() for k in torch.randint(3, 40, (n,), generator=g)]


@pytest.mark.parametrize("batch", [1, 3, 17, 64])
def test_graphs_on_and_off_give_the_same_greedy_tokens(random_pair, batch):
    ps, params = _prompts(batch, batch), SamplingParams(max_tokens=24, temperature=0)
    eager = LLM(random_pair[0], device="cuda", dtype="float32", enforce_eager=True, max_num_seqs=64)
    graphs = LLM(random_pair[0], device="cuda", dtype="float32", max_num_seqs=64)
    assert eager.engine.runner.graphs is None and graphs.engine.runner.graphs is not None
    ref = [o.token_ids for o in eager.generate(ps, params)]
    assert [o.token_ids for o in graphs.generate(ps, params)] == ref
    assert graphs.engine.runner.graphs.replays > 0


@pytest.mark.parametrize("graphs", [True, False])
def test_async_scheduling_gives_the_synchronous_tokens(random_pair, graphs):
    """Decode steps launched before the host reads the step before's tokens (the default with graphs):
    the synchronous loop's tokens, texts and finish reasons, stops on tokens the step in flight cannot
    know included, and every KV block back."""
    ps = _prompts(40, 11)
    kw = dict(device="cuda", dtype="float32", max_num_seqs=64, enforce_eager=not graphs)
    sync = LLM(random_pair[0], async_scheduling=False, **kw)
    plain = [SamplingParams(max_tokens=8 + 3 * (i % 9), temperature=0) for i in range(40)]
    ref = [o.token_ids for o in sync.generate(ps, plain)]
    params = [SamplingParams(max_tokens=p.max_tokens, temperature=0, stop_token_ids=[ref[0][4], ref[1][5]])
              for p in plain]
    asy = LLM(random_pair[0], async_scheduling=True, **kw)
    free = asy.engine.pool.num_free
    out = [(o.token_ids, o.text, o.finish_reason) for o in asy.generate(ps, params)]
    assert out == [(o.token_ids, o.text, o.finish_reason) for o in sync.generate(ps, params)]
    assert asy.engine.steps_ahead > 10 and asy.engine.pool.num_free == free
    assert (asy.engine.runner.graphs is not None) == graphs


@pytest.mark.parametrize("speculation", ["fixed", "goodput"])
def test_graphs_under_speculation(random_pair, speculation):
    ps, params = _prompts(6, 7), SamplingParams(max_tokens=24, temperature=0)
    ref = [o.token_ids for o in LLM(random_pair[0], device="cuda", dtype="float32", enforce_eager=True)
           .generate(ps, params)]
    llm = LLM(random_pair[0], device="cuda", dtype="float32", draft=str(random_pair[1]), num_speculative_tokens=3,
              speculation=speculation)
    assert [o.token_ids for o in llm.generate(ps, params)] == ref
    assert llm.engine.runner.graphs.replays > 0 and llm.engine.speculator.proposer.runner.graphs.replays > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_equals_reference(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    H, KV, D, BS, nb = 32, 4, 64, 16, 64
    kp = torch.randn(nb * BS, KV, D, generator=g, device="cuda").to(dtype)
    vp = torch.randn(nb * BS, KV, D, generator=g, device="cuda").to(dtype)
    tables = torch.randperm(nb, device="cuda")[:40].view(4, 10).to(torch.int32)
    row_seq = torch.tensor([0, 1, 1, 2, 3, 3, 3], device="cuda")
    limits = torch.tensor([1, 17, 18, 160, 5, 6, 7], device="cuda")
    q = torch.randn(7, H, D, generator=g, device="cuda").to(dtype)
    b = attend_rows_reference(q.float(), kp.float(), vp.float(), tables, row_seq, limits, BS, D ** -0.5)
    for max_ctx in (None, 4096):                                 # 10 splits of 32 tokens; 16 of 256
        a = triton_paged.attend_rows(q, kp, vp, tables, row_seq, limits, BS, D ** -0.5, max_ctx).float()
        assert (a - b).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_attention_equals_the_three_kernels(dtype):
    """attend_decode (RoPE, K/V store, attention and merge in one kernel, the last program of each (row, K/V
    head) merging): the pools rope_store writes bit for bit, the output of rope_store + attend_rows, with one
    split and sixteen, twice in a row (its counters zero again), a padding row writing the scratch slot."""
    g = torch.Generator(device="cuda").manual_seed(0)
    H, KV, D, BS, nb, R = 32, 4, 64, 16, 256, 6
    S = nb * BS
    cos = torch.randn(2048, D // 2, generator=g, device="cuda").repeat(1, 2)
    sin = torch.randn(2048, D // 2, generator=g, device="cuda").repeat(1, 2)
    pools = [torch.randn(S + BS, KV, D, generator=g, device="cuda").to(dtype) for _ in range(2)]
    qkv = torch.randn(R, H + 2 * KV, D, generator=g, device="cuda").to(dtype)
    # a table of 2 blocks (32 tokens: one split) and of 40 (16 splits, each row's length from its context)
    for W, pos in ((2, [0, 5, 16, 31, 30, 17]), (40, [0, 127, 128, 300, 639, 17])):
        tables = torch.randperm(nb, device="cuda")[:R * W].view(R, W).to(torch.int32)
        pos = torch.tensor(pos, device="cuda")
        slots = tables[torch.arange(R, device="cuda"), pos // BS].long() * BS + pos % BS
        slots[5] = -1
        row_seq, limits = torch.arange(R, device="cuda"), pos + 1
        rk, rv = (p.clone() for p in pools)
        q = triton_paged.rope_store(qkv, cos, sin, pos, slots, rk, rv, S, H)
        ref = triton_paged.attend_rows(q, rk, rv, tables, row_seq, limits, BS, D ** -0.5).float()
        for _ in range(2):
            kp, vp = (p.clone() for p in pools)
            out = triton_paged.attend_decode(qkv, cos, sin, pos, slots, kp, vp, S, H, tables, row_seq, limits,
                                             BS).float()
            assert torch.equal(kp, rk) and torch.equal(vp, rv)
            assert (out - ref).abs().max() <= (1e-6 if dtype == torch.float32 else 1e-2), (out - ref).abs().max()
            assert not triton_paged._COUNTERS.get(qkv.device, torch.zeros(1)).any()


def test_paged_backend_model_equals_sdpa_on_ragged_batches(random_pair):
    model = load_for_inference(random_pair[0], "cuda", "float32")
    outs = []
    for name in ("paged", "sdpa"):
        runner = ModelRunner(model, BlockPool(64, 4), attention=name, graphs=False)
        for s, n in enumerate((9, 30, 2)):
            runner.pool.prepare_write(s, n + 8)
        pre = runner.forward([0, 1, 2], [0, 0, 0], [list(range(3, 12)), list(range(5, 35)), [7, 8]],
                             [list(range(9)), list(range(30)), [0, 1]])
        dec = runner.forward([0, 1, 2], [9, 30, 2], [[4], [5], [6]])
        ver = runner.forward([0, 1, 2], [10, 31, 3], [[1, 2, 3], [4], [5, 6, 7, 8]], [[0, 1, 2], [0], [0, 1, 2, 3]])
        outs.append(torch.cat([pre, dec, ver]))
    assert (outs[0] - outs[1]).abs().max() < 1e-4


@pytest.mark.parametrize("bits,group,int4", [(4, 128, "tinygemm"), (4, 2048, "tinygemm"), (4, 128, "triton"),
                                            (4, 2048, "triton"), (4, 2048, "auto"), (4, 128, "auto"),
                                            (8, 2048, None), (8, 256, None)])
def test_low_bit_kernels_equal_the_dequantized_product(bits, group, int4, monkeypatch):
    from afford.models import quant
    if int4:
        monkeypatch.setattr(quant, "CUDA_INT4_KERNEL", int4)
    g = torch.Generator().manual_seed(bits)
    lin = torch.nn.Linear(2048, 1024, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1024, 2048, generator=g) * 0.02)
    ql = QuantLinear.from_linear(lin, bits, group)
    ql = ql.to("cuda")
    ql.refresh()
    assert ql.kernel == {"tinygemm": "int4cuda", "auto": "int4cuda", "triton": "int4triton",
                         None: "int8triton"}[int4], ql.kernel
    if int4 == "auto":                           # the row kernel where it won the timing, else tinygemm
        from afford.models import triton_int4
        ql._row = ql._row or (triton_int4.pack(ql.codes), ql.scales.float().contiguous(), ql.zeros.float().contiguous())
    for rows in (1, 2, 3, 4, 5, 16, 64):                  # the Triton int4 GEMV (<= 4 rows), then tiles
        x = torch.randn(rows, 2048, device="cuda")
        y = ql(x).float()
        kernel, ql.kernel = ql.kernel, "dequant"
        ref = ql(x).float()
        ql.kernel = kernel
        # bf16 rounding of each product and of the output: |x| @ |W|^T times a few bf16 epsilons
        from afford.models.quant import dequantize
        w = dequantize(ql.codes, ql.scales, ql.zeros).abs()
        bound = 4 * 2 ** -8 * (x.to(torch.bfloat16).float().abs() @ w.t()) + 1e-3
        assert ((y - ref).abs() <= bound).all(), (bits, group, rows, (y - ref).abs().max())


def test_int4_few_row_kernel_tiles_equal_the_dequantized_product():
    """Every tile the benchmark's sweep may pick (both variants), on bf16 rows: the dequantized product."""
    from afford.models import triton_int4 as t4
    from afford.models.quant import dequantize, quantize
    g = torch.Generator(device="cuda").manual_seed(3)
    for N, K, group in ((2560, 2048, 2048), (2048, 5632, 5632), (1024, 2048, 128)):
        q, sc, z = quantize(torch.randn(N, K, generator=g, device="cuda") * 0.02, 4, group)
        ops = (t4.pack(q), sc.contiguous(), z.contiguous())
        w = dequantize(q, sc, z)
        for cfg in ((4, 2048, 4, 1, 1), (8, 512, 4, 3, 1), (8, 1024, 4, 2, 2), (16, 1024, 8, 2, 2), (2, 1024, 2, 3, 2)):
            for rows in (1, 2, 4):
                x = torch.randn(rows, K, generator=g, device="cuda").to(torch.bfloat16)
                ref = x.float() @ w.t()
                y = t4.int4_mm(x, *ops, group, cfg).float()
                bound = 4 * 2 ** -8 * (x.float().abs() @ w.abs().t()) + 1e-3
                assert ((y - ref).abs() <= bound).all(), (N, K, group, cfg, rows)


@pytest.mark.parametrize("q,int4,kernel", [("int4", "tinygemm", "int4cuda"), ("int4", "auto", "int4cuda"),
                                           ("int4", "triton", "int4triton"), ("int8", "auto", "int8triton")])
def test_low_bit_graphs_with_fused_matrices(random_pair, q, int4, kernel, monkeypatch):
    from afford.models import quant
    monkeypatch.setattr(quant, "CUDA_INT4_KERNEL", int4)
    ps, params = _prompts(5, 3), SamplingParams(max_tokens=16, temperature=0)
    eager = LLM(random_pair[0], device="cuda", quantization=q, enforce_eager=True)
    graphs = LLM(random_pair[0], device="cuda", quantization=q)
    attn = graphs.engine.model.model.layers[0].self_attn
    assert isinstance(attn.qkv, QuantLinear) and attn.qkv.kernel == kernel
    assert [o.token_ids for o in graphs.generate(ps, params)] == [o.token_ids for o in eager.generate(ps, params)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_rope_gives_the_unfused_logits(random_pair, dtype):
    """RoPE + K/V store as one kernel on the rows path: the logits of the separate operators."""
    model = load_for_inference(random_pair[0], "cuda", dtype)
    outs = []
    for fused in (False, True):
        runner = ModelRunner(model, BlockPool(64, 4), attention="paged", graphs=False, max_q=4)
        runner.backend.fused_rope = fused
        for s, n in enumerate((9, 30, 2)):
            runner.pool.prepare_write(s, n + 8)
        runner.forward([0, 1, 2], [0, 0, 0], [list(range(3, 12)), list(range(5, 35)), [7, 8]])
        dec = runner.forward([0, 1, 2], [9, 30, 2], [[4], [5], [6]])
        ver = runner.forward([0, 1, 2], [10, 31, 3], [[1, 2, 3], [4], [5, 6, 7, 8]], [[0, 1, 2], [0], [0, 1, 2, 3]])
        outs.append(torch.cat([dec, ver]))
    # fp32: the same up to a fused multiply-add; bf16: the same up to bf16 rounding (an H200 run showed
    # logits differing in the third significant digit, while Triton's CPU interpreter gives torch's bits)
    assert (outs[0] - outs[1]).abs().max() < (1e-4 if dtype == "float32" else 0.1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_layer_kernels_give_torch_logits(random_pair, dtype):
    """Residual add + RMSNorm and silu * up as Triton kernels: the logits of torch's operators."""
    model = load_for_inference(random_pair[0], "cuda", dtype)
    outs = []
    for fused in (True, False):
        model.fused_cuda = fused
        runner = ModelRunner(model, BlockPool(64, 4), attention="paged", graphs=False)
        runner.pool.prepare_write(0, 20)
        pre = runner.forward([0], [0], [list(range(3, 12))], [list(range(9))])
        outs.append(torch.cat([pre, runner.forward([0], [9], [[4]])]))
    model.fused_cuda = True
    assert (outs[0] - outs[1]).abs().max() < (1e-4 if dtype == "float32" else 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gemv_kernel_equals_torch(dtype):
    """The one-row product with the residual add, RMSNorm and SwiGLU fused in: torch's operators within the
    rounding of the dtype, on the model's shapes and uneven ones, every tile the sweep tries."""
    from afford.models import triton_gemv
    g = torch.Generator(device="cuda").manual_seed(0)
    configs = sorted({c for c in triton_gemv.GEMV_CONFIGS.values() if c} | set(triton_gemv.SWEEP_CONFIGS))
    for N, K, add, norm, swiglu in ((2560, 2048, True, True, False), (2048, 2048, False, False, False),
                                    (2 * 1408, 2048, True, True, True), (2048, 5632, False, False, False),
                                    (1000, 700, True, True, True), (37, 96, False, True, False)):
        x = torch.randn(1, K, generator=g, device="cuda").to(dtype)
        a = torch.randn(1, K, generator=g, device="cuda").to(dtype) if add else None
        w = (torch.randn(N, K, generator=g, device="cuda") * 0.02).to(dtype)
        gam = (1 + 0.1 * torch.randn(K, generator=g, device="cuda")).to(dtype) if norm else None
        yr, hr = gemv_reference(x, w, a, gam, swiglu)
        tol = 1e-4 if dtype == torch.float32 else 1.6e-2
        for cfg in configs:
            y, h = triton_gemv.gemv(x, w, cfg, add=a, norm=gam, eps=1e-5, swiglu=swiglu)
            assert torch.equal(h, hr)
            err = (y.float() - yr).abs().max() / yr.abs().max()
            assert y.shape == yr.shape and err < tol, (N, K, cfg, float(err))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_gemv_gives_the_layer_logits(random_pair, dtype, monkeypatch):
    """One-row forwards through the fused GEMVs (model.fused_gemv): the logits of the fused-layer path,
    eager and replayed from a graph, the LM head after the norm kernel and as a GEMV with the norm fused;
    decode and a one-row verify."""
    from afford.models import triton_gemv
    model = load_for_inference(random_pair[0], "cuda", dtype)
    outs = []
    for gemv, graphs, head in ((False, False, None), (True, False, None), (True, True, None),
                               (True, True, (8, 1024, 4, 1))):
        monkeypatch.setitem(triton_gemv.GEMV_CONFIGS, "head", head)
        model.fused_gemv = gemv
        runner = ModelRunner(model, BlockPool(64, 4), attention="paged", graphs=graphs)
        runner.pool.prepare_write(0, 20)
        pre = runner.forward([0], [0], [list(range(3, 12))], [list(range(9))])
        steps = [runner.forward([0], [9 + i], [[4 + i]]) for i in range(3)]
        outs.append(torch.cat([pre, *steps]))
    model.fused_gemv = False
    tol = 1e-4 if dtype == "float32" else 0.1
    assert (outs[0] - outs[1]).abs().max() < tol and (outs[1] - outs[2]).abs().max() < tol
    assert (outs[2] - outs[3]).abs().max() < tol


def test_fused_int4_gemv_kernel_equals_the_dequantized_product():
    """The int4 one-row GEMV with add / RMSNorm / SwiGLU fused: the same formula over the dequantized
    weights within bf16 rounding, per-channel and grouped scales, every tile, layout and kernel (pairs, halves,
    tensor cores with the PTX conversion and with K split over programs, octets with the lop3, halves with x in
    the codes' layout, quads' integer dot products) the sweep tries (a split tile twice: its workspace is zero
    again after a call)."""
    from afford.models import triton_gemv
    from afford.models.quant import dequantize, quantize
    g = torch.Generator(device="cuda").manual_seed(0)
    for N, K, group, add, norm, swiglu in ((2560, 2048, 2048, True, True, False), (2048, 5632, 5632, False, False, False),
                                           (2 * 1408, 2048, 128, True, True, True), (1000, 768, 256, False, True, True),
                                           (2 * 1408, 2048, 2048, True, True, True),
                                           (2048, 2048, 64, False, False, False)):
        q, sc, z = quantize(torch.randn(N, K, generator=g, device="cuda") * 0.02, 4, group)
        w = dequantize(q, sc, z)
        x = torch.randn(1, K, generator=g, device="cuda").to(torch.bfloat16)
        a = torch.randn(1, K, generator=g, device="cuda").to(torch.bfloat16) if add else None
        gam = (1 + 0.1 * torch.randn(K, generator=g, device="cuda")).to(torch.bfloat16) if norm else None
        yr, hr = gemv_reference(x, w, a, gam, swiglu)
        # every swept tile on the first shape, one of each kernel on the others (each tile is a compile)
        tiles = triton_gemv.W4_SWEEP_CONFIGS if N == 2560 else [(4, 2048, 4, 1), (8, 1024, 4, 1, 1), (32, 512, 4, 1, 2),
                                                                (8, 1024, 4, 1, 3), (64, 256, 4, 1, 2, 4),
                                                                (4, 1024, 2, 1, 4), (16, 256, 1, 2, 5),
                                                                (16, 1024, 4, 1, 5), (16, 256, 1, 2, 5, 4)]
        if N == 2560:                                   # the kernels the sweep no longer tries, on this shape too
            tiles = tiles + [(32, 512, 4, 1, 2), (8, 1024, 4, 1, 3), (64, 256, 4, 1, 2, 4)]
        for cfg in tiles:
            layout = triton_gemv.w4_kind(cfg)[0]
            if triton_gemv.w4_plan(K, group, cfg) is None:
                continue                          # halves: the group must divide K / 2; octets, a split K: one group
            packed = triton_gemv.w4_pack(q, layout)
            for _ in range(2 if len(cfg) > 5 else 1):
                y, h = triton_gemv.gemv_w4(x, packed, sc.contiguous(), z.contiguous(), group, cfg, add=a, norm=gam,
                                           eps=1e-5, swiglu=swiglu)
                assert torch.equal(h, hr)
                err = (y.float() - yr).abs().max() / yr.abs().max()
                assert y.shape == yr.shape and err < 1.6e-2, (N, K, group, cfg, float(err))


def test_fused_int4_gemv_gives_the_int4_logits(random_pair, monkeypatch):
    """An int4 model's one-row forwards through the fused int4 GEMVs (every layout and kernel, in graphs with
    PDL where the card has it): its logits through tinygemm and the fused-layer kernels, eager and from a graph;
    the LM head int4 too (quantize_head), a GEMV with the final norm fused where a tile names the head."""
    from afford.models import triton_gemv
    model = load_for_inference(random_pair[0], "cuda", "bfloat16", quantization="int4", quantize_head=True)
    outs, defaults = [], dict(triton_gemv.GEMV_W4_CONFIGS)       # (the defaults mix layouts and kernels by role)
    for cfgs, graphs in (({}, False), (defaults, True),
                         (dict.fromkeys(("qkv", "o", "gate_up", "down"), (4, 2048, 4, 1)), False),
                         (dict.fromkeys(("qkv", "o", "gate_up", "down", "head"), (4, 2048, 4, 1)), False),
                         (dict.fromkeys(("qkv", "o", "gate_up", "down"), (8, 1024, 4, 1)), True),
                         (dict.fromkeys(("qkv", "o", "gate_up", "down"), (8, 1024, 4, 1, 1)), True),
                         (dict.fromkeys(("qkv", "o", "gate_up", "down"), (32, 512, 4, 1, 2)), True),
                         (dict.fromkeys(("qkv", "o", "gate_up", "down"), (8, 1024, 4, 1, 3)), True),
                         (dict.fromkeys(("qkv", "o", "gate_up", "down"), (64, 256, 4, 1, 2, 4)), True),
                         (dict.fromkeys(("qkv", "o", "gate_up", "down"), (4, 1024, 2, 1, 4)), True),
                         (dict.fromkeys(("qkv", "o", "gate_up", "down"), (16, 256, 1, 2, 5)), True),
                         (dict.fromkeys(("qkv", "o", "gate_up", "down", "head"), (16, 256, 1, 2, 5)), True),
                         (dict.fromkeys(("qkv", "o", "gate_up", "down"), (16, 256, 1, 2, 5, 2)), True)):
        monkeypatch.setattr(triton_gemv, "GEMV_W4_CONFIGS", cfgs)
        assert model._gemv_ready() == bool(cfgs)
        runner = ModelRunner(model, BlockPool(64, 4), attention="paged", graphs=graphs)
        runner.pool.prepare_write(0, 20)
        pre = runner.forward([0], [0], [list(range(3, 12))], [list(range(9))])
        steps = [runner.forward([0], [9 + i], [[4 + i]]) for i in range(3)]
        outs.append(torch.cat([pre, *steps]).float())
    scale = outs[0].abs().max()                  # tinygemm's logits against each fused tile, layout and kernel
    assert all((outs[0] - o).abs().max() < 0.05 * scale for o in outs[1:]), [float((outs[0] - o).abs().max()) for o in outs]


@pytest.mark.parametrize("dtype,quantization", [("float32", None), ("bfloat16", None), ("bfloat16", "int4")])
def test_pdl_gives_the_same_logits(random_pair, dtype, quantization, monkeypatch):
    """Programmatic dependent launch (triton_lib.PDL): each decode kernel starts early and waits for the one
    before it; the logits equal those without it bit for bit -- eager and replayed from graphs, one row (the
    fused GEMVs) and three rows (paged attention, RoPE + K/V store), bf16, fp32 and int4."""
    from afford.models import triton_lib
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0+")
    model = load_for_inference(random_pair[0], "cuda", dtype, quantization=quantization)
    outs = []
    for graphs in (False, True):
        for pdl in (False, True):
            monkeypatch.setattr(triton_lib, "PDL", pdl)
            assert triton_lib.pdl_args(torch.zeros(1, device="cuda")) == (
                {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False})
            runner = ModelRunner(model, BlockPool(64, 4), attention="paged", graphs=graphs)
            for s_ in range(3):
                runner.pool.prepare_write(s_, 24)
            pre = runner.forward([0, 1, 2], [0, 0, 0], [list(range(3, 12)), list(range(5, 9)), list(range(7, 20))])
            one = [runner.forward([0], [9 + i], [[4 + i]]) for i in range(3)]
            three = [runner.forward([0, 1, 2], [12 + i, 4 + i, 13 + i], [[4 + i], [5 + i], [6 + i]]) for i in range(2)]
            outs.append(torch.cat([pre, *one, *three]))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[2], outs[3])


@pytest.mark.parametrize("dtype,quantization", [("float32", None), ("bfloat16", None), ("bfloat16", "int4")])
def test_qkv_gemv_with_rope_gives_the_same_logits(random_pair, dtype, quantization, monkeypatch):
    """fused_qkv_rope (the one-row q|k|v GEMV doing RoPE and the K/V store, rope_store's kernel gone): the
    logits without it bit for bit, eager and replayed from graphs; bf16, fp32 and int4 (the default tiles).
    Eager, rope_store runs for the steps' rows only without it (counted)."""
    import afford.attention.paged as paged_mod
    from afford.models import triton_gemv
    monkeypatch.setattr(triton_gemv, "GEMV_W4_CONFIGS", dict(triton_gemv.GEMV_W4_CONFIGS))
    calls = []
    real = paged_mod.rope_store
    monkeypatch.setattr(paged_mod, "rope_store", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    model = load_for_inference(random_pair[0], "cuda", dtype, quantization=quantization)
    outs = []
    for graphs in (False, True):
        for rope in (False, True):
            model.fused_qkv_rope = rope
            runner = ModelRunner(model, BlockPool(64, 4), attention="paged", graphs=graphs)
            runner.pool.prepare_write(0, 24)
            calls.clear()
            pre = runner.forward([0], [0], [list(range(3, 12))])
            steps = [runner.forward([0], [9 + i], [[4 + i]]) for i in range(4)]
            assert model._gemv_ready() and model._qkv_rope_tile()
            if not graphs:             # eager: the steps' one-row calls of rope_store only without it
                assert calls.count(1) == (0 if rope else 4 * len(model.model.layers)), calls
            outs.append(torch.cat([pre, *steps]))
    model.fused_qkv_rope = False
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[2], outs[3])


def test_fused_gemv_graphs_on_and_off_give_the_same_greedy_tokens(random_pair):
    ps, params = _prompts(1, 5), SamplingParams(max_tokens=24, temperature=0)
    toks = []
    for eager in (True, False):
        llm = LLM(random_pair[0], device="cuda", dtype="float32", enforce_eager=eager)
        llm.engine.model.fused_gemv = True
        toks.append([o.token_ids for o in llm.generate(ps, params)])
    assert toks[0] == toks[1]


@pytest.mark.parametrize("head", [None, (16, 256, 1, 2, 5)])
def test_quantized_head_graphs_on_and_off_give_the_same_greedy_tokens(random_pair, head, monkeypatch):
    """int4 with the LM head quantized (the default tiles; the head on tinygemm or a fused GEMV): graphs on
    and off give the same greedy tokens, at batch 1 (the fused GEMVs) and 3."""
    from afford.models import triton_gemv
    monkeypatch.setitem(triton_gemv.GEMV_W4_CONFIGS, "head", head)
    toks = []
    for eager in (True, False):
        llm = LLM(random_pair[0], device="cuda", quantization="int4", quantize_head=True, enforce_eager=eager)
        assert isinstance(llm.engine.model.lm_head, QuantLinear)
        toks.append([[o.token_ids for o in llm.generate(_prompts(n, 5), SamplingParams(max_tokens=16, temperature=0))]
                     for n in (1, 3)])
    assert toks[0] == toks[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compress_round_trip_on_the_gpu(llama_dir, dtype):
    """The coder on CUDA: graphs replay the decode-only forwards, windows start with eager prefill rows; the
    decoder must see the encoder's logits bit for bit."""
    pytest.importorskip("constriction", reason="the coder's package (pip install -e .[dev] brings it)")
    from afford.compress.text import LMCodec
    data = b"To be, or not to be: that is the question. \xff" * 20 + bytes(range(256))
    codec = LMCodec(llama_dir, context=48, batch=5, overlap=8, device="cuda", dtype=dtype)
    blob = codec.compress(data)
    assert LMCodec(llama_dir, context=48, batch=5, overlap=8, device="cuda", dtype=dtype).decompress(blob) == data
    assert codec.runner.graphs is not None and codec.runner.graphs.replays > 0
