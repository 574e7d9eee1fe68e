"""The zoo: tokenizer, training, resume, distillation, export, the bundled pair, and its bad input."""
import json

import pytest
import torch
from conftest import ROOT

from afford import LLM, ConfigError, SamplingParams
from afford.cli import main as cli
from afford.zoo.tokenizer import train_tokenizer
from afford.zoo.train import TrainConfig, export, from_preset, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    text = (ROOT / "data" / "tinyshakespeare" / "input.txt").read_text()[:60_000]
    (d / "shk.txt").write_text(text)
    lines = (ROOT / "data" / "gsm8k" / "train.jsonl").read_text().splitlines()[:200]
    (d / "gsm.jsonl").write_text("\n".join(lines) + "\n")
    return [str(d / "shk.txt"), str(d / "gsm.jsonl")]


def tiny(out, corpus, tokenizer, steps, **kw) -> TrainConfig:
    return from_preset("tiny", out=str(out), data=tuple(corpus), tokenizer=str(tokenizer), steps=steps,
                       seq_len=64, batch_size=8, eval_every=10 ** 6, warmup_steps=5, lr=3e-3, threads=2, **kw)


def test_train_lowers_loss_and_loads_in_transformers_and_afford(tmp_path, corpus, tokenizer_dir):
    from transformers import AutoModelForCausalLM
    first = train(tiny(tmp_path / "m0", corpus, tokenizer_dir, steps=1), log=lambda *_: None)
    res = train(tiny(tmp_path / "m", corpus, tokenizer_dir, steps=60), log=lambda *_: None)
    assert res["val_loss"] < first["val_loss"] - 0.5
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    llm = LLM(str(tmp_path / "m"), dtype="float32")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        ref = hf(ids).logits[0, -1]
    out = llm.generate(ids[0].tolist(), SamplingParams(max_tokens=1, temperature=0, logprobs=0))[0]
    assert out.token_ids[0] == int(ref.argmax())
    assert abs(out.logprobs[0]["logprob"] - float(torch.log_softmax(ref, -1).max())) < 1e-4


def test_resume_continues_from_saved_step(tmp_path, corpus, tokenizer_dir):
    train(tiny(tmp_path / "m", corpus, tokenizer_dir, steps=5), log=lambda *_: None)
    at5 = torch.load(tmp_path / "m" / "ckpt.pt", weights_only=False)
    name = next(k for k in at5["model"] if ".layers.0." in k)   # not a tied embedding
    at5["model"][name] = at5["model"][name] + 10.0     # a mark that only a real resume carries forward
    torch.save(at5, tmp_path / "m" / "ckpt.pt")
    res = train(tiny(tmp_path / "m", corpus, tokenizer_dir, steps=9), resume=True, log=lambda *_: None)
    assert res["steps"] == 9
    ck = torch.load(tmp_path / "m" / "ckpt.pt", weights_only=False)
    assert ck["step"] == 9
    # it went on from step 5's weights and optimizer, not from scratch: the mark is still there (4 small
    # steps later), and Adam counted 9 updates
    assert (ck["model"][name] - at5["model"][name]).abs().max() < 1.0
    assert not torch.equal(ck["model"][name], at5["model"][name])
    assert all(float(st["step"]) == 9 for st in ck["optim"]["state"].values())
    with pytest.raises(ConfigError, match="another model shape"):
        bigger = TrainConfig(out=str(tmp_path / "m"), data=tuple(corpus), tokenizer=str(tokenizer_dir), steps=12,
                             layers=3, hidden=64, heads=4, kv_heads=2, intermediate=128, seq_len=64)
        train(bigger, resume=True, log=lambda *_: None)


