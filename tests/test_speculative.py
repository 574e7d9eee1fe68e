"""Speculative decoding: greedy output identical to plain decoding for both proposers, any k, batch and
preemption; speculative sampling reproduces the target distribution (and the test catches a rule that
always accepts); caches stay consistent; bad input is refused."""
import pytest
import torch
from conftest import make_hf_model

from afford import LLM, ConfigError, SamplingParams
from afford.speculative.acceptance import POLICIES, AcceptancePolicy, register

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("pair")
    target = make_hf_model(root / "t", tokenizer_dir, seed=1)
    # a draft that agrees often: the target's weights plus noise, one layer fewer
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(target)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    m.save_pretrained(root / "d")
    for f in target.glob("tokenizer*"):
        (root / "d" / f.name).write_bytes(f.read_bytes())
    return target, root / "d"


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        base = torch.randint(2, 512, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        out.append(base * 3)           # repetition gives prompt lookup something to find
    return out


@pytest.mark.parametrize("proposer", ["draft", "ngram"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_speculation_equals_plain(pair, proposer, k):
    target, draft = pair
    ps = prompts(8, seed=k)
    ref = LLM(str(target), dtype="float32").generate(ps, GREEDY)
    llm = LLM(str(target), dtype="float32", draft=str(draft) if proposer == "draft" else "ngram",
              num_speculative_tokens=k)
    for batch in (ps[:1], ps):                       # batch 1 and batch 8, mixed lengths
        outs = llm.generate(batch, GREEDY)
        assert [o.token_ids for o in outs] == [r.token_ids for r in ref[:len(batch)]]
    assert llm.stats.drafted > 0 and llm.stats.accepted > 0
    eng = llm.engine
    eng.pool.check()
    assert eng.pool.num_free == eng.pool.num_blocks
    if proposer == "draft":
        eng.speculator.proposer.pool.check()
        assert eng.speculator.proposer.pool.num_free == eng.speculator.proposer.pool.num_blocks


def test_speculation_under_preemption(pair):
    target, draft = pair
    ps = prompts(8, seed=21)
    ref = LLM(str(target), dtype="float32").generate(ps, GREEDY)
    llm = LLM(str(target), dtype="float32", draft=str(draft), num_speculative_tokens=4, max_model_len=96,
              kv_blocks=10, block_size=16)
    outs = llm.generate(ps, GREEDY)
    assert llm.stats.preemptions > 0
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks
    assert llm.engine.speculator.proposer.pool.num_free == llm.engine.speculator.proposer.pool.num_blocks


def test_metrics_report_acceptance(pair):
    target, draft = pair
    llm = LLM(str(target), dtype="float32", draft=str(draft), num_speculative_tokens=4)
    out = llm.generate(prompts(1, seed=3)[0], GREEDY)[0]
    m = out.metrics
    assert m["drafted"] > 0 and 0 <= m["acceptance_rate"] <= 1
    assert m["tokens_per_forward"] > 1.0                # speculation made fewer target forwards than tokens
    assert len(m["accepted_per_position"]) == 4 and m["accepted_per_position"][0] >= m["accepted_per_position"][-1]


# ---- the distribution test ----
def chi2_pvalue(counts: torch.Tensor, expected: torch.Tensor) -> float:
    keep = expected >= 5                               # pool cells too small for the chi-square approximation
    obs = torch.cat([counts[keep], counts[~keep].sum().view(1)])
    exp = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2,
                                         dtype=torch.float64)))


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("v16")
    t = make_hf_model(root / "t", tokenizer_dir, seed=5, vocab_size=16, sharpen=1.5)
    d = make_hf_model(root / "d", tokenizer_dir, seed=6, vocab_size=16, sharpen=1.5, num_hidden_layers=1)
    return t, d


def exact_first_two(target, prompt) -> torch.Tensor:
    """p(t1, t2 | prompt) from the target alone: (V, V)."""
    from afford.models.loader import load_model
    m = load_model(target, "cpu", "float32")
    V = m.cfg.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(m(torch.tensor([prompt]))[0, -1], -1)                       # (V,)
        ids = torch.tensor([prompt + [t] for t in range(V)])                           # (V, T+1)
        p2 = torch.softmax(m(ids)[:, -1], -1)                                           # (V, V)
    return (p1.unsqueeze(1) * p2).double()


