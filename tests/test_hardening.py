"""Bad command lines and bad sampling values: a one-line error and a non-zero exit, never a traceback, a
silent default or an overwritten file (issue #21's audit, one regression test each)."""
import pytest

from afford import SamplingParams
from afford.cli import main
from afford.config import ConfigError


def run_cli(argv, capsys):
    """(exit code, stderr) of `afford ARGV`: argparse's usage errors exit 2 through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,says", [
    (["cost", "--model", "step3", "--context", "0"], "--context"),
    (["cost", "--model", "step3", "--context", str(1 << 30)], "--context"),
    (["cost", "afd", "--model", "step3", "--context", "0"], "--context"),
    (["cost", "afd", "--model", "step3", "--network-gbps", "0"], "--network-gbps"),
    (["cost", "--model", "step3", "--hardware", ""], "no hardware"),
    (["cost", "--model", "step3", "--hardware", "h100", "--price", "h100=-1"], "--price"),
    (["cost", "--model", "step3", "--hardware", "h100", "--price", "h100=nan"], "--price"),
    (["cost", "--model", "step3", "--hardware", "h100", "--price", "h100=inf"], "--price"),
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--max-queue", "0"], "--max-queue"),
    (["generate", "hi", "--max-model-len", "0"], "max_model_len"),
    (["quantize", "--model", "default", "--bits", "4", "--group", "0", "--out", "x"], "--group"),
    (["quantize", "--model", "default", "--bits", "4", "--tau", "-1", "--out", "x"], "--tau"),
])
def test_bad_flags_are_one_line_errors(argv, says, capsys):
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and says in err, err


def test_plot_into_a_missing_folder_and_quantize_onto_existing_output(tmp_path, capsys):
    code, err = run_cli(["cost", "--model", "step3", "--hardware", "h100", "--plot", str(tmp_path / "no" / "p.png")],
                        capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    for existing in (tmp_path / "file", tmp_path / "folder"):
        if existing.name == "file":
            existing.write_text("keep me")
        else:
            existing.mkdir()
            (existing / "config.json").write_text("{}")
        code, err = run_cli(["quantize", "--model", "default", "--bits", "8", "--out", str(existing)], capsys)
        assert code == 2 and "already exists" in err
    assert (tmp_path / "file").read_text() == "keep me" and (tmp_path / "folder" / "config.json").read_text() == "{}"


def test_device_and_model_folder_errors(tmp_path, capsys):
    import torch
    if not torch.cuda.is_available():
        code, err = run_cli(["generate", "hi", "--device", "cuda"], capsys)
        assert code == 2 and "CUDA" in err and "Traceback" not in err
    code, err = run_cli(["generate", "hi", "--model", str(tmp_path)], capsys)        # an empty folder
    assert code == 2 and "no config.json" in err


def test_seed_range_is_checked():
    SamplingParams(seed=(1 << 64) - 1)
    SamplingParams(seed=-(1 << 63))
    for bad in (dict(seed=1 << 70), dict(seed=(1 << 64) - 1, n=2), dict(seed=-(1 << 63) - 1)):
        with pytest.raises(ConfigError, match="seed"):
            SamplingParams(**bad)


def test_abort_mid_prefill_frees_everything(random_pair):
    from afford import LLM
    llm = LLM(str(random_pair[0]), max_num_batched_tokens=16)
    eng = llm.engine
    seq = eng.add_request(list(range(2, 150)), SamplingParams(max_tokens=8), request_id="long")
    eng.step()
    assert seq.in_prefill and 0 < seq.num_computed < 148             # one chunk of a long prompt done
    eng.abort("long")
    assert not eng.has_unfinished() and eng.pool.num_used == 0 and eng.stats.aborted == 1
    eng.pool.check()


def test_abort_stops_every_choice_of_a_forked_request(random_pair):
    from afford import LLM
    llm = LLM(str(random_pair[0]))
    eng = llm.engine
    eng.add_request([5, 6, 7, 8], SamplingParams(max_tokens=100, temperature=1.0, n=4, ignore_eos=True),
                    request_id="r")
    for _ in range(3):
        eng.step()
    assert len(eng.scheduler.running) == 4              # the choices were forked after the prefill
    eng.abort("r")
    assert not eng.has_unfinished() and eng.pool.num_used == 0


def test_goodput_speculation_starts_with_a_short_context(random_pair):
    from afford import LLM
    target, draft = map(str, random_pair)
    llm = LLM(target, draft=draft, speculation="goodput", max_model_len=64)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=40, temperature=0))[0]
    assert len(out.token_ids) >= 1
