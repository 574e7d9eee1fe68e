"""Attention-FFN disaggregation over torch.distributed (gloo, real worker processes): the same greedy tokens
as one process for dense and MoE models, a worker that dies fails requests with a clear error, and no
process outlives its deployment."""
import subprocess
import sys
import time

import httpx
import pytest
import torch

from afford import LLM, SamplingParams
from afford.afd.protocol import AFDSpec, shard
from afford.afd.runner import AFDWorkerLost, free_port, split_batch
from afford.attention.backend import ForwardBatch
from afford.config import ConfigError
from tests.conftest import make_hf_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42], [100, 101, 102, 103, 104], [7, 8], [300, 301, 302, 303]]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, tokenizer_dir):
    return make_hf_model(tmp_path_factory.mktemp("afd_mixtral"), tokenizer_dir, "mixtral", seed=2, sharpen=3.0,
                         num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def qwen_moe_dir(tmp_path_factory, tokenizer_dir):
    """Qwen2-MoE: a shared expert (worker 1 runs it) and a dense layer between MoE layers."""
    return make_hf_model(tmp_path_factory.mktemp("afd_qwen_moe"), tokenizer_dir, "qwen2_moe", seed=2, sharpen=3.0,
                         num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                         shared_expert_intermediate_size=96, mlp_only_layers=[1], num_hidden_layers=3)


def exited(procs, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p.poll() is not None for p in procs):
            return True
        time.sleep(0.05)
    return False


def test_split_batch_is_contiguous_and_balanced():
    n = [1, 1, 1, 1, 1, 1, 1]
    b = ForwardBatch("decode", list(range(7)), [3] * 7, n, [[i] for i in range(7)], 16,
                     torch.arange(7), torch.full((7,), 3))
    groups = split_batch(b, 3)
    assert [e - s for _, s, e in groups] == [3, 2, 2]
    assert groups[0][1] == 0 and groups[-1][2] == 7
    assert all(a[2] == b_[1] for a, b_ in zip(groups, groups[1:]))          # contiguous, nothing lost
    assert [s for sub, _, _ in groups for s in sub.seq_ids] == list(range(7))
    one = ForwardBatch("prefill", [0], [0], [9], [[0]], 16, torch.arange(9), torch.arange(9))
    assert len(split_batch(one, 3)) == 1                                    # one sequence: one micro-batch
    assert [len(shard(10, i, 3)) for i in range(3)] == [4, 3, 3]


@pytest.mark.parametrize("which,spec,micro", [("dense", "attention=1,ffn=1", 1), ("dense", "attention=1,ffn=2", 3),
                                              ("mixtral", "attention=1,ffn=1", 1),
                                              ("qwen2_moe", "attention=1,ffn=2", 3)])
def test_afd_greedy_equals_one_process(which, spec, micro, llama_dir, mixtral_dir, qwen_moe_dir, monkeypatch):
    from afford.models import loader
    path = str({"dense": llama_dir, "mixtral": mixtral_dir, "qwen2_moe": qwen_moe_dir}[which])
    want = [o.token_ids for o in LLM(path, dtype="float32", native=False).generate(PROMPTS, GREEDY)]

    def whole_checkpoint(*a, **k):
        raise AssertionError("the AFD attention side read the whole checkpoint")
    monkeypatch.setattr(loader, "load_state_dict", whole_checkpoint)       # the workers are other processes
    with LLM(path, dtype="float32", afd=spec, micro_batches=micro, max_num_batched_tokens=16) as llm:
        got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        t = llm.engine.runner.timings()
        procs = llm.engine.runner.procs
        names = [n for n, _ in llm.engine.model.named_parameters()]
        native = llm.engine.runner.native_attn is not None          # attention halves as native calls
    assert got == want
    assert native
    # the attention side never loaded an FFN / expert weight (its workers hold them); MoE routers it keeps
    assert not [n for n in names if ".mlp." in n and not n.endswith(".mlp.gate.weight")]
    assert any(n.endswith(".mlp.gate.weight") for n in names) == (which != "dense")
    assert t["steps"] > 0 and all(a > 0 for a in t["attention_s"]) and all(f > 0 for f in t["ffn_s"])
    assert len(procs) == AFDSpec.parse(spec).ffn and exited(procs)


@pytest.mark.parametrize("which,spec,micro", [("dense", "attention=2,ffn=1", 2), ("qwen2_moe", "attention=3,ffn=2", 1)])
def test_data_parallel_attention_workers_equal_one_process(which, spec, micro, llama_dir, qwen_moe_dir):
    """attention=N>1: each sequence's K/V and attention on one of N attention workers (rank 0 and N - 1
    worker processes), every FFN worker answering all of them per layer in one product."""
    path = str({"dense": llama_dir, "qwen2_moe": qwen_moe_dir}[which])
    prompts = PROMPTS + [[9, 10, 11, 12], [200, 201]]
    want = [o.token_ids for o in LLM(path, dtype="float32", native=False).generate(prompts, GREEDY)]
    with LLM(path, dtype="float32", afd=spec, micro_batches=micro, max_num_batched_tokens=16,
             enable_prefix_caching=False) as llm:
        got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
        procs = llm.engine.runner.procs
        homes = sorted(llm.engine.runner.home.values())
        n = AFDSpec.parse(spec).attention
        assert set(homes) == set(range(n)) and max(map(homes.count, range(n))) - min(map(homes.count, range(n))) <= 1
        with pytest.raises(ConfigError, match="n=2 with afd attention=N>1"):
            llm.generate(["hello"], SamplingParams(max_tokens=2, n=2))
        assert llm.generate(PROMPTS[:1], GREEDY)[0].token_ids == want[0]       # still serving after the refusal
    assert got == want
    assert len(procs) == AFDSpec.parse(spec).world_size - 1 and exited(procs)


def test_an_emulated_link_delays_the_messages_and_changes_no_token(llama_dir, monkeypatch):
    """AFFORD_AFD_LINK (benchmarks/afd.py --link): every hidden-state message waits out the link's latency,
    sent from a wire thread while the sender goes on; the tokens stay the one-process ones, and a step
    of 2 layers x 2 directions x 1 micro-batch takes at least 4 latencies longer."""
    want = [o.token_ids for o in LLM(llama_dir, dtype="float32", native=False).generate(PROMPTS[:2], GREEDY)]
    from afford.afd.protocol import Link
    monkeypatch.setenv("AFFORD_AFD_LINK", "25,1000")
    assert Link.from_env().latency_s == 0.025
    with LLM(llama_dir, dtype="float32", afd="attention=1,ffn=1", micro_batches=1) as llm:
        eng = llm.engine
        got = [o.token_ids for o in llm.generate(PROMPTS[:2], GREEDY)]
        assert eng.runner.link is not None
        layers = eng.model_config.num_layers
        eng.add_request(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0))
        eng.step()
        t0 = time.perf_counter()
        eng.step()
        assert time.perf_counter() - t0 >= 2 * layers * 0.025
    assert got == want
    monkeypatch.setenv("AFFORD_AFD_LINK", "fast")
    with pytest.raises(ConfigError, match="LATENCY_MS,MB_PER_S"):
        Link.from_env()


