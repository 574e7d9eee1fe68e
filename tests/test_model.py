"""Our transformer against transformers' own classes: same weights, same logits (fp32)."""
import pytest
import torch
from conftest import make_hf_model

from afford.config import ConfigError, ModelConfig
from afford.core.runner import ModelRunner
from afford.kv.paged import BlockPool
from afford.models.loader import load_model

ROPES = {
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
    "mistral": dict(tie_word_embeddings=True),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_logits_match_transformers_prefill_and_every_decode_step(arch, tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM
    path = make_hf_model(tmp_path, tokenizer_dir, arch, **ROPES[arch])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path, device="cpu", dtype="float32")
    ids = torch.randint(2, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits[0]                                             # (40, V)
    assert (ours(ids)[0] - ref).abs().max() <= 1e-4                         # dense path
    pool = BlockPool(16, 4)
    runner = ModelRunner(ours, pool)
    pool.prepare_write(0, 40)                   # the scheduler's job: the runner only reads tables
    pre = runner.forward([0], [0], [ids[0, :24].tolist()], [list(range(24))])   # prefill, all rows
    assert (pre - ref[:24]).abs().max() <= 1e-4
    for t in range(24, 40):                                                 # every decode step
        step = runner.forward([0], [t], [[int(ids[0, t])]])
        assert (step[0] - ref[t]).abs().max() <= 1e-4, f"decode step at position {t}"
    pool.free(0)
    pool.check()
    assert pool.num_free == 16


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ConfigError, match="LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM"):
        ModelConfig.from_dir(tmp_path)


def test_missing_folder_and_missing_weights(tmp_path, tokenizer_dir):
    from afford import LLM
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    path = make_hf_model(tmp_path / "m", tokenizer_dir)
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ConfigError, match="safetensors"):
        LLM(str(path))


def test_sharded_checkpoint_loads(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM
    path = make_hf_model(tmp_path / "a", tokenizer_dir)
    hf = AutoModelForCausalLM.from_pretrained(path)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = torch.randint(2, 512, (1, 12))
    a = load_model(path, "cpu", "float32")(ids)
    b = load_model(tmp_path / "sharded", "cpu", "float32")(ids)
    assert torch.equal(a, b)
