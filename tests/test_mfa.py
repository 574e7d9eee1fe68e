"""MFA (Step-3 multi-matrix factorization attention) in our transformer."""
import torch

from afford import LLM, SamplingParams
from afford.core.runner import ModelRunner
from afford.kv.paged import BlockPool
from afford.models.loader import load_model, save_model
from afford.models.transformer import Transformer
from afford.zoo.train import from_preset, init_weights, model_config


def mfa_model(tmp_path, tokenizer_dir):
    tc = from_preset("small-mfa", out=str(tmp_path), data=("x",), tokenizer=str(tokenizer_dir), steps=1)
    torch.manual_seed(0)
    m = Transformer(model_config(tc, 512, 0))
    init_weights(m, std=0.1)
    save_model(m, tmp_path)
    for f in tokenizer_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def test_mfa_cache_holds_two_head_dims_and_matches_dense(tmp_path, tokenizer_dir):
    path = mfa_model(tmp_path, tokenizer_dir)
    m = load_model(path, "cpu", "float32")
    cfg = m.cfg
    assert cfg.attention == "mfa" and cfg.num_kv_heads == 1
    assert cfg.kv_values_per_token == 2 * cfg.head_dim
    ids = torch.randint(2, 512, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = m(ids)[0]                                                  # no cache
    runner = ModelRunner(m, BlockPool(8, 16))
    for k, v in runner.kv:                                                 # (slots, 1 head, head_dim)
        assert k.shape[1:] == (1, cfg.head_dim) and v.shape[1:] == (1, cfg.head_dim)
    runner.pool.prepare_write(0, 30)            # the scheduler's job: the runner only reads tables
    pre = runner.forward([0], [0], [ids[0, :20].tolist()], [list(range(20))])
    assert (pre - dense[:20]).abs().max() <= 1e-4
    for t in range(20, 30):
        assert (runner.forward([0], [t], [[int(ids[0, t])]])[0] - dense[t]).abs().max() <= 1e-4


def test_mfa_generates_through_llm_and_packs_like_unpacked(tmp_path, tokenizer_dir):
    path = mfa_model(tmp_path, tokenizer_dir)
    llm = LLM(str(path), dtype="float32")
    out = llm.generate([5, 6, 7, 8], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    m = load_model(path, "cpu", "float32")
    ids = [5, 6, 7, 8]
    with torch.no_grad():
        for _ in range(16):
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    assert out.token_ids == ids[4:]


def mfa_attention_by_hand(a, x, theta: float, eps: float) -> torch.Tensor:
    """MFA written out from its definition, sharing nothing with the model's code: x (T, hidden) ->
    (T, hidden). Query: q_b(RMSNorm(q_a(x))) for H heads; ONE key head and ONE value head for all of
    them; rotate-half RoPE at positions 0..T-1; causal softmax(q k / sqrt(D)) v; o_proj."""
    T, H, D = x.shape[0], a.h, a.d
    qa = x @ a.q_a_proj.weight.T
    qa = qa / torch.sqrt(qa.pow(2).mean(-1, keepdim=True) + eps) * a.q_norm.weight
    q = (qa @ a.q_b_proj.weight.T).view(T, H, D)
    k = (x @ a.k_proj.weight.T).view(T, D)
    v = (x @ a.v_proj.weight.T).view(T, D)
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]                # (T, D/2)
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()

    def rope(t):                                                                   # t (T, ..., D)
        c = cos.view(T, *[1] * (t.dim() - 2), D // 2)
        s_ = sin.view(T, *[1] * (t.dim() - 2), D // 2)
        a1, a2 = t[..., :D // 2], t[..., D // 2:]
        return torch.cat([a1 * c - a2 * s_, a2 * c + a1 * s_], dim=-1)
    q, k = rope(q), rope(k)
    out = torch.zeros(T, H, D)
    for i in range(T):
        for h in range(H):
            w = torch.softmax((k[:i + 1] @ q[i, h]) / D ** 0.5, dim=0)             # over positions 0..i
            out[i, h] = w @ v[:i + 1]
    return out.reshape(T, H * D) @ a.o_proj.weight.T


def test_mfa_attention_equals_the_written_out_formula(tmp_path, tokenizer_dir):
    path = mfa_model(tmp_path, tokenizer_dir)
    m = load_model(path, "cpu", "float32")
    cfg = m.cfg
    a = m.model.layers[1].self_attn
    x = torch.randn(12, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(12)
    with torch.no_grad():
        ours = a(x[None], m.rope_cos[pos].unsqueeze(-2)[None], m.rope_sin[pos].unsqueeze(-2)[None], None, 1)[0]
        ref = mfa_attention_by_hand(a, x, cfg.rope.theta, cfg.rms_norm_eps)
    assert (ours - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))

