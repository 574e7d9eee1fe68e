"""The native forward (afford/models/native.py): bitwise the Python path's logits for prefill, decode
(one sequence, a few with scattered blocks, a batched decode), verify, prompt chunks without logits,
after a fork with copy-on-write; the same greedy text through the engine; and it stays off where it
does not apply. Needs a C++ compiler (present on every machine that runs this suite)."""
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


@pytest.mark.parametrize("arch", ["bundled draft", "llama", "qwen2"])
def test_native_forward_is_bitwise_the_python_path(arch, built, tokenizer_dir, tmp_path):
    if arch == "bundled draft":
        path = resolve_model_path("default", "draft")
    else:                                          # qwen2: q|k|v biases; both with GQA (4 heads, 2 KV)
        path = make_hf_model(tmp_path / arch, tokenizer_dir, arch, tie_word_embeddings=arch == "qwen2")
    model = load_for_inference(path, "cpu", "float32")
    results = []
    for native in (True, False):
        pool = BlockPool(64, 4)
        order = list(pool.free_blocks)                       # out of order: some tables are not consecutive
        pool.free_blocks.clear()
        pool.free_blocks.extend(order[:6] + order[6:][::-1])
        runner = ModelRunner(model, pool, native=native)
        assert (runner.native is not None) == native
        results.append(scenario(runner, torch.Generator().manual_seed(0)))
    for i, (a, b) in enumerate(zip(*results)):
        assert a.shape == b.shape and torch.equal(a, b), f"forward {i}: max diff {(a - b).abs().max()}"


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
    assert "packed" in unsupported(load_for_inference(path, "cpu", "float32", quantization="int8"), "cpu_paged")
    assert LLM(str(path), attention="sdpa").engine.runner.native is None