def test_loading_without_the_ffn_reads_only_the_rest(qwen_moe_dir, monkeypatch):
    from afford.models import loader
    full = loader.load_model(qwen_moe_dir, device="cpu", dtype="float32")
    asked, real = [], loader.load_tensors

    def spy(path, cfg, names):
        asked.extend(names)
        return real(path, cfg, names)
    monkeypatch.setattr(loader, "load_tensors", spy)
    part = loader.load_model(qwen_moe_dir, device="cpu", dtype="float32", ffn=False)
    assert asked and not [n for n in asked if ".mlp." in n and not n.endswith(".mlp.gate.weight")]
    kept = dict(part.named_parameters())
    assert kept and all(".mlp." not in n or n.endswith(".mlp.gate.weight") for n in kept)
    for n, p in full.named_parameters():                    # what it kept is what the full load has
        if n in kept:
            assert torch.equal(kept[n], p)
    assert sum(p.numel() for p in kept.values()) < sum(p.numel() for p in full.parameters()) / 2


@pytest.mark.parametrize("spec,victim,role", [("attention=1,ffn=2", 1, "FFN worker"),
                                               ("attention=2,ffn=1", 0, "attention worker rank 1")])
def test_a_dead_worker_fails_requests_clearly_and_nothing_is_left(llama_dir, spec, victim, role):
    llm = LLM(str(llama_dir), dtype="float32", afd=spec, micro_batches=2, enable_prefix_caching=False)
    procs = llm.engine.runner.procs
    assert llm.generate([PROMPTS[0]], GREEDY)[0].token_ids
    procs[victim].kill()
    procs[victim].wait()
    with pytest.raises(AFDWorkerLost, match=f"{role}.*restart"):
        llm.generate(PROMPTS[:2], GREEDY)
    with pytest.raises(AFDWorkerLost):                       # at once: the deployment is known to be broken
        llm.generate([PROMPTS[1]], GREEDY)
    llm.close()
    assert exited(procs)


def test_server_stays_up_and_says_why_when_a_worker_dies(llama_dir):
    from tests.test_server import Server
    srv = Server(llama_dir, engine=dict(afd="attention=1,ffn=1", micro_batches=2))
    url = srv.url
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 8, "temperature": 0}
    procs = srv.llm.engine.runner.procs
    try:
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
        procs[0].kill()
        procs[0].wait()
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code in (500, 503) and "restart" in r.text
        h = httpx.get(url + "/health", timeout=10)
        assert h.status_code == 503 and "FFN worker" in h.json()["reason"]
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 503 and "cannot serve" in r.text
        assert srv.thread.is_alive() and srv.llm.thread.is_alive()
    finally:
        srv.stop()
        srv.llm.shutdown(timeout=1)
    assert exited(procs)


