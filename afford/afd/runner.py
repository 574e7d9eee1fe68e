"""AFDRunner: the engine's ModelRunner with the FFN half of every layer on FFN worker processes.

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

from afford.afd.protocol import (
    FORWARD,
    MAX_MICRO_BATCHES,
    MODEL_KEY,
    PING,
    STATS,
    STOP,
    AFDSpec,
    error_key,
    header,
    make_group,
    make_store,
    model_signature,
    ready_key,
    tag,
)
from afford.attention.backend import ForwardBatch
from afford.config import ConfigError
from afford.core.runner import ModelRunner
from afford.models.native import NativeDecoder
from afford.models.transformer import MoE

START_TIMEOUT_S = 120.0     # for workers to start and load their share (a message's timeout is timeout_s)


class AFDWorkerLost(RuntimeError):
    """An FFN worker stopped answering: the deployment cannot finish any forward; restart it."""


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
        """address None: spawn spec.ffn workers on this host; "host:port": wait there for workers started
        with `afford afd-worker` (ranks 1..ffn)."""
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
        if address is None:
            address = f"127.0.0.1:{free_port()}"
            threads = max(1, (os.cpu_count() or 2) // self.world_size)
            for r in range(1, self.world_size):
                cmd = [sys.executable, "-m", "afford.afd.worker", "--model", str(model_path), "--address", address,
                       "--rank", str(r), "--world-size", str(self.world_size), "--device", device, "--dtype", dtype,
                       "--threads", str(threads), "--timeout", str(timeout_s)]
                # own session: a Ctrl-C at the terminal reaches the engine, which stops them itself
                self.procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True))
        self.address = address
        try:
            store = make_store(address, 0, self.world_size, timeout_s)
            store.set(MODEL_KEY, model_signature(model.cfg, self.dtype))
            self._await_workers(store, max(timeout_s, START_TIMEOUT_S))
            self.pg = make_group(store, 0, self.world_size, timeout_s)
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
                    raise AFDWorkerLost(f"AFD start-up failed: FFN worker rank {r}: {store.get(error_key(r)).decode()}")
            dead = [(r, p.returncode) for r, p in enumerate(self.procs, start=1) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                _stop_workers(None, self.procs, 0, {"broken": True})
                why = f"FFN worker(s) exited with codes {dead} (their error is printed above)" if dead else \
                    f"not every FFN worker joined {self.address} within {timeout_s:.0f} s"
                raise AFDWorkerLost(f"AFD start-up failed: {why}")
            time.sleep(0.05)

    @property
    def broken(self) -> AFDWorkerLost | None:
        """Why no forward can run any more (a worker died: seen by a forward, or by the watchdog at once)."""
        if self._broken is None and self._state["broken"]:
            codes = [f"rank {r} (exit code {p.returncode})" for r, p in enumerate(self.procs, start=1)
                     if p.poll() is not None]
            self._broken = AFDWorkerLost(f"an FFN worker is gone: {', '.join(codes)}; the AFD deployment cannot "
                                         f"continue: restart it")
        return self._broken

    def close(self) -> None:
        """Stop the workers (idempotent; also runs when the runner is collected or the process exits)."""
        self._finalizer()

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
                dead = [f"rank {r} (exit code {p.returncode})" for r, p in enumerate(self.procs, start=1)
                        if p.poll() is not None]
                why = f"an FFN worker is gone{': ' + ', '.join(dead) if dead else ''} ({e})"
            else:
                why = f"a forward failed on the attention side mid-conversation ({type(e).__name__}: {e}), so the " \
                      f"FFN workers are out of step"
            self._broken = AFDWorkerLost(f"{why}; the AFD deployment cannot continue: restart it")
            raise self._broken from e

    def _broadcast_header(self, h: torch.Tensor) -> None:
        for work in [self.pg.send([h], r, 0) for r in range(1, self.world_size)]:
            work.wait()

    def worker_timings(self) -> torch.Tensor:
        """(workers, 2, layers) seconds each worker spent waiting for input / computing since the last call."""
        def ask():
            self._broadcast_header(header(STATS))
            out = torch.zeros(self.world_size - 1, 2, len(self.moe), dtype=torch.float64)
            for r in range(1, self.world_size):
                self.pg.recv([out[r - 1]], r, 0).wait()
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
        """Seconds of one (rows, cols) float32 round trip to worker 1, the transfer alone (median)."""
        def go():
            self.pg.send([header(PING, rows, cols, repeats)], 1, 0).wait()
            buf, times = torch.randn(rows, cols), []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.pg.send([buf], 1, 1).wait()
                self.pg.recv([buf], 1, 1).wait()
                times.append(time.perf_counter() - t0)
            return sorted(times)[len(times) // 2]
        return self._check(go)

    # ---- the forward ----
    @torch.inference_mode()
    def run(self, batch: ForwardBatch, ids: torch.Tensor, logits_rows: list[int] | None = None) -> torch.Tensor:
        return self._check(lambda: self._run(batch, ids, logits_rows))

    def _run(self, batch, ids, logits_rows):
        model = self.model
        groups = split_batch(batch, self.micro_batches)
        metas = [self.backend.prepare_metadata(sub, self.kv) for sub, _, _ in groups]   # what can fail locally,
        xs, rope = [], []                                                               # before the workers hear
        for sub, s, e in groups:
            pos = sub.positions
            if self.native_attn is None:                                                 # (native: RoPE in C++)
                rope.append((model.rope_cos[pos].unsqueeze(-2).to(self.dtype),
                             model.rope_sin[pos].unsqueeze(-2).to(self.dtype)))
            xs.append(model.model.embed_tokens(ids[s:e]))                                    # (n_i, hidden)
        self._broadcast_header(header(FORWARD, len(groups), sizes=[e - s for _, s, e in groups]))
        tables = (model.rope_cos, model.rope_sin)
        pending: list = [None] * len(groups)
        sends = []
        for li, layer in enumerate(model.model.layers):
            for i, meta in enumerate(metas):
                if pending[i] is not None:
                    xs[i] = self._collect(xs[i], pending[i], li - 1)
                t0 = time.perf_counter()
                if self.native_attn is not None:
                    x = xs[i]
                    h = self.native_attn.attn_half(x, groups[i][0], li)       # x += attention, in place; (n_i, hidden)
                else:
                    x = xs[i] + layer.self_attn(layer.input_layernorm(xs[i]), *rope[i], meta, li, tables)
                    h = layer.post_attention_layernorm(x)                                    # (n_i, hidden)
                if self.moe[li]:
                    w, idx = layer.mlp.route(h)                                              # (n_i, k) each
                    payload = torch.cat([h.float(), w.float(), idx.float()], dim=-1)        # (n_i, hidden + 2k)
                else:
                    payload = h.contiguous()
                payload = payload.cpu()
                xs[i] = x
                t = tag(li, i)
                sends += [(payload, self.pg.send([payload], r, t)) for r in range(1, self.world_size)]
                bufs = [torch.empty(len(h), h.shape[1], dtype=h.dtype) for _ in range(1, self.world_size)]
                pending[i] = [(b, self.pg.recv([b], r, t)) for r, b in enumerate(bufs, start=1)]
                self.attn_s[li] += time.perf_counter() - t0
        last = len(model.model.layers) - 1
        xs = [self._collect(x, p, last) for x, p in zip(xs, pending)]
        for _, work in sends:
            work.wait()
        self.steps += 1
        hid = model.model.norm(torch.cat(xs) if len(xs) > 1 else xs[0])                   # (N, hidden)
        if logits_rows == []:
            return torch.empty(0, model.cfg.vocab_size, device=self.device)
        if logits_rows is not None:
            hid = hid.index_select(0, torch.tensor(logits_rows, device=self.device))        # (R, hidden)
        return model.lm_head(hid).float()                                                  # (R, V)

    def _collect(self, x: torch.Tensor, pending, layer: int) -> torch.Tensor:
        """x plus every worker's partial FFN output of `layer` (waiting for them)."""
        t0 = time.perf_counter()
        for _, work in pending:
            work.wait()
        self.wait_s[layer] += time.perf_counter() - t0
        partial = pending[0][0]
        for buf, _ in pending[1:]:
            partial = partial + buf
        return x + partial.to(x.device)
