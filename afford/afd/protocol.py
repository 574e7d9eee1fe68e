"""What the attention workers (ranks 0..N-1; rank 0 runs the engine) and the FFN workers (ranks N..N+M-1)
say to each other.

Every step rank 0 sends each FFN worker a header (HEADER_LEN int64): [op, a, b, c, sizes...].
  FORWARD  a = m micro-batches per attention worker, b = N attention workers; sizes = N x m token counts
           (attention worker-major; 0: that worker has no such micro-batch). Then for every layer, for every
           micro-batch i: each attention worker with tokens in its micro-batch i sends their normed hidden
           states (n, hidden) -- with, in a MoE layer, the routing weights and the expert indices appended as
           2k more columns (float32) -- and the FFN worker answers each its partial FFN output (n, hidden),
           computed for all of them in one product. Attention workers add the partials of all FFN workers.
Each other attention worker r that has sequences in the step gets [FORWARD, tokens, sequences, table
width, m, sequences in each micro-batch...] and then one int64 tensor (tag DATA) with the step's token ids,
positions, K/V slots, query lengths and block tables; after the last layer it sends its hidden states (tag
FINAL) back to rank 0, which runs the final norm and LM head for every token.
  PING     a = rows, b = columns, c = repeats: echo a (a, b) tensor c times (measures the transfer alone).
  STATS    the worker answers its per-layer timings (2, layers): seconds waiting for input, computing;
           and resets them.
  STOP     the worker leaves its loop and exits.
Messages are tagged (layer, micro-batch) so that many may be in flight at once.
"""
from __future__ import annotations

import datetime
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from afford.config import ConfigError

FORWARD, PING, STATS, STOP = 1, 2, 3, 4
MAX_MICRO_BATCHES = 16
MAX_ATTENTION = 8
HEADER_LEN = 4 + MAX_ATTENTION * MAX_MICRO_BATCHES
DATA, FINAL = 1 << 28, (1 << 28) + 1          # tags: a step's inputs to, its hidden states from, an attention worker


@dataclass(frozen=True)
class AFDSpec:
    attention: int = 1
    ffn: int = 1

    @staticmethod
    def parse(text: str) -> "AFDSpec":
        """'attention=N,ffn=M' (either part may be left out: 1)."""
        parts = {}
        for item in str(text).split(","):
            key, _, val = item.strip().partition("=")
            if key not in ("attention", "ffn") or not val.strip().isdigit() or int(val) < 1:
                raise ConfigError(f"afd takes 'attention=N,ffn=M' with N, M >= 1, got {text!r}")
            parts[key] = int(val)
        spec = AFDSpec(**parts)
        if spec.attention > MAX_ATTENTION:
            raise ConfigError(f"afd attention=N takes at most {MAX_ATTENTION} attention workers, got {spec.attention}")
        return spec

    @property
    def world_size(self) -> int:
        return self.attention + self.ffn

    @property
    def ffn_ranks(self) -> range:
        return range(self.attention, self.attention + self.ffn)


def torchrun_env() -> tuple[int, int, str] | None:
    """(rank, world size, host:port) when this process was started by torchrun, else None."""
    import os
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    return int(env["RANK"]), int(env["WORLD_SIZE"]), f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"