def test_distillation_lowers_kl_to_teacher(tmp_path, corpus, tokenizer_dir):
    train(tiny(tmp_path / "t", corpus, tokenizer_dir, steps=40), log=lambda *_: None)
    kw = dict(teachers=(str(tmp_path / "t"),))
    def cfg(out, steps):
        return from_preset("tiny", out=str(out), data=tuple(corpus), tokenizer=str(tmp_path / "t"), steps=steps,
                           seq_len=64, batch_size=8, eval_every=10 ** 6, warmup_steps=5, lr=3e-3, **kw)
    from transformers import AutoTokenizer

    from afford.models.loader import load_model
    from afford.zoo.train import batches, encode_corpus, loss_fn
    train(cfg(tmp_path / "s0", 1), log=lambda *_: None)
    train(cfg(tmp_path / "s", 40), log=lambda *_: None)
    tok = AutoTokenizer.from_pretrained(tmp_path / "t")
    stream = encode_corpus(tok, [open(corpus[0]).read()[-5000:]])
    x, y = next(batches(stream, 8, 64, torch.Generator().manual_seed(0)))
    teacher = load_model(tmp_path / "t", "cpu", "float32")
    with torch.no_grad():
        kl = [float(loss_fn(load_model(tmp_path / s, "cpu", "float32"), x, y, teacher, cfg(tmp_path / s, 1)))
              for s in ("s0", "s")]
    assert kl[1] < 0.7 * kl[0]


def test_multi_exit_training_lowers_every_exits_loss(tmp_path, corpus, tokenizer_dir):
    from afford.config import ModelConfig
    first = train(tiny(tmp_path / "m0", corpus, tokenizer_dir, steps=1, exits=(1, 2)), log=lambda *_: None)
    res = train(tiny(tmp_path / "m", corpus, tokenizer_dir, steps=60, exits=(1, 2)), log=lambda *_: None)
    assert set(res["exit_val_loss"]) == {1, 2}
    for e in (1, 2):
        assert res["exit_val_loss"][e] < first["exit_val_loss"][e] - 0.5
    assert res["exit_val_loss"][2] == pytest.approx(res["val_loss"])
    assert ModelConfig.from_dir(tmp_path / "m").exits == (1, 2)
    with pytest.raises(ConfigError, match="--exits"):
        tiny(tmp_path / "x", corpus, tokenizer_dir, steps=1, exits=(1, 3))


def test_init_grows_a_shallower_model_or_cuts_a_deeper_one(tmp_path, corpus, tokenizer_dir):
    from afford.models.loader import load_model
    from afford.models.transformer import Transformer
    from afford.zoo.train import init_from, model_config
    train(tiny(tmp_path / "m", corpus, tokenizer_dir, steps=3), log=lambda *_: None)
    start = load_model(tmp_path / "m", "cpu", "float32")
    cfg = TrainConfig(out=str(tmp_path / "g"), data=tuple(corpus), tokenizer=str(tokenizer_dir), steps=1, layers=4,
                      hidden=64, heads=4, kv_heads=2, intermediate=128, exits=(2, 3, 4))
    grown = Transformer(model_config(cfg, start.cfg.vocab_size, 0))
    init_from(grown, start, "m")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        want = start(ids)
        for lg in grown.exit_logits(ids):                 # every exit computes what the 2-layer model does
            torch.testing.assert_close(lg, want)
    cut = Transformer(model_config(TrainConfig(out=str(tmp_path / "c"), data=tuple(corpus), tokenizer=str(tokenizer_dir),
                                               steps=1, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128,
                                               exits=(1, 2)), start.cfg.vocab_size, 0))
    torch.nn.init.normal_(grown.model.layers[3].mlp.down_proj.weight)    # the 4-layer model is no longer the 2-layer one
    init_from(cut, grown, "g")                            # a deeper model of the same width: its first layers
    with torch.no_grad():
        torch.testing.assert_close(cut.exit_logits(ids)[-1], grown.exit_logits(ids)[0])
        torch.testing.assert_close(cut(ids), want)
        assert not torch.allclose(grown(ids), want)
    wide = Transformer(model_config(TrainConfig(out=str(tmp_path / "w"), data=tuple(corpus), tokenizer=str(tokenizer_dir),
                                                steps=1, layers=2, hidden=128, heads=4, kv_heads=2, intermediate=128),
                                    start.cfg.vocab_size, 0))
    with pytest.raises(ConfigError, match="same width"):
        init_from(wide, start, "m")