def test_an_idle_deployment_outlives_the_message_timeout(llama_dir):
    """Workers wait for the next step as long as it takes; only a message already due times out."""
    from afford.afd.protocol import AFDSpec
    from afford.afd.runner import AFDRunner
    from afford.core.runner import ModelRunner
    from afford.kv.paged import BlockPool
    from afford.models.loader import load_for_inference
    ref = ModelRunner(load_for_inference(llama_dir, "cpu", "float32"), BlockPool(8, 16), native=False)
    afd = AFDRunner(load_for_inference(llama_dir, "cpu", "float32"), BlockPool(8, 16), str(llama_dir),
                    AFDSpec(1, 1), 2, timeout_s=2.0, native=False)          # the Python path: bitwise equal
    try:
        time.sleep(3.0)                                        # longer than the group's timeout
        for r in (ref, afd):
            r.pool.prepare_write(0, 6)
        want = ref.forward([0], [0], [PROMPTS[0][:6]])
        assert torch.equal(afd.forward([0], [0], [PROMPTS[0][:6]]), want)
        assert afd.broken is None
    finally:
        afd.close()
    assert exited(afd.procs)


def test_workers_started_by_hand_join_by_address(llama_dir):
    port = free_port()
    wrong = subprocess.Popen([sys.executable, "-m", "afford", "afd-worker", "--model", str(llama_dir), "--dtype",
                              "bfloat16", "--address", f"127.0.0.1:{port}", "--rank", "1", "--world-size", "2"],
                             stderr=subprocess.PIPE, text=True)
    with pytest.raises(AFDWorkerLost, match="same model, --device and --dtype"):   # another dtype: refused
        LLM(str(llama_dir), dtype="float32", afd="attention=1,ffn=1", afd_address=f"127.0.0.1:{port}")
    assert wrong.wait(timeout=30) != 0 and "same model, --device and --dtype" in wrong.stderr.read()
    port = free_port()                                         # a worker that guessed another shape: refused
    wrong = subprocess.Popen([sys.executable, "-m", "afford", "afd-worker", "--model", str(llama_dir), "--address",
                              f"127.0.0.1:{port}", "--rank", "1", "--world-size", "2", "--attention", "2"],
                             stderr=subprocess.PIPE, text=True)
    with pytest.raises(AFDWorkerLost, match="--attention 2, but rank 0 runs attention=1"):
        LLM(str(llama_dir), dtype="float32", afd="attention=1,ffn=1", afd_address=f"127.0.0.1:{port}")
    assert wrong.wait(timeout=30) != 0
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "afford", "afd-worker", "--model", str(llama_dir),
                               "--address", f"127.0.0.1:{port}", "--rank", "1", "--world-size", "2",
                               "--threads", "1"])
    try:
        want = [o.token_ids for o in LLM(str(llama_dir), dtype="float32", native=False).generate(PROMPTS[:3], GREEDY)]
        with LLM(str(llama_dir), dtype="float32", afd="attention=1,ffn=1", afd_address=f"127.0.0.1:{port}") as llm:
            assert [o.token_ids for o in llm.generate(PROMPTS[:3], GREEDY)] == want
        assert worker.wait(timeout=20) == 0                   # STOP: a clean exit
    finally:
        worker.kill()


@pytest.mark.parametrize("kw,msg", [(dict(afd="attention=9,ffn=1"), "at most 8"),
                                    (dict(afd="attention=2,ffn=1"), "no-enable-prefix-caching"),
                                    (dict(afd="ffn=0"), "attention=N,ffn=M"),
                                    (dict(afd="gpus=2"), "attention=N,ffn=M"),
                                    (dict(afd="ffn=1", quantization="int8"), "not implemented"),
                                    (dict(afd_address="127.0.0.1:1"), "afd deployments"),
                                    (dict(afd="ffn=1", micro_batches=0), "micro_batches")])
def test_bad_afd_settings_say_what_to_do(llama_dir, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        LLM(str(llama_dir), dtype="float32", **kw)


def test_torchrun_launches_the_attention_and_ffn_ranks(llama_dir):
    """`torchrun -m afford generate --afd ...`: rank 0 generates, ranks 1..M serve the FFN, all exit 0."""
    import os
    args = ["generate", "To be", "--model", str(llama_dir), "--max-tokens", "12", "--temperature", "0",
            "--dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plain = subprocess.run([sys.executable, "-m", "afford", *args], capture_output=True, text=True, timeout=120)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                          "-m", "afford", *args, "--afd", "attention=1,ffn=2"], capture_output=True, text=True,
                         timeout=180, env=env)
    assert plain.returncode == 0 and run.returncode == 0, run.stderr[-2000:]
    text = plain.stdout.split("  [length]")[0]
    assert text.strip() and text in run.stdout



def test_torchrun_with_the_wrong_process_count_says_so(llama_dir, monkeypatch, capsys):
    from afford.cli import main
    for k, v in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    assert main(["generate", "To be", "--model", str(llama_dir), "--afd", "attention=1,ffn=2"]) != 0
    assert "--nproc-per-node" in capsys.readouterr().err
