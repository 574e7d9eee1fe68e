"""AFD worker processes. An FFN worker owns its share of every layer's MLP (a slice of the intermediate
columns) or MoE (a slice of the experts; worker 0 also the shared expert) and, per layer and micro-batch,
answers every attention worker at once (their rows in one product) until STOP. An attention worker other
than rank 0 (attention=N>1) owns the K/V of its share of the sequences and runs their attention halves for
the steps rank 0 hands it. AFDRunner starts them on this host as `python -m afford.afd.worker ...` (a fresh
interpreter: nothing of the caller's script is re-imported); `afford afd-worker` starts the same loops on
another host."""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import torch
from torch import nn

from afford.afd.protocol import (
    DATA,
    FINAL,
    FORWARD,
    HEADER_LEN,
    KV_KEY,
    MODEL_KEY,
    PING,
    SPEC_KEY,
    STATS,
    STOP,
    Link,
    error_key,
    make_group,
    make_store,
    model_signature,
    ready_key,
    send,
    shard,
    tag,
)
from afford.config import ConfigError
from afford.models.transformer import DUAL_LAYOUT_MAX_BYTES, MLP, MoE

IDLE = datetime.timedelta(days=365)     # the wait for the next step's header (not the group's message timeout)


@dataclass(frozen=True)
class WorkerArgs:
    model: str                 # the model folder (resolved: every worker loads the same weights)
    address: str               # host:port of rank 0's rendezvous store
    rank: int                  # 1..N-1: attention workers; N..N+M-1: FFN workers
    world_size: int
    device: str = "cpu"
    dtype: str = "auto"
    threads: int | None = None
    timeout_s: float = 120.0
    attention: int = 1         # N, the attention workers (rank 0 among them)


MLP_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def _mlp(cfg, inter: int, tensors: dict, prefix: str, device, dtype) -> MLP:
    """An MLP of `inter` columns made from loaded tensors (built on the meta device: no throwaway init)."""
    with torch.device("meta"):
        m = MLP(cfg, inter)
    m.load_state_dict({f"{w}.weight": tensors[f"{prefix}{w}.weight"].to(device, dtype).contiguous()
                       for w in MLP_WEIGHTS}, assign=True)
    return m


