"""Mixture of experts in our transformer: Mixtral and Qwen2-MoE checkpoints load by weight name and give
transformers' logits; the engine decodes them; the zoo trains a small MoE that transformers loads back."""
import json

import pytest
import torch

from afford import LLM, SamplingParams
from afford.config import ConfigError
from afford.models.loader import load_for_inference, load_model
from afford.models.transformer import MoE
from tests.conftest import ROOT, make_hf_model

MOE_ARGS = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
            "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                              shared_expert_intermediate_size=96, mlp_only_layers=[1], num_hidden_layers=3)}


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe_dir(request, tmp_path_factory, tokenizer_dir):
    return request.param, make_hf_model(tmp_path_factory.mktemp(request.param), tokenizer_dir, request.param,
                                        seed=1, sharpen=3.0, **MOE_ARGS[request.param])


def test_moe_logits_equal_transformers(moe_dir):
    from transformers import AutoModelForCausalLM
    arch, path = moe_dir
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.randint(2, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, packed = load_model(path, "cpu", "float32"), load_for_inference(path, "cpu", "float32")
    moes = [m for m in ours.modules() if isinstance(m, MoE)]
    assert isinstance(ours.model.layers[1].mlp, MoE) == (arch == "mixtral")   # qwen2_moe: layer 1 stays dense
    assert (moes[0].shared_expert is not None) == (arch == "qwen2_moe")
    with torch.no_grad():
        want = ref(ids).logits
        assert torch.allclose(ours(ids), want, atol=1e-4, rtol=0)
        assert torch.allclose(packed(ids), want, atol=1e-4, rtol=0)


def test_moe_engine_greedy_equals_reference_decoding(moe_dir):
    from transformers import AutoModelForCausalLM
    _, path = moe_dir
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42]]
    llm = LLM(str(path), dtype="float32")
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ids = list(p)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
        assert o.token_ids == ids[len(p):]
    # a MoE step counts the FLOPs of the experts a token runs through, not of all of them
    cfg = llm.engine.model_config
    assert cfg.active_parameters < cfg.num_parameters


def test_zoo_trains_a_mixtral_that_transformers_loads(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    from afford.zoo.train import TrainConfig, train
    data = str(ROOT / "data" / "tinyshakespeare" / "input.txt")
    tc = TrainConfig(out=str(tmp_path / "moe"), data=(data,), tokenizer=str(tokenizer_dir), layers=2, hidden=64,
                     heads=4, kv_heads=2, intermediate=96, experts=4, experts_per_tok=2, seq_len=64, batch_size=4,
                     steps=30, eval_every=1000, threads=2, bf16=False)
    res = train(tc, log=lambda *_: None)
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == 4
    assert res["val_loss"] < 6.0                              # ln(512) = 6.24: it learned something
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"), dtype=torch.float32).eval()
    ids = torch.randint(2, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "moe", "cpu", "float32")(ids), ref(ids).logits, atol=1e-4)
    with pytest.raises(ConfigError, match="K <= E"):
        TrainConfig(out="x", data=("x",), tokenizer="x", steps=1, experts=2, experts_per_tok=3)
