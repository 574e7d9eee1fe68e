"""AFDRunner: the engine's ModelRunner with the FFN half of every layer on FFN worker processes, and with
attention=N>1 each sequence's K/V and attention on one of N attention workers (this process and N - 1
worker processes; afford/afd/worker.py serve_attention), every FFN worker answering all of them per layer
and micro-batch in one product.

One forward, with the step's sequences split into m micro-batches (contiguous groups, balanced by tokens):

    for layer l:  for micro-batch i:  wait for i's FFN output of layer l-1, add it to the residual,
                                      attention of i at layer l (writes its K/V), norm, route (MoE),
                                      send to the FFN workers (asynchronously)
    then the last layer's outputs, the final norm and the LM head.

While the workers run micro-batch i's FFN, this process runs micro-batch i+1's attention: with m >= 2 the
two sides overlap, and so do the transfers (gloo sends and receives on its own threads). The K/V a
micro-batch writes at layer l is in the pool before a later micro-batch of the same layer attends, so the
split never changes what any token sees.
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import threading
import time
import weakref

import torch

from afford.afd.pipeline import run_layers
from afford.afd.protocol import (
    DATA,
    FINAL,
    FORWARD,
    KV_KEY,
    MAX_MICRO_BATCHES,
    MODEL_KEY,
    PING,
    SPEC_KEY,
    STATS,
    STOP,
    AFDSpec,
    Link,
    error_key,
    header,
    make_group,
    make_store,
    model_signature,
    ready_key,
)
from afford.attention.backend import ForwardBatch
from afford.config import ConfigError
from afford.core.runner import ModelRunner
from afford.models.native import NativeDecoder, native_error, unsupported
from afford.models.transformer import MoE

START_TIMEOUT_S = 120.0     # for workers to start and load their share (a message's timeout is timeout_s)


class AFDWorkerLost(RuntimeError):
    """A worker (FFN or attention) stopped answering: the deployment cannot finish any forward; restart it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_batch(batch: ForwardBatch, m: int) -> list[tuple[ForwardBatch, int, int]]:
    """Up to m contiguous groups of the batch's sequences, balanced by tokens: (sub-batch, first token, end)."""
    m = max(1, min(m, len(batch.seq_ids)))
    total, groups, start_seq, at, fed = batch.num_tokens, [], 0, 0, 0
    for j, n in enumerate(batch.query_lens):
        fed += n
        last = j == len(batch.query_lens) - 1
        left_groups, left_seqs = m - len(groups) - 1, len(batch.query_lens) - j - 1
        if last or (left_groups > 0 and (fed >= total * (len(groups) + 1) / m or left_seqs == left_groups)):
            sl = slice(start_seq, j + 1)
            starts = batch.starts[sl]
            phase = batch.phase if batch.phase == "decode" else ("prefill" if not any(starts) else "verify")
            sub = ForwardBatch(phase, batch.seq_ids[sl], starts, batch.query_lens[sl], batch.tables[sl],
                               batch.block_size, batch.slot_mapping[at:fed], batch.positions[at:fed])
            groups.append((sub, at, fed))
            start_seq, at = j + 1, fed
    return groups


def select_batch(batch: ForwardBatch, idx: list[int]) -> tuple[ForwardBatch, torch.Tensor]:
    """The batch's sequences idx (in order) as a batch of their own, and the flat indices of their tokens."""
    offsets, at = [], 0
    for n in batch.query_lens:
        offsets.append(at)
        at += n
    tok = torch.cat([torch.arange(offsets[j], offsets[j] + batch.query_lens[j]) for j in idx])
    starts = [batch.starts[j] for j in idx]
    phase = batch.phase if batch.phase == "decode" else ("prefill" if not any(starts) else "verify")
    return ForwardBatch(phase, [batch.seq_ids[j] for j in idx], starts, [batch.query_lens[j] for j in idx],
                        [batch.tables[j] for j in idx], batch.block_size, batch.slot_mapping[tok],
                        batch.positions[tok]), tok


