"""S2D's sorted multi-exit draft (../shared/reference/decoding-methods.md §2): ONE draft whose exits -- after
cfg.exits layers -- share the final norm and the LM head (trained on the mean loss over its exits, `afford
zoo distill --exits`), serving every target that shares its tokenizer.

Each drafted token stops at the first exit whose top probability clears that exit's threshold. The deeper
layers of the positions that stopped early are not skipped for good: when a later token goes deeper, the
positions behind it that have not been through those layers go with it, in the same forward, entering
from their stored residual stream (S2D's lazy fill). So every layer's K/V ends up what a full forward
writes, and a deep exit sees the same context a full forward would.

Thresholds (`draft_exit`): "auto" calibrates them per target on live traffic -- the first
`calibration_tokens` verified draft positions run every exit, and the thresholds that maximize the
expected tokens per second (the measured acceptance of each exit's token, the measured time of each
segment of layers and of the target's verify) are kept; an exit's layer count ("2") drafts from that exit
always (a fixed shallow-exit draft); "t1,t2,..." fixes one threshold per exit before the last.
"""
from __future__ import annotations

import itertools
import time

import numpy as np
import torch

from afford.config import ConfigError
from afford.core.sampler import probs as sampling_probs
from afford.core.sequence import Sequence
from afford.speculative.proposers import Draft, DraftModelProposer, register

GRID = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0)   # candidate thresholds (0: always stop, 1: never)
EMA = 0.2                   # weight of the newest measurement in the segment and verify times