def test_several_teachers_average_or_alternate(tmp_path, corpus, tokenizer_dir):
    from transformers import AutoTokenizer

    from afford.models.loader import load_model
    from afford.zoo.train import batches, encode_corpus, loss_fn
    train(tiny(tmp_path / "t1", corpus, tokenizer_dir, steps=10), log=lambda *_: None)
    train(tiny(tmp_path / "t2", corpus, tokenizer_dir, steps=10, seed=1), log=lambda *_: None)
    t1, t2 = (load_model(tmp_path / t, "cpu", "float32") for t in ("t1", "t2"))
    student = load_model(tmp_path / "t1", "cpu", "float32")
    stream = encode_corpus(AutoTokenizer.from_pretrained(tokenizer_dir), [open(corpus[0]).read()[-5000:]])
    x, y = next(batches(stream, 4, 64, torch.Generator().manual_seed(0)))
    avg = tiny(tmp_path / "s", corpus, tokenizer_dir, steps=1, teachers=("a", "b"))
    alt = tiny(tmp_path / "s", corpus, tokenizer_dir, steps=1, teachers=("a", "b"), teacher_mix="alternate")
    with torch.no_grad():
        one = [float(loss_fn(student, x, y, [t], avg)) for t in (t1, t2)]
        assert one[0] == pytest.approx(0.0, abs=1e-5) and one[1] > 0.01      # KL to itself, to another model
        assert float(loss_fn(student, x, y, [t1, t1], avg)) == pytest.approx(0.0, abs=1e-5)   # a mixture of one
        mixed = float(loss_fn(student, x, y, [t1, t2], avg))
        assert 0.0 < mixed < one[1]
        assert [float(loss_fn(student, x, y, [t1, t2], alt, step)) for step in (0, 1)] == pytest.approx(one, abs=1e-5)
    assert cli(["zoo", "distill", "--teacher", str(tmp_path / "t1"), "--teacher", str(tmp_path / "t2"),
                "--teacher-mix", "alternate", "--student-preset", "tiny", "--exits", "1,2", "--data", *corpus,
                "--out", str(tmp_path / "d"), "--steps", "2", "--seq-len", "64", "--batch-size", "4"]) == 0
    assert LLM(str(tmp_path / "t2"), draft=str(tmp_path / "d")).generate([5, 6], SamplingParams(max_tokens=4))[0].token_ids


def test_export_writes_16_bit_without_checkpoint(tmp_path, corpus, tokenizer_dir):
    train(tiny(tmp_path / "m", corpus, tokenizer_dir, steps=2), log=lambda *_: None)
    export(tmp_path / "m", tmp_path / "e")
    assert not (tmp_path / "e" / "ckpt.pt").exists()
    assert json.loads((tmp_path / "e" / "config.json").read_text())["dtype"] == "bfloat16"
    assert LLM(str(tmp_path / "e")).generate([5, 6], SamplingParams(max_tokens=3, temperature=0))[0].token_ids


def test_bad_input(tmp_path, corpus, tokenizer_dir):
    with pytest.raises(ConfigError, match="not found"):
        train(tiny(tmp_path / "x", [str(tmp_path / "missing.txt")], tokenizer_dir, steps=1))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        train(tiny(tmp_path / "x", [str(tmp_path / "empty.txt")], tokenizer_dir, steps=1))
    with pytest.raises(ConfigError, match="byte alphabet"):
        train_tokenizer(["some text"], 100, tmp_path / "tok")
    train(tiny(tmp_path / "m", corpus, tokenizer_dir, steps=1), log=lambda *_: None)
    with pytest.raises(ConfigError, match="--overwrite"):
        train(tiny(tmp_path / "m", corpus, tokenizer_dir, steps=1), log=lambda *_: None)
    assert cli(["zoo", "train", "--preset", "nope", "--data", corpus[0], "--tokenizer", str(tokenizer_dir),
                "--out", str(tmp_path / "n"), "--steps", "1"]) == 2


def test_bundled_pair_loads_shares_vocabulary_and_generates():
    target = LLM("default")
    draft_llm = LLM("default", draft="default", num_speculative_tokens=4)
    assert draft_llm.engine.speculator.proposer.cfg.vocab_size == target.engine.model_config.vocab_size
    sp = SamplingParams(max_tokens=24, temperature=0)
    plain = target.generate("Natalia sold clips to 48 of her friends in April", sp)[0]
    drafted = draft_llm.generate("Natalia sold clips to 48 of her friends in April", sp)[0]
    assert plain.text.strip() and drafted.token_ids == plain.token_ids
    assert draft_llm.stats.accepted > 0