class FFNShard(nn.Module):
    """One layer's FFN share: forward(payload (n, width)) -> partial output (n, hidden). `owned`: the experts
    of a MoE layer this worker runs (None: a dense layer's slice of columns)."""

    def __init__(self, ffn: MLP | MoE, owned: range | None, hidden: int):
        super().__init__()
        self.ffn, self.owned, self.hidden = ffn, owned, hidden

    def pack(self, one_row_copy: bool) -> None:
        if self.owned is None:
            self.ffn.pack(one_row_copy)
            return
        for e in self.owned:
            self.ffn.experts[e].pack(one_row_copy)
        if self.ffn.shared_expert is not None:
            self.ffn.shared_expert.pack(one_row_copy)

    def forward(self, payload: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.owned is None:
            return self.ffn(payload)                                              # (n, hidden)
        H = self.hidden
        k = (payload.shape[1] - H) // 2
        x = payload[:, :H].to(dtype)                                              # (n, hidden)
        weights, idx = payload[:, H:H + k].to(dtype), payload[:, H + k:].long()   # (n, k) each
        out = self.ffn.experts_forward(x, weights, idx, self.owned)
        if (shared := self.ffn.shared_forward(x)) is not None:
            out = out + shared
        return out


def build_shards(args: WorkerArgs, workers: int) -> tuple[list[FFNShard], torch.dtype, str]:
    """This worker's share of every layer -- a contiguous slice of each dense MLP's intermediate columns, or
    of each MoE's experts (worker 0 also the shared expert) -- read alone from the checkpoint (safetensors
    slices), then packed for inference as the single-process model packs it."""
    from afford.config import ModelConfig
    from afford.models.loader import load_tensors, resolve_device, resolve_dtype
    cfg = ModelConfig.from_dir(args.model)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, cfg, device)
    index, everything = args.rank - args.attention, slice(None)
    names: dict[str, tuple | None] = {}
    for layer in range(cfg.num_layers):
        pre = f"model.layers.{layer}.mlp."
        if cfg.is_moe_layer(layer):
            names.update({f"{pre}experts.{e}.{w}.weight": None for e in shard(cfg.num_experts, index, workers)
                          for w in MLP_WEIGHTS})
            if index == 0 and cfg.shared_expert_intermediate_size:
                names.update({f"{pre}shared_expert.{w}.weight": None for w in MLP_WEIGHTS})
                names[f"{pre}shared_expert_gate.weight"] = None
        else:
            cols = shard(cfg.intermediate_size, index, workers)
            part = slice(cols.start, cols.stop)
            names.update({f"{pre}gate_proj.weight": (part, everything), f"{pre}up_proj.weight": (part, everything),
                          f"{pre}down_proj.weight": (everything, part)})
    tensors = load_tensors(args.model, cfg, names)
    shards = []
    for layer in range(cfg.num_layers):
        pre = f"model.layers.{layer}.mlp."
        if not cfg.is_moe_layer(layer):
            cols = shard(cfg.intermediate_size, index, workers)
            shards.append(FFNShard(_mlp(cfg, len(cols), tensors, pre, device, dtype), None, cfg.hidden_size))
            continue
        with torch.device("meta"):
            moe = MoE(cfg)
        owned = shard(cfg.num_experts, index, workers)
        moe.experts = nn.ModuleList(_mlp(cfg, cfg.moe_intermediate_size, tensors, f"{pre}experts.{e}.", device, dtype)
                                    if e in owned else nn.Identity() for e in range(cfg.num_experts))
        if index == 0 and cfg.shared_expert_intermediate_size:
            moe.shared_expert = _mlp(cfg, cfg.shared_expert_intermediate_size, tensors, f"{pre}shared_expert.",
                                     device, dtype)
            gate = nn.Linear(cfg.hidden_size, 1, bias=False, device="meta")
            gate.load_state_dict({"weight": tensors[f"{pre}shared_expert_gate.weight"].to(device, dtype)}, assign=True)
            moe.shared_expert_gate = gate
        else:
            moe.shared_expert = moe.shared_expert_gate = None
        del moe.gate                                                # routing happens on the attention side
        shards.append(FFNShard(moe, owned, cfg.hidden_size))
    del tensors
    dual = device.type == "cpu" and dtype == torch.float32 and \
        sum(q.numel() for s in shards for q in s.parameters()) * dtype.itemsize <= DUAL_LAYOUT_MAX_BYTES
    for s in shards:
        s.pack(dual)
    return shards, dtype, model_signature(cfg, dtype)


def _join(store, args: WorkerArgs):
    """Say this worker is ready, join the deployment's process group; with it, the emulated link (if any)."""
    store.set(ready_key(args.rank), "1")
    return make_group(store, args.rank, args.world_size, args.timeout_s), Link.from_env()


