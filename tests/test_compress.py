"""afford compress: exact round trips through the language-model coder and the probabilistic circuit, damaged
files and wrong models refused, frequencies never zero, circuit conditionals equal to brute force."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

from afford.compress import coder
from afford.compress.circuit import HCLT, Conditionals, bits_per_dim, compress_images, decompress_images, fit
from afford.compress.container import CorruptFile, pack, unpack
from afford.compress.text import ByteTokens, LMCodec


@pytest.fixture(scope="module", params=[8, 0], ids=["overlap", "chunks"])
def codec(llama_dir, request):
    # short windows and a small batch: several lanes and several windows per lane, each window re-reading
    # the lane's last 8 tokens (or none)
    return LMCodec(llama_dir, context=24, batch=3, overlap=request.param)


def corpus() -> dict[str, bytes]:
    rng = random.Random(0)
    shakespeare = (ROOT / "data" / "tinyshakespeare" / "input.txt").read_bytes()
    return {
        "empty": b"",
        "one byte": b"\x00",
        "random bytes": bytes(rng.randrange(256) for _ in range(300)),
        "unicode": "naïve café — 東京 🚀 ∑x² = y\n\tZürich <|endoftext|> <|pad|>".encode(),
        "invalid utf-8": b"ok \xff\xfe then \xed\xa0\x80 lone surrogate, \xc3 cut, \xe2\x82 end\xf0",
        "shakespeare": shakespeare[:700],
        "gsm8k": (ROOT / "data" / "gsm8k" / "test.jsonl").read_bytes()[:500],
        "config": (ROOT / "afford" / "assets" / "default" / "target" / "config.json").read_bytes(),
        "weights": (ROOT / "afford" / "assets" / "default" / "draft" / "model.safetensors").read_bytes()[:400],
    }


@pytest.fixture(scope="module")
def fresh(codec, llama_dir):
    """A second codec with the same settings: decoding must not lean on anything the encoding left behind."""
    return LMCodec(llama_dir, context=24, batch=3, overlap=codec.overlap)


@pytest.mark.parametrize("name", list(corpus()))
def test_round_trip_is_exact(codec, fresh, name):
    data = corpus()[name]
    blob = codec.compress(data)
    assert fresh.decompress(blob) == data
    assert codec.pool.num_free == codec.pool.num_blocks                  # every window's KV blocks went back


def test_byte_tokens_round_trip_any_bytes(llama_dir):
    from afford.models.loader import load_tokenizer
    tok = ByteTokens(load_tokenizer(llama_dir))
    rng = random.Random(1)
    for _ in range(50):
        data = bytes(rng.choice([rng.randrange(256), 0x20, 0x65, 0xc3, 0xa9]) for _ in range(rng.randrange(60)))
        assert tok.decode(tok.encode(data)) == data
    text = "the king's men, and the queen\n".encode()
    assert len(tok.encode(text)) < len(text)                 # valid UTF-8 goes through the BPE, not byte by byte


def test_long_file_codes_within_one_percent_of_the_model_cross_entropy():
    codec = LMCodec("default", context=256, batch=8)
    data = (ROOT / "data" / "gsm8k" / "test.jsonl").read_bytes()[:6000]
    blob = codec.compress(data)
    s = codec.stats
    assert s.model_bits > 0
    assert s.payload_bits <= 1.01 * s.model_bits + 32          # + the coder's final word
    assert len(blob) < len(data) / 2
    assert codec.decompress(blob) == data


def test_damaged_files_are_refused(codec):
    data = b"To be, or not to be, that is the question."
    blob = codec.compress(data)
    for i in (0, 5, len(blob) // 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[i] ^= 0x10
        with pytest.raises(CorruptFile):
            codec.decompress(bytes(bad))
    with pytest.raises(CorruptFile, match="truncated|damaged"):
        codec.decompress(blob[:-4])
    with pytest.raises(CorruptFile, match="not an afford-compressed"):
        codec.decompress(b"hello world")


def test_a_wrong_payload_that_passes_the_checksum_is_caught_by_the_original_hash(codec):
    header, words = unpack(codec.compress(b"The quick brown fox jumps over the lazy dog. " * 3))
    words = words.copy()
    words[0] ^= 0x00F0_0000                  # re-packed: a valid checksum around a payload that decodes wrongly
    with pytest.raises(CorruptFile, match="did not decode to its original"):
        codec.decompress(pack(header, words))


def test_a_different_model_or_setting_is_refused(codec, random_pair):
    blob = codec.compress(b"some text")
    other = LMCodec(random_pair[0], context=24, batch=3, overlap=codec.overlap)
    with pytest.raises(CorruptFile, match="different model"):
        other.decompress(blob)
    with pytest.raises(CorruptFile, match="batch=3"):
        LMCodec(codec.path, context=24, batch=4, overlap=codec.overlap).decompress(blob)
    with pytest.raises(CorruptFile, match=f"overlap={codec.overlap}"):
        LMCodec(codec.path, context=24, batch=3, overlap=codec.overlap + 3).decompress(blob)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=2, max_size=300), st.integers(0, 2))
def test_frequencies_are_never_zero_and_sum_to_the_precision(values, extreme):
    logits = torch.tensor([values], dtype=torch.float32)
    if extreme == 1:
        logits[0, 0] = float("-inf")
    elif extreme == 2:
        logits[0, -1] = 1e30
    f = coder.frequencies(logits)
    assert f.min() >= 1
    assert f.sum() == 1 << coder.PRECISION


def test_the_coder_decodes_what_it_encoded():
    rng = np.random.default_rng(0)
    freqs = coder.frequencies(torch.randn(500, 700) * 5)
    symbols = [int(rng.choice(700, p=r / r.sum())) for r in freqs]
    enc = coder.Encoder()
    for i in range(0, 500, 50):
        enc.encode(symbols[i:i + 50], freqs[i:i + 50])
    dec = coder.Decoder(enc.words())
    got = [s for i in range(0, 500, 50) for s in dec.decode(freqs[i:i + 50])]
    assert got == symbols
    assert enc.num_bits <= coder.ideal_bits(freqs, symbols) * 1.01 + 64


# ---- the probabilistic circuit ----

TREES = ([-1, 0, 0, 1, 1, 2], [1, 2, 3, -1, 3, 4], [-1, 0, 1, 2, 3, 4], [3, 3, 3, -1, 3, 3])


@pytest.mark.parametrize("parent", TREES)
def test_circuit_marginals_sum_to_one_and_conditionals_match_brute_force(parent):
    m = HCLT.random(np.array(parent), hidden=4, values=3, seed=2)
    every = torch.tensor(list(itertools.product(range(3), repeat=6)))                      # (729, 6)
    joint = m.log_likelihood(every).exp().reshape([3] * 6).numpy()
    assert joint.sum() == pytest.approx(1.0, abs=1e-12)
    # a marginal with pixels summed out equals the sum of the joint over them
    seen = torch.tensor([[True, False, True, False, False, True]] * 2)
    x = torch.tensor([[2, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 2]])
    lm = m.log_likelihood(x, seen).exp().numpy()
    assert lm[0] == pytest.approx(joint[2, :, 1, :, :, 0].sum(), rel=1e-10)
    assert lm[1] == pytest.approx(joint[0, :, 0, :, :, 2].sum(), rel=1e-10)
    # every conditional the coder uses equals brute-force enumeration
    rows = every[torch.randperm(729, generator=torch.Generator().manual_seed(0))[:4]]
    cond = Conditionals(m, len(rows))
    for k, v in enumerate(cond.order):
        got = cond.next().exp().numpy()                                                  # (4, 3)
        for n in range(len(rows)):
            idx = tuple(int(rows[n, u]) if u in cond.order[:k] else slice(None) for u in range(6))
            marg = joint[idx]
            free = [u for u in range(6) if u not in cond.order[:k]]
            want = marg.sum(axis=tuple(i for i, u in enumerate(free) if u != v))
            np.testing.assert_allclose(got[n], want / want.sum(), rtol=1e-10, atol=1e-13)
        cond.commit(rows[:, v])


def test_circuit_fits_digits_and_codes_them_exactly_near_its_nll():
    pytest.importorskip("sklearn")
    from afford.compress.bench import digits_split
    train, test = digits_split()
    model, history = fit(train[:400], 17, hidden=6, iters=12)
    # EM with a pseudocount climbs likelihood + prior, so the likelihood itself may dip by a hair
    assert all(b <= a + 1e-3 for a, b in zip(history, history[1:])) and history[-1] < history[0] - 0.5
    words, cond = compress_images(model, test[:60])
    assert np.array_equal(decompress_images(model, words, 60), test[:60])
    coded = 32 * len(words) / test[:60].size
    nll = bits_per_dim(model, test[:60])
    assert abs(coded - nll) <= nll * 0.02 + 32 / test[:60].size
    assert cond.evaluations / model.num_vars < model.num_vars / 2         # a short path per conditional, not the circuit


def test_cli_compress_and_decompress(tmp_path, llama_dir, capsys):
    from afford.cli import main
    src = tmp_path / "in.bin"
    src.write_bytes(b"Hello, \xffworld!\n" * 20)
    assert main(["compress", str(src), "--model", str(llama_dir), "--context", "32", "--batch", "2",
                 "--overlap", "8"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    out = tmp_path / "back.bin"
    assert main(["decompress", str(src) + ".afz", "-o", str(out), "--model", str(llama_dir)]) == 0
    assert out.read_bytes() == src.read_bytes()
    assert main(["decompress", str(src) + ".afz", "-o", str(out), "--model", str(llama_dir)]) == 2   # exists
    assert "--force" in capsys.readouterr().err
    assert main(["decompress", str(src) + ".afz", "-o", str(tmp_path / "x"), "--model", "default"]) == 2
    assert "different model" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "missing")]) == 2
    assert main(["compress", str(src), "-o", str(tmp_path / "no" / "such" / "dir.afz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compress", str(src), "-o", str(tmp_path), "--force"]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_lanes_cover_every_token_once_within_the_context(codec):
    for n in (0, 1, 5, 23, 24, 100, 301):
        seen = []
        lanes = codec.lanes(n)
        assert len(lanes) <= codec.batch
        for windows in lanes:
            lo = windows[0][1]
            for cs, s, e in windows:
                assert lo <= cs <= s < e and s - cs <= codec.overlap and 1 + (e - cs) <= codec.context
                seen.extend(range(s, e))
        assert seen == list(range(n))


def test_bad_settings_are_refused(llama_dir):
    from afford.config import ConfigError
    with pytest.raises(ConfigError, match="exceeds the model's 512 positions"):
        LMCodec(llama_dir, context=600)
    with pytest.raises(ConfigError, match="overlap < context - 1"):
        LMCodec(llama_dir, context=24, overlap=23)


def test_cli_pipes_through_standard_input_and_output(llama_dir):
    import subprocess
    import sys
    data = b"piped \x00\xff bytes, " * 10
    args = ["--model", str(llama_dir)]
    packed = subprocess.run([sys.executable, "-m", "afford", "compress", "-", *args, "--context", "32",
                             "--overlap", "8"], input=data, capture_output=True, check=True)
    assert packed.stdout.startswith(b"AFZ") and b"bits/byte" in packed.stderr
    back = subprocess.run([sys.executable, "-m", "afford", "decompress", "-", *args], input=packed.stdout,
                          capture_output=True, check=True)
    assert back.stdout == data
