"""The lossy levers (afford/levers/): EAD cascade, guided re-ranking, GRAD. Each at its "off" extreme is
plain decoding; each does what its rule says, checked against dense forwards of real (tiny random) models."""
from __future__ import annotations

import math

import pytest
import torch

from afford import LLM, SamplingParams
from afford.config import ConfigError
from tests.conftest import make_hf_model

PROMPTS = ["The king said to the", "Once more unto the breach", "What light through yonder window", "O Romeo"]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def large_dir(tmp_path_factory, tokenizer_dir):
    return make_hf_model(tmp_path_factory.mktemp("large"), tokenizer_dir, "llama", seed=3, hidden_size=96,
                         num_hidden_layers=3, intermediate_size=192, sharpen=3.0)


@pytest.fixture(scope="module")
def dense(llama_dir, large_dir):
    """Dense (no cache) fp32 forwards of both models: logits (T, V) of a token list."""
    from afford.models.loader import load_for_inference
    models = {"small": load_for_inference(llama_dir, "cpu", "float32"),
              "large": load_for_inference(large_dir, "cpu", "float32")}

    @torch.inference_mode()
    def logits(which: str, ids: list[int]) -> torch.Tensor:
        return models[which](torch.tensor(ids)[None])[0].float()
    return logits


def texts(llm, prompts=PROMPTS, params=GREEDY):
    return [o.token_ids for o in llm.generate(prompts, params)]


def test_off_extremes_are_plain_decoding(llama_dir, large_dir, tmp_path):
    (tmp_path / "a.txt").write_text("The king said to the people that the breach was open.")
    plain = texts(LLM(str(llama_dir)))
    assert texts(LLM(str(llama_dir), cascade="entropy", large=str(large_dir), tau=math.inf)) == plain
    assert texts(LLM(str(llama_dir), rerank="guided", large=str(large_dir), alpha=0.0,
                     counterfactual={"king": "queen"})) == plain
    assert texts(LLM(str(llama_dir), grad_corpus=str(tmp_path), grad_weight=0.0)) == plain
    sampled = SamplingParams(max_tokens=16, temperature=0.8, seed=7)
    assert texts(LLM(str(llama_dir), cascade="entropy", large=str(large_dir), tau=math.inf), params=sampled) == \
        texts(LLM(str(llama_dir)), params=sampled)


def entropy_bits(logits: torch.Tensor) -> float:
    lp = torch.log_softmax(logits, -1)
    return float(-(lp.exp() * lp).sum() / math.log(2))


@pytest.mark.parametrize("tau,window,dwell", [(3.0, 1, 3), (4.0, 5, 10), (0.0, 2, 4)])
def test_cascade_follows_the_rule_and_its_caches_match_fresh_prefills(llama_dir, large_dir, dense, tau, window,
                                                                      dwell):
    """Replay the rule by hand with each token's entropy from a dense forward of the model that produced it:
    the same tokens (so every catch-up left the caches as a fresh prefill would), the same model per token,
    never two switches closer than `dwell`."""
    llm = LLM(str(llama_dir), cascade="entropy", large=str(large_dir), tau=tau, window=window, dwell=dwell,
              max_num_seqs=4)
    outs = llm.generate(PROMPTS, GREEDY)            # one batch: sequences switch at different steps
    switched = 0
    for o in outs:
        src = o.metrics["sources"]
        assert len(src) == len(o.token_ids)
        active, since, win, ids = "small", 0, [], list(o.prompt_token_ids)
        for i, tok in enumerate(o.token_ids):
            assert src[i] == active, f"token {i}: expected the {active} model"
            z = dense(active, ids)[-1]
            assert tok == int(z.argmax()), f"token {i} is not the {active} model's greedy token"
            ids.append(tok)
            if i == 0:                              # the prefill's token: its entropy is not observed
                continue
            win = (win + [entropy_bits(z)])[-window:]
            since += 1
            if since >= dwell:
                want = "large" if sum(win) / len(win) >= tau else "small"
                if want != active:
                    active, since = want, 0
                    switched += 1
        flips = [i for i in range(1, len(src)) if src[i] != src[i - 1]]
        assert all(b - a >= dwell for a, b in zip(flips, flips[1:]))
        assert o.metrics["large_share"] == src.count("large") / len(src)
    assert llm.stats.switches == switched
    if tau == 0.0:
        assert switched and llm.stats.large_tokens > 0 and llm.stats.catchup_tokens > 0
    llm.engine.pool.check()


