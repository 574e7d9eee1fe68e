"""`afford bench --suite quick` on a tiny random pair: every file with its fields, the report, resuming."""
from __future__ import annotations

import json

import pytest

from afford.cli import main
from tests.conftest import ROOT, make_hf_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_dir, llama_dir):
    draft = make_hf_model(tmp_path_factory.mktemp("bench_draft"), tokenizer_dir, "llama", seed=1, hidden_size=32,
                          num_hidden_layers=1, intermediate_size=64)
    return llama_dir, draft


def test_bench_quick_writes_every_file_and_resumes(pair, tmp_path, capsys):
    target, draft = pair
    args = ["bench", "--suite", "quick", "--model", str(target), "--draft", str(draft), "--out", str(tmp_path),
            "--max-tokens", "6", "--categories", "qa,gsm8k", "--load", "1,2", "--data", str(ROOT / "data")]
    assert main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    sm = json.loads((tmp_path / "summary.json").read_text())
    arms = sm["arms"]
    for a in ("afford plain", "afford ngram k=4", "afford int8", "afford int4", "afford draft k=4",
              "afford goodput k<=4", "afford cascade tau=2.5 (lossy)", "afford sparse b=4 (lossy)", "hf plain",
              "hf prompt lookup", "hf assisted"):
        assert a in arms, a
        assert arms[a]["tokens"] == 6 * 2 and arms[a]["tokens_per_s"] > 0
        assert set(arms[a]["by_category"]) == {"qa", "gsm8k"}
    for a in ("afford plain", "afford ngram k=4", "afford draft k=4", "afford goodput k<=4", "hf plain"):
        assert arms[a]["agreement"] == 1.0, a          # lossless levers and transformers: the plain greedy tokens
        assert a == "hf plain" or arms[a]["usd_per_1m"] > 0
    assert arms["afford draft k=4"]["acceptance_by_position"] and arms["afford plain"]["vs_afford_plain"] == 1
    assert arms["hf plain"]["vs_hf_plain"] == 1 and arms["hf plain"]["usd_per_1m"] is None
    assert set(sm["load"]) == {"afford plain", "afford goodput k<=4"}
    assert set(sm["load"]["afford plain"]) == {"1", "2"}
    assert "no document folder" in sm["skipped"]["afford grad (lossy)"]
    for f in ("report.md", "tokens_per_s_by_category.png", "acceptance_by_position.png", "cost_vs_quality.png",
              "latency_vs_load.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    report = (tmp_path / "report.md").read_text()
    assert "| afford draft k=4 |" in report and "Latency under load" in report
    assert res["ran"] == 11 * 2
    cells = res["cells"]
    assert main(args) == 0                                # resumed: nothing left to run
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["ran"] == 0 and again["cells"] == cells
    assert main(args[:-6] + ["--categories", "qa", "--data", str(ROOT / "data")]) == 2     # other settings
    assert "other settings" in capsys.readouterr().err


def test_bench_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--load", "1,x", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--cost-hardware", "tpu9", "--out", str(tmp_path)]) == 2
    assert "unknown hardware" in capsys.readouterr().err
    assert main(["bench", "--categories", "qa,poetry", "--out", str(tmp_path)]) == 2
    assert "unknown categories poetry" in capsys.readouterr().err