def make_store(address: str, rank: int, world_size: int, timeout_s: float = 120.0):
    """The rendezvous store at `address` (host:port): rank 0 hosts it, except under torchrun, whose agent
    already serves one there (TORCHELASTIC_USE_AGENT_STORE)."""
    import os

    import torch.distributed as dist
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"afd address {address!r}: give host:port")
    run = torchrun_env()
    agent = run is not None and run[2] == address and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(host, int(port), world_size, rank == 0 and not agent,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def make_group(store, rank: int, world_size: int, timeout_s: float = 120.0):
    """A private gloo process group (no global default group, so several engines can live in one process)."""
    import torch.distributed as dist
    return dist.ProcessGroupGloo(store, rank, world_size, datetime.timedelta(seconds=timeout_s))


def ready_key(rank: int) -> str:
    return f"afford/afd/ready/{rank}"


MODEL_KEY = "afford/afd/model"
KV_KEY = "afford/afd/kv"                      # "slots,block size" of rank 0's K/V pool (attention workers' too)
SPEC_KEY = "afford/afd/spec"                  # "N,M": attention and FFN workers (each worker's role and share)


def error_key(rank: int) -> str:
    """Where a worker that cannot start says why (rank 0 may not see its process: another host)."""
    return f"afford/afd/error/{rank}"


def model_signature(cfg, dtype) -> str:
    """What both sides must agree on (rank 0 publishes it; a worker that loaded something else refuses)."""
    import json
    return json.dumps({"hidden": cfg.hidden_size, "layers": cfg.num_layers, "intermediate": cfg.intermediate_size,
                       "experts": cfg.num_experts, "vocab": cfg.vocab_size, "dtype": str(dtype)}, sort_keys=True)


def header(op: int, a: int = 0, b: int = 0, c: int = 0, sizes: list[int] = ()) -> torch.Tensor:
    h = torch.zeros(HEADER_LEN, dtype=torch.long)
    h[:4] = torch.tensor([op, a, b, c])
    h[4:4 + len(sizes)] = torch.tensor(list(sizes), dtype=torch.long)
    return h


def tag(layer: int, micro: int) -> int:
    return 1 + layer * MAX_MICRO_BATCHES + micro


def shard(n: int, index: int, parts: int) -> range:
    """The contiguous share of n things (a MoE's experts, a dense MLP's intermediate columns) that FFN
    worker `index` (0-based) of `parts` owns."""
    per, extra = divmod(n, parts)
    start = index * per + min(index, extra)
    return range(start, start + per + (index < extra))


class Link:
    """An emulated network link under the per-layer hidden-state messages (benchmarks/afd.py: one host's
    loopback moves them in ~1 % of a layer, too fast to show what micro-batches hide). Each process's sends
    leave in order over one wire: a message occupies it for bytes / bandwidth, then arrives `latency` later;
    a wire thread issues the real send at that time while the sender goes on computing, as a NIC would.
    Set by AFFORD_AFD_LINK="LATENCY_MS,MB_PER_S" in the environment of every worker (spawned workers
    inherit it); unset, messages go straight to gloo."""

    def __init__(self, latency_s: float, bytes_per_s: float):
        self.latency_s, self.bytes_per_s = latency_s, bytes_per_s
        self.free_at = 0.0
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="afd-link")

    @staticmethod
    def from_env() -> "Link | None":
        text = os.environ.get("AFFORD_AFD_LINK")
        if not text:
            return None
        try:
            ms, mbps = (float(v) for v in text.split(","))
            if ms < 0 or mbps <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"AFFORD_AFD_LINK={text!r}: give LATENCY_MS,MB_PER_S, e.g. 2,100") from None
        return Link(ms / 1e3, mbps * 1e6)

    def send(self, pg, t: torch.Tensor, dst: int, tag_: int):
        """pg.send([t], dst, tag_) after the link's delay; returns what .wait()s for it."""
        now = time.monotonic()
        with self.lock:
            start = max(now, self.free_at)
            self.free_at = start + t.numel() * t.element_size() / self.bytes_per_s
            due = self.free_at + self.latency_s

        def go():
            time.sleep(max(0.0, due - time.monotonic()))
            pg.send([t], dst, tag_).wait()
        return _Sent(self.pool.submit(go))


class _Sent:
    def __init__(self, future):
        self.future = future

    def wait(self, *_):
        self.future.result()
        return True


def send(pg, t: torch.Tensor, dst: int, tag_: int, link: Link | None):
    """A per-layer message: straight to gloo, or over the emulated link."""
    return pg.send([t], dst, tag_) if link is None else link.send(pg, t, dst, tag_)
