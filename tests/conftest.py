"""Fixtures: tiny random Llama / Qwen2 / Mistral checkpoints made with transformers' own classes and
save_pretrained, with a small byte-level BPE trained on the bundled data. Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from afford.zoo.data import read_documents
    from afford.zoo.tokenizer import train_tokenizer
    out = tmp_path_factory.mktemp("tok")
    text = read_documents(ROOT / "data" / "tinyshakespeare" / "input.txt")[0][:200_000]
    train_tokenizer([text], 512, out)
    return out


def make_hf_model(out: Path, tokenizer_dir: Path, arch: str = "llama", seed: int = 0, sharpen: float = 4.0,
                  **kw) -> Path:
    import shutil

    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
    )
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM), "mixtral": (MixtralConfig, MixtralForCausalLM),
               "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM)}
    cfg_cls, model_cls = classes[arch]
    args = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=512, max_position_embeddings=512, eos_token_id=0,
                bos_token_id=0, pad_token_id=1)
    args.update(kw)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**args)).eval()
    # random init is close to uniform; sharpen it so greedy decoding is not a sea of near-ties
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(sharpen)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("llama"), tokenizer_dir, "llama")


@pytest.fixture(scope="session")
def random_pair(tmp_path_factory, tokenizer_dir):
    """A random 2-layer Llama target and a 1-layer draft with its tokenizer."""
    root = tmp_path_factory.mktemp("pair")
    target = make_hf_model(root / "t", tokenizer_dir, seed=3)
    draft = make_hf_model(root / "d", tokenizer_dir, seed=3, num_hidden_layers=1)
    return target, draft