def parse_exit_policy(spec, exits: tuple[int, ...]) -> tuple[int | None, list[float] | None]:
    """draft_exit -> (a fixed exit's index, or None; fixed thresholds per exit before the last, or None)."""
    text = str(spec).strip()
    if text == "auto":
        return None, None
    if "," not in text and "." not in text:
        try:
            layers = int(text)
        except ValueError:
            raise ConfigError(f"draft_exit must be 'auto', an exit's layer count or thresholds 't1,t2,...'; got {spec!r}") from None
        if layers not in exits:
            raise ConfigError(f"draft_exit={layers}: the draft's exits are after {list(exits)} layers; pick one of them")
        return exits.index(layers), None
    try:
        taus = [float(t) for t in text.split(",")]
    except ValueError:
        raise ConfigError(f"draft_exit thresholds are numbers separated by commas, got {spec!r}") from None
    if len(taus) != len(exits) - 1 or not all(0.0 <= t <= 1.0 for t in taus):
        raise ConfigError(f"draft_exit needs {len(exits) - 1} thresholds in [0, 1] (one per exit before the last, "
                          f"exits {list(exits)}); got {spec!r}")
    return None, taus


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verify step yields with k drafts each accepted with probability alpha (plus the target's)."""
    return k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def fit_thresholds(top: np.ndarray, conf: np.ndarray, target: np.ndarray, seg_seconds: list[float],
                   verify_seconds: float, k: int) -> tuple[list[float], float]:
    """The thresholds (one per exit before the last, from GRID) that maximize expected tokens per second
    over calibration records -- top (n, S) each exit's argmax, conf (n, S) its probability, target (n,) the
    token the target kept there -- and the acceptance they predict."""
    S = top.shape[1]
    cost = np.cumsum(seg_seconds)                               # (S,) time to reach each exit
    match = top == target[:, None]                              # (n, S)
    best, best_value, best_alpha = [1.0] * (S - 1), -1.0, 0.0
    for taus in itertools.product(GRID, repeat=S - 1):
        stop = np.concatenate([conf[:, :-1] > np.array(taus), np.ones((len(top), 1), bool)], axis=1)   # (n, S)
        e = stop.argmax(1)                                      # the first exit that clears its threshold
        alpha = float(match[np.arange(len(top)), e].mean())
        value = expected_tokens(alpha, k) / (k * float(cost[e].mean()) + verify_seconds)
        if value > best_value + 1e-12:
            best, best_value, best_alpha = list(taus), value, alpha
    return best, best_alpha


@register("sorted")
class SortedDraftProposer(DraftModelProposer):
    """A multi-exit draft with confidence exits; see the module docstring."""

    def __init__(self, path: str, *args, draft_exit="auto", calibration_tokens: int = 192, **kw):
        kw["prefix_caching"] = False       # its blocks can hold the shallow layers only: never shared
        super().__init__(path, *args, **kw)
        if not self.cfg.exits:
            raise ConfigError("this draft has one exit; the sorted proposer needs a multi-exit draft (train one "
                              "with `afford zoo distill --exits 1,2,L ...`)")
        self.exits = list(self.cfg.exits)
        self.bounds = [0] + self.exits                          # segment s: layers bounds[s]..bounds[s + 1] - 1
        self.fixed, self.thresholds = parse_exit_policy(draft_exit, self.cfg.exits)
        self.auto = self.fixed is None and self.thresholds is None
        self.calibration_tokens = calibration_tokens
        S = len(self.exits)
        self.fill: dict[int, list[int]] = {}                     # sid -> positions with K/V, per segment
        self.resid: dict[int, dict[int, torch.Tensor]] = {}      # sid -> position -> residual at its depth
        self.probes: dict[int, dict[int, tuple[list[int], list[float]]]] = {}   # sid -> drafted position -> exits
        self.records: list[tuple[list[int], list[float], int]] = []
        self.seg_seconds: list[float | None] = [None] * S
        self.verify_seconds: float | None = None
        self.mean_k = 1.0
        self.exit_tokens = [0] * S
        self.predicted_acceptance: float | None = None

    # ---- drafting ----
    def propose(self, seqs, ks):
        for s in seqs:
            self._resolve(s)
        ks = self._fit_pool(seqs, ks)
        active = [i for i, k in enumerate(ks) if k > 0]
        drafts = [Draft([], None) for _ in seqs]
        if not active:
            return drafts
        for i in active:
            s = seqs[i]
            self.runner.copy_blocks(self.pool.prepare_write(s.seq_id, len(s.token_ids) + ks[i] - 1))
            if s.seq_id not in self.fill:
                self.fill[s.seq_id], self.resid[s.seq_id] = [0] * len(self.exits), {}
        rows: dict[int, list[torch.Tensor]] = {i: [] for i in active}
        for j in range(max(ks[i] for i in active)):
            cur = [i for i in active if ks[i] > j]
            feeds = [seqs[i].token_ids[self.fill[seqs[i].seq_id][0]:] if j == 0 else [drafts[i].tokens[-1]] for i in cur]
            self._draft_token([seqs[i] for i in cur], feeds, [drafts[i] for i in cur], [rows[i] for i in cur])
        for i in active:
            self.computed[seqs[i].seq_id] = self.fill[seqs[i].seq_id][0]
            if rows[i]:
                drafts[i].probs = torch.stack(rows[i])                                   # (k, V)
        self.mean_k = float(np.mean([ks[i] for i in active]))
        return drafts

    def _draft_token(self, seqs: list[Sequence], feeds: list[list[int]], drafts: list[Draft], rows: list[list]) -> None:
        """Feed each sequence's new tokens, go exit by exit until each one's next token stops, and append it."""
        S = len(self.exits)
        sids = [s.seq_id for s in seqs]
        starts = [self.fill[sid][0] for sid in sids]
        ends = [st + len(f) - 1 for st, f in zip(starts, feeds)]             # the position that predicts
        probing = self.auto and self.thresholds is None
        seen: dict[int, tuple[list[int], list[float]]] = {n: ([], []) for n in range(len(seqs))}
        going = list(range(len(seqs)))
        x, logits = self._segment(0, [sids[n] for n in going], [starts[n] for n in going], [feeds[n] for n in going])
        self._keep(0, [sids[n] for n in going], [starts[n] for n in going], [ends[n] for n in going], x)
        for s in range(S):
            conf, top = torch.softmax(logits, dim=-1).max(dim=-1)                          # (b,), (b,)
            stop, rest = [], []
            for r, n in enumerate(going):
                seen[n][0].append(int(top[r]))
                seen[n][1].append(float(conf[r]))
                last = s == S - 1 or s == self.fixed
                ok = last or (not probing and self.fixed is None and float(conf[r]) > self.thresholds[s])
                (stop if ok else rest).append((r, n))
            for r, n in stop:
                seq = seqs[n]
                if seq.params.greedy:
                    drafts[n].tokens.append(int(top[r]))
                else:
                    q = sampling_probs(logits[r].cpu(), seq.params)
                    drafts[n].tokens.append(int(torch.multinomial(q, 1, generator=seq.generator)))
                    rows[n].append(q)
                self.exit_tokens[s] += 1
                if probing:
                    self.probes.setdefault(sids[n], {})[ends[n] + 1] = seen[n]
            if not rest:
                return
            going = [n for _, n in rest]
            gs = [sids[n] for n in going]
            lo = [self.fill[sid][s + 1] for sid in gs]                       # positions not through segment s + 1
            x_in = torch.stack([self.resid[sid][p] for sid, a, n in zip(gs, lo, going) for p in range(a, ends[n] + 1)])
            x, logits = self._segment(s + 1, gs, lo, [[0] * (ends[n] + 1 - a) for a, n in zip(lo, going)], x_in)
            self._keep(s + 1, gs, lo, [ends[n] for n in going], x)

    def _segment(self, s: int, sids: list[int], starts: list[int], tokens: list[list[int]],
                 x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment s of the draft over the fed positions, logits at each sequence's last; its time measured."""
        at, last = 0, []
        for t in tokens:
            at += len(t)
            last.append(at - 1)
        t0 = time.perf_counter()
        out = self.runner.segment(sids, starts, tokens, self.bounds[s], self.bounds[s + 1], x, last)
        dt = time.perf_counter() - t0
        if at <= 2 * len(sids):                     # a catch-up of many positions says little of a token's cost
            old = self.seg_seconds[s]
            self.seg_seconds[s] = dt if old is None else (1 - EMA) * old + EMA * dt
        return out

    def _keep(self, s: int, sids: list[int], starts: list[int], ends: list[int], x: torch.Tensor) -> None:
        """Positions starts[i]..ends[i] are through segment s: store their residual for the next segment."""
        at = 0
        deepest = s == len(self.exits) - 1
        for sid, a, b in zip(sids, starts, ends):
            res = self.resid[sid]
            for p in range(a, b + 1):
                if deepest:
                    res.pop(p, None)
                else:
                    res[p] = x[at]
                at += 1
            self.fill[sid][s] = b + 1

    # ---- calibration (draft_exit="auto") ----
    def _resolve(self, seq: Sequence) -> None:
        """Drafted positions the target has now decided join the calibration records."""
        pending = self.probes.get(seq.seq_id)
        if not pending:
            return
        n = len(seq.token_ids)
        for p in [p for p in pending if p < n]:
            top, conf = pending.pop(p)
            self.records.append((top, conf, seq.token_ids[p]))
        if self.auto and self.thresholds is None and len(self.records) >= self.calibration_tokens \
                and None not in self.seg_seconds and self.verify_seconds is not None:
            self._fit()

    def _fit(self) -> None:
        top = np.array([r[0] for r in self.records])
        conf = np.array([r[1] for r in self.records])
        target = np.array([r[2] for r in self.records])
        k = max(1, round(self.mean_k))
        self.thresholds, self.predicted_acceptance = fit_thresholds(top, conf, target, self.seg_seconds,
                                                                    self.verify_seconds, k)
        self.probes.clear()

    def observe(self, st) -> None:
        if st.drafted:
            dt = max(st.seconds - st.draft_seconds, 0.0)
            self.verify_seconds = dt if self.verify_seconds is None else (1 - EMA) * self.verify_seconds + EMA * dt

    def counters(self) -> dict:
        """What the exits did (the engine's stats and /metrics read this)."""
        return {"exits": list(self.exits), "exit_tokens": list(self.exit_tokens),
                "thresholds": None if self.thresholds is None else list(self.thresholds),
                "policy": "fixed" if self.fixed is not None else "auto" if self.auto else "thresholds",
                "calibrated": self.thresholds is not None and self.auto,
                "calibration_records": len(self.records), "predicted_acceptance": self.predicted_acceptance,
                "segment_ms": [None if t is None else round(t * 1e3, 4) for t in self.seg_seconds]}

    # ---- state ----
    def rollback(self, seq, n_valid):
        sid = seq.seq_id
        fill = self.fill.get(sid)
        if fill is None:
            return
        if fill[0] > n_valid:
            self.pool.truncate(sid, n_valid)
        self.fill[sid] = [min(f, n_valid) for f in fill]
        self.computed[sid] = self.fill[sid][0]
        res = self.resid[sid]
        for p in [p for p in res if p >= n_valid]:
            del res[p]
        probes = self.probes.get(sid, {})
        for p in [p for p in probes if p > n_valid]:            # drafts past the first rejection: never decided
            del probes[p]

    def free(self, seq):
        self._resolve(seq)
        for d in (self.fill, self.resid, self.probes):
            d.pop(seq.seq_id, None)
        super().free(seq)
