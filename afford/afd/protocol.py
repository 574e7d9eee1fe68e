"""What the attention worker (rank 0) and the FFN workers (ranks 1..M) say to each other.

Every step rank 0 sends each worker a header (HEADER_LEN int64): [op, a, b, c, micro-batch sizes...].
  FORWARD  a = micro-batches; sizes = tokens in each. Then for every layer, for every micro-batch: rank 0
           sends the normed hidden states (n, hidden) -- with, in a MoE layer, the routing weights and the
           expert indices appended as 2k more columns (float32) -- and the worker answers its partial FFN
           output (n, hidden). The attention side adds the partials of all workers.
  PING     a = rows, b = columns, c = repeats: echo a (a, b) tensor c times (measures the transfer alone).
  STATS    the worker answers its per-layer timings (2, layers): seconds waiting for input, computing;
           and resets them.
  STOP     the worker leaves its loop and exits.
Messages are tagged (layer, micro-batch) so that many may be in flight at once.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch

from afford.config import ConfigError

FORWARD, PING, STATS, STOP = 1, 2, 3, 4
MAX_MICRO_BATCHES = 16
HEADER_LEN = 4 + MAX_MICRO_BATCHES


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
        if spec.attention != 1:
            raise ConfigError("afd attention=N: one attention worker per deployment (data-parallel attention "
                              "workers sharing FFN workers are not implemented); use attention=1")
        return spec

    @property
    def world_size(self) -> int:
        return self.attention + self.ffn


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