def test_cascade_with_shared_prefix_sampling_and_a_cost_model(llama_dir, large_dir):
    """n > 1 choices forked after a shared prefix while the large model is active, and steps where every
    sequence is on the large model with the planner's cost on: every choice finishes, each token has a source."""
    llm = LLM(str(llama_dir), cascade="entropy", large=str(large_dir), tau=0.0, dwell=1, cost_hardware="h100")
    out = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=20, temperature=0.8, seed=1, n=3, shared_prefix=6,
                                                   ignore_eos=True))
    for o in out:
        assert len(o.outputs) == 3
        for c in o.outputs:
            assert len(c.token_ids) == 20 and len(c.metrics["sources"]) == 20
            assert c.token_ids[:6] == o.token_ids[:6] and c.metrics["sources"][:6] == o.metrics["sources"][:6]
    assert llm.stats.large_tokens > 0 and llm.stats.modeled_usd_per_1m is not None
    llm.engine.pool.check()
    assert not llm.engine.levers.side.pool.tables


def test_grad_graph_equals_a_hand_computed_one(llama_dir, dense, tmp_path):
    from afford.levers.grad import Grad
    from afford.models.loader import load_for_inference, load_tokenizer
    docs = {"one.txt": "The king rode to the castle at dawn.", "two.txt": "The queen rode to the river at dusk."}
    for name, text in docs.items():
        (tmp_path / name).write_text(text)
    tok = load_tokenizer(llama_dir)
    grad = Grad(tmp_path, 4.0, 2, load_for_inference(llama_dir, "cpu", "float32"), tok, 512)
    graph, names = grad.graph_for("who rode to the castle and the river")
    assert sorted(names) == sorted(docs)
    want: dict[tuple[int, int], float] = {}
    for text in docs.values():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        z = dense("small", ids)
        for i in range(len(ids) - 1):
            key = (ids[i], ids[i + 1])
            want[key] = want.get(key, 0.0) + float(z[i, ids[i + 1]] - z[i].min())
    assert len(graph) == len(want)
    for u in {u for u, _ in want}:
        top = max(w for (a, _), w in want.items() if a == u)
        for (a, v), w in want.items():
            if a == u:
                assert graph.weight(u, v) == pytest.approx(w / top, rel=1e-4)
    # and the fusion rule on one row
    u = next(iter(graph.rows))
    z = torch.randn(tok.vocab_size if hasattr(tok, "vocab_size") else 512)
    ids, g = graph.rows[u]
    fused = grad.fuse(z, graph, u)
    gate = 1 - float(torch.softmax(z, -1).max())
    assert torch.allclose(fused[ids], z[ids] + 4.0 * gate * g, atol=1e-6)
    rest = torch.ones_like(z, dtype=torch.bool)
    rest[ids] = False
    assert torch.equal(fused[rest], z[rest])


def test_grad_changes_decoding_toward_the_document(llama_dir, tmp_path):
    (tmp_path / "doc.txt").write_text("The king said to the Lords of Velmora: we ride at dawn to Plimton.")
    plain = LLM(str(llama_dir)).generate(PROMPTS[0], GREEDY)[0]
    out = LLM(str(llama_dir), grad_corpus=str(tmp_path), grad_weight=50.0).generate(PROMPTS[0], GREEDY)[0]
    assert out.metrics["retrieved"] == ["doc.txt"]
    assert out.token_ids != plain.token_ids


def test_rerank_picks_the_counterfactually_stable_candidate(llama_dir, large_dir, dense):
    """With a large alpha the re-ranker must take, among the small model's top-k, the candidate after which
    the guide's next-token distribution changes least under the rewrite -- recomputed here with dense
    forwards -- and on some prompt that is not the small model's own greedy choice."""
    from afford.levers.rerank import js_divergence, swap_words
    from afford.models.loader import load_tokenizer
    tok = load_tokenizer(llama_dir)
    swaps = {"king": "queen", "light": "dark"}
    rewrite = swap_words(swaps)
    assert rewrite("The King saw light") == "The Queen saw dark"
    llm = LLM(str(llama_dir), rerank="guided", large=str(large_dir), alpha=1e4, rerank_top_k=4,
              counterfactual=swaps)
    one = SamplingParams(max_tokens=1, temperature=0)
    differs = 0
    for p in ["The king said to the", "What light through yonder", "Good king, the light of"]:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        cf = tok(rewrite(p), add_special_tokens=False)["input_ids"]
        cands = torch.topk(dense("small", ids)[-1], 4).indices.tolist()
        d = [float(js_divergence(torch.log_softmax(dense("large", ids + [c])[-1], -1)[None],
                                 torch.log_softmax(dense("large", cf + [c])[-1], -1)[None])) for c in cands]
        want = cands[min(range(4), key=lambda j: (d[j], j))]
        got = llm.generate(p, one)[0].token_ids[0]
        assert got == want
        differs += want != cands[0]
    assert differs, "the constructed prompts never separate the stable candidate from the greedy one"
    llm.engine.levers.side.pool.check()
    assert not llm.engine.levers.side.pool.tables       # finished requests leave nothing in the guide's pool


