"""C3oT on GSM8K: the compressor keeps every number and the answer line of every training solution while
dropping words; conditioned data holds each record twice, under the two prefixes, in the same split;
`afford zoo cot-compress` reports the rate."""
import json
import subprocess
import sys
from collections import Counter

import pytest
from conftest import ROOT

from afford.config import ConfigError
from afford.zoo.cot import ANNOTATION, LONG, SHORT, compress_file, compress_solution, numbers, prompt, word_count
from afford.zoo.data import split_documents

GSM8K = ROOT / "data" / "gsm8k" / "train.jsonl"


def test_compressed_solution_keeps_numbers_and_answer():
    long = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
            "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
    short = compress_solution(long)
    assert short == "48/2=24 clips\n48+24=72 clips\n#### 72"
    assert compress_solution("There are 7 days in a week and 1,200 people.\n#### 8400") == \
        "7 days week 1,200 people.\n#### 8400"


def test_every_training_solution_keeps_its_numbers_and_gets_shorter():
    recs = [json.loads(line) for line in GSM8K.read_text().splitlines()[:2000]]
    long_words = short_words = 0
    for r in recs:
        short = compress_solution(r["answer"])
        shown = ANNOTATION.sub("", r["answer"])                   # the solution as read, calculator notes out
        assert set(numbers(shown)) <= set(numbers(short)), (r["answer"], short)        # every number survives
        assert short.splitlines()[-1] == r["answer"].strip().splitlines()[-1]      # "#### answer"
        long_words += word_count(r["answer"])
        short_words += word_count(short)
    assert short_words < 0.75 * long_words


def test_conditioned_split_keeps_pairs_together(tmp_path):
    src = tmp_path / "g.jsonl"
    src.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"{i}+1 = <<{i}+1={i + 1}>>{i + 1} apples\n#### {i + 1}"})
                           + "\n" for i in range(20)))
    split = split_documents([src], 0.1, conditioned=True, seed=3)
    assert len(split.train) == 36 and len(split.val) == 4
    for docs in (split.train, split.val):
        qs = Counter(d.splitlines()[1] for d in docs)
        assert set(qs.values()) == {2}                           # both versions of a record, in one split
    assert sum(d.startswith(LONG) for d in split.train) == sum(d.startswith(SHORT) for d in split.train) == 18
    assert split.train != sorted(split.train, key=lambda d: int(d.splitlines()[1][1:-1]))   # shuffled
    assert prompt("Q1?") == f"{SHORT}\nQ1?\n"
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"text": "no question here"}) + "\n")
    with pytest.raises(ConfigError, match="question"):
        split_documents([bad], 0.1, conditioned=True)


def test_cot_compress_command(tmp_path):
    src = tmp_path / "g.jsonl"
    src.write_text("\n".join(GSM8K.read_text().splitlines()[:50]) + "\n")
    out = tmp_path / "short.jsonl"
    res = subprocess.run([sys.executable, "-m", "afford", "zoo", "cot-compress", "--data", str(src), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    assert stats["records"] == 50 and 0.25 < stats["compression_rate"] < 0.9
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 50 and all(r["short_answer"] == compress_solution(r["answer"]) for r in rows)
    assert compress_file(src, tmp_path / "again.jsonl") == stats
