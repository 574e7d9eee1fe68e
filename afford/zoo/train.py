"""`afford zoo train` and `afford zoo distill`: train a Llama-architecture model from scratch (or a
draft on a teacher's distributions) and write a Hugging Face folder both afford and transformers load.

AdamW, linear warm-up then cosine decay, gradient clipping, periodic validation loss/perplexity, a tqdm
bar with tokens/s and ETA, resumable checkpoints (`ckpt.pt`), and Ctrl-C leaves a usable checkpoint.
The schedule runs on progress = max(step / steps, elapsed / budget), so `--minutes` and `--steps`
both give a full warm-up-and-decay.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from afford.config import ConfigError, ModelConfig, RopeConfig
from afford.models.loader import load_model, save_model
from afford.models.transformer import MoE, Transformer

# name -> (layers, hidden, heads, kv_heads, intermediate[, q_rank for MFA])
PRESETS = {
    "target": (6, 256, 4, 2, 704),
    "draft": (2, 128, 2, 1, 352),
    "target-large": (6, 384, 6, 2, 1056),     # 2.05x the target's parameters, the same tokenizer (S2D's second target)
    "sorted-draft": (4, 128, 2, 1, 352),      # S2D: with --exits 1,2,4, one draft for both targets
    "tiny": (2, 64, 4, 2, 128),
    # equal-parameter pair for the MFA vs GQA comparison (benchmarks/mfa_vs_gqa.py)
    "small-gqa": (4, 192, 6, 2, 512),
    "small-mfa": (4, 192, 6, 1, 512, 128),
}


@dataclass(frozen=True)
class TrainConfig:
    out: str
    data: tuple[str, ...]
    tokenizer: str
    layers: int = 6
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 704
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0     # a longer context wants a larger base (e.g. 160000 at 4096 positions)
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    steps: int | None = None
    minutes: float | None = None
    eval_every: int = 200
    eval_batches: int = 8
    val_fraction: float = 0.05
    seed: int = 0
    device: str = "auto"
    teachers: tuple[str, ...] = ()  # distillation: KL to these models' softmax (one or several targets)
    teacher_mix: str = "average"    # several teachers: "average" their distributions, or "alternate" per batch
    temperature: float = 1.0        # distillation temperature
    exits: tuple[int, ...] = ()     # S2D multi-exit: the loss is the mean over these exits (the last = layers)
    threads: int | None = None
    q_rank: int = 0                 # > 0: MFA attention (low-rank query, one shared K/V head)
    experts: int = 0                # > 0: a Mixtral-style MoE, `intermediate` per expert
    experts_per_tok: int = 2        # MoE: top-k experts per token
    router_aux_coef: float = 0.01   # MoE: weight of the load-balancing loss
    init: str | None = None         # start from these weights (an HF folder of the same shape)
    bf16: bool | None = None        # bf16 autocast (weights stay fp32); None: where bf16 matmuls are fast
                                    # (CUDA, AVX-512 CPUs: ~2x); on an AVX2-only CPU they are >10x slower
    conditioned: bool = False       # C3oT: .jsonl records twice, long and short chain under condition prefixes
    sparse_budget: int = 0          # > 0: attention in the sparse backend's block pattern (sparse fine-tuning)
    sparse_block: int = 64          # ... its block size in tokens

    def __post_init__(self):
        if self.steps is None and self.minutes is None:
            raise ConfigError("give --steps or --minutes")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ConfigError("hidden must divide by heads and heads by kv_heads")
        if self.experts and not 0 < self.experts_per_tok <= self.experts:
            raise ConfigError(f"--moe E,K needs 0 < K <= E, got {self.experts},{self.experts_per_tok}")
        if self.experts and self.q_rank:
            raise ConfigError("--moe with --q-rank (an MFA MoE) has no Hugging Face architecture to save as; pick one")
        if self.teacher_mix not in ("average", "alternate"):
            raise ConfigError(f"teacher mix must be 'average' or 'alternate', got {self.teacher_mix!r}")
        if self.exits and (list(self.exits) != sorted(set(self.exits)) or self.exits[0] < 1
                           or self.exits[-1] != self.layers):
            raise ConfigError(f"--exits {','.join(map(str, self.exits))} must be increasing layer counts ending at "
                              f"the model's {self.layers} layers (e.g. --exits 1,2,{self.layers})")
        if self.sparse_budget and (self.sparse_budget < 4 or self.sparse_block < 1 or self.q_rank):
            raise ConfigError("--sparse-budget needs >= 4 blocks (sink + 2 local + 1) of --sparse-block >= 1 tokens, "
                              "and GQA attention (not --q-rank)")
        if self.seq_len > self.max_position_embeddings:
            raise ConfigError(f"seq_len {self.seq_len} exceeds the model's {self.max_position_embeddings} positions: "
                              f"raise --max-positions")


def model_config(tc: TrainConfig, vocab_size: int, eos_id: int) -> ModelConfig:
    mfa = tc.q_rank > 0
    if mfa and tc.kv_heads != 1:
        raise ConfigError("MFA shares one K/V head: use --kv-heads 1 with --q-rank")
    return ModelConfig(
        architecture="AffordMFAForCausalLM" if mfa else "MixtralForCausalLM" if tc.experts else "LlamaForCausalLM",
        vocab_size=vocab_size, hidden_size=tc.hidden,
        intermediate_size=tc.intermediate, num_layers=tc.layers, num_heads=tc.heads,
        num_kv_heads=tc.kv_heads, head_dim=tc.hidden // tc.heads,
        max_position_embeddings=tc.max_position_embeddings, rms_norm_eps=1e-5, rope=RopeConfig(theta=tc.rope_theta),
        tie_word_embeddings=True, bos_token_id=eos_id, eos_token_ids=(eos_id,), torch_dtype="float32",
        attention="mfa" if mfa else "gqa", q_rank=tc.q_rank, num_experts=tc.experts,
        num_experts_per_tok=tc.experts_per_tok if tc.experts else 0, moe_intermediate_size=tc.intermediate if tc.experts else 0,
        exits=tc.exits)


def encode_corpus(tok, docs: list[str]) -> torch.Tensor:
    """All documents as one id stream, each followed by EOS: (N,) int64."""
    eos = tok.eos_token_id
    ids: list[int] = []
    for enc in tok(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    if len(stream) <= seq_len + 1:
        raise ConfigError(f"the corpus has {len(stream)} tokens, fewer than one window of {seq_len + 1}")
    while True:
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
        win = torch.stack([stream[s: s + seq_len + 1] for s in starts.tolist()])   # (B, T+1)
        yield win[:, :-1], win[:, 1:]


def use_bf16(tc: TrainConfig, device: torch.device) -> bool:
    if tc.bf16 is not None:
        return tc.bf16
    return device.type == "cuda" or "AVX512" in torch.backends.cpu.get_cpu_capability()


def loss_fn(model: Transformer, x, y, teachers: list[Transformer] | Transformer | None, tc: TrainConfig,
            step: int = 0) -> torch.Tensor:
    """Cross-entropy, or with teachers the KL to their softmax (averaged, or one teacher per batch in turn);
    a multi-exit model's loss is the mean over its exits (S2D's sorted training: every exit shares the
    final norm and LM head)."""
    teachers = [] if teachers is None else [teachers] if isinstance(teachers, Transformer) else list(teachers)
    temperature = tc.temperature
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_bf16(tc, x.device)):
        exits = [lg.float() for lg in model.exit_logits(x)]                      # each (B, T, V)
        aux = tc.router_aux_coef * sum(m.aux_loss for m in model.modules() if isinstance(m, MoE)) \
            if tc.experts else 0.0
        if not teachers:
            return sum(F.cross_entropy(lg.flatten(0, 1), y.flatten()) for lg in exits) / len(exits) + aux
        with torch.no_grad():
            used = [teachers[step % len(teachers)]] if tc.teacher_mix == "alternate" else teachers
            t_logp = [F.log_softmax(t(x).float() / temperature, dim=-1) for t in used]      # each (B, T, V)
            # the mixture's log-probabilities: log(mean_t p_t)
            t_logp = t_logp[0] if len(t_logp) == 1 else \
                torch.logsumexp(torch.stack(t_logp), dim=0) - math.log(len(t_logp))
    kl = [F.kl_div(F.log_softmax(lg / temperature, dim=-1).flatten(0, 1), t_logp.flatten(0, 1), log_target=True,
                   reduction="batchmean") for lg in exits]
    return sum(kl) / len(kl) * temperature ** 2 + aux


@torch.no_grad()
def evaluate(model, val: torch.Tensor, tc: TrainConfig, device, per_exit: bool = False):
    """Mean next-token cross-entropy over the first eval_batches windows of the held-out stream (of the last
    exit; per_exit: a list, one per exit of a multi-exit model)."""
    model.eval()
    n = min(tc.eval_batches * tc.batch_size, (len(val) - 1) // tc.seq_len)
    if n < 1:
        return [float("nan")] * len(model.cfg.exits or (1,)) if per_exit else float("nan")
    win = val[: n * tc.seq_len + 1]
    x = win[:-1].view(n, tc.seq_len).to(device)                                   # (n, T)
    y = win[1:].view(n, tc.seq_len).to(device)
    losses = [[F.cross_entropy(lg.flatten(0, 1).float(), y[i:i + tc.batch_size].flatten())
               for lg in (model.exit_logits(x[i:i + tc.batch_size]) if per_exit else [model(x[i:i + tc.batch_size])])]
              for i in range(0, n, tc.batch_size)]                            # (batches, exits)
    model.train()
    means = [float(v) for v in torch.tensor(losses).mean(0)]
    return means if per_exit else means[0]


def lr_at(tc: TrainConfig, step: int, progress: float) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * cos)


def train(tc: TrainConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from afford.zoo.data import split_documents

    if tc.threads:
        torch.set_num_threads(tc.threads)
    out = Path(tc.out)
    ckpt_path = out / "ckpt.pt"
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise ConfigError(f"{out} exists; pass --overwrite to replace it or --resume to continue")
    if resume and not ckpt_path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
    device = torch.device("cuda" if tc.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if tc.device == "auto" else tc.device))
    torch.manual_seed(tc.seed)
    try:
        tok = AutoTokenizer.from_pretrained(tc.tokenizer)
    except Exception as e:
        raise ConfigError(f"cannot load a tokenizer from {tc.tokenizer!r} ({e}); make one with `afford zoo tokenizer`") from e
    split = split_documents(list(tc.data), tc.val_fraction, tc.conditioned, tc.seed)
    train_ids, val_ids = encode_corpus(tok, split.train), encode_corpus(tok, split.val)
    teachers = [load_teacher(t, tok, device) for t in tc.teachers]
    mcfg = model_config(tc, len(tok), tok.eos_token_id)
    model = Transformer(mcfg).to(device)
    init_weights(model)
    if tc.sparse_budget:                  # train in the pattern the sparse backend decodes with
        for m in model.modules():
            if hasattr(m, "train_sparse"):
                m.train_sparse = (tc.sparse_budget, tc.sparse_block)
    if tc.init and not resume:
        init_from(model, load_model(tc.init, device=str(device), dtype="float32"), tc.init)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    step, elapsed = 0, 0.0
    if resume:
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if not same_shape(ck["model_config"], mcfg):
            raise ConfigError(f"{ckpt_path} was trained with another model shape; resume with the same flags")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        step, elapsed = ck["step"], ck["elapsed"]
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    gen = torch.Generator().manual_seed(tc.seed + step)
    data = batches(train_ids, tc.batch_size, tc.seq_len, gen)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model {n_params / 1e6:.2f} M params | train {len(train_ids):,} tokens | val {len(val_ids):,} tokens")
    history: list[dict] = []

    def save(tag: str):
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step, "elapsed": elapsed,
                    "model_config": asdict(mcfg), "train_config": asdict(tc)}, ckpt_path)
        save_model(model, out, dtype=torch.float32)
        log(f"[{tag}] saved {out} at step {step}")

    budget = tc.minutes * 60 if tc.minutes else None
    bar = tqdm(total=tc.steps, initial=step, unit="step", dynamic_ncols=True, mininterval=2.0)
    model.train()
    t0 = time.time() - elapsed
    try:
        while True:
            elapsed = time.time() - t0
            progress = max(step / tc.steps if tc.steps else 0.0, elapsed / budget if budget else 0.0)
            if progress >= 1.0:
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(tc, step, progress)
            x, y = next(data)
            loss = loss_fn(model, x.to(device), y.to(device), teachers, tc, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            step += 1
            tps = step * tc.batch_size * tc.seq_len / max(time.time() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tps:,.0f}", lr=f"{g['lr']:.1e}")
            if step % tc.eval_every == 0:
                vl = evaluate(model, val_ids, tc, device)
                history.append({"step": step, "train_loss": loss.item(), "val_loss": vl, "val_ppl": math.exp(vl),
                                "elapsed_s": round(time.time() - t0, 1)})
                bar.write(f"step {step}: train {loss.item():.3f} | val {vl:.3f} (ppl {math.exp(vl):.1f}) | {tps:,.0f} tok/s")
                save("eval")
    except KeyboardInterrupt:
        bar.write("interrupted: saving a usable checkpoint")
    finally:
        bar.close()
        elapsed = time.time() - t0
    vl = evaluate(model, val_ids, tc, device)
    save("final")
    result = {"steps": step, "elapsed_s": round(elapsed, 1), "val_loss": vl, "val_ppl": math.exp(vl),
              "params": n_params, "history": history}
    if mcfg.exits:
        result["exit_val_loss"] = dict(zip(mcfg.exits, evaluate(model, val_ids, tc, device, per_exit=True)))
        log("val loss per exit: " + ", ".join(f"{e} layers {v:.3f}" for e, v in result["exit_val_loss"].items()))
    log(f"done: {step} steps in {elapsed / 60:.1f} min, val loss {vl:.3f} (ppl {math.exp(vl):.1f})")
    return result


def same_shape(saved: dict, mcfg: ModelConfig) -> bool:
    """A checkpoint's model config is this one (fields added to ModelConfig since it was written count as
    their defaults)."""
    from dataclasses import MISSING, fields
    now = asdict(mcfg)
    return all(saved.get(f.name, f.default) == now[f.name] and (f.name in saved or f.default is not MISSING)
               for f in fields(ModelConfig))


def init_from(model: Transformer, start: Transformer, name: str) -> None:
    """Start from `start`'s weights: the same shape; a shallower model of the same width, which grows:
    its layers first, each new layer starting as the identity (attention and MLP outputs zero), so the grown
    model computes what `start` does until training moves it (e.g. a sorted draft grown from a draft); or a
    deeper one, whose first layers, norm and head it keeps (a draft cut from its target, as in LayerSkip /
    Kangaroo: its exits start from the target's own features)."""
    a, b = start.cfg, model.cfg
    shape = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size", "attention",
             "q_rank", "tie_word_embeddings")
    if any(getattr(a, f) != getattr(b, f) for f in shape) or (b.num_experts and a.num_layers != b.num_layers):
        raise ConfigError(f"--init {name} has another shape than the model being trained (it needs the same width, "
                          f"heads, attention and embedding tying)")
    state = {k: v for k, v in start.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < b.num_layers}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ConfigError(f"--init {name}: weights the model being trained has no place for: {unexpected[:3]}")
    grown = [k for k in missing if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= a.num_layers)]
    if grown:
        raise ConfigError(f"--init {name} lacks weights the model being trained needs: {grown[:3]}")
    with torch.no_grad():
        for layer in model.model.layers[a.num_layers:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


def load_teacher(path: str, tok, device) -> Transformer:
    """A teacher for distillation, checked to share the student's tokenizer."""
    from afford.models.loader import load_tokenizer
    teacher = load_model(path, device=str(device), dtype="float32")
    teacher.eval()
    if teacher.cfg.vocab_size != len(tok) or load_tokenizer(Path(path)).get_vocab() != tok.get_vocab():
        raise ConfigError(f"teacher {path} has another tokenizer than the student's; distil from teachers that "
                          f"share one tokenizer (the first teacher's is used)")
    return teacher


def init_weights(model: Transformer, std: float = 0.02) -> None:
    """GPT-2 style: normal(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)."""
    for name, p in model.named_parameters():
        if p.dim() == 2:
            s = std / math.sqrt(2 * model.cfg.num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            torch.nn.init.normal_(p, 0.0, s)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)


def preset_shape(name: str) -> dict:
    """A preset's model shape as TrainConfig fields."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    layers, hidden, heads, kv, inter, *q_rank = PRESETS[name]
    return dict(layers=layers, hidden=hidden, heads=heads, kv_heads=kv, intermediate=inter,
                q_rank=q_rank[0] if q_rank else 0)


def from_preset(name: str, **kw) -> TrainConfig:
    return TrainConfig(**preset_shape(name), **kw)


def export(src: str | Path, dst: str | Path, dtype: str = "bfloat16", overwrite: bool = False) -> None:
    """Write src's weights in `dtype` plus its config and tokenizer to dst, without the training checkpoint."""
    import shutil
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConfigError(f"{dst} exists; pass --overwrite to replace it")
    model = load_model(src, device="cpu", dtype="float32")
    save_model(model, dst, dtype=getattr(torch, dtype))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "chat_template.jinja":
            shutil.copy(f, dst / f.name)