def test_bundled_sorted_draft_serves_both_bundled_targets():
    from afford.config import ModelConfig
    from afford.models.loader import resolve_model_path
    small, large = (ModelConfig.from_dir(resolve_model_path(m)) for m in ("default", "default-large"))
    assert large.num_parameters >= 2 * small.num_parameters and large.vocab_size == small.vocab_size
    assert ModelConfig.from_dir(resolve_model_path("default-sorted")).exits
    sp = SamplingParams(max_tokens=24, temperature=0)
    prompt = "Natalia sold clips to 48 of her friends in April"
    for target in ("default", "default-large"):
        llm = LLM(target, draft="default-sorted", num_speculative_tokens=4)
        assert llm.generate(prompt, sp)[0].token_ids == LLM(target).generate(prompt, sp)[0].token_ids
        assert llm.stats.accepted > 0


def test_ctrl_c_leaves_a_usable_checkpoint(tmp_path, corpus, tokenizer_dir):
    import signal
    import subprocess
    import sys
    import time
    proc = subprocess.Popen([sys.executable, "-m", "afford", "zoo", "train", "--preset", "tiny", "--data", *corpus,
                             "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "m"), "--steps", "100000",
                             "--seq-len", "64", "--batch-size", "4", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    while "step" not in seen and proc.poll() is None:        # wait until training steps are running
        seen += proc.stdout.read(1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "interrupted" in out
    assert (tmp_path / "m" / "ckpt.pt").exists()
    assert LLM(str(tmp_path / "m")).generate([5, 6], SamplingParams(max_tokens=2, temperature=0))[0].token_ids


def test_teacher_text_writes_the_teachers_greedy_continuations(tmp_path, llama_dir):
    from afford.zoo.data import teacher_text
    src = tmp_path / "q.jsonl"
    src.write_text("\n".join(json.dumps({"question": q, "answer": "x"}) for q in ("To be", "Or not", "Hello")) + "\n")
    assert teacher_text(str(llama_dir), str(src), "question", str(tmp_path / "t.jsonl"), limit=2, max_tokens=5) == 2
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    ref = LLM(str(llama_dir)).generate("To be\n", SamplingParams(max_tokens=5, temperature=0))[0].text
    assert [r["question"] for r in rows] == ["To be", "Or not"] and rows[0]["answer"] == ref
    with pytest.raises(ConfigError, match="field"):
        teacher_text(str(llama_dir), str(src), "prompt", str(tmp_path / "u.jsonl"))


def test_passkey_documents_and_a_long_context_config(tmp_path, corpus, tokenizer_dir):
    """`afford zoo passkey` plants one key per document and asks for it at the end; `--max-positions` and
    `--rope-theta` reach the trained model's config.json."""
    import json

    from afford.cli import main
    from afford.models.loader import load_tokenizer
    from afford.zoo.passkey import QUESTION
    out = tmp_path / "pk.jsonl"
    assert main(["zoo", "passkey", "--filler", str(corpus[0]), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                 "--n", "5", "--tokens", "200,400"]) == 0
    docs = [json.loads(x) for x in out.read_text().splitlines()]
    tok = load_tokenizer(tokenizer_dir)
    for d in docs:
        assert d["prompt"].endswith(QUESTION) and d["text"] == f"{d['prompt']} {d['key']}."
        assert d["prompt"].count(d["key"]) == 2                     # planted once (the sentence names it twice)
        assert 100 <= len(tok(d["prompt"], add_special_tokens=False)["input_ids"]) <= 800
    assert main(["zoo", "passkey", "--filler", str(corpus[0]), "--out", str(out), "--tokens", "9"]) == 2
    res = train(tiny(tmp_path / "long", corpus, tokenizer_dir, steps=2, max_position_embeddings=128,
                     rope_theta=50000.0), log=lambda *_: None)
    cfg = json.loads((tmp_path / "long" / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 128 and cfg["rope_theta"] == 50000.0 and res["val_loss"] > 0
    with pytest.raises(ConfigError, match="max-positions"):
        tiny(tmp_path / "bad", corpus, tokenizer_dir, steps=1, max_position_embeddings=32)
