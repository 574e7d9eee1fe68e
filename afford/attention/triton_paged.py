"""Paged attention for query rows, read in place through the block table (Triton).

Why hand-written: the maintained paged-decode kernels (FlashInfer, flash-attn's `flash_attn_with_kvcache`)
ship no wheel for the torch + CUDA 13 build our GPU machines run and cannot be fetched there, and
FlashInfer's JIT build takes minutes; Triton comes with every CUDA build of torch. The kernel is the
textbook one, flash-decoding: one program per (query row, K/V head, split of the context) takes the
G query heads that share that K/V head (GQA: the K/V are read once for all of them, the products on
tensor cores in bf16 / fp16, exactly in fp32) and walks its split in chunks of BLOCK_N tokens, looking
each token's block up in the table -- no gather, no padded (B, L) copy; a second small kernel merges
the splits' online-softmax partials. The splits divide each row's own context (a context of up to
MAX_SPLITS x BLOCK_N tokens: one step a program; splits past it do nothing), and the loop bounds are read
from memory, so one CUDA graph serves any context length up to the one it was captured for.

Row r belongs to sequence `row_seq[r]` (a row of `tables`) and attends to that sequence's first
`limits[r]` tokens (its position + 1: decode, verify and prefill chunks alike).
"""
from __future__ import annotations

import torch

from afford.models.triton_lib import available, pdl_args, rope, rope_halves, tl, triton  # noqa: F401  (available: re-exported)

