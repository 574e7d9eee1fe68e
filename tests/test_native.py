"""The native forward (afford/models/native.py): the Python path's logits to fp32 rounding for prefill,
decode (one sequence, a few with scattered blocks, a batched decode), verify, prompt chunks without
logits, after a fork with copy-on-write; a token's logits bitwise the same alone, in a ragged batch, in
a verify and after a chunked prefill (its kernels are batch-invariant by construction); the same greedy
text through the engine; and it stays off where it does not apply. Needs a C++ compiler (present on every
machine that runs this suite)."""
import shutil

import pytest
import torch
from conftest import make_hf_model

from afford import LLM, SamplingParams
from afford.core.runner import ModelRunner
from afford.kv.paged import BlockPool
from afford.models.loader import load_for_inference, resolve_model_path
from afford.models.native import native_error, native_module, unsupported

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: the native forward cannot be built")


@pytest.fixture(scope="module")
def built():
    module = native_module()
    assert module is not None, f"the native forward did not build: {native_error()}"
    return module


def scenario(runner: ModelRunner, g: torch.Generator) -> list[torch.Tensor]:
    """Every kind of forward the engine makes, on a pool whose blocks are handed out of order."""
    pool, outs = runner.pool, []
    V = runner.model.cfg.vocab_size

    def toks(n):
        return torch.randint(2, V, (n,), generator=g).tolist()

    def fwd(seqs, starts, tokens, rows=None):
        for s, st, t in zip(seqs, starts, tokens):
            runner.copy_blocks(pool.prepare_write(s, st + len(t)))
        outs.append(runner.forward(seqs, starts, tokens, rows))

    lens = {0: 21, 1: 9, 2: 35, 3: 5, 4: 13}
    fwd(list(lens), [0] * 5, [toks(n) for n in lens.values()])              # ragged prefill
    for step in range(6):                                                    # decode: 1, 3 (gather), 5 (batched)
        for seqs in ([0], [1, 2, 4], [0, 1, 2, 3, 4]):
            fwd(seqs, [lens[s] for s in seqs], [toks(1) for _ in seqs])
            for s in seqs:
                lens[s] += 1
    fwd([0, 2], [lens[0], lens[2]], [toks(5), toks(3)], [[0, 1, 2, 3, 4], [2]])   # verify, ragged k
    pool.truncate(0, lens[0] + 2)                                            # rejected drafts rolled back
    lens[0] += 2
    pool.fork(1, 7)                                                          # shared blocks, copy-on-write
    lens[7] = lens[1]
    fwd([1, 7], [lens[1], lens[7]], [toks(1), toks(1)])
    fwd([3], [lens[3]], [toks(40)], [[]])                                    # a prompt chunk: no logits
    fwd([3], [lens[3] + 40], [toks(1)])
    for s in list(pool.tables):
        pool.free(s)
    return outs


def model_for(arch, tokenizer_dir, tmp_path):
    if arch == "bundled draft":
        path = resolve_model_path("default", "draft")
    else:                                          # qwen2: q|k|v biases; both with GQA (4 heads, 2 KV)
        path = make_hf_model(tmp_path / arch, tokenizer_dir, arch, tie_word_embeddings=arch == "qwen2")
    return load_for_inference(path, "cpu", "float32")


def shuffled_pool(order_seed: int = 0) -> BlockPool:
    pool = BlockPool(64, 4)
    order = list(pool.free_blocks)                           # out of order: some tables are not consecutive
    pool.free_blocks.clear()
    pool.free_blocks.extend(order[:6] + order[6:][::-1] if order_seed == 0 else order[::-1])
    return pool


@pytest.mark.parametrize("arch", ["bundled draft", "llama", "qwen2"])
def test_native_forward_matches_the_python_path(arch, built, tokenizer_dir, tmp_path):
    model = model_for(arch, tokenizer_dir, tmp_path)
    results = []
    for native in (True, False):
        runner = ModelRunner(model, shuffled_pool(), native=native)
        assert (runner.native is not None) == native
        results.append(scenario(runner, torch.Generator().manual_seed(0)))
    for i, (a, b) in enumerate(zip(*results)):
        assert a.shape == b.shape, f"forward {i}: {a.shape} vs {b.shape}"
        if a.numel():
            torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4, msg=lambda m: f"forward {i}: {m}")
            assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("arch", ["bundled draft", "qwen2"])
