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
expected tokens per second (how often each exit's token is the target's, the measured time of a drafted
token split into its layers and heads by their weights, the measured time of the target's step) are the
model's choice. That model cannot see what the lazy fill costs later (the layers a shallow exit skipped
run anyway once a later token goes deeper) nor a forward's fixed costs, so the model's choice and every
fixed exit then run live, in turn (`trial_block` steps each, `trial_rounds` times), to measure each one's
time per speculative step; the policy kept is the one with the most expected tokens (its match rate on the
calibration records: the same positions for every policy, where the live steps' tokens would vary with
the text each block met; at each step's own k and batch) per measured second of step -- a mixed policy
only when it beats the best fixed exit by TRIAL_MARGIN. An exit's layer count ("2") drafts from that exit
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
from afford.kv.paged import table_slots
from afford.speculative.proposers import Draft, DraftModelProposer, register

GRID = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0)   # candidate thresholds (0: always stop, 1: never)
# the live trial keeps a mixed policy over the best fixed exit only when it measured this much faster: two
# arms of one policy measured 3 % apart (s2d.py), and a mix pays costs a trial block undercounts (each new
# request's prompt filled through the deep layers at its first deep token)
TRIAL_MARGIN = 0.05
EMA = 0.2                   # weight of the newest measurement in the per-token draft and the step times


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


def fixed_exit_thresholds(e: int, S: int) -> list[float]:
    """Thresholds (one per exit before the last) that stop every token at exit e of S: never before it
    (1: its head is not even computed), always at it (0)."""
    return [1.0] * e + [0.0] * (e < S - 1) + [1.0] * max(0, S - 2 - e)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verify step yields with k drafts each accepted with probability alpha (plus the target's)."""
    return k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def fit_thresholds(top: np.ndarray, conf: np.ndarray, target: np.ndarray, layer_seconds: list[float],
                   head_seconds: float, verify_seconds: float, k: int) -> tuple[list[float], float]:
    """The thresholds (one per exit before the last, from GRID) that maximize expected tokens per second
    over calibration records -- top (n, S) each exit's argmax, conf (n, S) its probability, target (n,) the
    token the target kept there -- and the per-token match rate (alpha) they give on those records. A token that stops at exit e cost the
    layers of segments 0..e and one head per exit it was tested at (an exit with threshold 1 is not)."""
    S = top.shape[1]
    layers = np.cumsum(layer_seconds)                           # (S,) layers' time to reach each exit
    best, best_value, best_alpha = [1.0] * (S - 1), -1.0, 0.0
    for taus in itertools.product(GRID, repeat=S - 1):
        cost = layers + head_seconds * np.array([sum(t < 1.0 for t in taus[:e]) + 1 for e in range(S)])   # (S,)
        alpha, e = policy_alpha(top, conf, target, list(taus))
        value = expected_tokens(alpha, k) / (k * float(cost[e].mean()) + verify_seconds)
        if value > best_value + 1e-12:
            best, best_value, best_alpha = list(taus), value, alpha
    if 0.0 in best:                     # every token stops by the first 0: the thresholds after it never apply
        best = best[:best.index(0.0) + 1] + [1.0] * (len(best) - best.index(0.0) - 1)
    return best, best_alpha


def policy_alpha(top: np.ndarray, conf: np.ndarray, target: np.ndarray, taus: list[float]) -> tuple[float, np.ndarray]:
    """Over calibration records (as in fit_thresholds): the per-token match rate of the policy `taus`, and
    the exit (n,) each record's token stops at under it."""
    stop = np.concatenate([conf[:, :-1] > np.array(taus), np.ones((len(top), 1), bool)], axis=1)   # (n, S)
    e = stop.argmax(1)                                          # the first exit that clears its threshold
    return float((top[np.arange(len(top)), e] == target).mean()), e


@register("sorted")
class SortedDraftProposer(DraftModelProposer):
    """A multi-exit draft with confidence exits; see the module docstring. State per sequence: `fill[sid][s]`,
    the positions whose K/V segment s holds (non-increasing in s), and in `resid` (slots, hidden) the residual
    stream of each position after the deepest segment it went through, at its K/V slot."""

    def __init__(self, path: str, *args, draft_exit="auto", calibration_tokens: int = 192, trial_block: int = 8,
                 trial_rounds: int = 4, **kw):
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
        k_pool = self.runner.kv[0][0]
        self.resid = torch.zeros(k_pool.shape[0], self.cfg.hidden_size, dtype=k_pool.dtype, device=k_pool.device)
        self.fill: dict[int, list[int]] = {}
        self.probes: dict[int, dict[int, tuple[list[int], list[float]]]] = {}   # sid -> drafted position -> exits
        self.records: list[tuple[list[int], list[float], int]] = []
        self.token_seconds: float | None = None                 # per drafted token while probing (every exit)
        self.verify_seconds: float | None = None
        self.mean_k = 1.0
        self.exit_tokens = [0] * S
        self.predicted_acceptance: float | None = None
        if trial_rounds and trial_block < 2:
            raise ConfigError(f"trial_block={trial_block}: a block's first step is not counted, so it needs >= 2 "
                              f"steps (or trial_rounds=0: no live trial)")
        self.trial_block, self.trial_rounds = trial_block, trial_rounds
        self.trial: list[list[float]] | None = None     # policies measured live after the fit (None: not now)
        self.trial_stats: list[list[float]] = []        # per policy: [seconds, steps counted, expected tokens]
        self.trial_step = 0                             # speculative steps into the trial
        self.trial_arm: int | None = None               # the policy the step in flight drafted with
        self.trial_alpha: list[float] = []               # each trial policy's match rate on the records
        self.trial_result: dict | None = None

    @property
    def probing(self) -> bool:
        return self.auto and self.thresholds is None

    # ---- drafting ----
    def propose(self, seqs, ks):
        for s in seqs:
            self._resolve(s)
        ks, active, drafts = self._reserve(seqs, ks)
        if not active:
            return drafts
        if self.trial is not None:
            self._trial_turn()
        for i in active:
            self.fill.setdefault(seqs[i].seq_id, [0] * len(self.exits))
        self.mean_k = float(np.mean([ks[i] for i in active]))
        probing, t0 = self.probing, time.perf_counter()
        catchup = sum(len(seqs[i].token_ids) - self.fill[seqs[i].seq_id][0] for i in active)
        if all(seqs[i].params.greedy for i in active) and self.runner.native is not None:
            self._native([seqs[i] for i in active], [ks[i] for i in active], [drafts[i] for i in active])
        else:
            rows: dict[int, list[torch.Tensor]] = {i: [] for i in active}
            for j in range(max(ks[i] for i in active)):
                cur = [i for i in active if ks[i] > j]
                feeds = [seqs[i].token_ids[self.fill[seqs[i].seq_id][0]:] if j == 0 else [drafts[i].tokens[-1]]
                         for i in cur]
                self._draft_token([seqs[i] for i in cur], feeds, [drafts[i] for i in cur], [rows[i] for i in cur])
            for i in active:
                if rows[i]:
                    drafts[i].probs = torch.stack(rows[i])                                   # (k, V)
        if probing and catchup <= 2 * len(active):   # a catch-up of many positions says little of a token's cost
            dt = (time.perf_counter() - t0) / sum(ks[i] for i in active)
            self.token_seconds = dt if self.token_seconds is None else (1 - EMA) * self.token_seconds + EMA * dt
        return drafts

    def _native(self, seqs: list[Sequence], ks: list[int], drafts: list[Draft]) -> None:
        """All of a greedy batch's k tokens, exits and lazy fill in one native call."""
        sids = [s.seq_id for s in seqs]
        fills = [self.fill[sid] for sid in sids]
        tokens = [s.token_ids[f[0]:] for s, f in zip(seqs, fills)]
        probe = self.probing
        taus = self.thresholds or [1.0] * (len(self.exits) - 1)
        out, exits, fills, info = self.runner.draft_exits(sids, [f[0] for f in fills], tokens, ks, fills, self.bounds,
                                                          taus, -1 if self.fixed is None else self.fixed, probe,
                                                          self.resid)
        S = len(self.exits)
        for s, sid, d, toks, ex, f, inf in zip(seqs, sids, drafts, out, exits, fills, info):
            d.tokens.extend(toks)
            self.fill[sid] = list(f)
            for e in ex:
                self.exit_tokens[e] += 1
            if probe:
                base = len(s.token_ids)
                for j in range(len(toks)):
                    rec = inf[j * S * 2:(j + 1) * S * 2]
                    self.probes.setdefault(sid, {})[base + j] = ([int(v) for v in rec[0::2]], list(rec[1::2]))

    def _slots(self, sid: int, a: int, b: int) -> torch.Tensor:
        """K/V slots of positions a..b (inclusive) of sequence sid: where their residual streams are kept."""
        return torch.tensor(table_slots(self.pool.tables[sid], self.pool.block_size, a, b + 1), dtype=torch.long)

    def _draft_token(self, seqs: list[Sequence], feeds: list[list[int]], drafts: list[Draft], rows: list[list]) -> None:
        """The Python path, one token per sequence: feed its new tokens, go exit by exit until its next token
        stops, and append it (sampled requests draw from the exit's distribution and keep it for acceptance)."""
        S = len(self.exits)
        sids = [s.seq_id for s in seqs]
        starts = [self.fill[sid][0] for sid in sids]
        ends = [st + len(f) - 1 for st, f in zip(starts, feeds)]             # the position that predicts
        seen: dict[int, tuple[list[int], list[float]]] = {n: ([], []) for n in range(len(seqs))}
        going = list(range(len(seqs)))
        x, logits = self._segment(0, sids, starts, feeds, head=self._decides(0))
        self._keep(0, sids, starts, ends, x)
        for s in range(S):
            if not self._decides(s):                      # nobody can stop here: no head, on to the next segment
                rest = [(r, n) for r, n in enumerate(going)]
            else:
                conf, top = torch.softmax(logits, dim=-1).max(dim=-1)                      # (b,), (b,)
                rest = self._stop(s, going, conf, top, logits, seqs, sids, ends, seen, drafts, rows)
            if not rest:
                return
            going = [n for _, n in rest]
            gs = [sids[n] for n in going]
            lo = [self.fill[sid][s + 1] for sid in gs]                       # positions not through segment s + 1
            x_in = self.resid[torch.cat([self._slots(sid, a, ends[n]) for sid, a, n in zip(gs, lo, going)])]
            x, logits = self._segment(s + 1, gs, lo, [[0] * (ends[n] + 1 - a) for a, n in zip(lo, going)], x_in,
                                      head=self._decides(s + 1))
            self._keep(s + 1, gs, lo, [ends[n] for n in going], x)

    def _decides(self, s: int) -> bool:
        """Whether a token can stop at segment s (else its head is not even computed)."""
        return self.probing or s == len(self.exits) - 1 or s == self.fixed or \
            (self.fixed is None and self.thresholds[s] < 1.0)

    def _stop(self, s, going, conf, top, logits, seqs, sids, ends, seen, drafts, rows) -> list[tuple[int, int]]:
        """The tokens that stop at segment s take their draft; returns (row, sequence) of the others."""
        S, probing = len(self.exits), self.probing
        stop, rest = [], []
        for r, n in enumerate(going):
            if probing:                                   # every exit's argmax and top probability, for the fit
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
        return rest

    def _segment(self, s: int, sids: list[int], starts: list[int], tokens: list[list[int]],
                 x: torch.Tensor | None = None, head: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment s of the draft over the fed positions, logits at each sequence's last (head=False: none)."""
        at, last = 0, []
        for t in tokens:
            at += len(t)
            last.append(at - 1)
        return self.runner.segment(sids, starts, tokens, self.bounds[s], self.bounds[s + 1], x, last if head else None)

    def _keep(self, s: int, sids: list[int], starts: list[int], ends: list[int], x: torch.Tensor) -> None:
        """Positions starts[i]..ends[i] went through segment s: their residual stream into `resid`."""
        if s < len(self.exits) - 1:
            self.resid[torch.cat([self._slots(sid, a, b) for sid, a, b in zip(sids, starts, ends)])] = x
        for sid, b in zip(sids, ends):
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
        if self.probing and len(self.records) >= self.calibration_tokens and self.verify_seconds is not None \
                and self.token_seconds is not None:
            self._fit()

    def _costs(self) -> tuple[list[float], float] | None:
        """Seconds per drafted token of each segment's layers and of one exit's head: the measured time of a
        probed token (every layer, every exit's head) split in proportion to their weights."""
        if self.token_seconds is None:
            return None
        c = self.cfg
        layer = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * \
            c.hidden_size + 3 * c.hidden_size * c.intermediate_size
        head = c.vocab_size * c.hidden_size
        unit = self.token_seconds / (layer * self.bounds[-1] + head * len(self.exits))
        return [unit * layer * (b - a) for a, b in zip(self.bounds, self.bounds[1:])], unit * head

    def _fit(self) -> None:
        top = np.array([r[0] for r in self.records])
        conf = np.array([r[1] for r in self.records])
        target = np.array([r[2] for r in self.records])
        k = max(1, round(self.mean_k))
        layer_s, head_s = self._costs()
        best, self.predicted_acceptance = fit_thresholds(top, conf, target, layer_s, head_s, self.verify_seconds, k)
        self.probes.clear()
        self.thresholds = best
        S = len(self.exits)
        # the last exit first, then the fit's choice, then the other fixed exits deepest first: a shallower
        # policy's deferred layers are always filled by the next block's uncounted first step, and every
        # round's first arm (the last exit) fills what the shallowest arm of the round before left
        policies = [fixed_exit_thresholds(S - 1, S)]
        for taus in [best] + [fixed_exit_thresholds(e, S) for e in reversed(range(S - 1))]:
            if taus not in policies:
                policies.append(taus)
        self.trial_alpha = [policy_alpha(top, conf, target, taus)[0] for taus in policies]
        if self.trial_rounds > 0 and len(policies) > 1:
            self.trial, self.trial_stats, self.trial_step = policies, [[0.0, 0, 0.0] for _ in policies], 0

    def _trial_turn(self) -> None:
        """The live trial: this step drafts with the policy whose block it is (a block's first step pays
        the switch -- the fill of layers the policy before skipped -- and is not counted)."""
        self.trial_arm = (self.trial_step // self.trial_block) % len(self.trial)
        self.thresholds = self.trial[self.trial_arm]
        if self.trial_step % self.trial_block == 0:
            self.trial_arm = None
        self.trial_step += 1

    def observe(self, st) -> None:
        if st.drafted:
            dt = max(st.seconds - st.draft_seconds, 0.0)
            self.verify_seconds = dt if self.verify_seconds is None else (1 - EMA) * self.verify_seconds + EMA * dt
        if self.trial is None:
            return
        arm, self.trial_arm = self.trial_arm, None
        # a step that fed a prompt's catch-up through the draft says little of the policy's cost: not counted
        if arm is not None and st.drafted and st.draft_catchup <= 2 * st.num_seqs:
            rec = self.trial_stats[arm]
            rec[0], rec[1] = rec[0] + st.seconds, rec[1] + 1
            rec[2] += sum(expected_tokens(self.trial_alpha[arm], k) for k in st.k_per_seq if k)  # this step's k, batch
        if self.trial_step >= self.trial_block * self.trial_rounds * len(self.trial):
            rates = [tok / sec if sec > 0 else 0.0 for sec, _, tok in self.trial_stats]
            S = len(self.exits)
            fixed = [i for i, taus in enumerate(self.trial) if taus in [fixed_exit_thresholds(e, S) for e in range(S)]]
            best = max(fixed, key=rates.__getitem__)
            mixed = [i for i in range(len(rates)) if i not in fixed]
            if mixed and rates[mixed[0]] > (1 + TRIAL_MARGIN) * rates[best]:
                best = mixed[0]
            self.trial_result = {"policies": self.trial, "alpha": [round(a, 4) for a in self.trial_alpha],
                                 "step_ms": [round(sec / n * 1e3, 4) if n else None for sec, n, _ in self.trial_stats],
                                 "tokens_per_s": [round(r, 1) for r in rates],
                                 "steps": [int(n) for _, n, _ in self.trial_stats], "chosen": best}
            self.thresholds, self.trial = self.trial[best], None
            self.predicted_acceptance = self.trial_alpha[best]

    def counters(self) -> dict:
        """What the exits did (the engine's stats and /metrics read this)."""
        costs = self._costs()
        return {"exits": list(self.exits), "exit_tokens": list(self.exit_tokens),
                "thresholds": None if self.thresholds is None else list(self.thresholds),
                "policy": "fixed" if self.fixed is not None else "auto" if self.auto else "thresholds",
                "calibrated": self.thresholds is not None and self.auto,
                "trial": self.trial_result if self.trial is None else "running",
                "calibration_records": len(self.records), "predicted_acceptance": self.predicted_acceptance,
                "segment_ms": None if costs is None else [round(t * 1e3, 4) for t in costs[0]],
                "head_ms": None if costs is None else round(costs[1] * 1e3, 4)}

    # ---- state ----
    def rollback(self, seq, n_valid):
        sid = seq.seq_id
        fill = self.fill.get(sid)
        if fill is None:
            return
        if fill[0] > n_valid:
            self.pool.truncate(sid, n_valid)
        self.fill[sid] = [min(f, n_valid) for f in fill]
        probes = self.probes.get(sid, {})
        for p in [p for p in probes if p > n_valid]:            # drafts past the first rejection: never decided
            del probes[p]

    def catchup(self, seq):
        return max(0, len(seq.token_ids) - self.fill.get(seq.seq_id, [0])[0] - 1)

    def free(self, seq):
        self._resolve(seq)
        for d in (self.fill, self.probes):
            d.pop(seq.seq_id, None)
        super().free(seq)
