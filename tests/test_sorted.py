"""S2D: multi-exit models (config, shared head, partial forwards), the sorted proposer's confidence exits and
lazy fill of the deeper layers, threshold calibration, and training with exits and several teachers."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_hf_model

from afford import LLM, ConfigError, SamplingParams
from afford.config import ModelConfig
from afford.speculative.sorted import GRID, fit_thresholds, fixed_exit_thresholds

PROMPTS = [[5, 6, 7, 8], [40, 41, 9, 100, 3, 7]]


@pytest.fixture(scope="module")
def sorted_pair(tmp_path_factory, tokenizer_dir):
    """A 4-layer draft with exits after 1, 2 and 4 layers; its own weights without exits as one target (so the
    last exit drafts exactly what that target decodes); a random 2-layer model as a second target."""
    root = tmp_path_factory.mktemp("sorted")
    draft = make_hf_model(root / "d", tokenizer_dir, seed=5, num_hidden_layers=4, exits=[1, 2, 4])
    same = root / "same"
    shutil.copytree(draft, same)
    cfg = json.loads((same / "config.json").read_text())
    del cfg["exits"]
    (same / "config.json").write_text(json.dumps(cfg))
    other = make_hf_model(root / "t", tokenizer_dir, seed=3)
    return draft, same, other


def greedy(llm, n=40):
    p = SamplingParams(max_tokens=n, temperature=0)
    return [o.token_ids for o in llm.generate(PROMPTS, p)]


def test_exits_config_round_trips_and_rejects_bad_lists(sorted_pair):
    draft, same, _ = sorted_pair
    cfg = ModelConfig.from_dir(draft)
    assert cfg.exits == (1, 2, 4) and ModelConfig.from_hf(cfg.to_hf()).exits == (1, 2, 4)
    raw = json.loads((draft / "config.json").read_text())
    for bad in ([2, 1, 4], [1, 2], [0, 4], [1, 1, 4]):
        with pytest.raises(ConfigError, match="exits"):
            ModelConfig.from_hf({**raw, "exits": bad})


def test_exits_share_the_head_and_partial_forwards_match_the_full_one(sorted_pair):
    from afford.core.runner import ModelRunner
    from afford.kv.paged import BlockPool
    from afford.models.loader import load_for_inference, load_model
    draft, _, _ = sorted_pair
    dense = load_model(draft, "cpu", "float32")
    assert not any("exit" in k for k in dense.state_dict())            # no per-exit norm or head
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        exits = dense.exit_logits(ids)
        assert len(exits) == 3 and torch.equal(exits[-1], dense(ids))
        x = dense.model.embed_tokens(ids)
        pos = torch.arange(6)[None]
        for lo, hi, lg in zip((0, 1, 2), (1, 2, 4), exits):
            x = dense.run_layers(x, pos, None, lo, hi)
            torch.testing.assert_close(dense.lm_head(dense.model.norm(x)), lg)
    for native in (True, False):                       # the paged segments, native and Python
        model = load_for_inference(draft, "cpu", "float32")
        runner = ModelRunner(model, BlockPool(8, 16), native=native)
        runner.pool.prepare_write(0, 6)
        h, lg0 = runner.segment([0], [0], [ids[0].tolist()], 0, 1, logits_rows=[5])
        h, lg1 = runner.segment([0], [0], [[0] * 6], 1, 2, x=h, logits_rows=[5])
        h, lg2 = runner.segment([0], [0], [[0] * 6], 2, 4, x=h, logits_rows=[5])
        for got, want in zip((lg0, lg1, lg2), exits):
            torch.testing.assert_close(got[0], want[0, 5], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ["auto", "1", "2", "4", "0,0", "1,1", "0.5,0.9"])
def test_greedy_outputs_equal_plain_decoding_for_every_target_and_exit_policy(sorted_pair, policy):
    draft, same, other = sorted_pair
    for target in (same, other):
        want = greedy(LLM(str(target)))
        assert greedy(LLM(str(target), draft=str(draft), draft_exit=policy)) == want
        if policy in ("auto", "0.5,0.9"):                 # and the Python path (sampled batches take it)
            assert greedy(LLM(str(target), draft=str(draft), draft_exit=policy, native=False)) == want


@pytest.mark.parametrize("native", [True, False])
def test_thresholds_one_and_zero_are_the_last_and_the_first_exit(sorted_pair, native):
    draft, same, _ = sorted_pair
    stats = {}
    for policy in ("1,1", "4", "0,0", "1"):
        llm = LLM(str(same), draft=str(draft), draft_exit=policy, native=native)
        greedy(llm)
        st = llm.engine.stats
        stats[policy] = (st.draft["exit_tokens"], st.accepted, st.drafted, st.accepted_per_position)
    assert stats["1,1"] == stats["4"] and stats["0,0"] == stats["1"]
    last, first = stats["1,1"], stats["0,0"]
    assert last[0][:2] == [0, 0] and last[0][2] > 0 and first[0][1:] == [0, 0] and first[0][0] > 0
    assert last[1] == last[2]                           # the last exit is the target itself: every draft accepted
    assert first[1] < first[2]
    # "always the last exit" drafts what the same model as a plain (single-exit) draft drafts
    plain = LLM(str(same), draft=str(same), native=native)
    greedy(plain)
    assert (plain.engine.stats.accepted, plain.engine.stats.drafted) == last[1:3]


@pytest.mark.parametrize("native", [True, False])
def test_lazy_fill_leaves_every_layer_with_the_kv_of_a_full_forward(sorted_pair, native):
    from afford.core.runner import ModelRunner
    from afford.kv.paged import BlockPool
    from afford.models.loader import load_for_inference
    draft, same, _ = sorted_pair
    llm = LLM(str(same), draft=str(draft), draft_exit="0,0", native=native)   # every token stops at the first exit
    eng = llm.engine
    prop = eng.speculator.proposer
    seq = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=60, temperature=0))
    for _ in range(6):
        eng.step()
    fill = prop.fill[seq.seq_id]
    assert fill[1] == fill[2] == 0 < fill[0]            # only the first layer has K/V so far
    prop.thresholds = [1.0, 1.0]                        # the next token goes through every layer
    eng.step()
    eng.step()
    fill = prop.fill[seq.seq_id]
    assert fill[0] == fill[1] == fill[2] > 10
    n = fill[0]
    model = load_for_inference(draft, "cpu", "float32")
    ref = ModelRunner(model, BlockPool(16, eng.pool.block_size))
    ref.pool.prepare_write(0, n)
    ref_logits = ref.forward([0], [0], [seq.token_ids[:n]])
    bs = eng.pool.block_size
    slots = [prop.pool.tables[seq.seq_id][p // bs] * bs + p % bs for p in range(n)]
    ref_slots = [ref.pool.tables[0][p // bs] * bs + p % bs for p in range(n)]
    for (k, v), (rk, rv) in zip(prop.runner.kv, ref.kv):
        torch.testing.assert_close(k[slots], rk[ref_slots], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v[slots], rv[ref_slots], atol=1e-5, rtol=1e-5)
    # and on that cache the last position's logits through every layer are the full forward's
    _, lg = prop.runner.segment([seq.seq_id], [n - 1], [[seq.token_ids[n - 1]]], 0, 4, logits_rows=[0])
    torch.testing.assert_close(lg[0], ref_logits[0], atol=1e-4, rtol=1e-4)
    while eng.has_unfinished():
        eng.step()


@pytest.mark.parametrize("native", [True, False])
def test_calibration_fits_thresholds_on_live_traffic_and_reports_them(sorted_pair, native):
    draft, same, _ = sorted_pair
    llm = LLM(str(same), draft=str(draft), draft_exit="auto", native=native)
    p = llm.engine.speculator.proposer
    p.calibration_tokens, p.trial_block, p.trial_rounds = 40, 2, 1
    greedy(llm, 60)
    d = llm.engine.stats.draft
    assert d["calibrated"] and d["calibration_records"] >= 40
    assert len(d["thresholds"]) == 2 and all(t in GRID for t in d["thresholds"])
    for _ in range(5):                    # the live trial: the last exit, the fit's choice, the other exits
        if isinstance(llm.engine.stats.draft["trial"], dict):
            break
        greedy(llm, 60)
    tr = llm.engine.stats.draft["trial"]
    assert tr["policies"][0] == [1.0, 1.0] and [0.0, 1.0] in tr["policies"] and [1.0, 0.0] in tr["policies"]
    assert all(n >= 1 for n in tr["steps"]) and llm.engine.stats.draft["thresholds"] == tr["policies"][tr["chosen"]]
    assert all(t is not None and t > 0 for t in d["segment_ms"])
    assert "draft exits" in llm.engine.stats.line()
    from prometheus_client import CollectorRegistry, generate_latest

    from afford.serve.metrics import _SpeculativeCollector
    reg = CollectorRegistry()
    reg.register(_SpeculativeCollector(llm.engine))
    text = generate_latest(reg).decode()
    assert sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("afford_draft_exit_tokens_total{")) == sum(d["exit_tokens"])
    assert 'afford_draft_exit_threshold{exit="1"}' in text


def test_fit_thresholds_trades_acceptance_against_measured_cost():
    n = 200
    conf = np.tile([0.99, 0.99, 0.5], (n, 1))
    target = np.arange(n)
    right = np.tile(target[:, None], (1, 3))
    # the first exit is right and confident: stop there
    taus, alpha = fit_thresholds(right, conf, target, [1e-4, 1e-4, 2e-4], 5e-5, 1e-3, 4)
    assert taus[0] < 0.99 and alpha == 1.0
    assert 0.0 not in taus or all(t == 1.0 for t in taus[taus.index(0.0) + 1:])   # nothing past an always-stop
    # the first exit is confidently wrong, the last exit right: never stop early
    wrong = right.copy()
    wrong[:, :2] = -1
    taus, alpha = fit_thresholds(wrong, conf, target, [1e-4, 1e-4, 2e-4], 5e-5, 1e-3, 4)
    assert taus == [1.0, 1.0] and alpha == 1.0


def test_bad_exit_policies_say_what_to_do(sorted_pair, random_pair):
    draft, same, _ = sorted_pair
    with pytest.raises(ConfigError, match="exits are after"):
        LLM(str(same), draft=str(draft), draft_exit=3)
    with pytest.raises(ConfigError, match="thresholds"):
        LLM(str(same), draft=str(draft), draft_exit="0.5")
    with pytest.raises(ConfigError, match="multi-exit"):
        LLM(str(random_pair[0]), draft=str(random_pair[1]), draft_exit="1")
    with pytest.raises(ConfigError, match="ngram"):
        LLM(str(same), draft="ngram", draft_exit="1")


def test_sampled_speculation_with_early_exits_reproduces_the_target_distribution(tokenizer_dir, tmp_path):
    from test_speculative import chi2_pvalue, exact_first_two
    target = make_hf_model(tmp_path / "t", tokenizer_dir, seed=5, vocab_size=16, sharpen=1.5)
    draft = make_hf_model(tmp_path / "d", tokenizer_dir, seed=6, vocab_size=16, sharpen=4.0, exits=[1, 2])
    prompt, n = [3, 7, 3, 7, 3, 7, 3], 12000
    # at 0.2 about a sixth of the drafts stop at the first exit (the Python path: sampled requests)
    llm = LLM(str(target), draft=str(draft), draft_exit="0.2", num_speculative_tokens=2, max_num_seqs=256, seed=7)
    outs = llm.generate([prompt] * n, SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True))
    tokens = llm.engine.stats.draft["exit_tokens"]
    assert tokens[0] > 0 and tokens[1] > 0                       # drafts from both exits
    counts = torch.zeros(16, 16, dtype=torch.float64)
    for o in outs:
        counts[o.token_ids[0], o.token_ids[1]] += 1
    assert chi2_pvalue(counts.flatten(), (exact_first_two(target, prompt) * n).flatten()) > 0.001


def test_fixed_exit_thresholds_stop_every_token_at_that_exit():
    assert fixed_exit_thresholds(0, 3) == [0.0, 1.0]
    assert fixed_exit_thresholds(1, 3) == [1.0, 0.0]
    assert fixed_exit_thresholds(2, 3) == [1.0, 1.0]
    assert fixed_exit_thresholds(1, 4) == [1.0, 0.0, 1.0]


def test_live_trial_keeps_the_policy_with_the_most_expected_tokens_per_measured_second(sorted_pair):
    """After the fit, each policy drafts a block of steps in turn, to measure its step time (a block's first
    step, which pays the switch, and catch-up steps not counted); the policy kept maximizes its match rate
    on the calibration records, as tokens per step at each step's k, per second."""
    from afford.core.stats import StepStats
    draft, same, _ = sorted_pair
    llm = LLM(str(same), draft=str(draft), draft_exit="auto")
    p = llm.engine.speculator.proposer
    policies = [[1.0, 1.0], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]
    step_ms = {0: 1.0, 1: 1.1, 2: 0.8, 3: 0.6}

    def trial(alphas):
        p.trial_alpha = alphas
        p.trial, p.trial_stats, p.trial_step, p.trial_block, p.trial_rounds = \
            policies, [[0.0, 0, 0.0] for _ in policies], 0, 3, 2
        steps = 0
        while p.trial is not None:
            p._trial_turn()
            arm = (steps // 3) % 4
            assert p.thresholds == policies[arm]
            st = StepStats(kind="decode", num_seqs=1, tokens_in=5, tokens_out=3, context_tokens=40, k_per_seq=[4])
            st.drafted = 4
            st.seconds = step_ms[arm] * 1e-3 * (50.0 if steps % 3 == 0 else 1.0)   # a switch step: ignored
            p.observe(st)
            steps += 1
        assert steps == 3 * 2 * 4 and p.trial_result["steps"] == [4, 4, 4, 4]
        return p.trial_result

    # the same match rate for every policy: the fastest step wins (exit 1 always)
    r = trial([1.0, 1.0, 1.0, 1.0])
    assert r["chosen"] == 3 and p.thresholds == [0.0, 1.0] and r["step_ms"][3] == pytest.approx(0.6)
    assert r["tokens_per_s"][3] == pytest.approx(5 / 0.6e-3, abs=0.1)
    # the first exit's tokens always wrong: its fast steps yield one token each, the faster of the others wins
    r = trial([1.0, 1.0, 1.0, 0.0])
    assert r["chosen"] == 2 and p.thresholds == [1.0, 0.0]
    # a mixed policy (the fit's [0.5, 0.5]) is kept over the best fixed exit only when clearly faster
    step_ms[1] = 0.78                                   # 2.6 % faster than exit 2 (0.8 ms): exit 2 is kept
    assert trial([1.0, 1.0, 1.0, 0.0])["chosen"] == 2
    step_ms[1] = 0.7                                    # 14 % faster: the mix is kept
    r = trial([1.0, 1.0, 1.0, 0.0])
    assert r["chosen"] == 1 and p.thresholds == [0.5, 0.5]
    assert llm.engine.stats.draft["trial"] == r