def test_a_tokens_logits_do_not_depend_on_its_batch(arch, built, tokenizer_dir, tmp_path):
    """The same prompt and continuation, fed (a) alone token by token, (b) prefilled in a ragged batch and
    decoded beside three other sequences on a differently ordered pool, (c) as one verify of all the
    continuation, (d) after a prefill in two chunks: every logit bitwise equal."""
    model = model_for(arch, tokenizer_dir, tmp_path)
    g = torch.Generator().manual_seed(1)
    V = model.cfg.vocab_size
    toks = lambda n: torch.randint(2, V, (n,), generator=g).tolist()  # noqa: E731
    prompt, cont, others = toks(23), toks(6), [toks(n) for n in (9, 30, 4)]

    def write(runner, s, n):
        runner.copy_blocks(runner.pool.prepare_write(s, n))

    def alone(chunked=False, verify=False):
        r = ModelRunner(model, shuffled_pool(), native=True)
        write(r, 0, len(prompt))
        if chunked:
            r.forward([0], [0], [prompt[:10]], [[]])
            first = r.forward([0], [10], [prompt[10:]])
        else:
            first = r.forward([0], [0], [prompt])
        write(r, 0, len(prompt) + len(cont))
        if verify:
            return [first, r.forward([0], [len(prompt)], [cont], [list(range(len(cont)))])]
        return [first] + [r.forward([0], [len(prompt) + i], [[t]]) for i, t in enumerate(cont)]

    def batched():
        r = ModelRunner(model, shuffled_pool(1), native=True)
        seqs = [0, 1, 2, 3]
        feeds = [prompt] + others
        for s, f in zip(seqs, feeds):
            write(r, s, len(f))
        first = r.forward(seqs, [0] * 4, feeds)[:1]
        outs = [first]
        for i, t in enumerate(cont):
            starts = [len(f) + i for f in feeds]
            for s, st in zip(seqs, starts):
                write(r, s, st + 1)
            outs.append(r.forward(seqs, starts, [[t], *[[5]] * 3])[:1])
        return outs

    a, b, d = torch.cat(alone()), torch.cat(batched()), torch.cat(alone(chunked=True))
    c = torch.cat(alone(verify=True))
    assert torch.equal(a, b), f"alone vs batched: max diff {(a - b).abs().max()}"
    assert torch.equal(a, d), f"alone vs chunked prefill: max diff {(a - d).abs().max()}"
    # the verify feeds the continuation's tokens; its row i predicts what decode step i + 1 did
    assert torch.equal(a[1:], c[1:]) and torch.equal(a[0], c[0])


def test_the_matrix_kernel_computes_each_row_alone(built):
    """Rows of x W^T are bitwise equal whatever the number of rows computed together; sizes that are not
    multiples of the tiles (out % 16, in % 8); a bias; and torch's product to fp32 rounding."""
    g = torch.Generator().manual_seed(0)
    for out, inn in [(37, 13), (160, 64), (1000, 259)]:
        w, bias = torch.randn(out, inn, generator=g), torch.randn(out, generator=g)
        panels = built.pack_panels(w)
        x = torch.randn(13, inn, generator=g)
        full = built.linear(x, panels, out, bias)
        torch.testing.assert_close(full, x @ w.t() + bias, atol=1e-4, rtol=1e-4)
        for rows in (1, 2, 3, 7):
            for at in range(0, 13 - rows + 1, 5):
                assert torch.equal(built.linear(x[at:at + rows], panels, out, bias), full[at:at + rows])


def test_bf16_panels_give_the_fp32_panels_products_bitwise(built):
    """Weights that are bf16 values multiply the same from bf16 panels as from fp32 ones: every row, every
    tile shape, with a bias and accumulating."""
    g = torch.Generator().manual_seed(3)
    for out, inn in [(37, 13), (160, 64), (1000, 259)]:
        w, bias = torch.randn(out, inn, generator=g).bfloat16(), torch.randn(out, generator=g)
        p32, p16 = built.pack_panels(w.float()), built.pack_panels(w)
        assert p16.dtype == torch.bfloat16 and p16.element_size() * 2 == p32.element_size()
        x = torch.randn(13, inn, generator=g)
        for rows in (1, 2, 5, 13):
            assert torch.equal(built.linear(x[:rows], p16, out, bias), built.linear(x[:rows], p32, out, bias))


@pytest.mark.parametrize("which", ["target", "draft"])
def test_a_bf16_checkpoint_runs_on_bf16_panels_with_the_same_logits(which, built, monkeypatch):
    """The bundled models are stored in bf16: loaded as fp32 their panels stay bf16 (half the bytes per
    forward) and every forward's logits are bitwise those of fp32 panels. A model with fp32 values keeps
    fp32 panels."""
    model = load_for_inference(resolve_model_path("default", which), "cpu", "float32")
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("AFFORD_NATIVE_BF16", flag)
        runner = ModelRunner(model, shuffled_pool(), native=True)
        assert runner.native.bf16 == (flag == "1")
        results.append(scenario(runner, torch.Generator().manual_seed(0)))
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"forward {i}: max diff {(a - b).abs().max()}"
    monkeypatch.setenv("AFFORD_NATIVE_BF16", "1")
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-4                  # one value that bf16 cannot hold
    assert not ModelRunner(model, shuffled_pool(), native=True).native.bf16