if triton is not None:
    @triton.jit
    def _pdl(PDL: tl.constexpr):
        """Programmatic dependent launch (triton_lib): let the next kernel launch now, then wait for the one
        before this one to finish (every kernel here reads what the one before wrote)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _walk(q, K, V, tables, seq, kvh, start, hi, stride_ks, stride_kh, stride_tb, BS: tl.constexpr,
              GP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        """Online softmax of q (GP, D_PAD) over the tokens [start, hi) of sequence `seq`'s K/V head kvh, each
        token's block looked up in the table: (row max, row sum, softmax-weighted V sum), fp32."""
        d = tl.arange(0, D_PAD)
        m = tl.full((GP,), float("-inf"), tl.float32)
        l_sum = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D_PAD), tl.float32)
        while start < hi:                    # (a while loop: Triton's interpreter, the CPU tests, runs it too)
            n = start + tl.arange(0, BLOCK_N)
            valid = n < hi
            page = tl.load(tables + seq * stride_tb + n // BS, mask=valid, other=0).to(tl.int64)
            kv_off = (page * BS + n % BS)[:, None] * stride_ks + kvh * stride_kh + d[None, :]
            km = valid[:, None] & (d < D)[None, :]
            k = tl.load(K + kv_off, mask=km, other=0.0)                                  # (BLOCK_N, D_PAD)
            v = tl.load(V + kv_off, mask=km, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")      # (GP, BLOCK_N)
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
            start += BLOCK_N
        return m, l_sum, acc

    @triton.jit
    def _chunk(n_ctx, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
        """Tokens a split of this context walks: the context over SPLITS, rounded up to whole BLOCK_N steps --
        a short context's splits take one step each, a long one's a few (set by the row's own length, the
        same in an eager forward and a graph's replay)."""
        return ((n_ctx + SPLITS - 1) // SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N

    @triton.jit
    def _program(row_seq, limits, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        """A split program's (row, K/V head, split), the row's sequence, context length and split length, and
        its tokens [lo, hi) (empty for a split past the context)."""
        _pdl(PDL)
        r = tl.program_id(0)
        sp = tl.program_id(2)
        n_ctx = tl.load(limits + r)
        chunk = _chunk(n_ctx, SPLITS, BLOCK_N)
        return r, tl.program_id(1), sp, tl.load(row_seq + r).to(tl.int64), n_ctx, chunk, sp * chunk, \
            tl.minimum((sp + 1) * chunk, n_ctx)

    @triton.jit
    def _emit(O, Acc, Ml, r, sp, heads, g, d, qm, m, l_sum, acc, stride_or, stride_oh, H: tl.constexpr,
              G: tl.constexpr, D_PAD: tl.constexpr, SPLITS: tl.constexpr):
        """One split: the rows' output; several: this split's partials (merged by _merge_one or _merge_group)."""
        if SPLITS == 1:
            o = acc / l_sum[:, None]
            tl.store(O + r * stride_or + heads[:, None] * stride_oh + d[None, :], o.to(O.dtype.element_ty), mask=qm)
        else:
            part = (r * H + heads) * SPLITS + sp                                          # (GP,)
            tl.store(Acc + part[:, None] * D_PAD + d[None, :], acc, mask=qm)
            tl.store(Ml + part * 2, m, mask=g < G)
            tl.store(Ml + part * 2 + 1, l_sum, mask=g < G)

    @triton.jit
    def _split_kernel(Q, K, V, O, Acc, Ml, tables, row_seq, limits, scale,
                      stride_qr, stride_qh, stride_ks, stride_kh, stride_or, stride_oh, stride_tb,
                      H: tl.constexpr, BS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                      D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                      IEEE: tl.constexpr, PDL: tl.constexpr):
        r, kvh, sp, seq, n_ctx, chunk, lo, hi = _program(row_seq, limits, SPLITS, BLOCK_N, PDL)
        if lo < n_ctx or SPLITS == 1:        # (a split past the context: no partials, the merge skips it)
            g = tl.arange(0, GP)             # the G query heads sharing this K/V head (padded to GP >= 16)
            d = tl.arange(0, D_PAD)
            qm = (g < G)[:, None] & (d < D)[None, :]
            heads = kvh * G + g
            q = tl.load(Q + r * stride_qr + heads[:, None] * stride_qh + d[None, :], mask=qm, other=0.0)
            q = q.to(tl.float32) * scale
            if not IEEE:
                q = q.to(K.dtype.element_ty)     # bf16 / fp16 pools: tensor-core products, fp32 accumulation
            m, l_sum, acc = _walk(q, K, V, tables, seq, kvh, lo, hi, stride_ks, stride_kh, stride_tb, BS, GP, D,
                                  D_PAD, BLOCK_N, IEEE)
            _emit(O, Acc, Ml, r, sp, heads, g, d, qm, m, l_sum, acc, stride_or, stride_oh, H, G, D_PAD, SPLITS)

    @triton.jit
    def _merge_one(Acc, Ml, O, r, h, used, stride_or, stride_oh, H: tl.constexpr, D: tl.constexpr,
                   D_PAD: tl.constexpr, SPLITS: tl.constexpr, S_PAD: tl.constexpr):
        """Row r, head h: the online-softmax partials of its first `used` splits (those the context reaches)
        merged into the output."""
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, D_PAD)
        sm = s < used
        part = (r * H + h) * SPLITS + s
        m = tl.load(Ml + part * 2, mask=sm, other=float("-inf"))
        l_sum = tl.load(Ml + part * 2 + 1, mask=sm, other=0.0)
        acc = tl.load(Acc + part[:, None] * D_PAD + d[None, :], mask=sm[:, None] & (d < D)[None, :], other=0.0)
        w = tl.exp(m - tl.max(m, axis=0))
        o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_sum * w, axis=0)
        tl.store(O + r * stride_or + h * stride_oh + d, o.to(O.dtype.element_ty), mask=d < D)

    @triton.jit
    def _merge_group(Acc, Ml, O, r, kvh, used, stride_or, stride_oh, H: tl.constexpr, G: tl.constexpr,
                     GM: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, SPLITS: tl.constexpr,
                     S_PAD: tl.constexpr):
        """_merge_one for the G heads of K/V head kvh at once, read from L2: one round of loads (G x splits x D
        partials) and one of reductions. _merge_one in a loop over the heads put each head's loads after the
        store before it (they may alias): on sm_90, 8 serial L2 round trips, each with 5 CTA barriers."""
        g = tl.arange(0, GM)[:, None]                                   # (GM, 1)
        s = tl.arange(0, S_PAD)[None, :]                                # (1, S_PAD)
        d = tl.arange(0, D_PAD)[None, None, :]                          # (1, 1, D_PAD)
        sm = (g < G) & (s < used)                                       # (GM, S_PAD)
        part = (r * H + kvh * G + g) * SPLITS + s                       # (GM, S_PAD)
        m = tl.load(Ml + part * 2, mask=sm, other=float("-inf"), cache_modifier=".cg")
        l_sum = tl.load(Ml + part * 2 + 1, mask=sm, other=0.0, cache_modifier=".cg")
        acc = tl.load(Acc + part[:, :, None] * D_PAD + d, mask=sm[:, :, None] & (d < D), other=0.0,
                      cache_modifier=".cg")                             # (GM, S_PAD, D_PAD)
        w = tl.exp(m - tl.max(m, axis=1)[:, None])                      # (padding heads: all NaN, never stored)
        o = tl.sum(acc * w[:, :, None], axis=1) / tl.sum(l_sum * w, axis=1)[:, None]      # (GM, D_PAD)
        dd = tl.arange(0, D_PAD)[None, :]
        tl.store(O + r * stride_or + (kvh * G + g) * stride_oh + dd, o.to(O.dtype.element_ty),
                 mask=(g < G) & (dd < D))

    @triton.jit
    def _merge_kernel(Acc, Ml, O, limits, stride_or, stride_oh, H: tl.constexpr, D: tl.constexpr,
                      D_PAD: tl.constexpr, SPLITS: tl.constexpr, S_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                      PDL: tl.constexpr):
        _pdl(PDL)
        r = tl.program_id(0)
        n_ctx = tl.load(limits + r)
        chunk = _chunk(n_ctx, SPLITS, BLOCK_N)
        _merge_one(Acc, Ml, O, r, tl.program_id(1), (n_ctx + chunk - 1) // chunk, stride_or, stride_oh, H, D, D_PAD,
                   SPLITS, S_PAD)


BLOCK_N, MAX_SPLITS = 32, 16


def split_count(max_ctx: int) -> int:
    """Programs per (row, K/V head) that walk a context side by side (flash-decoding): one per BLOCK_N tokens
    of max_ctx, at most MAX_SPLITS. Each row's split length comes from its own context (_chunk: the context
    over the splits, in whole BLOCK_N steps), so a short context takes one step a program; the count depends
    on max_ctx only, so a graph's replay and an eager forward split a row alike (the same sums)."""
    return max(1, min(MAX_SPLITS, -(-max_ctx // BLOCK_N)))


def attend_rows(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                row_seq: torch.Tensor, limits: torch.Tensor, block_size: int, scale: float,
                max_ctx: int | None = None) -> torch.Tensor:
    """q (R, H, D), pools (slots, KV, D), tables (B, M) int32, row_seq / limits (R,) int -> (R, H, D).
    max_ctx: the longest context any call of this shape can see (default: the table's width)."""
    R, H, D = q.shape
    KV = k_pool.shape[1]
    out = torch.empty(R, H, D, dtype=q.dtype, device=q.device)
    if R == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    G = H // KV
    D_PAD = max(16, triton.next_power_of_2(D))
    splits = split_count(max(max_ctx or 0, tables.shape[1] * block_size))
    if splits > 1 and R * H * splits * D_PAD * 4 > 1 << 26:     # long row batches (eager prompt chunks, never a
        splits = 1                                              # graph's): no partials buffer of >= 64 MB
    acc = ml = out
    if splits > 1:
        acc = torch.empty(R * H * splits, D_PAD, dtype=torch.float32, device=q.device)
        ml = torch.empty(R * H * splits, 2, dtype=torch.float32, device=q.device)
    _split_kernel[(R, KV, splits)](q, k_pool, v_pool, out, acc, ml, tables, row_seq, limits, scale,
                                   q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
                                   out.stride(0), out.stride(1), tables.stride(0),
                                   H=H, BS=block_size, G=G, GP=max(16, triton.next_power_of_2(G)), D=D, D_PAD=D_PAD,
                                   BLOCK_N=BLOCK_N, SPLITS=splits,
                                   IEEE=k_pool.dtype == torch.float32, num_warps=4, **pdl_args(q))
    if splits > 1:
        _merge_kernel[(R, H)](acc, ml, out, limits, out.stride(0), out.stride(1), H=H, D=D, D_PAD=D_PAD,
                              SPLITS=splits, S_PAD=max(2, triton.next_power_of_2(splits)), BLOCK_N=BLOCK_N,
                              num_warps=1, **pdl_args(q))
    return out


if triton is not None:
    @triton.jit
    def _rope_store_kernel(QKV, COS, SIN, POS, SLOTS, KP, VP, QO, scratch,
                           stride_n, stride_h, stride_cos, stride_ks, stride_kh, stride_qn, stride_qh,
                           H: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                           PDL: tl.constexpr):
        _pdl(PDL)
        n = tl.program_id(0)
        h = tl.program_id(1)                 # one of the H + 2 KV heads of token n's q|k|v
        j = tl.arange(0, HALF_PAD)
        jm = j < HALF
        src = QKV + n * stride_n + h * stride_h
        x1 = tl.load(src + j, mask=jm, other=0.0)
        x2 = tl.load(src + HALF + j, mask=jm, other=0.0)
        slot = tl.load(SLOTS + n)
        slot = tl.where(slot >= 0, slot, scratch).to(tl.int64)    # padding rows write the scratch slot
        if h < H + KV:
            o1, o2 = rope_halves(x1, x2, COS, SIN, tl.load(POS + n).to(tl.int64), stride_cos, j, jm, HALF)
            if h < H:
                dst = QO + n * stride_qn + h * stride_qh
            else:
                dst = KP + slot * stride_ks + (h - H) * stride_kh
            tl.store(dst + j, o1, mask=jm)
            tl.store(dst + HALF + j, o2, mask=jm)
        else:
            dst = VP + slot * stride_ks + (h - H - KV) * stride_kh
            tl.store(dst + j, x1, mask=jm)
            tl.store(dst + HALF + j, x2, mask=jm)


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               slots: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scratch: int,
               heads: int) -> torch.Tensor:
    """One kernel for what six did: RoPE on q and k of qkv (N, H + 2 KV, D), k and v stored into the pools
    at `slots` (-1: the scratch slot); returns the rotated q (N, H, D)."""
    N, HH, D = qkv.shape
    KV = (HH - heads) // 2
    q = torch.empty(N, heads, D, dtype=qkv.dtype, device=qkv.device)
    if N:
        _rope_store_kernel[(N, HH)](qkv, cos, sin, positions, slots, k_pool, v_pool, q, scratch,
                                    qkv.stride(0), qkv.stride(1), cos.stride(0), k_pool.stride(0), k_pool.stride(1),
                                    q.stride(0), q.stride(1), H=heads, KV=KV, HALF=D // 2,
                                    HALF_PAD=max(2, triton.next_power_of_2(D // 2)), num_warps=1, **pdl_args(qkv))
    return q


if triton is not None:
    @triton.jit
    def _decode_kernel(QKV, COS, SIN, POS, SLOTS, KP, VP, O, Acc, Ml, CNT, tables, row_seq, limits, scale, scratch,
                       stride_n, stride_h, stride_cos, stride_ks, stride_kh, stride_or, stride_oh, stride_tb,
                       H: tl.constexpr, KV: tl.constexpr, BS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                       GM: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                       SPLITS: tl.constexpr, S_PAD: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
        """_rope_store_kernel, _split_kernel and _merge_kernel as one kernel, for rows that are each their
        sequence's only fed token (decode): every program rotates its G query heads in registers; the split
        holding the row's own position rotates its k, stores k and v at the row's slot and (a CTA barrier)
        then walks its tokens, which include it; of the splits the context reaches, the program of a (row, K/V
        head) that finishes last (a counter per pair, zero between calls) merges their partials. The three
        kernels' numbers: the same K/V bit for bit, the same partials, the same merge formula (its sums over
        the splits may round in another order: 4 warps here, 1 in _merge_kernel)."""
        r, kvh, sp, seq, n_ctx, chunk, lo, hi = _program(row_seq, limits, SPLITS, BLOCK_N, PDL)
        if lo < n_ctx:                       # (a split past the context: nothing to do, nothing to count)
            pos = tl.load(POS + r).to(tl.int64)
            HALF: tl.constexpr = D // 2
            g = tl.arange(0, GP)
            d = tl.arange(0, D_PAD)
            dm = d < D
            qm = (g < G)[:, None] & dm[None, :]
            heads = kvh * G + g
            other = tl.where(d < HALF, d + HALF, d - HALF)        # each element's partner in the other half
            sign = tl.where(d < HALF, -1.0, 1.0)
            c = tl.load(COS + pos * stride_cos + d, mask=dm, other=0.0).to(tl.float32)
            s = tl.load(SIN + pos * stride_cos + d, mask=dm, other=0.0).to(tl.float32)
            src = QKV + r * stride_n
            x = tl.load(src + heads[:, None] * stride_h + d[None, :], mask=qm, other=0.0)
            xp = tl.load(src + heads[:, None] * stride_h + other[None, :], mask=qm, other=0.0)
            q = rope(x, xp, c[None, :], s[None, :], sign[None, :])
            if sp == pos // chunk:                                 # the split that holds the row's own token
                kx = tl.load(src + (H + kvh) * stride_h + d, mask=dm, other=0.0)
                kp = tl.load(src + (H + kvh) * stride_h + other, mask=dm, other=0.0)
                v = tl.load(src + (H + KV + kvh) * stride_h + d, mask=dm, other=0.0)
                slot = tl.load(SLOTS + r)
                slot = tl.where(slot >= 0, slot, scratch).to(tl.int64)    # padding rows write the scratch slot
                tl.store(KP + slot * stride_ks + kvh * stride_kh + d, rope(kx, kp, c, s, sign), mask=dm)
                tl.store(VP + slot * stride_ks + kvh * stride_kh + d, v, mask=dm)
                tl.debug_barrier()                                  # stored before this CTA reads them back
            q = q.to(tl.float32) * scale
            if not IEEE:
                q = q.to(KP.dtype.element_ty)
            m, l_sum, acc = _walk(q, KP, VP, tables, seq, kvh, lo, hi, stride_ks, stride_kh, stride_tb, BS, GP, D,
                                  D_PAD, BLOCK_N, IEEE)
            _emit(O, Acc, Ml, r, sp, heads, g, d, qm, m, l_sum, acc, stride_or, stride_oh, H, G, D_PAD, SPLITS)
            if SPLITS > 1:
                used = (n_ctx + chunk - 1) // chunk                 # the splits the context reaches
                tl.debug_barrier()                                  # every thread's stores before the count
                if tl.atomic_add(CNT + r * KV + kvh, 1, sem="acq_rel") == used - 1:
                    # the last of them: merge its G heads, read from L2
                    _merge_group(Acc, Ml, O, r, kvh, used, stride_or, stride_oh, H, G, GM, D, D_PAD, SPLITS, S_PAD)
                    tl.store(CNT + r * KV + kvh, 0)                 # ready for the next call / graph replay


_COUNTERS: dict = {}          # device -> int32 counters of _decode_kernel's (row, K/V head) pairs, zero between calls


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Counters shared by every decode-attention call on the device: each call leaves them zero, and the
    kernels of a step run one after another (a PDL launch waits for the kernel before it)."""
    cnt = _COUNTERS.get(device)
    if cnt is None or cnt.numel() < n:
        if cnt is not None:                  # a captured graph may still point at the old ones: kept alive
            _COUNTERS.setdefault("outgrown", []).append(cnt)
        cnt = _COUNTERS[device] = torch.zeros(max(n, 1 << 12), dtype=torch.int32, device=device)
    return cnt


def attend_decode(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  slots: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scratch: int, heads: int,
                  tables: torch.Tensor, row_seq: torch.Tensor, limits: torch.Tensor, block_size: int,
                  max_ctx: int | None = None) -> torch.Tensor:
    """rope_store + attend_rows in one kernel, for rows that are each their sequence's only fed token at
    `positions` (limits = positions + 1): qkv (R, H + 2 KV, D) un-rotated -> the attention output (R, H, D);
    k and v are stored at `slots` (-1: the scratch slot) as rope_store stores them."""
    R, HH, D = qkv.shape
    KV = (HH - heads) // 2
    out = torch.empty(R, heads, D, dtype=qkv.dtype, device=qkv.device)
    if R == 0:
        return out
    G, D_PAD = heads // KV, max(16, triton.next_power_of_2(D))
    splits = split_count(max(max_ctx or 0, tables.shape[1] * block_size))
    if splits > 1 and R * heads * splits * D_PAD * 4 > 1 << 26:      # as attend_rows: no partials of >= 64 MB
        splits = 1
    acc = ml = cnt = out
    if splits > 1:
        acc = torch.empty(R * heads * splits, D_PAD, dtype=torch.float32, device=qkv.device)
        ml = torch.empty(R * heads * splits, 2, dtype=torch.float32, device=qkv.device)
        cnt = _counters(qkv.device, R * KV)
    _decode_kernel[(R, KV, splits)](qkv, cos, sin, positions, slots, k_pool, v_pool, out, acc, ml, cnt, tables,
                                    row_seq, limits, D ** -0.5, scratch, qkv.stride(0), qkv.stride(1), cos.stride(0),
                                    k_pool.stride(0), k_pool.stride(1), out.stride(0), out.stride(1),
                                    tables.stride(0), H=heads, KV=KV, BS=block_size, G=G,
                                    GP=max(16, triton.next_power_of_2(G)), GM=max(2, triton.next_power_of_2(G)), D=D,
                                    D_PAD=D_PAD, BLOCK_N=BLOCK_N,
                                    SPLITS=splits, S_PAD=max(2, triton.next_power_of_2(splits)),
                                    IEEE=k_pool.dtype == torch.float32, num_warps=4, **pdl_args(qkv))
    return out