def serve(args: WorkerArgs, store=None) -> None:
    """The FFN worker's loop; returns on STOP, raises when rank 0 is gone (its process then exits)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = args.world_size - args.attention
    store = store or make_store(args.address, args.rank, args.world_size, args.timeout_s)
    try:
        shards, dtype, mine = build_shards(args, workers)
        theirs = store.get(MODEL_KEY).decode()
        if theirs != mine:
            raise ConfigError(f"FFN worker rank {args.rank} loaded {args.model} as {mine}, but the attention worker "
                              f"runs {theirs}: give every worker the same model, --device and --dtype")
    except Exception as e:
        store.set(error_key(args.rank), f"{type(e).__name__}: {e}")
        raise
    pg, link = _join(store, args)
    hidden = shards[0].hidden
    wait_s, ffn_s = torch.zeros(len(shards), dtype=torch.float64), torch.zeros(len(shards), dtype=torch.float64)
    head = torch.zeros(HEADER_LEN, dtype=torch.long)
    with torch.inference_mode():
        while True:
            pg.recv([head], 0, 0).wait(IDLE)             # an idle deployment waits as long as it must
            op, a, b, c = head[:4].tolist()
            if op == STOP:
                return
            if op == STATS:
                pg.send([torch.stack([wait_s, ffn_s])], 0, 0).wait()
                wait_s.zero_(), ffn_s.zero_()
            elif op == PING:
                buf = torch.empty(a, b)
                for _ in range(c):
                    pg.recv([buf], 0, 1).wait()
                    pg.send([buf], 0, 1).wait()
            elif op == FORWARD:                   # a micro-batches per attention worker, b attention workers
                sizes = head[4:4 + a * b].view(b, a).tolist()
                sends = []
                for layer, s in enumerate(shards):
                    width = hidden + (2 * s.ffn.top_k if s.owned is not None else 0)
                    pdtype = torch.float32 if s.owned is not None else dtype
                    for i in range(a):
                        t0 = time.perf_counter()
                        ranks = [r for r in range(b) if sizes[r][i]]
                        bufs = [torch.empty(sizes[r][i], width, dtype=pdtype) for r in ranks]
                        for work in [pg.recv([buf], r, tag(layer, i)) for r, buf in zip(ranks, bufs)]:
                            work.wait()
                        t1 = time.perf_counter()
                        out = s(torch.cat(bufs) if len(bufs) > 1 else bufs[0], dtype)   # every attention worker's rows
                        parts = out.split([sizes[r][i] for r in ranks]) if len(bufs) > 1 else [out]
                        sends += [(o, send(pg, o.contiguous(), r, tag(layer, i), link)) for r, o in zip(ranks, parts)]
                        wait_s[layer] += t1 - t0
                        ffn_s[layer] += time.perf_counter() - t1
                for _, work in sends:
                    work.wait()


def serve_attention(args: WorkerArgs, store=None) -> None:
    """An attention worker other than rank 0 (attention=N>1): holds the K/V of the sequences rank 0 assigns
    it (a pool of rank 0's shape, committed only where its sequences write) and, for each step
    rank 0 hands it, runs their layers -- attention halves natively, FFN halves on the FFN workers, micro-
    batched as rank 0's own -- and sends back their hidden states."""
    from afford.afd.pipeline import run_layers
    from afford.attention.backend import ForwardBatch
    from afford.models.loader import load_model, resolve_device
    from afford.models.native import NativeDecoder
    if args.threads:
        torch.set_num_threads(args.threads)
    store = store or make_store(args.address, args.rank, args.world_size, args.timeout_s)
    try:
        if args.device not in ("cpu", "auto") or resolve_device(args.device).type != "cpu":
            raise ConfigError(f"an attention worker runs on the CPU (native forward); got --device {args.device}")
        with torch.no_grad():
            model = load_model(args.model, args.device, args.dtype, ffn=False).pack_for_inference()
        mine = model_signature(model.cfg, next(model.parameters()).dtype)
        theirs = store.get(MODEL_KEY).decode()
        if theirs != mine:
            raise ConfigError(f"attention worker rank {args.rank} loaded {args.model} as {mine}, but rank 0 runs "
                              f"{theirs}: give every worker the same model, --device and --dtype")
        slots, block_size = (int(v) for v in store.get(KV_KEY).decode().split(","))
        cfg = model.cfg
        # empty, not zeros: the pages of a fresh large allocation are committed only where this worker's
        # sequences write, and attention reads only slots its sequences wrote
        kv = [(torch.empty(slots, cfg.num_kv_heads, cfg.head_dim), torch.empty(slots, cfg.num_kv_heads, cfg.head_dim))
              for _ in range(cfg.num_layers)]
        native = NativeDecoder.build(model, kv, block_size, "cpu_paged")
        if native is None:
            raise ConfigError("this attention worker cannot build the native CPU forward (a C++ compiler, fp32)")
    except Exception as e:
        store.set(error_key(args.rank), f"{type(e).__name__}: {e}")
        raise
    pg, link = _join(store, args)
    ffn_ranks = range(args.attention, args.world_size)
    moe = [isinstance(layer.mlp, MoE) for layer in model.model.layers]
    head = torch.zeros(HEADER_LEN, dtype=torch.long)
    with torch.inference_mode():
        while True:
            pg.recv([head], 0, 0).wait(IDLE)
            op, n_tok, n_seq, width = head[:4].tolist()
            if op == STOP:
                return
            if op != FORWARD:
                raise ConfigError(f"attention worker rank {args.rank}: unexpected message {op}")
            m = int(head[4])
            per_micro = head[5:5 + m].tolist()
            data = torch.empty(3 * n_tok + n_seq + n_seq * width, dtype=torch.long)
            pg.recv([data], 0, DATA).wait()
            ids, pos, slots_, q_lens, tables = data.split([n_tok, n_tok, n_tok, n_seq, n_seq * width])
            q_lens = q_lens.tolist()
            tables = tables.view(n_seq, width).tolist()
            groups, seq, tok = [], 0, 0             # attn_half reads positions, slots, lengths and tables only
            for cnt in per_micro:
                n = sum(q_lens[seq:seq + cnt])
                groups.append((ForwardBatch("decode", list(range(seq, seq + cnt)), [0] * cnt, q_lens[seq:seq + cnt],
                                            tables[seq:seq + cnt], block_size, slots_[tok:tok + n], pos[tok:tok + n]),
                               tok, tok + n))
                seq, tok = seq + cnt, tok + n
            xs = [model.model.embed_tokens(ids[s:e]) for _, s, e in groups]

            def attn(i, li, x):
                return x, native.attn_half(x, groups[i][0], li)
            xs = run_layers(model, pg, ffn_ranks, xs, moe, attn, link=link)
            pg.send([torch.cat(xs) if len(xs) > 1 else xs[0]], 0, FINAL).wait()


def add_args(p) -> None:
    p.add_argument("--model", required=True, help="the model folder (the same weights as the attention worker's)")
    p.add_argument("--address", required=True, help="host:port of the attention worker (rank 0)")
    p.add_argument("--rank", type=int, required=True, help="1..N-1: an attention worker; N..N+M-1: an FFN worker")
    p.add_argument("--world-size", type=int, required=True, help="N + M")
    p.add_argument("--attention", type=int, help="N, the deployment's attention workers (rank 0's --afd "
                                                 "attention=N; read from rank 0 when left out, checked when given)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a message")


def run(a) -> int:
    """Serve until STOP or until rank 0 goes away (then exit quietly: there is nobody left to answer)."""
    if not 1 <= a.rank < a.world_size:
        raise ConfigError(f"--rank must be in 1..{a.world_size - 1} (rank 0 is the engine's attention worker)")
    store = make_store(a.address, a.rank, a.world_size, a.timeout)
    # the deployment's shape comes from rank 0: a worker's role and share follow from it (a hand-started
    # worker that guessed another N would load the wrong share and answer with wrong partials)
    n, m = (int(v) for v in store.get(SPEC_KEY).decode().split(","))
    why = None
    if n + m != a.world_size:
        why = f"--world-size {a.world_size}, but rank 0 runs attention={n},ffn={m} ({n + m} processes)"
    elif a.attention is not None and a.attention != n:
        why = f"--attention {a.attention}, but rank 0 runs attention={n}"
    if why is not None:
        store.set(error_key(a.rank), f"ConfigError: {why}")
        raise ConfigError(f"worker rank {a.rank}: {why}")
    args = WorkerArgs(a.model, a.address, a.rank, a.world_size, a.device, a.dtype, a.threads, a.timeout, n)
    try:
        serve_attention(args, store) if a.rank < n else serve(args, store)
    except RuntimeError as e:
        if "Connection closed" not in str(e) and "Connection reset" not in str(e):
            raise
    return 0


if __name__ == "__main__":
    import argparse
    import sys
    parser = argparse.ArgumentParser("python -m afford.afd.worker", description=__doc__)
    add_args(parser)
    sys.exit(run(parser.parse_args()))