def test_argmax_rows_is_torchs_argmax(built):
    """The greedy pick the engine uses: torch's argmax (the first of tied maxima, a NaN counts as the
    largest), for contiguous and strided logits; wrong inputs fall back to torch or raise."""
    from afford.models.native import argmax_rows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4096, generator=g)
    x[1, 7] = x[1, 900] = x[1].max() + 1                    # a tie: the first one
    x[2, 3], x[2, 50] = float("nan"), float("nan")           # NaN wins, the first NaN
    x[3] = float("-inf")
    x[4, 4095] = float("inf")
    short = torch.randn(4, 13, generator=g)
    short[0, 12] = 9.0                                       # the maximum in the tail past the 8-wide steps
    short[1, 11] = float("nan")
    for t in (x, x[::2], x[:, ::3], x.t().contiguous().t(), short, short[:, :5]):
        assert argmax_rows(t) == t.argmax(-1).tolist()
    assert argmax_rows(x.double()) == x.double().argmax(-1).tolist()          # not fp32: torch's
    with pytest.raises(RuntimeError, match="argmax_rows"):
        built.argmax_rows(torch.zeros(3, 0))


def test_engine_text_is_the_same_with_and_without(built):
    ps = ["Natalia sold clips to 48 of her friends in April", "The capital of France is", "def add(a, b):"]
    sp = SamplingParams(max_tokens=24, temperature=0)
    on, off = LLM("default", draft="default"), LLM("default", draft="default", native=False)
    assert on.engine.runner.native is not None and on.engine.speculator.proposer.runner.native is not None
    assert off.engine.runner.native is None
    assert [o.token_ids for o in on.generate(ps, sp)] == [o.token_ids for o in off.generate(ps, sp)]


def test_native_stays_off_where_it_does_not_apply(tokenizer_dir, tmp_path):
    path = make_hf_model(tmp_path / "m", tokenizer_dir)
    assert "fp32" in unsupported(load_for_inference(path, "cpu", "bfloat16"), "cpu_paged")
    assert "cpu_paged" in unsupported(load_for_inference(path, "cpu", "float32"), "sdpa")
    assert "quantized" in unsupported(load_for_inference(path, "cpu", "float32", quantization="int8"), "cpu_paged")
    assert LLM(str(path), attention="sdpa").engine.runner.native is None


def test_a_greedy_draft_in_one_call_equals_forward_by_forward(built):
    """The proposer's native draft loop (argmax and feed-back inside one call) drafts the tokens and
    writes the K/V that k separate forwards do, per-sequence k included."""
    model = load_for_inference(resolve_model_path("default", "draft"), "cpu", "float32")
    g = torch.Generator().manual_seed(2)
    feeds = [torch.randint(2, 4096, (n,), generator=g).tolist() for n in (17, 1, 40)]
    ks = [4, 3, 1]
    runners = [ModelRunner(model, shuffled_pool(), native=True) for _ in range(2)]
    for r in runners:
        for s, (f, k) in enumerate(zip(feeds, ks)):
            r.copy_blocks(r.pool.prepare_write(s, len(f) + k - 1))
    got = runners[0].draft_greedy([0, 1, 2], [0, 0, 0], feeds, ks)
    r, want = runners[1], [[] for _ in feeds]
    logits = r.forward([0, 1, 2], [0, 0, 0], feeds)
    for j in range(max(ks)):
        cur = [i for i in range(3) if ks[i] > j]
        if j:
            logits = r.forward(cur, [len(feeds[i]) - 1 + j for i in cur], [[want[i][-1]] for i in cur])
        for row, i in zip(logits.argmax(-1).tolist(), cur):
            want[i].append(row)
    assert got == want and [len(t) for t in got] == ks
    for (k0, v0), (k1, v1) in zip(runners[0].kv, runners[1].kv):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


def test_bad_inputs_raise_before_anything_is_written(built):
    """A slot outside the pool, a position its table does not cover, a logits row past the tokens fed: a
    clear error, and the pool is untouched."""
    model = load_for_inference(resolve_model_path("default", "draft"), "cpu", "float32")
    r = ModelRunner(model, BlockPool(8, 16))
    r.copy_blocks(r.pool.prepare_write(0, 5))
    batch, ids = r.prepare_decode([0], [4], [7])
    before = [k.clone() for k, _ in r.kv]
    none = torch.empty(0, dtype=torch.long)
    cases = [((ids, batch.positions, torch.tensor([10 ** 6]), [1], batch.tables, none), "outside the K/V pool"),
             ((ids, torch.tensor([900]), batch.slot_mapping, [1], batch.tables, none), "has no block"),
             ((ids, batch.positions, batch.slot_mapping, [1], batch.tables, torch.tensor([3])), "logits row 3"),
             ((ids, batch.positions, batch.slot_mapping, [2], batch.tables, none), "do not sum"),
             ((ids, batch.positions, batch.slot_mapping, [1], [[10 ** 6]], none), "block 1000000")]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            r.native.impl.step(*args)
    assert all(torch.equal(a, k) for a, (k, _) in zip(before, r.kv))