def _stop_workers(pg, procs: list[subprocess.Popen], world_size: int, state: dict) -> None:
    """STOP every worker, then make sure no process is left behind (the finalizer: runs at close() or exit).
    A broken deployment's workers may be stuck mid-forward: they are killed, not asked."""
    state["closed"] = True
    if pg is not None and not state.get("broken"):
        for r in range(1, world_size):
            if r <= len(procs) and procs[r - 1].poll() is not None:
                continue
            try:
                pg.send([header(STOP)], r, 0).wait(datetime.timedelta(seconds=5))
            except Exception:
                pass
    for p in procs:
        try:
            p.wait(timeout=0 if state.get("broken") else 5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _watchdog(procs: list[subprocess.Popen], state: dict, every_s: float = 0.2) -> None:
    """One local worker gone ends the deployment: kill the others too, so that no wait blocks on a live worker
    that itself waits for the dead one (gloo raises at once on a closed connection, not on a stalled one)."""
    while not state.get("closed"):
        if any(p.poll() is not None for p in procs):
            if not state.get("closed"):
                state["broken"] = True
                for p in procs:
                    p.kill()
            return
        time.sleep(every_s)


class AFDRunner(ModelRunner):
    def __init__(self, model, pool, model_path: str, spec: AFDSpec, micro_batches: int = 3,
                 attention: str = "auto", address: str | None = None, device: str = "cpu", dtype: str = "auto",
                 timeout_s: float = 120.0, attention_options: dict | None = None, native: bool = True):
        """address None: spawn the workers on this host (ranks 1..N-1 attention, N..N+M-1 FFN); "host:port":
        wait there for workers started with `afford afd-worker` (they read N and M from rank 0's store)."""
        if not 1 <= micro_batches <= MAX_MICRO_BATCHES:
            raise ConfigError(f"micro_batches must be in 1..{MAX_MICRO_BATCHES}, got {micro_batches}")
        super().__init__(model, pool, attention, native=False, graphs=False, attention_options=attention_options)
        self.spec, self.micro_batches = spec, micro_batches
        self.world_size = spec.world_size
        self.moe = [isinstance(layer.mlp, MoE) for layer in model.model.layers]
        model.drop_ffn()                                  # the workers hold the FFN weights (a no-op when the
                                                          # engine loaded the model without them)
        # each layer's attention half as one C++ call on the native forward's kernels (paged attention that
        # reads the blocks in place) where it applies, the Python path otherwise; built (on a first run:
        # compiled) before any worker starts
        self.native_attn = NativeDecoder.build(model, self.kv, pool.block_size, self.backend.name) \
            if native else None
        self.procs: list[subprocess.Popen] = []
        self._broken: AFDWorkerLost | None = None
        self.attention, self.ffn_ranks = spec.attention, spec.ffn_ranks
        self.home: dict[int, int] = {}                  # seq_id -> its attention worker (attention=N>1)
        if spec.attention > 1 and self.native_attn is None:
            why = unsupported(model, self.backend.name) or native_error() or "native=False"
            raise ConfigError(f"afd attention=N>1 runs every attention worker's layers on the native CPU forward, "
                              f"which does not take this model here ({why}); use attention=1")
        if address is None:
            address = f"127.0.0.1:{free_port()}"
            threads = max(1, (os.cpu_count() or 2) // self.world_size)
            for r in range(1, self.world_size):
                cmd = [sys.executable, "-m", "afford.afd.worker", "--model", str(model_path), "--address", address,
                       "--rank", str(r), "--world-size", str(self.world_size), "--device", device, "--dtype", dtype,
                       "--threads", str(threads), "--timeout", str(timeout_s), "--attention", str(spec.attention)]
                # own session: a Ctrl-C at the terminal reaches the engine, which stops them itself
                self.procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True))
        self.address = address
        try:
            store = make_store(address, 0, self.world_size, timeout_s)
            store.set(MODEL_KEY, model_signature(model.cfg, self.dtype))
            store.set(KV_KEY, f"{self.kv[0][0].shape[0]},{pool.block_size}")
            store.set(SPEC_KEY, f"{spec.attention},{spec.ffn}")
            self._await_workers(store, max(timeout_s, START_TIMEOUT_S))
            self.pg = make_group(store, 0, self.world_size, timeout_s)
            self.link = Link.from_env()
        except Exception:
            _stop_workers(None, self.procs, 0, {"broken": True})
            raise
        self._state = {"broken": False}                  # shared with the finalizer and the watchdog
        self._finalizer = weakref.finalize(self, _stop_workers, self.pg, self.procs, self.world_size, self._state)
        if self.procs:
            threading.Thread(target=_watchdog, args=(self.procs, self._state), daemon=True,
                             name="afford-afd-watchdog").start()
        L = len(self.moe)
        self.attn_s, self.wait_s = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
        self.steps = 0

    def _await_workers(self, store, timeout_s: float) -> None:
        """Until every worker has loaded its share; a worker that exits first fails at once, not at the timeout."""
        deadline = time.monotonic() + timeout_s
        while not store.check([ready_key(r) for r in range(1, self.world_size)]):
            for r in range(1, self.world_size):
                if store.check([error_key(r)]):
                    _stop_workers(None, self.procs, 0, {"broken": True})
                    raise AFDWorkerLost(f"AFD start-up failed: {self._role(r)} rank {r}: "
                                        f"{store.get(error_key(r)).decode()}")
            dead = [(r, p.returncode) for r, p in enumerate(self.procs, start=1) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                _stop_workers(None, self.procs, 0, {"broken": True})
                why = f"worker(s) exited with codes {dead} (their error is printed above)" if dead else \
                    f"not every worker joined {self.address} within {timeout_s:.0f} s"
                raise AFDWorkerLost(f"AFD start-up failed: {why}")
            time.sleep(0.05)

    def _home(self, seq_id: int) -> int:
        """The attention worker that holds a sequence's K/V: given at its first forward to the worker with the
        fewest live sequences, kept while the pool holds its blocks (a preempted sequence is recomputed
        from its prompt, so it may move)."""
        if seq_id not in self.home:
            for sid in [s for s in self.home if s not in self.pool.tables]:
                del self.home[sid]
            load = [0] * self.attention
            for r in self.home.values():
                load[r] += 1
            self.home[seq_id] = load.index(min(load))
        return self.home[seq_id]

    def _role(self, rank: int) -> str:
        return "attention worker" if rank < self.spec.attention else "FFN worker"

    @property
    def broken(self) -> AFDWorkerLost | None:
        """Why no forward can run any more (a worker died: seen by a forward, or by the watchdog at once)."""
        if self._broken is None and self._state["broken"]:
            codes = [f"{self._role(r)} rank {r} (exit code {p.returncode})" for r, p in enumerate(self.procs, start=1)
                     if p.poll() is not None]
            self._broken = AFDWorkerLost(f"a worker is gone: {', '.join(codes)}; the AFD deployment cannot "
                                         f"continue: restart it")
        return self._broken

    def close(self) -> None:
        """Stop the workers (idempotent; also runs when the runner is collected or the process exits)."""
        self._finalizer()
        if getattr(self, "link", None) is not None:
            self.link.pool.shutdown(wait=False)            # the emulated link's idle wire threads

    # ---- messages ----
    def _check(self, fn):
        """Run a conversation with the workers; any failure in it leaves the two sides out of step, so the
        deployment is marked broken (and the message says which side failed)."""
        if self.broken is not None:
            raise self.broken
        try:
            return fn()
        except BaseException as e:
            self._state["broken"] = True
            transport = isinstance(e, RuntimeError) and any(w in str(e) for w in ("Connection", "gloo", "Timed out"))
            if transport:
                time.sleep(0.2)                    # a worker that crashed: let its exit code arrive
                dead = [f"{self._role(r)} rank {r} (exit code {p.returncode})" for r, p in enumerate(self.procs, start=1)
                        if p.poll() is not None]
                why = f"a worker is gone{': ' + ', '.join(dead) if dead else ''} ({e})"
            else:
                why = f"a forward failed on the attention side mid-conversation ({type(e).__name__}: {e}), so the " \
                      f"workers are out of step"
            self._broken = AFDWorkerLost(f"{why}; the AFD deployment cannot continue: restart it")
            raise self._broken from e

    def _to_ffn(self, h: torch.Tensor) -> None:
        for work in [self.pg.send([h], r, 0) for r in self.ffn_ranks]:
            work.wait()

    def worker_timings(self) -> torch.Tensor:
        """(FFN workers, 2, layers) seconds each spent waiting for input / computing since the last call."""
        def ask():
            self._to_ffn(header(STATS))
            out = torch.zeros(len(self.ffn_ranks), 2, len(self.moe), dtype=torch.float64)
            for j, r in enumerate(self.ffn_ranks):
                self.pg.recv([out[j]], r, 0).wait()
            return out
        return self._check(ask)

    def timings(self) -> dict:
        """Per-layer seconds since the last call: attention compute and waiting here, the workers' FFN."""
        w = self.worker_timings()
        out = {"steps": self.steps, "attention_s": self.attn_s.tolist(), "wait_s": self.wait_s.tolist(),
               "ffn_s": w[:, 1].max(0).values.tolist(), "ffn_wait_s": w[:, 0].max(0).values.tolist()}
        self.attn_s.zero_(), self.wait_s.zero_()
        self.steps = 0
        return out

    def ping(self, rows: int, cols: int, repeats: int = 20) -> float:
        """Seconds of one (rows, cols) float32 round trip to the first FFN worker, the transfer alone (median)."""
        def go():
            f = self.ffn_ranks[0]
            self.pg.send([header(PING, rows, cols, repeats)], f, 0).wait()
            buf, times = torch.randn(rows, cols), []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.pg.send([buf], f, 1).wait()
                self.pg.recv([buf], f, 1).wait()
                times.append(time.perf_counter() - t0)
            return sorted(times)[len(times) // 2]
        return self._check(go)

    # ---- the forward ----
    @torch.inference_mode()
    def run(self, batch: ForwardBatch, ids: torch.Tensor, logits_rows: list[int] | None = None) -> torch.Tensor:
        return self._check(lambda: self._run(batch, ids, logits_rows))

    def _run(self, batch, ids, logits_rows):
        model, N, m = self.model, self.attention, self.micro_batches
        # each sequence's attention worker (its K/V lives there); rank 0 runs the rest of the step
        parts: dict[int, tuple[ForwardBatch, torch.Tensor | None]] = {}
        if N == 1:
            parts[0] = (batch, None)
        else:
            by_rank: dict[int, list[int]] = {}
            for j, sid in enumerate(batch.seq_ids):
                by_rank.setdefault(self._home(sid), []).append(j)
            parts = {r: select_batch(batch, idx) for r, idx in sorted(by_rank.items())}
        groups = {r: split_batch(sub, m) for r, (sub, _) in parts.items()}
        width = max(len(g) for g in groups.values())
        mine = groups.get(0, [])
        metas, rope = [], []
        if self.native_attn is None:                # the Python path's inputs: what can fail locally, before
            for sub, _, _ in mine:                  # the workers hear (N = 1 here)
                metas.append(self.backend.prepare_metadata(sub, self.kv))
                rope.append((model.rope_cos[sub.positions].unsqueeze(-2).to(self.dtype),
                             model.rope_sin[sub.positions].unsqueeze(-2).to(self.dtype)))
        sizes = []                                  # tokens per (attention worker, micro-batch), 0-padded
        for r in range(N):
            n = [e - s for _, s, e in groups.get(r, [])]
            sizes += n + [0] * (width - len(n))
        self._to_ffn(header(FORWARD, width, N, sizes=sizes))
        sends = []
        for r, (sub, tok) in parts.items():                    # the other attention workers' inputs
            if r == 0:
                continue
            w = max(len(t) for t in sub.tables)
            blocks = torch.tensor([t + [0] * (w - len(t)) for t in sub.tables], dtype=torch.long)   # (seqs, w)
            data = torch.cat([ids[tok].long(), sub.positions.long(), sub.slot_mapping.long(),
                              torch.tensor(sub.query_lens, dtype=torch.long), blocks.view(-1)])
            h = header(FORWARD, sub.num_tokens, len(sub.seq_ids), w,
                       sizes=[len(groups[r]), *[len(g.seq_ids) for g, _, _ in groups[r]]])
            sends += [self.pg.send([h], r, 0), self.pg.send([data], r, DATA)]
        hid = None
        if mine:
            tok0 = parts[0][1]
            ids0 = ids if tok0 is None else ids[tok0]
            xs = [model.model.embed_tokens(ids0[s:e]) for _, s, e in mine]                   # (n_i, hidden)
            tables = (model.rope_cos, model.rope_sin)

            def attn(i, li, x):
                if self.native_attn is not None:
                    return x, self.native_attn.attn_half(x, mine[i][0], li)             # x += attention, in place
                layer = model.model.layers[li]
                x = x + layer.self_attn(layer.input_layernorm(x), *rope[i], metas[i], li, tables)
                return x, layer.post_attention_layernorm(x)
            xs = run_layers(model, self.pg, self.ffn_ranks, xs, self.moe, attn, self.attn_s, self.wait_s, self.link)
            hid = torch.cat(xs) if len(xs) > 1 else xs[0]
        if N > 1:                                             # every token's hidden state, in the batch's order
            full = torch.empty(batch.num_tokens, model.cfg.hidden_size, dtype=self.dtype)
            for r, (sub, tok) in parts.items():
                if r == 0:
                    full[tok] = hid
                else:
                    buf = torch.empty(sub.num_tokens, model.cfg.hidden_size, dtype=self.dtype)
                    self.pg.recv([buf], r, FINAL).wait()
                    full[tok] = buf
            hid = full
        for work in sends:
            work.wait()
        self.steps += 1
        hid = model.model.norm(hid)                                                         # (N, hidden)
        if logits_rows == []:
            return torch.empty(0, model.cfg.vocab_size, device=self.device)
        if logits_rows is not None:
            hid = hid.index_select(0, torch.tensor(logits_rows, device=self.device))        # (R, hidden)
        return model.lm_head(hid).float()                                                  # (R, V)