def sample_first_two(target, draft, prompt, n, policy="rejection", params=None):
    spec = dict(draft=str(draft), num_speculative_tokens=2, acceptance=policy) if draft is not None else {}
    llm = LLM(str(target), dtype="float32", max_num_seqs=256, seed=7, **spec)
    outs = llm.generate([prompt] * n, params or SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True))
    assert draft is None or llm.stats.drafted > 0
    counts = torch.zeros(16, 16, dtype=torch.float64)
    for o in outs:
        counts[o.token_ids[0], o.token_ids[1]] += 1
    return counts


@register("always-accept-for-test")
class AlwaysAccept(AcceptancePolicy):
    lossless = False

    def accept(self, target_logits, draft, params, generator):
        if draft.tokens:
            return len(draft.tokens), draft.tokens[-1]
        return 0, int(torch.multinomial(torch.softmax(target_logits[0], -1), 1, generator=generator))


@pytest.mark.parametrize("draft_kind", ["draft", "ngram"])
def test_speculative_sampling_reproduces_target_distribution(tiny_vocab, draft_kind):
    target, draft = tiny_vocab
    prompt = [3, 7, 3, 7, 3, 7, 3]
    n = 12000
    expected = exact_first_two(target, prompt) * n
    counts = sample_first_two(target, draft if draft_kind == "draft" else "ngram", prompt, n)
    assert chi2_pvalue(counts.flatten(), expected.flatten()) > 0.001


def test_distribution_test_catches_a_rule_that_always_accepts(tiny_vocab):
    target, draft = tiny_vocab
    prompt = [3, 7, 3, 7, 3, 7, 3]
    n = 12000
    expected = exact_first_two(target, prompt) * n
    counts = sample_first_two(target, draft, prompt, n, policy="always-accept-for-test")
    assert chi2_pvalue(counts.flatten(), expected.flatten()) < 1e-6
    POLICIES.pop("always-accept-for-test")


def test_bad_speculation_input(pair, tmp_path, tokenizer_dir):
    target, _ = pair
    with pytest.raises(ConfigError, match="between 1 and 32"):
        LLM(str(target), draft="ngram", num_speculative_tokens=0)
    with pytest.raises(ConfigError, match="between 1 and 32"):
        LLM(str(target), draft="ngram", num_speculative_tokens=33)
    other_vocab = make_hf_model(tmp_path / "v", tokenizer_dir, vocab_size=300)
    with pytest.raises(ConfigError, match="vocabulary"):
        LLM(str(target), draft=str(other_vocab))
    short = make_hf_model(tmp_path / "s", tokenizer_dir, max_position_embeddings=64)
    with pytest.raises(ConfigError, match="positions"):
        LLM(str(target), draft=str(short))
    with pytest.raises(ConfigError, match="acceptance"):
        LLM(str(target), draft="ngram", acceptance="yes")


def test_draft_pool_never_overflows_with_forked_choices(pair):
    """n > 1 shares the prompt's blocks in the target's pool but not in the draft's: the draft shortens
    its drafts to what its pool holds instead of raising."""
    target, draft = pair
    llm = LLM(str(target), draft=str(draft), num_speculative_tokens=4, kv_blocks=10, block_size=4, max_model_len=32)
    out = llm.generate([[5, 6, 7, 8, 5, 6, 7]], SamplingParams(max_tokens=12, temperature=0.8, seed=1, n=4))[0]
    assert len(out.outputs) == 4 and all(len(o.token_ids) == 12 for o in out.outputs)
    llm.engine.pool.check()