def test_bad_inputs_get_clear_errors(llama_dir, large_dir, tokenizer_dir, tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        LLM(str(llama_dir), grad_corpus=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("   \n")
    with pytest.raises(ConfigError, match="no non-empty"):
        LLM(str(llama_dir), grad_corpus=str(tmp_path / "empty"))
    other = make_hf_model(tmp_path / "other", tokenizer_dir, "llama", vocab_size=640)
    with pytest.raises(ConfigError, match="vocabulary"):
        LLM(str(llama_dir), cascade="entropy", large=str(other))
    with pytest.raises(ConfigError, match="needs large="):
        LLM(str(llama_dir), cascade="entropy")
    with pytest.raises(ConfigError, match="counterfactual"):
        LLM(str(llama_dir), rerank="guided", large=str(large_dir))
    with pytest.raises(ConfigError, match="do not combine"):
        LLM(str(llama_dir), draft="ngram", grad_corpus=str(tmp_path))
    with pytest.raises(ConfigError, match="cascade must be"):
        LLM(str(llama_dir), cascade="always", large=str(large_dir))
    with pytest.raises(ConfigError, match="tau"):
        LLM(str(llama_dir), cascade="entropy", large=str(large_dir), tau=-1)
    with pytest.raises(ConfigError, match="alpha"):               # refused before any model loads
        LLM(str(llama_dir), rerank="guided", large=str(tmp_path / "nowhere"), alpha=-1.0, counterfactual={"a": "b"})
    with pytest.raises(ConfigError, match="rerank_top_k"):
        LLM(str(llama_dir), rerank="guided", large=str(large_dir), rerank_top_k=40, counterfactual={"a": "b"})
    with pytest.raises(ConfigError, match="grad_weight"):
        LLM(str(llama_dir), grad_corpus=str(tmp_path), grad_weight=-2.0)
    llm = LLM(str(llama_dir), rerank="guided", large=str(large_dir), counterfactual={"a": "b"})
    with pytest.raises(ConfigError, match="n=1"):
        llm.generate("x", SamplingParams(n=2))
    with pytest.raises(ConfigError, match="drop large="):
        LLM(str(llama_dir), large=str(large_dir))

    def broken(text):
        raise KeyError(text)
    llm = LLM(str(llama_dir), rerank="guided", large=str(large_dir), counterfactual=broken)
    with pytest.raises(ConfigError, match="rewrite failed"):
        llm.generate("x")
    assert not llm.engine.seqs and not llm.engine.has_unfinished()


def test_cli_generate_with_a_cascade_prints_its_share(llama_dir, large_dir, capsys):
    from afford.cli import main
    assert main(["generate", "The king said", "--model", str(llama_dir), "--max-tokens", "16", "--cascade",
                 "entropy", "--large", str(large_dir), "--tau", "0", "--dwell", "2"]) == 0
    assert "cascade: large model" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(llama_dir), "--rerank", "guided", "--large", str(large_dir),
                 "--swap", "oops"]) == 2


def test_factqa_set_on_disk_is_the_generated_one():
    import json

    from afford.bench.factqa import build, correct
    from tests.conftest import ROOT
    docs, questions = build()
    folder = ROOT / "data" / "factqa"
    assert sorted(p.name for p in (folder / "docs").iterdir()) == sorted(n for n, _ in docs)
    assert all((folder / "docs" / n).read_text() == t + "\n" for n, t in docs)
    assert [json.loads(line) for line in (folder / "questions.jsonl").read_text().splitlines()] == questions
    assert correct("  Plimton, on the river", "Plimton") and not correct(" the city\nPlimton", "Plimton")


def test_bench_fidelity_cli_writes_its_report(llama_dir, large_dir, tmp_path, capsys):
    import json

    from afford.cli import main
    from tests.conftest import ROOT
    cfg = json.dumps({"model": str(llama_dir), "cascade": "entropy", "large": str(large_dir), "tau": 0.0, "dwell": 2})
    assert main(["bench", "fidelity", "--large", str(large_dir), "--n", "2", "--max-tokens", "8", "--config", cfg,
                 "--data", str(ROOT / "data"), "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "fidelity.json").read_text())
    base, casc = r["rows"]
    assert base["identical"] == 1 and base["speed_vs_large"] == 1
    assert casc["large_share"] > 0 and casc["side_tokens"] > 0
    assert "| configuration |" in (tmp_path / "fidelity.md").read_text()
    assert main(["bench", "fidelity", "--config", "[1]", "--out", str(tmp_path)]) == 2
