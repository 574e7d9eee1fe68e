"""ModelRunner: owns the model and its paged K/V tensors and runs one batched forward over sequences
of different lengths, each feeding a different number of new tokens (prefill: its prompt; decode: 1;
speculative verification: 1 + k)."""
from __future__ import annotations

import torch

from afford.kv.paged import BlockPool
from afford.models.quant import quant_bytes
from afford.models.transformer import AttnMeta, Transformer


class ModelRunner:
    def __init__(self, model: Transformer, pool: BlockPool):
        self.model = model
        self.pool = pool
        cfg = model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        n_slots = pool.num_blocks * pool.block_size
        # per layer: (num_slots, KV, D) for K and for V
        self.kv = [(torch.zeros(n_slots, cfg.num_kv_heads, cfg.head_dim, device=self.device, dtype=self.dtype),
                    torch.zeros(n_slots, cfg.num_kv_heads, cfg.head_dim, device=self.device, dtype=self.dtype))
                   for _ in range(cfg.num_layers)]
        self.weight_bytes = quant_bytes(model)     # bytes of weights one forward reads (low-bit counted as such)
        self.kv_bytes_per_token = cfg.num_layers * cfg.kv_values_per_token * self.kv[0][0].element_size()

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        bs = self.pool.block_size
        for src, dst in copies:
            for k, v in self.kv:
                k[dst * bs:(dst + 1) * bs] = k[src * bs:(src + 1) * bs]
                v[dst * bs:(dst + 1) * bs] = v[src * bs:(src + 1) * bs]

    @torch.inference_mode()
    def forward(self, seq_ids: list[int], starts: list[int], tokens: list[list[int]],
                logits_rows: list[list[int]] | None = None) -> torch.Tensor:
        """Feed tokens[i] at positions starts[i].. of sequence seq_ids[i]; their K/V are written into the pool.

        logits_rows[i]: which of sequence i's fed positions need logits (default: its last).
        Returns logits (sum of len(logits_rows[i]), V) in float32, in that order."""
        B, T = len(seq_ids), max(len(t) for t in tokens)
        ends = [s + len(t) for s, t in zip(starts, tokens)]
        for sid, end in zip(seq_ids, ends):
            self._copy_blocks(self.pool.prepare_write(sid, end))
        L = max(ends)
        bs = self.pool.block_size
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        slots = torch.full((B, T), -1, dtype=torch.long)
        n_blk = -(-L // bs)
        tables = torch.zeros(B, n_blk, dtype=torch.long)
        for i, (sid, s, toks) in enumerate(zip(seq_ids, starts, tokens)):
            n = len(toks)
            ids[i, :n] = torch.tensor(toks)
            pos[i, :n] = torch.arange(s, s + n)
            tbl = self.pool.tables[sid]
            tables[i, :len(tbl)] = torch.tensor(tbl)
            slots[i, :n] = torch.tensor(self.pool.slots(sid, s, s + n))
        # every context slot of every sequence: (B, n_blk * bs) -> first L
        gather = (tables.unsqueeze(-1) * bs + torch.arange(bs)).view(B, -1)[:, :L]
        mask = torch.arange(L).view(1, 1, L) <= pos.unsqueeze(-1)                 # (B, T, L) causal + own length
        flat = slots.view(-1)
        real = flat >= 0
        rows = None if bool(real.all()) else real.nonzero().view(-1).to(self.device)
        meta = AttnMeta(slots=flat[real].to(self.device), rows=rows, gather=gather.to(self.device),
                        mask=mask.unsqueeze(1).to(self.device), kv=self.kv)       # mask (B, 1, T, L)
        h = self.model.hidden(ids.to(self.device), pos.to(self.device), meta)     # (B, T, hidden)
        if logits_rows is None:
            logits_rows = [[len(t) - 1] for t in tokens]
        b_idx = torch.tensor([i for i, rows in enumerate(logits_rows) for _ in rows], device=self.device)
        t_idx = torch.tensor([r for rows in logits_rows for r in rows], device=self.device)
        return self.model.lm_head(h[b_idx, t_idx]).float()                       # (R, V)
