"""A probabilistic circuit that codes small images exactly: a hidden Chow-Liu tree (HCLT).

Structure (Liu, Mandt & Van den Broeck 2022; ../shared/reference/other-methods.md §6): the maximum spanning
tree of the pixels' pairwise mutual information, rooted at its centre; every pixel X_v gets a latent Z_v with
H states, the latents follow the tree (P(Z_root), P(Z_v | Z_parent)) and each X_v is emitted from its Z_v.
Summing the latents out is a smooth, decomposable circuit, so every marginal -- any set of pixels observed,
the rest summed out -- is one upward pass. Trained by full-batch EM: the expected counts of a parameter are
the gradient of the log-likelihood with respect to its logarithm (the standard circuit identity), so the
E-step is one backward pass.

Coding (`Conditionals`): pixels in the tree's post-order; pixel k's conditional over its K values is
P(x_<k, X_k = x) / P(x_<k). Node messages of earlier pixels stay cached, and a pixel's K candidates are
propagated only from its node up to the lowest ancestor that contains every pixel seen so far; above that node
nothing is observed, so the rest of the circuit is that node's prior marginal (the paper's "top-down
probability"). Each conditional re-evaluates that one short path instead of the whole circuit.
pyjuice (the authors' PyTorch library) runs its layers as Triton GPU kernels, so this is a small log-space
PyTorch evaluator of the same model that runs on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor
F64 = torch.float64


def mutual_information(x: np.ndarray, k: int, pseudocount: float = 0.1) -> np.ndarray:
    """x (N, D) ints in [0, k) -> (D, D) pairwise mutual information (nats), diagonal 0."""
    n, d = x.shape
    onehot = np.eye(k)[x]                                                      # (N, D, K)
    joint = np.einsum("nik,njl->ijkl", onehot, onehot) + pseudocount / (k * k)   # (D, D, K, K)
    joint /= joint.sum(axis=(2, 3), keepdims=True)
    pi = joint.sum(3)                                                          # (D, D, K): marginal of i
    pj = joint.sum(2)                                                          # (D, D, K): marginal of j
    mi = (joint * (np.log(joint) - np.log(pi[..., :, None]) - np.log(pj[..., None, :]))).sum((2, 3))
    np.fill_diagonal(mi, 0.0)
    return mi


def chow_liu_tree(x: np.ndarray, k: int) -> np.ndarray:
    """The maximum-MI spanning tree rooted at its centre: parent[v] (-1 at the root)."""
    from scipy.sparse.csgraph import breadth_first_order, minimum_spanning_tree
    mi = mutual_information(x, k)
    d = len(mi)
    w = (mi.max() + 1.0) - mi                      # all positive: scipy reads 0 as "no edge"
    np.fill_diagonal(w, 0.0)
    tree = minimum_spanning_tree(w)
    tree = tree + tree.T

    def farthest(src):
        order, pred = breadth_first_order(tree, src, directed=False)
        depth = np.zeros(d, dtype=int)
        for v in order[1:]:
            depth[v] = depth[pred[v]] + 1
        return int(order[np.argmax(depth[order])]), pred

    a, _ = farthest(0)
    b, pred = farthest(a)
    path = [b]
    while path[-1] != a:
        path.append(int(pred[path[-1]]))
    root = path[len(path) // 2]                                 # the middle of a longest path: the centre
    _, pred = breadth_first_order(tree, root, directed=False)
    parent = np.asarray(pred, dtype=np.int64)
    parent[root] = -1
    return parent


@dataclass
class HCLT:
    """parent (D,) with -1 at the root; log_prior (H,); log_trans (D, H, H) [parent state, child state];
    log_emit (D, H, K). All float64, each distribution normalised."""
    parent: np.ndarray
    log_prior: Tensor
    log_trans: Tensor
    log_emit: Tensor

    def __post_init__(self):
        d = len(self.parent)
        self.root = int(np.flatnonzero(self.parent < 0)[0])
        self.children: list[list[int]] = [[] for _ in range(d)]
        for v, p in enumerate(self.parent):
            if p >= 0:
                self.children[p].append(v)
        self.depth = np.zeros(d, dtype=int)
        self.topo = [self.root]                                     # parents before children
        for v in self.topo:
            for c in self.children[v]:
                self.depth[c] = self.depth[v] + 1
                self.topo.append(c)
        self.levels = [torch.tensor([v for v in range(d) if self.depth[v] == lv and v != self.root])
                       for lv in range(int(self.depth.max()), 0, -1)]      # deepest first, root excluded
        self.parent_t = torch.as_tensor(self.parent)

    @property
    def num_vars(self) -> int:
        return len(self.parent)

    @property
    def num_values(self) -> int:
        return self.log_emit.shape[2]

    @classmethod
    def random(cls, parent: np.ndarray, hidden: int, values: int, seed: int = 0) -> "HCLT":
        g = torch.Generator().manual_seed(seed)
        d = len(parent)

        def dist(*shape):
            return torch.log(torch.rand(*shape, generator=g, dtype=F64) + 0.5).log_softmax(-1)
        return cls(np.asarray(parent), dist(hidden), dist(d, hidden, hidden), dist(d, hidden, values))

    def leaves(self, x: Tensor, observed: Tensor | None = None, params: tuple | None = None) -> Tensor:
        """x (N, D) values -> (N, D, H) log P(x_v | Z_v), 0 (summed out) where not observed."""
        log_emit = self.log_emit if params is None else params[2]
        leaf = log_emit.transpose(1, 2)[torch.arange(self.num_vars)[None, :], x]        # (N, D, H)
        return leaf if observed is None else leaf * observed[..., None]

    def log_likelihood(self, x: Tensor, observed: Tensor | None = None, params: tuple | None = None) -> Tensor:
        """log P(observed pixels of each row), (N,); one upward pass, a tree level at a time."""
        log_prior, log_trans, _ = (self.log_prior, self.log_trans, self.log_emit) if params is None else params
        inner = self.leaves(x, observed, params)                                          # (N, D, H)
        for nodes in self.levels:
            # message to the parent: (N, n, H_parent) = logsumexp over the child's state
            msg = torch.logsumexp(log_trans[nodes][None] + inner[:, nodes, None, :], dim=-1)
            inner = inner.index_add(1, self.parent_t[nodes], msg)
        return torch.logsumexp(log_prior + inner[:, self.root], dim=-1)

    def prior_marginals(self) -> Tensor:
        """(D, H) log P(Z_v) with nothing observed: the top-down probabilities."""
        out = torch.empty(self.num_vars, self.log_prior.shape[0], dtype=F64)
        out[self.root] = self.log_prior
        for v in self.topo[1:]:
            out[v] = torch.logsumexp(out[self.parent[v]][:, None] + self.log_trans[v], dim=0)
        return out

    def postorder(self) -> list[int]:
        out, stack = [], [(self.root, False)]
        while stack:
            v, done = stack.pop()
            if done:
                out.append(v)
            else:
                stack.append((v, True))
                stack.extend((c, False) for c in reversed(self.children[v]))
        return out


def fit(x: np.ndarray, values: int, hidden: int = 16, iters: int = 60, pseudocount: float = 0.1,
        seed: int = 0) -> tuple[HCLT, list[float]]:
    """Chow-Liu structure, then full-batch EM. Returns the model and the training NLL (bits per dimension)
    after each iteration."""
    parent = chow_liu_tree(x, values)
    model = HCLT.random(parent, hidden, values, seed)
    xt = torch.as_tensor(x, dtype=torch.long)
    history = []
    for _ in range(iters):
        params = tuple(t.detach().clone().requires_grad_(True)
                       for t in (model.log_prior, model.log_trans, model.log_emit))
        ll = model.log_likelihood(xt, params=params).sum()
        ll.backward()                        # d ll / d log(theta) = expected count of theta (E-step)
        counts = [p.grad + pseudocount for p in params]
        model.log_prior, model.log_trans, model.log_emit = (torch.log(c / c.sum(-1, keepdim=True)) for c in counts)
        history.append(-float(ll.detach()) / (x.size * np.log(2)))
    return model, history


def bits_per_dim(model: HCLT, x: np.ndarray) -> float:
    with torch.no_grad():
        return -float(model.log_likelihood(torch.as_tensor(x, dtype=torch.long)).sum()) / (x.size * np.log(2))


class Conditionals:
    """Pixel-by-pixel conditionals for a batch of N images, in `order` (the tree's post-order). Call
    `next()` for the current pixel's (N, K) log conditional, then `commit(values)` with its (N,) values.
    Encoder and decoder make the same calls, so they see the same numbers bit for bit."""

    def __init__(self, model: HCLT, n: int):
        self.m = model
        d, h = model.num_vars, model.log_prior.shape[0]
        self.order = model.postorder()
        self.leaf = torch.zeros(n, d, h, dtype=F64)            # log P(x_v | Z_v); 0 = summed out
        self.msg = torch.zeros(n, d, h, dtype=F64)             # each node's message to its parent (0 = nothing seen)
        self.top = model.prior_marginals()                      # (D, H)
        self.lca: int | None = None                             # lowest node holding every pixel seen so far
        self.step = 0
        self.evaluations = 0                                    # node evaluations, for the benchmark
        self._path: list[tuple[int, Tensor]] = []

    def _ancestors(self, v: int) -> list[int]:
        out = [v]
        while self.m.parent[out[-1]] >= 0:
            out.append(int(self.m.parent[out[-1]]))
        return out

    def _inner(self, v: int, skip: int = -1) -> Tensor:
        """(N, H) log inner value of node v from its leaf and its children's cached messages (minus `skip`)."""
        out = self.leaf[:, v]
        for c in self.m.children[v]:
            if c != skip:
                out = out + self.msg[:, c]
        return out

    def _up(self, v: int, inner: Tensor) -> Tensor:
        """(..., H) inner of v -> (..., H) its message in its parent's state space."""
        return torch.logsumexp(self.m.log_trans[v] + inner[..., None, :], dim=-1)

    def next(self) -> Tensor:
        m = self.m
        v = self.order[self.step]
        if self.lca is None:
            top = v
        else:
            up_v = set(self._ancestors(v))
            top = next(a for a in self._ancestors(self.lca) if a in up_v)
            u = self.lca                                         # refresh the old lca's chain below `top`
            while u != top:
                self.msg[:, u] = self._up(u, self._inner(u))
                self.evaluations += 1
                u = int(m.parent[u])
        cand = m.log_emit[v].T                                   # (K, H): the leaf for each candidate value
        cur = cand[None] + self._inner(v)[:, None, :]          # (N, K, H); v itself is not observed yet
        self._path = []
        u = v
        while u != top:
            msg = self._up(u, cur)                               # (N, K, H_parent)
            self._path.append((u, msg))
            p = int(m.parent[u])
            cur = self._inner(p, skip=u)[:, None, :] + msg
            u = p
            self.evaluations += 1
        self.evaluations += 1
        self._top = top
        joint = torch.logsumexp(self.top[top] + cur, dim=-1)    # (N, K): log P(x_<k, X_k = each value)
        return joint - torch.logsumexp(joint, dim=-1, keepdim=True)

    def commit(self, values) -> None:
        v = self.order[self.step]
        idx = torch.as_tensor(values, dtype=torch.long)
        rows = torch.arange(len(idx))
        self.leaf[:, v] = self.m.log_emit[v].T[idx]
        for u, msg in self._path:
            self.msg[:, u] = msg[rows, idx]
        self.lca = self._top
        self.step += 1


def compress_images(model: HCLT, x: np.ndarray) -> tuple[np.ndarray, Conditionals]:
    """x (N, D) ints -> the range coder's words; every pixel coded against its exact conditional."""
    from afford.compress import coder
    enc = coder.Encoder()
    cond = Conditionals(model, len(x))
    for v in cond.order:
        col = x[:, v]
        enc.encode(col, coder.frequencies(cond.next()))
        cond.commit(col)
    return enc.words(), cond


def decompress_images(model: HCLT, words: np.ndarray, n: int) -> np.ndarray:
    from afford.compress import coder
    dec = coder.Decoder(words)
    cond = Conditionals(model, n)
    x = np.zeros((n, model.num_vars), dtype=np.int64)
    for v in cond.order:
        x[:, v] = dec.decode(coder.frequencies(cond.next()))
        cond.commit(x[:, v])
    return x
