"""SpecController: how many tokens to draft for each running sequence this step.

Contract: `choose(seqs, k_max) -> list[int]`, each in 0..k_max. The Speculator then clips each k so a
sequence never drafts past its max_tokens or the context.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from afford.core.sequence import Sequence
from afford.registry import registry

CONTROLLERS, register = registry()


class SpecController(ABC):
    name = "abstract"

    @abstractmethod
    def choose(self, seqs: list[Sequence], k_max: int) -> list[int]: ...

    def observe(self, step_stats) -> None:
        """Called after each step with its StepStats (adaptive controllers learn from it)."""

    def forget(self, seq_id: int) -> None:
        """A sequence finished or was preempted."""

    def profile(self, engine) -> None:
        """A short warm-up measurement at start-up (adaptive controllers)."""


@register("fixed")
class FixedK(SpecController):
    def choose(self, seqs, k_max):
        return [k_max] * len(seqs)


@register("off")
class Off(SpecController):
    def choose(self, seqs, k_max):
        return [0] * len(seqs)


class StepTimeModel:
    """Least-squares fit of step seconds against features, over a window of recent observations,
    warm-started from a profiling pass. predict(x) = max(0, coef . x)."""

    def __init__(self, n_features: int, window: int = 256, ridge: float = 1e-9):
        self.n, self.window, self.ridge = n_features, window, ridge
        self.X: list[list[float]] = []
        self.y: list[float] = []
        self.coef = np.zeros(n_features)

    def add(self, x: list[float], seconds: float) -> None:
        self.X.append(list(x))
        self.y.append(seconds)
        if len(self.X) > self.window:
            del self.X[0], self.y[0]
        self._fit()

    def _fit(self) -> None:
        X, y = np.asarray(self.X), np.asarray(self.y)
        A = X.T @ X + self.ridge * np.eye(self.n)
        coef = np.linalg.solve(A, X.T @ y)
        self.coef = np.maximum(coef, 0.0)       # times never fall with more work

    def predict(self, x) -> float:
        return float(np.maximum(np.asarray(x) @ self.coef, 0.0))


def expected_tokens(alpha: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Tokens a step yields with k drafts at i.i.d. acceptance alpha: (1 - a^(k+1)) / (1 - a)."""
    a = np.clip(alpha, 0.0, 0.999)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


@register("goodput")
class Goodput(SpecController):
    """SmartSpec (step3/decoding-methods.md §1): every step, choose each request's k in 0..k_max to
    maximize the batch's goodput = expected generated tokens / predicted step time.

    - acceptance: per request, an exponential moving average of accepted/drafted, starting from a
      global moving average (itself starting from `prior`);
    - step time = target verify (c0 + c1 * batched tokens + c2 * context tokens) + draft
      (d1 * max k + d2 * sum k), each fitted online by least squares, warm-started by `profile()`;
    - search: for each bound K = max k, Dinkelbach iterations pick every request's k independently
      (the time model is linear in sum k), then the best K wins; k = 0 everywhere when speculation
      does not pay.
    """

    def __init__(self, prior: float = 0.6, decay: float = 0.8):
        self.prior, self.decay = prior, decay
        self.global_alpha = prior
        self.alpha: dict[int, float] = {}
        self.target = StepTimeModel(3)
        self.draft = StepTimeModel(2)

    # -- estimators --
    def observe_acceptance(self, seq_id: int, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        r = accepted / drafted
        a = self.alpha.get(seq_id, self.global_alpha)
        self.alpha[seq_id] = self.decay * a + (1 - self.decay) * r
        self.global_alpha = 0.95 * self.global_alpha + 0.05 * r

    def observe_timing(self, batched_tokens: int, context_tokens: int, verify_s: float,
                       max_k: int, sum_k: int, draft_s: float) -> None:
        self.target.add([1.0, batched_tokens, context_tokens], verify_s)
        if max_k > 0:
            self.draft.add([max_k, sum_k], draft_s)

    def observe(self, st) -> None:
        if st.kind != "decode":
            return
        for sid, d, a in zip(st.seq_ids, st.k_per_seq, st.accepted_per_seq):
            self.observe_acceptance(sid, d, a)
        self.observe_timing(st.tokens_in, st.context_tokens, st.seconds - st.draft_seconds,
                            max(st.k_per_seq, default=0), sum(st.k_per_seq), st.draft_seconds)

    def forget(self, seq_id: int) -> None:
        self.alpha.pop(seq_id, None)

    # -- the choice --
    def step_time(self, ks: np.ndarray, contexts: np.ndarray) -> float:
        t = self.target.predict([1.0, float((ks + 1).sum()), float(contexts.sum())])
        if ks.max(initial=0) > 0:
            t += self.draft.predict([float(ks.max()), float(ks.sum())])
        return max(t, 1e-9)

    def choose(self, seqs, k_max):
        B = len(seqs)
        if B == 0:
            return []
        alpha = np.array([self.alpha.get(s.seq_id, self.global_alpha) for s in seqs])
        ctx = np.array([len(s.token_ids) for s in seqs], dtype=float)
        c1, d2 = self.target.coef[1], self.draft.coef[1]
        ks_grid = np.arange(k_max + 1)
        gain = expected_tokens(alpha[:, None], ks_grid[None, :])            # (B, k_max + 1)
        best_k, best_g = np.zeros(B, dtype=int), gain[:, 0].sum() / self.step_time(np.zeros(B, int), ctx)
        for K in range(1, k_max + 1):
            g = best_g
            ks = np.zeros(B, dtype=int)
            for _ in range(4):                                              # Dinkelbach on sum(E) - g * T
                score = gain[:, :K + 1] - g * (c1 + d2) * ks_grid[None, :K + 1]
                ks = score.argmax(axis=1)
                if ks.max() == 0:
                    break
                g = gain[np.arange(B), ks].sum() / self.step_time(ks, ctx)
            if ks.max() > 0 and g > best_g:
                best_k, best_g = ks, g
        return best_k.tolist()

    def profile(self, engine) -> None:
        """Warm start: time a few synthetic target verifies and draft steps of different sizes."""
        import time
        runner, pool = engine.runner, engine.pool
        prop = engine.spec.proposer if engine.spec else None
        for batch, per in ((1, 1), (1, 5), (4, 1), (4, 5), (16, 1), (16, 3)):
            ids = [-(i + 1) for i in range(batch)]
            ctx = 32
            if pool.num_free < batch * (-(-(ctx + per) // pool.block_size)):
                continue
            runner.forward(ids, [0] * batch, [[1] * ctx] * batch)
            t = time.perf_counter()
            runner.forward(ids, [ctx] * batch, [[1] * per] * batch, [list(range(per))] * batch)
            self.target.add([1.0, batch * per, batch * (ctx + per)], time.perf_counter() - t)
            if prop is not None and getattr(prop, "runner", None) is not None:
                prop.runner.forward(ids, [0] * batch, [[1] * ctx] * batch)
                t = time.perf_counter()
                for j in range(per):
                    prop.runner.forward(ids, [ctx + j] * batch, [[1]] * batch)
                self.draft.add([per, batch * per], time.perf_counter() - t)
                for i in ids:
                    prop.pool.free(i)
            elif prop is not None:
                self.draft.add([per, batch * per], 0.0)
            for i in ids:
                pool.free(i)
