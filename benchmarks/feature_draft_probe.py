"""Would a draft that reads the target's own features (EAGLE: the target's last hidden state at position t and
the token at t + 1 -> the hidden state at t + 1, through the target's frozen norm and LM head) accept more
than the token-level drafts of #15? An offline probe, before any engine work: it trains such a head for a
few minutes against the bundled target, then estimates greedy acceptance at k on the target's own greedy
GSM8K-test answers for the head and for token-level drafts, with one estimator.

The estimator: every answer position t is a step start; the draft proposes k tokens chained on its own
outputs (for the feature head: its own predicted features after the first token) and the step accepts the
leading run that equals the target's greedy continuation. Acceptance = mean run / k over all starts (the
engine's steps start only where the previous one stopped, so this weights positions a little differently;
it is a proxy, compared side by side).

    python benchmarks/feature_draft_probe.py --minutes 15 --draft default-draft --draft default-sorted

Writes benchmarks/results/feature_draft_probe.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from common import ROOT, greedy_answers, save

from afford.models.transformer import Transformer


class FeatureHead(torch.nn.Module):
    """fc([embed(x_{t+1}), f_t]) -> one decoder layer of the target's width -> f_{t+1} (not normed)."""

    def __init__(self, target: Transformer):
        super().__init__()
        from dataclasses import replace
        cfg = replace(target.cfg, num_layers=1, exits=())
        self.body = Transformer(cfg)
        del self.body.lm_head, self.body.model.embed_tokens
        h = cfg.hidden_size
        self.fc = torch.nn.Linear(2 * h, h, bias=False)
        torch.nn.init.normal_(self.fc.weight, 0.0, 0.02)
        with torch.no_grad():
            for n, p in self.body.named_parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.02)

    def forward(self, emb_next: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """emb_next, feat (B, T, H) -> predicted next features (B, T, H); causal over T."""
        z = self.fc(torch.cat([emb_next, feat], dim=-1))
        positions = torch.arange(z.shape[1]).expand(z.shape[:2])
        return self.body.run_layers(z, positions, None, 0, 1)


def target_features(target: Transformer, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T) -> (the last layer's residual stream (B, T, H), logits (B, T, V))."""
    positions = torch.arange(ids.shape[-1]).expand_as(ids)
    f = target.run_layers(target.model.embed_tokens(ids), positions, None, 0, len(target.model.layers))
    return f, target.lm_head(target.model.norm(f))


def train_head(target, head, stream, minutes: float, lr: float, noise: float, log, unroll: int = 1) -> dict:
    from afford.zoo.train import batches
    gen = torch.Generator().manual_seed(0)
    data = batches(stream, 16, 256, gen)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    emb = target.model.embed_tokens
    t0, step = time.time(), 0
    while time.time() - t0 < minutes * 60:
        frac = (time.time() - t0) / (minutes * 60)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        x, _ = next(data)                                                   # (B, T)
        with torch.no_grad():
            f, logits = target_features(target, x)
            e_next = emb(x[:, 1:])                                          # the token at t + 1
            p_next = F.log_softmax(logits[:, 1:].float(), dim=-1)           # what the target predicts at t + 1
        feat_in = f[:, :-1] + noise * torch.randn_like(f[:, :-1]) * f[:, :-1].std()
        kl = reg = 0.0
        for j in range(unroll):     # step j + 1 of a draft: fed its own features of step j (EAGLE-3's test-time
            pred = head(e_next[:, j:], feat_in)                             # training, every position at once)
            q = F.log_softmax(target.lm_head(target.model.norm(pred)).float(), dim=-1)
            kl = kl + F.kl_div(q.flatten(0, 1), p_next[:, j:].flatten(0, 1), log_target=True, reduction="batchmean")
            reg = reg + F.smooth_l1_loss(pred, f[:, 1 + j:])
            feat_in = pred[:, :-1]
        kl, reg = kl / unroll, reg / unroll
        loss = kl + reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            log(f"step {step} ({time.time() - t0:.0f} s): kl {kl.item():.3f} reg {reg.item():.4f}")
    return {"steps": step, "minutes": round((time.time() - t0) / 60, 2)}


@torch.no_grad()
def runs_feature_head(target, head, ids: torch.Tensor, start: int, k: int) -> list[int]:
    """For every step start t >= start in ids (1, T) -- the target's greedy text -- the leading run of
    the head's k chained drafts that equals ids[t + 2 ...] (the bonus token ids[t + 1] is the target's)."""
    f, _ = target_features(target, ids)
    emb = target.model.embed_tokens(ids)
    T = ids.shape[1]
    runs = []
    for t in range(start, T - k - 1):
        e_in, f_in = emb[:, 1:t + 2], f[:, :t + 1]                         # positions 0..t, true features
        n = 0
        for j in range(k):
            pred = head(e_in, f_in)[:, -1:]                                 # f^_{t+1+j}
            tok = target.lm_head(target.model.norm(pred)).argmax(-1)        # (1, 1)
            if int(tok) != int(ids[0, t + 2 + j]):
                break
            n += 1
            e_in = torch.cat([e_in, target.model.embed_tokens(tok)], dim=1)
            f_in = torch.cat([f_in, pred], dim=1)
        runs.append(n)
    return runs


@torch.no_grad()
def runs_token_draft(draft, ids: torch.Tensor, start: int, k: int) -> list[list[int]]:
    """The same for a token-level draft, one list per exit: on the target's greedy text the draft's chained
    drafts equal its teacher-forced argmaxes while they match, so the run is the leading matches."""
    out = []
    for lg in draft.exit_logits(ids):
        hit = (lg[0, :-1].argmax(-1) == ids[0, 1:]).tolist()                # hit[q]: position q predicts q + 1
        T = ids.shape[1]
        runs = []
        for t in range(start, T - k - 1):
            n = 0
            while n < k and hit[t + 1 + n]:
                n += 1
            runs.append(n)
        out.append(runs)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="default")
    ap.add_argument("--draft", action="append", default=[], help="token-level drafts to compare (repeat)")
    ap.add_argument("--minutes", type=float, default=15)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--noise", type=float, default=0.1, help="feature noise while training, x the features' std")
    ap.add_argument("--unroll", type=int, default=1, help="train each position on its next N drafting steps, "
                    "each fed the head's own features of the step before")
    ap.add_argument("--name", default="feature_draft_probe")
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from afford.models.loader import load_model, load_tokenizer, resolve_model_path
    from afford.zoo.data import split_documents
    from afford.zoo.train import encode_corpus
    tpath = resolve_model_path(a.target)
    tok = load_tokenizer(tpath)
    target = load_model(tpath, "cpu", "float32").eval()
    for p in target.parameters():
        p.requires_grad_(False)
    data = [str(ROOT / "runs" / "gsm8k_train_teacher.jsonl"), str(ROOT / "data" / "gsm8k" / "train.jsonl"),
            str(ROOT / "data" / "tinyshakespeare" / "input.txt")]
    stream = encode_corpus(tok, split_documents(data, 0.05, False, 0).train)
    torch.manual_seed(0)
    head = FeatureHead(target)
    info = train_head(target, head, stream, a.minutes, a.lr, a.noise, print, a.unroll)
    head.eval()
    recs = [json.loads(line) for line in open(ROOT / "data" / "gsm8k" / "test.jsonl")][: a.questions]
    seqs = greedy_answers(target, tok, recs, a.new_tokens)        # the target's own answers: what drafts meet
    out = {"settings": vars(a), "head": {**info, "params": sum(p.numel() for p in head.parameters())}, "acceptance": {}}
    runs = [r for x, s in seqs for r in runs_feature_head(target, head, x, s, a.k)]
    out["acceptance"]["feature head"] = round(sum(runs) / len(runs) / a.k, 4)
    out["first_token"] = {"feature head": round(sum(r > 0 for r in runs) / len(runs), 4)}
    for name in a.draft:
        d = load_model(resolve_model_path(name, "draft"), "cpu", "float32").eval()
        per = [runs_token_draft(d, x, s, a.k) for x, s in seqs]
        for i, e in enumerate(d.cfg.exits or (d.cfg.num_layers,)):
            rs = [r for p in per for r in p[i]]
            out["acceptance"][f"{name} exit {e}"] = round(sum(rs) / len(rs) / a.k, 4)
            out["first_token"][f"{name} exit {e}"] = round(sum(r > 0 for r in rs) / len(rs), 4)
    for name, v in out["acceptance"].items():
        print(f"{name}: acceptance proxy {v:.3f}, first token {out['first_token'][name]:.3f}")
    print(f"wrote {save(a.name, out)}")


if __name__ == "__main__":
    main()
