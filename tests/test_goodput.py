"""SmartSpec goodput controller: the choices it makes under synthetic load and acceptance, its
estimators, and lossless output whatever k it picks."""
import numpy as np
import pytest

from afford import LLM, SamplingParams
from afford.core.params import SamplingParams as SP
from afford.core.sequence import Sequence
from afford.spec.control import Goodput, StepTimeModel, expected_tokens


def seqs(n, ctx=100):
    return [Sequence(i, str(i), None, list(range(ctx)), SP(max_tokens=100), None, None) for i in range(n)]


def controller(alpha, c0=0.010, c_tok=0.0002, c_ctx=1e-7, d_step=0.0005, d_tok=0.00005):
    """A controller whose time model is fitted from synthetic steps of a known linear cost."""
    g = Goodput(prior=alpha)
    rng = np.random.default_rng(0)
    for _ in range(60):
        b, k = int(rng.integers(1, 65)), int(rng.integers(0, 9))
        ctx = b * int(rng.integers(50, 400))
        g.observe_timing(b * (k + 1), ctx, c0 + c_tok * b * (k + 1) + c_ctx * ctx, k, b * k, d_step * k + d_tok * b * k)
    return g


def test_acceptance_near_zero_turns_speculation_off():
    g = controller(alpha=0.02)
    assert g.choose(seqs(4), 8) == [0, 0, 0, 0]


def test_acceptance_near_one_and_light_load_speculates_deeply():
    g = controller(alpha=0.97)
    ks = g.choose(seqs(1), 8)
    assert ks[0] >= 6


def test_larger_batches_get_shorter_k():
    g = controller(alpha=0.7, c0=0.002, c_tok=0.001)     # verification cost grows with batched tokens
    k_small = np.mean(g.choose(seqs(1), 8))
    k_big = np.mean(g.choose(seqs(64), 8))
    assert k_big < k_small


def test_per_request_k_follows_per_request_acceptance():
    g = controller(alpha=0.6)
    ss = seqs(2)
    for _ in range(30):
        g.observe_acceptance(0, 4, 4)      # always accepted
        g.observe_acceptance(1, 4, 0)      # never accepted
    k_good, k_bad = g.choose(ss, 8)
    assert k_good > 0 and k_bad == 0


def test_estimators_converge():
    g = Goodput(prior=0.5)
    rng = np.random.default_rng(1)
    trace = []
    for _ in range(400):
        g.observe_acceptance(7, 4, int(rng.binomial(4, 0.8)))
        trace.append(g.alpha[7])
    assert abs(np.mean(trace[-200:]) - 0.8) < 0.03 and abs(trace[-1] - 0.8) < 0.2
    assert abs(g.global_alpha - 0.8) < 0.1
    m = StepTimeModel(3)
    for _ in range(100):
        x = [1.0, rng.integers(1, 200), rng.integers(100, 20000)]
        m.add(x, 0.004 + 0.0003 * x[1] + 2e-7 * x[2] + rng.normal(0, 1e-5))
    assert m.coef == pytest.approx([0.004, 0.0003, 2e-7], rel=0.05)
    assert expected_tokens(np.array([0.0]), np.array([4]))[0] == pytest.approx(1.0)
    assert expected_tokens(np.array([0.5]), np.array([2]))[0] == pytest.approx(1.75)


def test_greedy_output_identical_under_goodput(tmp_path, tokenizer_dir):
    import torch
    from conftest import make_hf_model
    target = make_hf_model(tmp_path / "t", tokenizer_dir, seed=1)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 512, (6,), generator=g).tolist() * 3 for _ in range(6)]
    sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    ref = LLM(str(target), dtype="float32").generate(prompts, sp)
    llm = LLM(str(target), dtype="float32", draft="ngram", num_speculative_tokens=6, speculation="goodput")
    outs = llm.generate(prompts, sp)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert sum(llm.stats.k_histogram) > 0 and llm.engine.spec.controller.target.coef.sum() > 0
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks
