"""SmartSpec's goodput controller: per-request acceptance estimates, a step-time model (timing.py)
and the search for each request's k that maximizes expected tokens per second."""
from __future__ import annotations

import numpy as np

from afford.speculative.control import SpeculativeController, register
from afford.speculative.timing import StepTimeModel


def expected_tokens(alpha: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Tokens a step yields with k drafts at i.i.d. acceptance alpha: (1 - a^(k+1)) / (1 - a)."""
    a = np.clip(alpha, 0.0, 0.999)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


@register("goodput")
class Goodput(SpeculativeController):
    """SmartSpec (../shared/reference/decoding-methods.md §1): every step, choose each request's k in
    0..k_max to maximize the batch's goodput = expected generated tokens / predicted step time.

    - acceptance: per request, the per-token acceptance rate of a truncated geometric process (drafted
      token j is accepted with probability alpha while all before it were): successes / trials, where a
      step that accepted n of k drafts had n successes in n + [n < k] trials. Plain accepted/drafted would
      be biased low for k > 1 and push k down. Both counts decay by `decay` per trial (a window of about
      1 / (1 - decay) trials, the same for every k) on top of `prior_weight` pseudo-trials at the global
      rate; a request that drafts nothing ages by one trial per step, back toward the global rate;
    - step time = target verify + draft, two non-negative least-squares fits over recent steps,
      anchored by the engine's start-up profile (`wants_profile`). Verify: c0 + c1 * rows + c2 * sequences + c3 * [rows > 1] + c4 *
      context tokens + c5 * sequences that drafted (their acceptance, rollback and multi-token
      bookkeeping: a fixed price per speculating request, whatever its k). The [rows > 1] term is the
      step from a matrix-vector to a matrix-matrix kernel when a lone sequence verifies drafts (on the
      2-core CPU here a second row costs ~30 % of a one-row forward).
      Draft: d1 * draft forwards (max k) + d2 * draft rows (sum k) + d3 * catch-up tokens (what a draft
      that skipped steps must feed before it proposes; in the choice it is spread over the request's
      remaining tokens, since it is paid once);
    - search: for each bound K = max k, Dinkelbach iterations pick every request's k independently
      given the shared cost of K, then the best K wins; k = 0 everywhere when speculation does not pay;
    - margin: speculation must beat k = 0 by more than the time model's recent underestimate of
      speculative steps (the moving mean of measured / forecast - 1 over them, within [2 %, 25 %]):
      a step the model thinks cheaper than it is inflates the predicted gain by as much;
    - exploration: after `explore_every` steps with k = 0 everywhere, the request with the oldest
      acceptance information drafts one token, so a workload whose acceptance rises is noticed -- but
      only once the idle steps' predicted time times `explore_budget` covers the probe's predicted cost,
      catch-up included (a draft that skipped 500 tokens first feeds them all: with a cheap target step
      that is many steps' worth) and scaled by what past probes cost over their forecast, so probing
      costs about that share of decoding time;
    - an unchanged batch that chose k = 0 is searched again every `recheck_every` steps, and a quarter
      of the k = 0 steps feed the step-time fit: a controller that decided not to speculate costs
      little more than not having one.
    """

    def __init__(self, prior: float = 0.6, decay: float = 0.9, prior_weight: float = 1.0,
                 explore_every: int = 64, explore_budget: float = 0.01, recheck_every: int = 8):
        self.prior, self.decay, self.prior_weight, self.explore_every = prior, decay, prior_weight, explore_every
        self.explore_budget, self.idle_seconds = explore_budget, 0.0
        self.recheck_every = recheck_every
        self._idle: tuple | None = None            # (sequence ids, k_max, base) of the last all-k = 0 choice
        self._probe: tuple[float, float] | None = None      # (base, predicted extra seconds) of a probe step
        self.probe_scale = 1.0                     # measured / predicted extra seconds of past probes
        self.g_succ, self.g_trials = prior * 20.0, 20.0         # global counts (slower decay)
        self.succ: dict[int, float] = {}
        self.trials: dict[int, float] = {}
        self.last_drafted: dict[int, int] = {}                  # seq_id -> step it last drafted
        self.steps, self.idle_steps = 0, 0
        self.forecast_bias = 0.05                  # moving mean of measured / forecast - 1, speculative steps
        self.target = StepTimeModel(6)
        self.draft = StepTimeModel(3)
        self.last_prediction: float | None = None

    wants_profile = True

    @property
    def global_alpha(self) -> float:
        return self.g_succ / self.g_trials

    @property
    def alpha(self) -> dict[int, float]:
        return {sid: self.alpha_of(sid) for sid in self.succ}

    def alpha_of(self, seq_id: int) -> float:
        w, ga = self.prior_weight, self.global_alpha
        return (self.succ.get(seq_id, 0.0) + w * ga) / (self.trials.get(seq_id, 0.0) + w)

    # -- estimators --
    def observe_acceptance(self, seq_id: int, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        trials = accepted + (1 if accepted < drafted else 0)
        lam = self.decay ** trials
        self.succ[seq_id] = lam * self.succ.get(seq_id, 0.0) + accepted
        self.trials[seq_id] = lam * self.trials.get(seq_id, 0.0) + trials
        self.g_succ = 0.99 ** trials * self.g_succ + accepted
        self.g_trials = 0.99 ** trials * self.g_trials + trials
        self.last_drafted[seq_id] = self.steps

    @staticmethod
    def verify_features(rows: int, seqs: int, context_tokens: int, drafting: int) -> list[float]:
        return [1.0, rows, seqs, float(rows > 1), context_tokens, drafting]

    def observe_timing(self, rows, seqs, context_tokens, verify_s, max_k, sum_k, draft_s, catchup=0,
                       anchor=False, drafting=None):
        if drafting is None:
            drafting = seqs if max_k > 0 else 0
        if verify_s is not None:
            self.target.add(self.verify_features(rows, seqs, context_tokens, drafting), verify_s, anchor,
                            bucket=(seqs.bit_length(), drafting > 0))
        if max_k > 0:
            self.draft.add([max_k, sum_k, catchup], draft_s, anchor, bucket=(sum_k.bit_length(), catchup > 0))

    def observe(self, st) -> None:
        if st.kind != "decode":
            return
        self.steps += 1
        if self._probe is not None:                  # what the last probe really cost, catch-up and all
            base, cost = self._probe
            self._probe = None
            ratio = max(st.seconds - base, 0.0) / max(cost, 1e-6)
            self.probe_scale = min(max(0.5 * self.probe_scale + 0.5 * ratio, 1.0), 20.0)
        if st.predicted_seconds and max(st.k_per_seq, default=0) > 0 and st.seconds > 0:
            err = st.seconds / st.predicted_seconds - 1.0
            self.forecast_bias = 0.95 * self.forecast_bias + 0.05 * min(max(err, -1.0), 1.0)
        for sid, d, a in zip(st.seq_ids, st.k_per_seq, st.accepted_per_seq):
            if d > 0:
                self.observe_acceptance(sid, d, a)
            elif sid in self.succ:                   # information ages while a request does not draft
                self.succ[sid] *= self.decay
                self.trials[sid] *= self.decay
        max_k = max(st.k_per_seq, default=0)
        if max_k == 0 and self.steps % 4:            # a quarter of the plain steps is enough to fit their cost
            return
        self.observe_timing(st.tokens_in, st.num_seqs, st.context_tokens, st.seconds - st.draft_seconds,
                            max_k, sum(st.k_per_seq), st.draft_seconds, st.draft_catchup,
                            drafting=sum(1 for k in st.k_per_seq if k > 0))

    def forget(self, seq_id: int) -> None:
        for d in (self.succ, self.trials, self.last_drafted):
            d.pop(seq_id, None)

    # -- the choice --
    def choose(self, seqs, k_max, catchup=None):
        B = len(seqs)
        if B == 0:
            return []
        # a batch that chose k = 0 last step, unchanged: decide again only every `recheck_every` steps (a
        # search costs ~50-300 us, ~2-10 % of a small model's step; acceptance does not move while nobody
        # drafts, and the step-time fit moves slowly)
        if self._idle is not None and self._idle[:2] == (tuple(s.seq_id for s in seqs), k_max) \
                and self.idle_steps % self.recheck_every:
            self.idle_steps += 1
            self.idle_seconds += self._idle[2]
            self.last_prediction = self._idle[2]
            return [0] * B
        ks = self._choose(seqs, k_max, catchup)
        self._idle = (tuple(s.seq_id for s in seqs), k_max, self.last_prediction) if not any(ks) else None
        return ks

    def _choose(self, seqs, k_max, catchup):
        B = len(seqs)
        alphas = [min(self.alpha_of(s.seq_id), 0.999) for s in seqs]
        c0, c1, c2, c3, c4, c5 = self.target.coef.tolist()
        d1, d2, d3 = self.draft.coef.tolist()
        ctx = float(sum(len(s.token_ids) for s in seqs))
        # T(ks) = base + shared(K) + sum_i cost[i, k_i], shared and cost only when K = max k > 0
        base = max(c0 + (c1 + c2) * B + c3 * (B > 1) + c4 * ctx, 1e-9)
        # quick exit (most steps of a low-acceptance or heavy load): even every draft accepted at the
        # least extra time would not beat k = 0
        best_case = sum((1.0 - a ** (k_max + 1)) / (1.0 - a) for a in alphas) / (base + d1 + c3 * (B == 1))
        margin = 1.0 + min(max(self.forecast_bias, 0.02), 0.25)
        probe_cost = d1 + c3 * (B == 1) + c1 + c4 + d2 + c5                    # one token drafted, plus catch-up
        if best_case <= margin * B / base:
            return self._no_speculation(seqs, base, probe_cost, d3, catchup)
        if B == 1:                      # the latency case: a 1-D search, no arrays (numpy costs ~0.3 ms here)
            return self._choose_one(seqs[0], alphas[0], k_max, base, margin, catchup[0] if catchup else 0)
        alpha = np.array(alphas)
        cu = np.zeros(B) if catchup is None else np.asarray(catchup, dtype=float)
        left = np.array([max(1, s.params.max_tokens - s.num_output) for s in seqs], dtype=float)
        grid = np.arange(k_max + 1)
        gain = expected_tokens(alpha[:, None], grid[None, :])                     # (B, k_max + 1)
        on = grid[None, :] > 0
        cost = (c1 + c4 + d2) * grid[None, :] + (c5 + d3 * cu[:, None]) * on      # real seconds
        charge = cost - d3 * cu[:, None] * on * (1.0 - gain / left[:, None])      # catch-up spread out
        g0 = B / base
        bounds = grid[1:]                                                         # K = 1..k_max
        shared = base + d1 * bounds + c3 * (B == 1)                               # (K,)
        allowed = ((grid[None, None, :] <= bounds[:, None, None])                # (K, B, k_max + 1): the bound,
                   & (grid[None, None, :] < left[None, :, None]))                 # and never past max_tokens
        rows = np.arange(B)[None, :]
        g = np.full(k_max, g0)
        for _ in range(4):              # Dinkelbach, for every bound K at once: argmax sum(E) - g * T
            score = np.where(allowed, gain[None] - g[:, None, None] * charge[None], -np.inf)
            ks = score.argmax(axis=2)                                             # (K, B)
            g = gain[rows, ks].sum(axis=1) / (shared + charge[rows, ks].sum(axis=1))
        g = np.where(ks.max(axis=1) > 0, g, -np.inf)
        best = int(g.argmax())
        if g[best] <= margin * g0:
            return self._no_speculation(seqs, base, probe_cost, d3, catchup)
        self.idle_steps, self.idle_seconds = 0, 0.0
        best_k = ks[best]
        self.last_prediction = base + d1 * int(best_k.max()) + c3 * (B == 1) + float(cost[np.arange(B), best_k].sum())
        return best_k.tolist()

    def _choose_one(self, seq, alpha: float, k_max: int, base: float, margin: float, catchup: float) -> list[int]:
        """choose() for a lone request, the same objective without arrays: the k in 1..k_max (never past
        max_tokens) with the best expected tokens / step time, if it beats k = 0 by the margin."""
        c0, c1, c2, c3, c4, c5 = self.target.coef.tolist()
        d1, d2, d3 = self.draft.coef.tolist()
        left = max(1, seq.params.max_tokens - seq.num_output)
        best_k, best_g = 0, margin / base
        for k in range(1, min(k_max, left - 1) + 1):
            gain = (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
            charge = (c1 + c4 + d2) * k + c5 + d3 * catchup * gain / left        # catch-up spread out
            g = gain / (base + d1 * k + c3 + charge)
            if g > best_g:
                best_k, best_g = k, g
        if best_k == 0:
            return self._no_speculation([seq], base, d1 + c3 + c1 + c4 + d2 + c5, d3, [catchup])
        self.idle_steps, self.idle_seconds = 0, 0.0
        self.last_prediction = base + d1 * best_k + c3 + (c1 + c4 + d2) * best_k + c5 + d3 * catchup
        return [best_k]

    def _no_speculation(self, seqs, base: float, probe_cost: float, d3: float, catchup) -> list[int]:
        """k = 0 for all, except that after `explore_every` such steps the request with the oldest
        acceptance information drafts one token (its forecast feeds the margin too, so a margin that
        grew while speculating can shrink again)."""
        ks = [0] * len(seqs)
        self.idle_steps += 1
        self.idle_seconds += base
        self.last_prediction = base
        if self.idle_steps >= self.explore_every:
            i = min(range(len(seqs)), key=lambda j: self.last_drafted.get(seqs[j].seq_id, -1))
            cost = probe_cost + d3 * (catchup[i] if catchup is not None else 0)
            if self.idle_seconds * self.explore_budget >= cost * self.probe_scale:
                self.idle_steps, self.idle_seconds = 0, 0.0
                ks[i] = 1
                self.last_prediction = base + cost
                self._probe = (base, cost)
        return ks
