"""The step-time model of the goodput controller: non-negative least squares over recent steps."""
from __future__ import annotations

from collections import deque

import numpy as np


class StepTimeModel:
    """Non-negative least-squares fit of step seconds against features. The observations are kept in
    rings per regime (the caller's `bucket`, e.g. the batch size's power of two), the last `per_bucket`
    of each, so an hour at light load does not push out what batches of 16 cost; the profiling pass's
    observations stay as low-weight anchors for regimes never seen. predict(x) = coef . x."""

    def __init__(self, n_features: int, per_bucket: int = 64, anchor_weight: float = 0.1, refit_every: int = 8):
        self.n, self.per_bucket, self.anchor_weight, self.refit_every = n_features, per_bucket, anchor_weight, refit_every
        self.rings: dict = {}
        self.anchor_X: list[list[float]] = []
        self.anchor_y: list[float] = []
        self.count = 0
        self.coef = np.zeros(n_features)

    def add(self, x: list[float], seconds: float, anchor: bool = False, bucket=0) -> None:
        if anchor:
            self.anchor_X.append(list(x))
            self.anchor_y.append(seconds)
        else:
            self.rings.setdefault(bucket, deque(maxlen=self.per_bucket)).append((list(x), seconds))
            self.count += 1
            every = self.refit_every if self.count <= 256 else 8 * self.refit_every
            if self.count > 32 and self.count % every:
                return                     # a refit costs ~0.1-1 ms; the coefficients move slowly
        self._fit()

    def _fit(self) -> None:
        seen = [obs for ring in self.rings.values() for obs in ring]
        w = np.sqrt(self.anchor_weight) if seen else 1.0
        X = np.concatenate([np.asarray([o[0] for o in seen]).reshape(-1, self.n),
                            w * np.asarray(self.anchor_X).reshape(-1, self.n)])
        y = np.concatenate([np.asarray([o[1] for o in seen]), w * np.asarray(self.anchor_y)])
        if not len(y):
            return
        scale = np.maximum(np.abs(X).max(axis=0), 1e-12)          # columns of rows, tokens, seconds...
        active = np.ones(self.n, dtype=bool)
        coef = np.zeros(self.n)
        for _ in range(self.n):            # active set: a negative coefficient is dropped, the rest refitted
            coef[:] = 0.0
            if not active.any():
                break
            sol = np.linalg.lstsq(X[:, active] / scale[active], y, rcond=None)[0] / scale[active]
            coef[active] = sol
            if (sol >= 0).all():
                break
            active[np.flatnonzero(active)[sol < 0]] = False
        self.coef = coef

    def predict(self, x) -> float:
        return float(np.asarray(x) @ self.coef)