def test_lookahead_near_the_context_end_does_not_preempt(pair):
    """Close to max_model_len the scheduler reserves only the slots a sequence may still draft, so a
    lone sequence is never preempted (and re-prefilled) for want of speculative room; goodput's start-up
    profile fits a short context too."""
    target, draft = pair
    for speculation in ("fixed", "goodput"):
        llm = LLM(str(target), draft=str(draft), num_speculative_tokens=4, max_model_len=63, block_size=16,
                  kv_blocks=4, speculation=speculation)
        out = llm.generate([list(range(2, 40))], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
        assert out.finish_reason == "length" and len(out.prompt_token_ids) + len(out.token_ids) == 63
        assert out.metrics["preemptions"] == 0, speculation


def truncated(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The sampling distribution written out from its definition: softmax(logits / temperature), keep the
    top_k most likely, then the smallest most-likely set whose renormalised mass reaches top_p."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = sorted(range(len(p)), key=lambda i: -float(p[i]))[:top_k]
    total = sum(float(p[i]) for i in order)
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += float(p[i]) / total
        if mass >= top_p:
            break
    q = torch.zeros_like(p)
    q[kept] = p[kept]
    return q / q.sum()


@pytest.mark.parametrize("draft_kind", ["plain sampler", "draft"])
def test_temperature_top_k_top_p_give_the_specified_distribution(tiny_vocab, draft_kind):
    """The sampler's meaning, alone and under speculative rejection sampling (whose acceptance must use the
    same truncated distribution): the first two tokens' joint counts against the written-out p."""
    from afford.models.loader import load_model
    target, draft = tiny_vocab
    prompt, n, (T, k, top_p) = [3, 7, 3, 7, 3, 7, 3], 8000, (0.8, 6, 0.9)
    m = load_model(target, "cpu", "float32")
    with torch.no_grad():
        p1 = truncated(m(torch.tensor([prompt]))[0, -1], T, k, top_p)
        l2 = m(torch.tensor([prompt + [t] for t in range(16)]))[:, -1]
    expected = p1.unsqueeze(1) * torch.stack([truncated(row, T, k, top_p) for row in l2]) * n
    sp = SamplingParams(max_tokens=4, temperature=T, top_k=k, top_p=top_p, ignore_eos=True)
    counts = sample_first_two(target, draft if draft_kind == "draft" else None, prompt, n, params=sp)
    assert (counts[expected == 0] == 0).all()                 # nothing outside top-k / top-p, ever
    assert chi2_pvalue(counts.flatten(), expected.flatten()) > 0.001


@pytest.mark.parametrize("proposer", ["draft", "ngram"])
def test_stops_inside_one_speculative_step_equal_plain(pair, proposer):
    """EOS / stop_token_ids / stop strings / max_tokens landing in the middle of accepted drafts: the output
    is exactly plain decoding's with the same parameters (greedy, n = 2 included)."""
    target, draft = pair
    ps = prompts(4, seed=31)
    plain = LLM(str(target), dtype="float32")
    spec = LLM(str(target), dtype="float32", draft=str(draft) if proposer == "draft" else "ngram",
               num_speculative_tokens=8)
    ref = plain.generate(ps, GREEDY)
    for p, r in zip(ps, ref):
        cases = [SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[r.token_ids[9]]),
                 SamplingParams(max_tokens=13, temperature=0, ignore_eos=True, n=2)]
        if len(r.text) > 12:
            cases.append(SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[r.text[8:11]]))
        for sp in cases:
            want = plain.generate([p], sp)[0]
            got = spec.generate([p], sp)[0]
            assert [o.token_ids for o in got.outputs] == [o.token_ids for o in want.outputs], sp
            assert got.text == want.text and got.finish_reason == want.finish_reason, sp
    assert spec.stats.drafted > 0
    assert spec.engine.pool.num_used == 0


def test_preemption_with_ngram_and_with_sampled_speculation(pair):
    target, draft = pair
    ps = prompts(8, seed=41)
    ref = LLM(str(target), dtype="float32").generate(ps, GREEDY)
    small = dict(max_model_len=96, kv_blocks=10, block_size=16)
    ngram = LLM(str(target), dtype="float32", draft="ngram", num_speculative_tokens=4, **small)
    assert [o.token_ids for o in ngram.generate(ps, GREEDY)] == [r.token_ids for r in ref]
    assert ngram.stats.preemptions > 0 and ngram.stats.drafted > 0
    sampled = LLM(str(target), dtype="float32", draft=str(draft), num_speculative_tokens=4, **small)
    outs = sampled.generate(ps, SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True))
    assert all(len(o.token_ids) == 40 for o in outs)
    assert sampled.stats.preemptions > 0 and sampled.stats.drafted > 0
    for llm in (ngram, sampled):
        llm.engine.pool.check()
        assert llm.engine.pool.num_used == 0


def test_prompt_logprobs_in_a_mixed_batch_and_under_preemption(pair):
    target, _ = pair
    ps = prompts(8, seed=51)
    with_lp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, prompt_logprobs=True)
    without = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    alone = LLM(str(target), dtype="float32")
    ref = [alone.generate([p], with_lp)[0] for p in ps[::2]]
    llm = LLM(str(target), dtype="float32", max_model_len=96, kv_blocks=10, block_size=16)
    outs = llm.generate(ps, [with_lp if i % 2 == 0 else without for i in range(len(ps))])
    assert llm.stats.preemptions > 0
    for o, r in zip(outs[::2], ref):
        assert o.token_ids == r.token_ids
        assert o.prompt_logprobs == pytest.approx(r.prompt_logprobs, abs=1e-4)
    assert all(o.prompt_logprobs is None for o in outs[1::2])

