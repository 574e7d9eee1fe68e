"""The one-row (batch-1 decode) product of a dense bf16 / fp16 / fp32 matrix on CUDA (Triton), with the
work around it fused in: `gemv(x, w, add=a, norm=g, swiglu=True)` computes, in ONE kernel,

    h = x + a                          (the residual add, rounded to x's dtype as torch's add rounds)
    y = (w @ (h * g)) * rsqrt(mean(h^2) + eps)      (RMSNorm folded around the product)
    y = silu(y_gate) * y_up            (SwiGLU, when w is gate|up stacked: gate rows, then up rows)

and returns y and h (the new residual stream). Why: in a batch-1 CUDA-graph step of a 1.1 B Llama on an
H200, cuBLAS runs q|k|v and o (N = 2048-2560) at 1.5-1.8 TB/s with 64 x 8 tiles (its kernels' names), i.e.
by that tiling 32-40 thread blocks on a card of 132 SMs, and each layer adds two add + RMSNorm launches, SwiGLU's product and a split-K
reduce (benchmarks/gpu_decode.py's kernel profile, run 6). Here a program takes BLOCK_N rows and streams
them over the whole K (hundreds of programs in flight), accumulates x * w in a (BLOCK_N, BLOCK_K) fp32
tile, and reads h in the same loop for the norm's sum of squares, so the norm costs no extra pass: its
1 / rms multiplies the row sums at the end (the same formula as RMSNorm then the product; the rounding
differs only in that the normed input is not rounded to bf16 before the product).

Measured on an H200 (gpu_decode.py, runs 7-9): a batch-1 step of that model 0.87-0.89 ms instead of 1.15-1.19
(1.31x tok/s in the same run), 165 kernels instead of 255, the GEMVs at 2.1-3.4 TB/s.

`gemv_w4` is the same for int4 weights (the zero point times the sum of x once per row, the nibbles widened
in registers): with the add / norm / SwiGLU it saves it beats tinygemm on q|k|v and gate|up, not on o and
down, which keep tinygemm (int4's batch-1 step 0.755 vs 0.873 ms, run 9).

Used by `Transformer._hidden_gemv` (one-row forwards on CUDA, `model.fused_gemv`); the tiles per matrix
role are GEMV_CONFIGS (None: cuBLAS for that role) and GEMV_W4_CONFIGS, picked on the card by
gpu_decode.py's `gemv_sweep` / `gemv_w4_sweep`. tests/test_graphs.py runs the kernels in Triton's
interpreter; tests/test_gpu.py on the card.
"""
from __future__ import annotations

import torch

from afford.models.triton_lib import available, nvidia, pdl_args, rope_halves, tl, triton  # noqa: F401  (available: re-exported)

# (BLOCK_N, BLOCK_K, num_warps, num_stages) per matrix role; None: F.linear (cuBLAS) for that role. The
# defaults: gpu_decode.py's gemv_sweep on an H200 (797054a), each role's fastest of SWEEP_CONFIGS over 22
# streamed matrices -- q|k|v with add + norm 5.04 us against cuBLAS + the norm kernel's 7.96, o 4.04 vs 6.02,
# gate|up with add + norm + SwiGLU 13.5 vs 17.5, down 7.70 vs 10.6 (a 1.1 B Llama's shapes). "head": the LM head
# with the final add + norm fused (Transformer.logits); not yet timed on a card, so cuBLAS after the norm kernel
GEMV_CONFIGS: dict[str, tuple[int, int, int, int] | None] = {
    "qkv": (4, 2048, 4, 1), "o": (2, 2048, 4, 1), "gate_up": (4, 2048, 4, 1), "down": (4, 2048, 4, 1), "head": None}
# int4 (per-group scales and zero points): the same per role, a fifth element naming the code layout and kernel
# (W4_KINDS: 0 or none the pairs layout, triton_int4.pack; 1 halves, pack_halves; 2 halves through the tensor
# cores, _gemv_w4_tc_kernel; 3 octets, pack_octets, one group a row, _gemv_w4o_kernel; 4 halves with x loaded
# in the codes' layout, _gemv_w4_kernel's X2D; 5 quads, pack_quads, one group a row, integer dot products on x in
# fixed point, _gemv_w4q_kernel; a sixth element for 2 and 5: K split over that many programs). o, down and
# the head without one keep their QuantLinear's kernel (tinygemm); q|k|v or gate|up without one (or with a scale
# group smaller than the tile, which this kernel would walk in short steps -- not measured) keep the model on the
# fused-layer path. The defaults: gpu_decode.py's gemv_w4_sweep on an H200 (run 12, 8e2fd79), per-channel
# scales, 22 streamed matrices a role, each role's fastest of W4_SWEEP_CONFIGS (us a matrix, against tinygemm
# and the kernels it replaces): q|k|v with add + norm 3.47 vs 5.07 (pairs), o 3.25 vs 3.72 (quads), gate|up with
# add + norm + SwiGLU 7.15 vs 12.20 (quads, K split in 4), down 5.51 vs 6.43 (halves), the head (only where
# quantize_head makes it int4) with the final add + norm 12.79 vs 23.21 (quads). Run 10's tiles (pairs for
# q|k|v and gate|up, halves for o, tinygemm for down): 3.47-4.65, 3.43, 9.55, 6.43 us.
GEMV_W4_CONFIGS: dict[str, tuple[int, ...] | None] = {"qkv": (8, 2048, 4, 1), "o": (16, 1024, 4, 2, 5),
                                                      "gate_up": (16, 256, 1, 2, 5, 4), "down": (4, 2048, 4, 1, 1),
                                                      "head": (16, 256, 1, 1, 5)}
# the tiles gpu_decode.py's gemv_sweep times per role on the card (and tests/test_gpu.py checks)
SWEEP_CONFIGS = [(2, 2048, 4, 1), (4, 1024, 4, 1), (4, 2048, 4, 1), (8, 512, 4, 1), (8, 1024, 4, 1), (8, 2048, 8, 1),
                 (16, 512, 4, 1), (16, 512, 8, 1), (4, 512, 2, 1), (8, 512, 4, 3), (4, 1024, 4, 2), (16, 256, 4, 3)]
# (run 8 timed ten pairs tiles; five, each slower on every role than a tile kept here, left the list to keep the
# card's sweep short: 2 x 2048, 16 x 2048, 16 x 1024, 8 x 512 and 32 x 512 rows x K)
W4_SWEEP_CONFIGS = [(4, 2048, 4, 1), (8, 2048, 4, 1), (8, 1024, 4, 1), (16, 512, 4, 1), (4, 1024, 2, 1),
                    (8, 1024, 4, 3)]                                                 # pairs (the last pipelined)
W4_SWEEP_CONFIGS += [c + (1,) for c in ((4, 2048, 4, 1), (8, 1024, 4, 1), (16, 512, 4, 1), (4, 1024, 2, 1))]  # halves
W4_SWEEP_CONFIGS += [c + (4,) for c in ((8, 1024, 4, 1), (4, 1024, 2, 1), (8, 512, 2, 1), (8, 1024, 4, 3))]
# (halves with x in the codes' layout; no 2048-weight steps, whose rows span warps: barriers again)
W4_SWEEP_CONFIGS += [c + (5,) for c in ((16, 256, 1, 1), (16, 256, 1, 2), (32, 256, 1, 1), (8, 256, 1, 2),
                                        (16, 512, 2, 1), (32, 512, 2, 1), (8, 512, 2, 2), (16, 1024, 4, 1),
                                        (16, 1024, 4, 2))]
W4_SWEEP_CONFIGS += [(16, 256, 1, 2, 5, 2), (16, 256, 1, 2, 5, 4)]
# few weights a thread (16-32 at K = 2048, where the tiles above give 64-256): run 12's fits put int4's fixed
# part at 2.4 us a product against bf16's 1.0, and a program's instructions after its input arrives run as one
# dependent chain -- sm_90 SASS, q|k|v with add + norm: bf16 (4, 2048, 4, 1) 536 a program, halves (4, 2048, 4,
# 1, 1) 752, pairs (8, 2048, 4, 1) 1,216, quads (16, 1024, 4, 2, 5) 1,336; halves (2, 2048, 8, 1, 1) 360,
# (1, 2048, 4, 1, 1) 376
W4_SWEEP_CONFIGS += [(2, 2048, 4, 1, 1), (2, 2048, 8, 1, 1), (1, 2048, 4, 1, 1), (4, 2048, 8, 1, 1),   # halves
                     (2, 2048, 4, 1), (4, 2048, 8, 1),                                                  # pairs
                     (8, 2048, 4, 1, 5), (16, 2048, 8, 1, 5)]                                           # quads
# (quads, integer dot products: a step of 256 weights a warp keeps one word column a thread; stages 2 prefetch.
# One warp and 8 steps a row: the fewest instructions a weight (sm_90 SASS); more warps, fewer steps, or a sixth
# element splitting a row's K over 2-4 programs: more programs and bytes in flight for the 2048-row matrices,
# whose 16-row programs would be one a SM, each a DRAM round trip a step.
# The tensor-core tiles (32 / 64 / 128 rows, K split in 2-4) and the octets tiles lost on every role in run 10 --
# their best 1.25-1.44x / 1.14-1.33x the best tile's time: left out of the card's sweep, their kernels kept and
# tested.)

if triton is not None:
    @triton.jit
    def _inv_rms(ss, eps, K: tl.constexpr, NORM: tl.constexpr, AXIS: tl.constexpr = 0):
        """1 / rms from the summed squares along AXIS (1 without the norm)."""
        r = 1.0
        if NORM:
            r = 1.0 / tl.sqrt(tl.sum(ss, axis=AXIS) / K + eps)
        return r

    @triton.jit
    def _split_last(WS, CNT, pid, i, nm, ys, yu, ss, xs, eps, K: tl.constexpr, BLOCK_N: tl.constexpr,
                    SPLIT: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr):
        """A row block's K split over SPLIT programs (program_id 1): this one's row sums ys (yu: the up rows'), at
        i (mask nm), and x's squares' and x's sums (scalars) go to its slot of WS; it counts itself in CNT (zero
        between calls). Returns whether it counted last and then every slot's sums added in split order
        (deterministic, unlike atomic adds; read from L2), the norm's 1 / rms and x's sum -- the counter left at
        zero for the next call and a graph's next replay."""
        SLOT: tl.constexpr = 2 * BLOCK_N + 2
        two = tl.arange(0, 2)
        ws = WS + pid * (SPLIT * SLOT)
        mine = ws + tl.program_id(1) * SLOT
        tl.store(mine + i, ys, mask=nm)
        if SWIGLU:
            tl.store(mine + BLOCK_N + i, yu, mask=nm)
        tl.store(mine + 2 * BLOCK_N + two, tl.where(two == 0, ss, xs))
        tl.debug_barrier()                               # every thread's stores before the count (release)
        last = tl.atomic_add(CNT + pid, 1, sem="acq_rel") == SPLIT - 1
        ys = tl.zeros_like(ys)
        yu = tl.zeros_like(yu)
        tot = tl.zeros((2,), tl.float32)
        if last:
            for sp in tl.static_range(SPLIT):
                ys += tl.load(ws + sp * SLOT + i, mask=nm, other=0.0, cache_modifier=".cg")
                if SWIGLU:
                    yu += tl.load(ws + sp * SLOT + BLOCK_N + i, mask=nm, other=0.0, cache_modifier=".cg")
                tot += tl.load(ws + sp * SLOT + 2 * BLOCK_N + two, cache_modifier=".cg")
            tl.store(CNT + pid, 0)
        return last, ys, yu, _inv_rms(tl.where(two == 0, tot, 0.0), eps, K, NORM), \
            tl.sum(tl.where(two == 1, tot, 0.0), axis=0)

    @triton.jit
    def _store_out(Y, n, nm, y, yu, SWIGLU: tl.constexpr):
        """The rows' fp32 results (with SwiGLU: y the gate rows, yu the up rows) into Y in its dtype; silu
        rounded to the dtype before the product, as torch's operators round."""
        dt = Y.dtype.element_ty
        if SWIGLU:
            g = y.to(dt).to(tl.float32)
            act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
            y = act * yu.to(dt).to(tl.float32)
        tl.store(Y + n, y.to(dt), mask=nm)

    @triton.jit
    def _tile_rows(pid, N, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr):
        """A program's BLOCK_N output rows and which exist. ROPE (a q|k|v product, heads of 2 HALF rows): rows
        in RoPE's pairs, element i of a head beside element i + HALF, so the program holds both halves of each
        rotation (_rope_rows) -- the same rows as without, in another order."""
        t = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        if ROPE:
            p = t // 2                                                  # the pair: head p // HALF, element p % HALF
            n = (p // HALF) * (2 * HALF) + p % HALF + (t % 2) * HALF
        else:
            n = t
        return n, t < N

    @triton.jit
    def _rope_rows(Y, pid, N, y, COS, SIN, POS, SLOTS, KP, VP, scratch, stride_cos, stride_ks, stride_kh,
                   BLOCK_N: tl.constexpr, RH: tl.constexpr, RKV: tl.constexpr, HALF: tl.constexpr):
        """A q|k|v product's rows y (fp32, in _tile_rows' ROPE order) out as rope_store leaves them: rounded to
        the dtype, RoPE at the row's position on q and k (triton_lib.rope_halves, as rope_store rounds), q to Y
        (RH heads of 2 HALF), k and v into the pools at the row's slot (-1: the scratch slot) -- bit for bit
        rope_store's result from the stored product."""
        dt = Y.dtype.element_ty
        x1, x2 = tl.split(tl.reshape(y.to(dt), (BLOCK_N // 2, 2)))    # element i, element i + HALF
        p = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        pm = 2 * p < N
        hd = p // HALF
        i = p % HALF
        o1, o2 = rope_halves(x1, x2, COS, SIN, tl.load(POS).to(tl.int64), stride_cos, i, pm, HALF)
        slot = tl.load(SLOTS)
        slot = tl.where(slot >= 0, slot, scratch).to(tl.int64)
        isq = pm & (hd < RH)
        isk = pm & (hd >= RH) & (hd < RH + RKV)
        isv = pm & (hd >= RH + RKV)
        q_at = Y + hd * (2 * HALF) + i
        tl.store(q_at, o1, mask=isq)
        tl.store(q_at + HALF, o2, mask=isq)
        k_at = KP + slot * stride_ks + (hd - RH) * stride_kh + i
        tl.store(k_at, o1, mask=isk)
        tl.store(k_at + HALF, o2, mask=isk)
        v_at = VP + slot * stride_ks + (hd - RH - RKV) * stride_kh + i
        tl.store(v_at, x1, mask=isv)
        tl.store(v_at + HALF, x2, mask=isv)

    @triton.jit
    def _row_affine(S, Z, n, nm, F_OFF, ONE: tl.constexpr, SWIGLU: tl.constexpr):
        """One group a row: the rows' scales and zero points (and the up rows', with SwiGLU); 0 otherwise. The
        kernels load them first, with their first codes: left to _w4_finish, they were a DRAM round trip after
        the row sums' reduction, at the end of every program (the sm_90 SASS put the loads there)."""
        s = 0.0
        z = 0.0
        su = 0.0
        zu = 0.0
        if ONE:
            s = tl.load(S + n, mask=nm, other=0.0)
            z = tl.load(Z + n, mask=nm, other=0.0)
            su, zu = s, z
            if SWIGLU:
                su = tl.load(S + n + F_OFF, mask=nm, other=0.0)
                zu = tl.load(Z + n + F_OFF, mask=nm, other=0.0)
        return s, z, su, zu

    @triton.jit
    def _w4_finish(Y, n, nm, s, z, su, zu, sums, sums_u, zacc, zacc_u, xt, off, r, ONE: tl.constexpr,
                   SWIGLU: tl.constexpr):
        """int4 rows' sums -> outputs. One group a row: s * (sum - off * sum(x)) + z * sum(x), off the code
        offset the sums carry, s / z (su / zu for the up rows) from _row_affine; several: the scales are in the
        sums already, the zero points in zacc."""
        y, yu = _w4_rows(s, z, su, zu, sums, sums_u, zacc, zacc_u, xt, off, r, ONE, SWIGLU)
        _store_out(Y, n, nm, y, yu, SWIGLU)

    @triton.jit
    def _w4_rows(s, z, su, zu, sums, sums_u, zacc, zacc_u, xt, off, r, ONE: tl.constexpr, SWIGLU: tl.constexpr):
        """_w4_finish's rows (and up rows), fp32, before the store."""
        if ONE:
            y = s * (sums - off * xt) + z * xt
        else:
            y = sums + zacc
        yu = y
        if SWIGLU:
            if ONE:
                yu = su * (sums_u - off * xt) + zu * xt
            else:
                yu = sums_u + zacc_u
        return y * r, yu * r

    @triton.jit
    def _x_part(X, A, XO, G, k, km, wm, HAS_ADD: tl.constexpr, NORM: tl.constexpr, EVEN: tl.constexpr,
                WRITE: tl.constexpr = True):
        """x at k (+ the addend, written back where wm -- program 0's one copy of each k -- unless WRITE is
        False), fp32, times the norm's weight; and its squares. km: which k exist (EVEN: all; the loads then
        carry no mask, so they stay 16-byte vectors)."""
        if EVEN:
            x = tl.load(X + k)
        else:
            x = tl.load(X + k, mask=km, other=0.0)
        if HAS_ADD:
            if EVEN:
                a = tl.load(A + k)
            else:
                a = tl.load(A + k, mask=km, other=0.0)
            x = (x.to(tl.float32) + a.to(tl.float32)).to(x.dtype)
            if WRITE:
                tl.store(XO + k, x, mask=wm)
        xf = x.to(tl.float32)
        sq = xf * xf
        if NORM:
            if EVEN:
                xf = xf * tl.load(G + k).to(tl.float32)
            else:
                xf = xf * tl.load(G + k, mask=km, other=0.0).to(tl.float32)
        return xf, sq

    @triton.jit
    def _rows(R, k, nm, km, EVEN: tl.constexpr):
        """A (BLOCK_N, len(k)) tile of the rows R at columns k: rows past N (nm False) and, unless EVEN, columns
        past K (km False) read 0."""
        if EVEN:
            t = tl.load(R + k[None, :], mask=nm[:, None], other=0.0)
        else:
            t = tl.load(R + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        return t

    @triton.jit
    def _step_rows(rows, rows_u, col, nm, cm, EVEN: tl.constexpr, SWIGLU: tl.constexpr, PDL: tl.constexpr):
        """A step's tile of the rows (and of the up rows, with SwiGLU): weights or int4 codes. PDL (the first
        step): no kernel writes them, so they load after this kernel lets the next one start and before it
        waits for the one before (triton_lib); x and the addend, that kernel's output, only after."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        w = _rows(rows, col, nm, cm, EVEN)
        u = w
        if SWIGLU:
            u = _rows(rows_u, col, nm, cm, EVEN)
        if PDL:
            tl.extra.cuda.gdc_wait()
        return w, u

    @triton.jit
    def _gemv_step(X, A, XO, G, pid, k, km, w, u, acc, acc_u, ss, HAS_ADD: tl.constexpr, NORM: tl.constexpr,
                   SWIGLU: tl.constexpr, EVEN: tl.constexpr):
        """One step of _gemv_kernel over columns k, its weights w (and the up rows' u) loaded."""
        xf, sq = _x_part(X, A, XO, G, k, km, km & (pid == 0), HAS_ADD, NORM, EVEN)
        acc += w.to(tl.float32) * xf[None, :]
        if SWIGLU:
            acc_u += u.to(tl.float32) * xf[None, :]
        return acc, acc_u, ss + sq

    @triton.jit
    def _gemv_kernel(X, A, XO, G, W, Y, N, UP_OFF, eps, stride_w,
                     COS, SIN, POS, SLOTS, KP, VP, scratch, stride_cos, stride_ks, stride_kh, K: tl.constexpr,
                     HAS_ADD: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
                     ROPE: tl.constexpr, RH: tl.constexpr, RKV: tl.constexpr, HALF: tl.constexpr):
        # ROPE: a q|k|v product that leaves what rope_store would (_rope_rows; COS ... stride_kh its arguments)
        pid = tl.program_id(0)
        n, nm = _tile_rows(pid, N, BLOCK_N, ROPE, HALF)
        kk = tl.arange(0, BLOCK_K)
        rows = W + n[:, None].to(tl.int64) * stride_w
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        ss = tl.zeros((BLOCK_K,), tl.float32)
        w, u = _step_rows(rows, rows + UP_OFF, kk, nm, kk < K, EVEN_K, SWIGLU, PDL)
        acc, acc_u, ss = _gemv_step(X, A, XO, G, pid, kk, kk < K, w, u, acc, acc_u, ss, HAS_ADD, NORM, SWIGLU, EVEN_K)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            k = k0 + kk
            w, u = _step_rows(rows, rows + UP_OFF, k, nm, k < K, EVEN_K, SWIGLU, False)
            acc, acc_u, ss = _gemv_step(X, A, XO, G, pid, k, k < K, w, u, acc, acc_u, ss, HAS_ADD, NORM, SWIGLU, EVEN_K)
        r = _inv_rms(ss, eps, K, NORM)
        if ROPE:
            _rope_rows(Y, pid, N, tl.sum(acc, axis=1) * r, COS, SIN, POS, SLOTS, KP, VP, scratch, stride_cos,
                       stride_ks, stride_kh, BLOCK_N, RH, RKV, HALF)
        else:
            _store_out(Y, n, nm, tl.sum(acc, axis=1) * r, tl.sum(acc_u, axis=1) * r, SWIGLU)

    @triton.jit
    def _w4_col(c, j, K: tl.constexpr, HALVES: tl.constexpr):
        """The byte columns of gemv_w4's step at c (a byte column in the halves layout, a k in the pairs one)
        and which exist."""
        if HALVES:
            col = c + j
        else:
            col = c // 2 + j
        return col, col < K // 2

    @triton.jit
    def _nibbles(b):
        """Bytes' low and high nibbles minus 8, as fp32: each nibble becomes the low mantissa bits of 2^23 (or-ed
        into 0x4B000000), minus 2^23 + 8 -- no conversion instruction. A masked byte (0) reads -8, against an x
        of 0."""
        b = b.to(tl.uint32)
        lo = ((b & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        hi = ((b >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        return lo, hi

    @triton.jit
    def _w4_step(X, A, XO, G, S, Z, pid, n, nm, F_OFF, n_groups, c, j, kk, b, bu, acc, acc_u, zacc, zacc_u, ss, xsum,
                 K: tl.constexpr, GROUP: tl.constexpr, HAS_ADD: tl.constexpr, NORM: tl.constexpr,
                 SWIGLU: tl.constexpr, HALVES: tl.constexpr, X2D: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
        """One step of _gemv_w4_kernel at c, its code bytes b (the up rows' bu) loaded."""
        ONE: tl.constexpr = GROUP == K
        if HALVES:
            if X2D:         # x loaded in the codes' own layout, every row a copy: no conversion through shared memory
                kx = c + j[None, :] + tl.zeros((BLOCK_N, 1), tl.int32)   # (the sum x + a: _write_sum)
                cm = kx < K // 2
                xe, sqe = _x_part(X, A, XO, G, kx, cm, cm, HAS_ADD, NORM, EVEN, False)           # the low nibbles' x
                xo, sqo = _x_part(X, A, XO, G, K // 2 + kx, cm, cm, HAS_ADD, NORM, EVEN, False)  # the high nibbles'
                xs_lo = tl.sum(xe, axis=1)
                xs_hi = tl.sum(xo, axis=1)
                xe2 = xe
                xo2 = xo
            else:
                cm = (c + j) < K // 2
                xe, sqe = _x_part(X, A, XO, G, c + j, cm, cm & (pid == 0), HAS_ADD, NORM, EVEN)
                xo, sqo = _x_part(X, A, XO, G, K // 2 + c + j, cm, cm & (pid == 0), HAS_ADD, NORM, EVEN)
                xs_lo = tl.sum(xe, axis=0)
                xs_hi = tl.sum(xo, axis=0)
                xe2 = xe[None, :]
                xo2 = xo[None, :]
            ss += sqe + sqo
            g_lo = c // GROUP
            g_hi = (K // 2 + c) // GROUP
            if ONE:
                xsum += xe + xo
        else:
            km = (c + kk) < K
            xf, sq = _x_part(X, A, XO, G, c + kk, km, km & (pid == 0), HAS_ADD, NORM, EVEN)
            ss += sq
            xe, xo = tl.split(tl.reshape(xf, (BLOCK_K // 2, 2)))
            xe2 = xe[None, :]
            xo2 = xo[None, :]
            g_lo = c // GROUP
            g_hi = g_lo
            xs_lo = tl.sum(xf, axis=0)
            xs_hi = 0.0
            if ONE:
                xsum += xf
        lo, hi = _nibbles(b)
        if ONE:
            acc += lo * xe2 + hi * xo2
        else:
            s_lo = tl.load(S + n * n_groups + g_lo, mask=nm, other=0.0)
            s_hi = tl.load(S + n * n_groups + g_hi, mask=nm, other=0.0)
            acc += s_lo[:, None] * lo * xe2 + s_hi[:, None] * hi * xo2
            zacc += tl.load(Z + n * n_groups + g_lo, mask=nm, other=0.0) * xs_lo \
                + tl.load(Z + n * n_groups + g_hi, mask=nm, other=0.0) * xs_hi
        if SWIGLU:
            lo, hi = _nibbles(bu)
            if ONE:
                acc_u += lo * xe2 + hi * xo2
            else:
                nu = n + F_OFF
                s_lo = tl.load(S + nu * n_groups + g_lo, mask=nm, other=0.0)
                s_hi = tl.load(S + nu * n_groups + g_hi, mask=nm, other=0.0)
                acc_u += s_lo[:, None] * lo * xe2 + s_hi[:, None] * hi * xo2
                zacc_u += tl.load(Z + nu * n_groups + g_lo, mask=nm, other=0.0) * xs_lo \
                    + tl.load(Z + nu * n_groups + g_hi, mask=nm, other=0.0) * xs_hi
        return acc, acc_u, zacc, zacc_u, ss, xsum

    @triton.jit
    def _write_sum(X, A, XO, K: tl.constexpr, STEP: tl.constexpr):
        """XO = x + a, by _x_part (X2D's write-back, one 1-D pass of program 0: a store from
        the codes' layout would go through shared memory)."""
        k = tl.arange(0, STEP)
        for k0 in range(0, K, STEP):
            km = k0 + k < K
            _x_part(X, A, XO, X, k0 + k, km, km, True, False, False)

    @triton.jit
    def _gemv_w4_kernel(X, A, XO, G, P, S, Z, Y, N, F_OFF, UP_OFF, eps, stride_p, n_groups,
                        COS, SIN, POS, SLOTS, KP, VP, scratch, stride_cos, stride_ks, stride_kh, K: tl.constexpr,
                        GROUP: tl.constexpr, HAS_ADD: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
                        HALVES: tl.constexpr, X2D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN: tl.constexpr, PDL: tl.constexpr, ROPE: tl.constexpr, RH: tl.constexpr,
                        RKV: tl.constexpr, HALF: tl.constexpr):
        # int4 codes two a byte, w = (q - 8) * s + z per (row, group). Layouts: pairs (triton_int4.pack: k
        # and k + 1 share a byte; x is loaded whole and split in registers) or halves (pack_halves: k and
        # k + K / 2 share a byte; x is loaded as two contiguous halves, no split). A step covers BLOCK_K
        # weights of a row inside one group per nibble; the zero point multiplies the sum of x once per
        # row; one group per row (GROUP == K): the scale applies at the end, and the last step may run past
        # the row (EVEN False: masked), so a K of no power of two still takes long steps. The first step's
        # codes load before PDL's wait, as _gemv_kernel's weights do. X2D (halves): x, its squares and sums
        # live in the codes' layout, every row of the tile a copy (each warp reads x from L1), instead of one
        # copy that shared memory hands to every warp at each step (sm_90 SASS: 1 barrier instead of 11-39).
        ONE: tl.constexpr = GROUP == K
        XAX: tl.constexpr = 1 if X2D else 0
        END: tl.constexpr = K // 2 if HALVES else K
        STEP: tl.constexpr = BLOCK_K // 2 if HALVES else BLOCK_K
        pid = tl.program_id(0)
        n, nm = _tile_rows(pid, N, BLOCK_N, ROPE, HALF)     # (ROPE: as _gemv_kernel's)
        j = tl.arange(0, BLOCK_K // 2)
        kk = tl.arange(0, BLOCK_K)
        rows = P + n[:, None].to(tl.int64) * stride_p
        rows_u = rows + UP_OFF
        acc = tl.zeros((BLOCK_N, BLOCK_K // 2), tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_K // 2), tl.float32)
        zacc = tl.zeros((BLOCK_N,), tl.float32)
        zacc_u = tl.zeros((BLOCK_N,), tl.float32)
        if X2D:
            ss = tl.zeros((BLOCK_N, STEP), tl.float32)
            xsum = tl.zeros((BLOCK_N, STEP), tl.float32)
        else:
            ss = tl.zeros((STEP,), tl.float32)
            xsum = tl.zeros((STEP,), tl.float32)
        s, z, su, zu = _row_affine(S, Z, n, nm, F_OFF, ONE, SWIGLU)
        col, cm = _w4_col(0, j, K, HALVES)
        b, bu = _step_rows(rows, rows_u, col, nm, cm, False, SWIGLU, PDL)
        acc, acc_u, zacc, zacc_u, ss, xsum = _w4_step(
            X, A, XO, G, S, Z, pid, n, nm, F_OFF, n_groups, 0, j, kk, b, bu, acc, acc_u, zacc, zacc_u, ss, xsum,
            K, GROUP, HAS_ADD, NORM, SWIGLU, HALVES, X2D, BLOCK_N, BLOCK_K, EVEN)
        for c in range(STEP, END, STEP):
            col, cm = _w4_col(c, j, K, HALVES)
            b, bu = _step_rows(rows, rows_u, col, nm, cm, False, SWIGLU, False)
            acc, acc_u, zacc, zacc_u, ss, xsum = _w4_step(
                X, A, XO, G, S, Z, pid, n, nm, F_OFF, n_groups, c, j, kk, b, bu, acc, acc_u, zacc, zacc_u, ss, xsum,
                K, GROUP, HAS_ADD, NORM, SWIGLU, HALVES, X2D, BLOCK_N, BLOCK_K, EVEN)
        if X2D and HAS_ADD:
            if pid == 0:
                _write_sum(X, A, XO, K, STEP)
        if ROPE:
            y, _ = _w4_rows(s, z, su, zu, tl.sum(acc, axis=1), tl.sum(acc_u, axis=1), zacc, zacc_u,
                            tl.sum(xsum, axis=XAX), 0.0, _inv_rms(ss, eps, K, NORM, XAX), ONE, SWIGLU)
            _rope_rows(Y, pid, N, y, COS, SIN, POS, SLOTS, KP, VP, scratch, stride_cos, stride_ks, stride_kh,
                       BLOCK_N, RH, RKV, HALF)
        else:
            _w4_finish(Y, n, nm, s, z, su, zu, tl.sum(acc, axis=1), tl.sum(acc_u, axis=1), zacc, zacc_u,
                       tl.sum(xsum, axis=XAX), 0.0, _inv_rms(ss, eps, K, NORM, XAX), ONE, SWIGLU)

    @triton.constexpr_function
    def _nib_shift(j):
        """Where nibble j of an octets word sits: bit 4j of the word for j < 5, else bit 4(j - 3) of word >> 12
        (bits 20 and up would reach 2^23's exponent)."""
        j = int(getattr(j, "value", j))
        return 4 * j if j < 5 else 4 * (j - 3)

    @triton.constexpr_function
    def _nib_lop3(j):
        return f"lop3.b32 $0, $1, {15 << _nib_shift(j)}, 0x4B000000, 0xea;"    # (a & mask) | 0x4B000000

    @triton.jit
    def _mant(src, J: tl.constexpr, USE_ASM: tl.constexpr):
        """Nibble J's bits of src in 2^23's mantissa, read as fp32: 2^23 + 2^sh * q. One lop3 on a card (ptxas
        emits an and and an or for the Triton ops, which the interpreter runs)."""
        if USE_ASM:
            v = tl.inline_asm_elementwise(_nib_lop3(J), "=r,r", [src], dtype=tl.float32, is_pure=True, pack=1)
        else:
            v = ((src & (15 << _nib_shift(J))) | 0x4B000000).to(tl.float32, bitcast=True)
        return v

    @triton.jit
    def _w4o_step(X, A, XO, G, pid, c0, c, w, wu, acc, acc_u, ss, xsum, K: tl.constexpr, HAS_ADD: tl.constexpr,
                  NORM: tl.constexpr, SWIGLU: tl.constexpr, EVEN: tl.constexpr, USE_ASM: tl.constexpr):
        """One step of _gemv_w4o_kernel at word column c0, its code words w (the up rows' wu) loaded."""
        SEG: tl.constexpr = K // 8
        cm = (c0 + c) < SEG
        w_hi = w >> 12                                   # nibbles 5-7 to bits 8-19
        wu_hi = wu >> 12
        for j in tl.static_range(8):
            xj, sqj = _x_part(X, A, XO, G, j * SEG + c0 + c, cm, cm & (pid == 0), HAS_ADD, NORM, EVEN)
            ss += sqj
            xsum += xj
            # nibble j, or-ed into 2^23's mantissa at bit sh, reads 2^23 + p * q (p = 2^sh) exactly; minus
            # 2^23 + 8p that is p * (q - 8), and x scaled by 1 / p (exact) takes p off inside the multiply-add
            p = 1 << _nib_shift(j)
            xs = xj * (1.0 / p)
            if j < 5:
                v = _mant(w, j, USE_ASM)
            else:
                v = _mant(w_hi, j, USE_ASM)
            acc = acc + (v - (8388608.0 + 8.0 * p)) * xs[None, :]
            if SWIGLU:
                if j < 5:
                    v = _mant(wu, j, USE_ASM)
                else:
                    v = _mant(wu_hi, j, USE_ASM)
                acc_u = acc_u + (v - (8388608.0 + 8.0 * p)) * xs[None, :]
        return acc, acc_u, ss, xsum

    @triton.jit
    def _gemv_w4o_kernel(X, A, XO, G, P, S, Z, Y, N, F_OFF, UP_OFF, eps, stride_p, K: tl.constexpr,
                         HAS_ADD: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_C: tl.constexpr, EVEN: tl.constexpr, USE_ASM: tl.constexpr, PDL: tl.constexpr):
        # gemv_w4 in the octets layout (pack_octets; one group a row): a row is K / 8 int32 words, word c holding
        # the codes of k = c, c + K/8, ..., c + 7K/8 in its eight nibbles, so a step reads BLOCK_C words of a row
        # and eight contiguous runs of x. Each weight costs an and-or (the nibble into a float's mantissa, no
        # shift but one per word), a subtraction and a multiply-add (_w4o_step) -- against the pairs kernel's
        # byte unpacking, shifts and split sums. USE_ASM: the and-or as one lop3 (inline PTX).
        SEG: tl.constexpr = K // 8
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        c = tl.arange(0, BLOCK_C)
        rows = P + n[:, None].to(tl.int64) * stride_p
        rows_u = rows + UP_OFF
        acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
        ss = tl.zeros((BLOCK_C,), tl.float32)
        xsum = tl.zeros((BLOCK_C,), tl.float32)
        s, z, su, zu = _row_affine(S, Z, n, nm, F_OFF, True, SWIGLU)
        w, wu = _step_rows(rows, rows_u, c, nm, c < SEG, False, SWIGLU, PDL)
        acc, acc_u, ss, xsum = _w4o_step(X, A, XO, G, pid, 0, c, w, wu, acc, acc_u, ss, xsum, K, HAS_ADD, NORM,
                                         SWIGLU, EVEN, USE_ASM)
        for c0 in range(BLOCK_C, SEG, BLOCK_C):
            w, wu = _step_rows(rows, rows_u, c0 + c, nm, (c0 + c) < SEG, False, SWIGLU, False)
            acc, acc_u, ss, xsum = _w4o_step(X, A, XO, G, pid, c0, c, w, wu, acc, acc_u, ss, xsum, K, HAS_ADD,
                                             NORM, SWIGLU, EVEN, USE_ASM)
        _w4_finish(Y, n, nm, s, z, su, zu, tl.sum(acc, axis=1), tl.sum(acc_u, axis=1), 0.0, 0.0,
                   tl.sum(xsum, axis=0), 0.0, _inv_rms(ss, eps, K, NORM), True, SWIGLU)


if triton is not None:
    # The quads layout's integer dot products (kind 5, _gemv_w4q_kernel). x becomes 24-bit fixed point: m = round(x *
    # 2^(21 - e)), e the exponent of max |x| (so |m| < 2^22: x is exact to 2^-22 of its largest element, about
    # fp32's own rounding of the sums), split into H = m >> 16 (signed, one byte) and ML = m & 0xFFFF. dp4a
    # multiplies four code bytes' nibbles (unsigned) by four bytes of H and adds them to an int32 in one instruction,
    # dp2a two of them by two 16-bit ML; so a word of eight weights costs three unpacking instructions, two dp4a and
    # four dp2a -- against seven to eleven instructions A WEIGHT for the fp32 kernels above (their sm_90 SASS: the
    # widening, subtraction and multiply-add per weight). The sums per piece are exact integers, put together once.
    # (Both write their outputs last, from local registers: LLVM may give an output the register of any input,
    # taking the inputs as all read before an output is written.)
    _Q_PIECES = tl.constexpr("""{
    .reg .b32 a, b, t0, t1, t2;
    prmt.b32 a, $3, $4, 0x0062;
    prmt.b32 b, $5, $6, 0x0062;
    prmt.b32 t0, a, b, 0x5410;
    prmt.b32 t1, $3, $4, 0x5410;
    prmt.b32 t2, $5, $6, 0x5410;
    mov.b32 $0, t0;
    mov.b32 $1, t1;
    mov.b32 $2, t2;
    }""")
    _Q_DOT = tl.constexpr("""{
    .reg .b32 l, h, t0, t1;
    and.b32 l, $2, 0x0F0F0F0F;
    shr.u32 h, $2, 4;
    and.b32 h, h, 0x0F0F0F0F;
    dp4a.u32.s32 t0, l, $3, $9;
    dp4a.u32.s32 t0, h, $4, t0;
    dp2a.lo.u32.u32 t1, $5, l, $10;
    dp2a.hi.u32.u32 t1, $6, l, t1;
    dp2a.lo.u32.u32 t1, $7, h, t1;
    dp2a.hi.u32.u32 t1, $8, h, t1;
    mov.b32 $0, t0;
    mov.b32 $1, t1;
    }""")

    @triton.jit
    def _q_fixed(xf, scl):
        """x -> round(x * scl) as int32 (scl a power of two, |x * scl| < 2^22): 1.5 * 2^23 added puts the integer in
        the mantissa's low bits."""
        return (xf * scl + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000

    @triton.jit
    def _q_pieces(m):
        """m (1, C, 4: a code word's four k) -> three words (1, C, 1): the four H bytes (byte 2 of each m), the ML
        halves of k 0 and 1, of k 2 and 3. Five prmt. The four k are split apart first and the asm takes them
        as four operands: with pack=4 Triton filled the instance with undef wherever a step had fewer word
        columns than threads (the size-4 dimension then spread over threads)."""
        e, o = tl.split(tl.reshape(m, (m.shape[0], m.shape[1], 2, 2)))            # k 0, 2 and k 1, 3
        m0, m2 = tl.split(e)
        m1, m3 = tl.split(o)
        h, l01, l23 = tl.inline_asm_elementwise(_Q_PIECES, "=r,=r,=r,r,r,r,r", [m0, m1, m2, m3],
                                                dtype=(tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        return h[:, :, None], l01[:, :, None], l23[:, :, None]

    @triton.jit
    def _q_dot(wd, me, mo, aH, aL, USE_ASM: tl.constexpr):
        """Code words wd (GN, C, 4 rows) times the fixed-point x of their columns, me (the low nibbles' k) and mo
        (the high ones'), both (1, C, 4: the word's four k): aH += sum of q * H, aL += sum of q * ML."""
        if USE_ASM:
            eH, e01, e23 = _q_pieces(me)
            oH, o01, o23 = _q_pieces(mo)
            aH, aL = tl.inline_asm_elementwise(
                _Q_DOT, "=r,=r,r,r,r,r,r,r,r,r,r",
                [wd, tl.broadcast_to(eH, wd.shape), tl.broadcast_to(oH, wd.shape), tl.broadcast_to(e01, wd.shape),
                 tl.broadcast_to(e23, wd.shape), tl.broadcast_to(o01, wd.shape), tl.broadcast_to(o23, wd.shape),
                 aH, aL], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        else:                       # the same integers in Triton ops (the interpreter): byte i of each word
            i4 = tl.arange(0, 4)[None, None, :]
            for i in tl.static_range(4):
                lo = (wd >> (8 * i)) & 15
                hi = (wd >> (8 * i + 4)) & 15
                e = tl.sum(tl.where(i4 == i, me, 0), axis=2)[:, :, None]       # (1, C, 1): x's m at byte i
                o = tl.sum(tl.where(i4 == i, mo, 0), axis=2)[:, :, None]
                aH += lo * (e >> 16) + hi * (o >> 16)
                aL += lo * (e & 0xFFFF) + hi * (o & 0xFFFF)
        return aH, aL

    @triton.jit
    def _q_sums(aH, aL, msum, inv):
        """The rows' sum of x * (q - 8): each (row, word column)'s sum of q * m, less 8 * that column's sum of m,
        exact in int64 (aL is unsigned: dp2a adds only products of unsigned numbers), then fp32, summed over the
        columns and scaled back by inv = 2^(e - 21). (The columns summed first, in int64, took 1,000 shuffles a
        thread; summed in fp32 before taking off 8 * sum of m, they lost ~10x the fp32 kernels' accuracy to the
        cancellation.)"""
        mc = tl.sum(msum, axis=2)[:, :, None]
        t = (aH.to(tl.int64) * 65536 + aL.to(tl.uint32, bitcast=True).to(tl.int64) - 8 * mc).to(tl.float32)
        return tl.sum(t, axis=1) * inv

    @triton.jit
    def _x_scan(X, A, XO, G, pid, K: tl.constexpr, PRE: tl.constexpr, HAS_ADD: tl.constexpr, NORM: tl.constexpr):
        """One pass over x before the codes' steps: max |x| (for the fixed point), the squares (summed by _inv_rms)
        and x's sum; program 0 writes x + a."""
        EVEN: tl.constexpr = K % PRE == 0
        kk = tl.arange(0, PRE)
        mx = tl.zeros((PRE,), tl.float32)
        ss = tl.zeros((PRE,), tl.float32)
        xs = tl.zeros((PRE,), tl.float32)
        for k0 in tl.static_range(0, K, PRE):
            km = k0 + kk < K
            xf, sq = _x_part(X, A, XO, G, k0 + kk, km, km & (pid == 0), HAS_ADD, NORM, EVEN)
            mx = tl.maximum(mx, tl.abs(xf))
            ss += sq
            xs += xf
        return tl.max(mx, axis=0), ss, tl.sum(xs, axis=0)

    @triton.jit
    def _x_scan_words(X, A, XO, G, pid, w_lo, c, i, K: tl.constexpr, WPER: tl.constexpr, BLOCK_C: tl.constexpr,
                      HAS_ADD: tl.constexpr, NORM: tl.constexpr):
        """_x_scan over one split's x only -- word columns [w_lo, w_lo + WPER), k = 4c + i and K / 2 + 4c + i, in
        the steps' own layout -- for its own fixed point; its squares' and x's sums (scalars) for the last split
        to add up. Program (0, split) writes its columns' x + a."""
        mx = tl.zeros((1, BLOCK_C, 4), tl.float32)
        ss = tl.zeros((1, BLOCK_C, 4), tl.float32)
        xs = tl.zeros((1, BLOCK_C, 4), tl.float32)
        for t in tl.static_range(0, WPER, BLOCK_C):      # (unrolled, as _x_scan: the steps' loop stays the only one)
            kx = 4 * (w_lo + t + c)[None, :, None] + i[None, None, :]
            km = kx < K // 2
            xe, se = _x_part(X, A, XO, G, kx, km, km & (pid == 0), HAS_ADD, NORM, False)
            xo, so = _x_part(X, A, XO, G, K // 2 + kx, km, km & (pid == 0), HAS_ADD, NORM, False)
            mx = tl.maximum(mx, tl.maximum(tl.abs(xe), tl.abs(xo)))
            ss += se + so
            xs += xe + xo
        mx = tl.max(tl.max(tl.max(mx, axis=2), axis=1), axis=0)
        ss = tl.sum(tl.sum(tl.sum(ss, axis=2), axis=1), axis=0)
        return mx, ss, tl.sum(tl.sum(tl.sum(xs, axis=2), axis=1), axis=0)

    @triton.jit
    def _q_codes(P, goff, gm, c0, j, W: tl.constexpr, EVEN: tl.constexpr):
        """A step's code words (GN, C, 4): the row groups at goff (GN,; gm: which exist -- pack_quads pads the
        last one with zero rows), words c0.. -- loaded as (GN, 4C), each group's words for its four rows one
        contiguous run with one mask a 16-byte vector (a (GN, C, 4) load got a layout of its own, converted
        through shared memory every step; a mask per row split the vectors)."""
        if EVEN:
            m = gm[:, None]
        else:
            m = gm[:, None] & ((c0 + j // 4) < W)[None, :]
        t = tl.load(P + goff[:, None] + (4 * c0 + j)[None, :], mask=m, other=0)
        return tl.reshape(t, (goff.shape[0], j.shape[0] // 4, 4))

    @triton.jit
    def _q_rows(P, goff, goff_u, gm, c0, j, W: tl.constexpr, EVEN: tl.constexpr, SWIGLU: tl.constexpr):
        """A step's code words for the rows, and for the up rows with SwiGLU (else the rows' again)."""
        wd = _q_codes(P, goff, gm, c0, j, W, EVEN)
        wu = wd
        if SWIGLU:
            wu = _q_codes(P, goff_u, gm, c0, j, W, EVEN)
        return wd, wu

    @triton.jit
    def _w4q_step(X, A, XO, G, c0, c, i, wd, wu, aH, aL, uH, uL, msum, scl, K: tl.constexpr, HAS_ADD: tl.constexpr,
                  NORM: tl.constexpr, SWIGLU: tl.constexpr, EVEN: tl.constexpr, USE_ASM: tl.constexpr):
        """One step of _gemv_w4q_kernel at word c0, its code words wd (the up rows' wu) loaded."""
        kx = 4 * (c0 + c)[None, :, None] + i[None, None, :]                       # (1, C, 4): a word's four k
        cm = kx < K // 2
        xe, _ = _x_part(X, A, XO, G, kx, cm, cm, HAS_ADD, NORM, EVEN, False)          # the low nibbles' x
        xo, _ = _x_part(X, A, XO, G, K // 2 + kx, cm, cm, HAS_ADD, NORM, EVEN, False)   # the high nibbles'
        me = _q_fixed(xe, scl)
        mo = _q_fixed(xo, scl)
        msum += me.to(tl.int64) + mo.to(tl.int64)
        aH, aL = _q_dot(wd, me, mo, aH, aL, USE_ASM)
        if SWIGLU:
            uH, uL = _q_dot(wu, me, mo, uH, uL, USE_ASM)
        return aH, aL, uH, uL, msum

    @triton.jit
    def _gemv_w4q_kernel(X, A, XO, G, P, S, Z, Y, WS, CNT, N, F_OFF, UP_OFF, eps, stride_p, K: tl.constexpr,
                         HAS_ADD: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_C: tl.constexpr, PRE: tl.constexpr, EVEN: tl.constexpr, PREFETCH: tl.constexpr,
                         USE_ASM: tl.constexpr, SPLIT: tl.constexpr, WPER: tl.constexpr, PDL: tl.constexpr):
        # gemv_w4 in the quads layout (pack_quads; one group a row) with integer dot products (the section's
        # comment). Word c of row n sits at (n // 4) * stride_p + 4 * c + n % 4: four rows' word c are one 16-byte
        # vector, so a thread holds a column's words for many rows and converts each x once for all of them; the
        # word holds the halves layout's bytes 4c..4c+3 (k = 4c + i in the low nibbles, K / 2 + 4c + i in the high
        # ones). x is read once before the steps (_x_scan: its largest |x|, the norm's and the zero points' sums),
        # then again per step, as fixed point, in the codes' own (word, byte) layout. PREFETCH: each step's codes
        # load before the step before it computes (Triton's pipeliner left this loop alone: the same SASS at
        # num_stages 1 and 2), for twice the bytes in flight at the cost of registers. SPLIT > 1: a row block's
        # word columns are split over SPLIT programs (program_id 1; WPER columns each) -- more programs, more bytes
        # in flight for the one-warp tiles (o and down have 128 row blocks of 16 for 132 SMs); each scans only its
        # own x (its own fixed point: a finer one), stores its rows' sums, x's squares' and x's sums in its own slot
        # of WS and counts itself in CNT (zero between calls); the one that counts last adds the slots in split
        # order (deterministic), takes the norm's 1 / rms from the squares, and finishes the rows.
        W: tl.constexpr = K // 8
        GN: tl.constexpr = BLOCK_N // 4
        pid = tl.program_id(0)
        if SPLIT == 1:                                    # (WPER: W in whole steps; the last split's steps
            w_lo = 0                                      # past W are masked, EVEN False)
        else:
            w_lo = tl.program_id(1) * WPER
        r = tl.arange(0, 4)
        n = pid * BLOCK_N + 4 * tl.arange(0, GN)[:, None] + r[None, :]              # (GN, 4)
        nm = n < N
        grp = pid * GN + tl.arange(0, GN)
        gm = grp < (N + 3) // 4
        goff = grp.to(tl.int64) * stride_p
        goff_u = goff + UP_OFF                              # (the up rows start a group: gemv_w4 checks F % 4)
        j = tl.arange(0, 4 * BLOCK_C)
        c = tl.arange(0, BLOCK_C)
        aH = tl.zeros((GN, BLOCK_C, 4), tl.int32)
        aL = tl.zeros((GN, BLOCK_C, 4), tl.int32)
        uH = tl.zeros((GN, BLOCK_C, 4), tl.int32)
        uL = tl.zeros((GN, BLOCK_C, 4), tl.int32)
        msum = tl.zeros((1, BLOCK_C, 4), tl.int64)
        s, z, su, zu = _row_affine(S, Z, n, nm, F_OFF, True, SWIGLU)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        wd, wu = _q_rows(P, goff, goff_u, gm, w_lo, j, W, EVEN, SWIGLU)
        if PDL:
            tl.extra.cuda.gdc_wait()
        if SPLIT == 1:
            mx, ss, xt = _x_scan(X, A, XO, G, pid, K, PRE, HAS_ADD, NORM)
            rr = _inv_rms(ss, eps, K, NORM)
        else:
            mx, ss, xt = _x_scan_words(X, A, XO, G, pid, w_lo, tl.arange(0, BLOCK_C), tl.arange(0, 4), K, WPER,
                                       BLOCK_C, HAS_ADD, NORM)
        e = tl.maximum((mx.to(tl.int32, bitcast=True) >> 23) - 127, -100)               # floor(log2(max |x|))
        scl = ((148 - e) << 23).to(tl.float32, bitcast=True)                            # 2^(21 - e)
        inv = ((106 + e) << 23).to(tl.float32, bitcast=True)                            # 2^(e - 21)
        for t in range(BLOCK_C, WPER, BLOCK_C):           # computes the step before c0; c0's codes load before
            c0 = w_lo + t                                 # that (PREFETCH) or after it
            if PREFETCH:
                wn, un = _q_rows(P, goff, goff_u, gm, c0, j, W, EVEN, SWIGLU)
            aH, aL, uH, uL, msum = _w4q_step(X, A, XO, G, c0 - BLOCK_C, c, r, wd, wu, aH, aL, uH, uL, msum, scl, K,
                                             HAS_ADD, NORM, SWIGLU, EVEN, USE_ASM)
            if not PREFETCH:
                wn, un = _q_rows(P, goff, goff_u, gm, c0, j, W, EVEN, SWIGLU)
            wd = wn
            wu = un
        aH, aL, uH, uL, msum = _w4q_step(X, A, XO, G, w_lo + (WPER - BLOCK_C), c, r, wd, wu, aH, aL, uH, uL, msum,
                                         scl, K, HAS_ADD, NORM, SWIGLU, EVEN, USE_ASM)
        sums = _q_sums(aH, aL, msum, inv)
        sums_u = sums
        if SWIGLU:
            sums_u = _q_sums(uH, uL, msum, inv)
        if SPLIT == 1:
            _w4_finish(Y, n, nm, s, z, su, zu, sums, sums_u, 0.0, 0.0, xt, 0.0, rr, True, SWIGLU)
        else:                                            # the last split finishes the rows (slot rows: (GN, 4))
            last, sums, sums_u, rr, xt = _split_last(WS, CNT, pid, 4 * tl.arange(0, GN)[:, None] + r[None, :], nm,
                                                     sums, sums_u, ss, xt, eps, K, BLOCK_N, SPLIT, NORM, SWIGLU)
            if last:
                _w4_finish(Y, n, nm, s, z, su, zu, sums, sums_u, 0.0, 0.0, xt, 0.0, rr, True, SWIGLU)

if triton is not None:
    # int4 -> 16-bit operands as Marlin does it: prmt spreads bytes 0 / 1 (2 / 3) into the two halves of a
    # register, one lop3 keeps a nibble of each and ORs in the exponent of 128 (bf16 0x4300; fp16 1024, 0x6400),
    # so each half reads 128 + q (1024 + q) exactly; a shift by 4 gives the high nibbles. Four bytes at a time
    # (output 0 the low nibbles of bytes 0-3, output 1 the high ones; element i of a register pair: byte i), or
    # two (a 16-bit input: what a warpgroup mma's register operand holds per register -- offline, 2.6-3.0
    # instructions a weight instead of 3.3-3.6 for those tiles; the four-byte form suits mma.sync's tiles).
    @triton.constexpr_function
    def _w4_asm_for(fp16, pack2):
        magic = "0x64006400" if getattr(fp16, "value", fp16) else "0x43004300"
        if getattr(pack2, "value", pack2):
            return f"""{{
            .reg .b32 t0;
            mov.b32 t0, {{$2, 0}};
            prmt.b32 t0, t0, 0, 0x4140;
            lop3.b32 $0, t0, 0x000F000F, {magic}, 0xea;
            shr.b32 t0, t0, 4;
            lop3.b32 $1, t0, 0x000F000F, {magic}, 0xea;
            }}"""
        return f"""{{
        .reg .b32 t0, t1;
        prmt.b32 t0, $4, 0, 0x4140;
        prmt.b32 t1, $4, 0, 0x4342;
        lop3.b32 $0, t0, 0x000F000F, {magic}, 0xea;
        lop3.b32 $1, t1, 0x000F000F, {magic}, 0xea;
        shr.b32 t0, t0, 4;
        shr.b32 t1, t1, 4;
        lop3.b32 $2, t0, 0x000F000F, {magic}, 0xea;
        lop3.b32 $3, t1, 0x000F000F, {magic}, 0xea;
        }}"""

    @triton.jit
    def _w4_operands(b, USE_ASM: tl.constexpr, FP16: tl.constexpr, PACK2: tl.constexpr):
        """Bytes (uint8) -> (128 + low nibble, 128 + high nibble) in bf16 (1024 + q in fp16), exact. PACK2: two
        bytes an asm (the warpgroup-mma tiles), else four."""
        OPDT: tl.constexpr = tl.float16 if FP16 else tl.bfloat16
        if USE_ASM:
            PACK: tl.constexpr = 2 if PACK2 else 4
            CONS: tl.constexpr = "=r,=r,h" if PACK2 else "=r,=r,=r,=r,r"
            if FP16:
                lo, hi = tl.inline_asm_elementwise(_w4_asm_for(FP16, PACK2), CONS, [b], dtype=(tl.float16, tl.float16),
                                                   is_pure=True, pack=PACK)
            else:
                lo, hi = tl.inline_asm_elementwise(_w4_asm_for(FP16, PACK2), CONS, [b],
                                                   dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=PACK)
        else:                                # the same bits without PTX (Triton's CPU interpreter)
            b16 = b.to(tl.uint16)
            MAGIC: tl.constexpr = 0x6400 if FP16 else 0x4300
            lo = ((b16 & 15) | MAGIC).to(OPDT, bitcast=True)
            hi = ((b16 >> 4) | MAGIC).to(OPDT, bitcast=True)
        return lo, hi

    @triton.jit
    def _w4_tc_step(X, A, XO, G, S, Z, pid, n, nm, F_OFF, n_groups, c, hi, j, r16, b, bu, acc, acc_u, zacc, zacc_u,
                    ss, xsum, K: tl.constexpr, GROUP: tl.constexpr, HAS_ADD: tl.constexpr, NORM: tl.constexpr,
                    SWIGLU: tl.constexpr, EVEN: tl.constexpr, USE_ASM: tl.constexpr, FP16: tl.constexpr,
                    PACK2: tl.constexpr):
        """One step of _gemv_w4_tc_kernel at byte column c (columns from hi on masked), its code bytes b (the up
        rows' bu) loaded."""
        ONE: tl.constexpr = GROUP == K
        OFF: tl.constexpr = 1032.0 if FP16 else 136.0
        OPDT: tl.constexpr = tl.float16 if FP16 else tl.bfloat16
        cm = (c + j) < hi
        xe, sqe = _x_part(X, A, XO, G, c + j, cm, cm & (pid == 0), HAS_ADD, NORM, EVEN)            # low nibbles' x
        xo, sqo = _x_part(X, A, XO, G, K // 2 + c + j, cm, cm & (pid == 0), HAS_ADD, NORM, EVEN)   # high ones'
        ss += sqe + sqo
        xe_op = xe.to(OPDT)
        xo_op = xo.to(OPDT)
        xe16 = tl.where(r16[None, :] == 0, xe_op[:, None], 0.0).to(OPDT)             # (HALF, 16), column 0 = x
        xo16 = tl.where(r16[None, :] == 0, xo_op[:, None], 0.0).to(OPDT)
        lo, hi = _w4_operands(b, USE_ASM, FP16, PACK2)                                        # (BLOCK_N, HALF)
        if ONE:
            acc = tl.dot(lo, xe16, acc)
            acc = tl.dot(hi, xo16, acc)
            xsum += xe_op.to(tl.float32) + xo_op.to(tl.float32)
        else:
            g_lo = c // GROUP
            g_hi = (K // 2 + c) // GROUP
            s_lo = tl.load(S + n * n_groups + g_lo, mask=nm, other=0.0)
            s_hi = tl.load(S + n * n_groups + g_hi, mask=nm, other=0.0)
            xs_lo = tl.sum(xe_op.to(tl.float32), axis=0)
            xs_hi = tl.sum(xo_op.to(tl.float32), axis=0)
            acc += tl.dot(lo, xe16) * s_lo[:, None] + tl.dot(hi, xo16) * s_hi[:, None]
            zacc += (tl.load(Z + n * n_groups + g_lo, mask=nm, other=0.0) - OFF * s_lo) * xs_lo \
                + (tl.load(Z + n * n_groups + g_hi, mask=nm, other=0.0) - OFF * s_hi) * xs_hi
        if SWIGLU:
            lo, hi = _w4_operands(bu, USE_ASM, FP16, PACK2)
            if ONE:
                acc_u = tl.dot(lo, xe16, acc_u)
                acc_u = tl.dot(hi, xo16, acc_u)
            else:
                nu = n + F_OFF
                s_lo = tl.load(S + nu * n_groups + g_lo, mask=nm, other=0.0)
                s_hi = tl.load(S + nu * n_groups + g_hi, mask=nm, other=0.0)
                acc_u += tl.dot(lo, xe16) * s_lo[:, None] + tl.dot(hi, xo16) * s_hi[:, None]
                zacc_u += (tl.load(Z + nu * n_groups + g_lo, mask=nm, other=0.0) - OFF * s_lo) * xs_lo \
                    + (tl.load(Z + nu * n_groups + g_hi, mask=nm, other=0.0) - OFF * s_hi) * xs_hi
        return acc, acc_u, zacc, zacc_u, ss, xsum

    @triton.jit
    def _gemv_w4_tc_kernel(X, A, XO, G, P, S, Z, Y, WS, CNT, N, F_OFF, UP_OFF, eps, stride_p, n_groups,
                           K: tl.constexpr, GROUP: tl.constexpr, HAS_ADD: tl.constexpr, NORM: tl.constexpr,
                           SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                           EVEN: tl.constexpr, USE_ASM: tl.constexpr, FP16: tl.constexpr, PACK2: tl.constexpr,
                           PDL: tl.constexpr):
        # gemv_w4 through the tensor cores (the halves layout): the codes become 16-bit operands (128 + q, see
        # _w4_operands), the rows of W the product's M, x a 16-column operand whose column 0 is x, so the
        # products cost mma instructions instead of a multiply-add per weight; 128 + 8 (1024 + 8) times the
        # operand x's sum comes off after the sums, which are fp32. Rows of a program: BLOCK_N >= 16. Offline
        # (sm_90 SASS, benchmarks/gemv_sass.py) 2.6-4.7 instructions a weight against 7-12 for _gemv_w4_kernel;
        # on a card: not yet run.
        # SPLIT > 1 (one group a row): the K of a row is split over SPLIT programs (program_id 1), since a
        # warpgroup mma takes 64 rows and a 2048-row matrix would give 32 programs to 132 SMs. Each stores its
        # row sums, squares and x sum in its own slot of WS and counts itself in CNT (zero between calls); the
        # program that counts last sums the slots in split order -- deterministic, unlike atomic adds -- resets
        # its counter and finishes the rows.
        ONE: tl.constexpr = GROUP == K
        HALF: tl.constexpr = BLOCK_K // 2
        KS: tl.constexpr = ((K // 2 + SPLIT - 1) // SPLIT + HALF - 1) // HALF * HALF     # byte columns a split
        OFF: tl.constexpr = 1032.0 if FP16 else 136.0
        pid = tl.program_id(0)
        lo = tl.program_id(1) * KS
        hi = tl.minimum(lo + KS, K // 2)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        j = tl.arange(0, HALF)
        r16 = tl.arange(0, 16)
        rows = P + n[:, None].to(tl.int64) * stride_p
        rows_u = rows + UP_OFF
        acc = tl.zeros((BLOCK_N, 16), tl.float32)
        acc_u = tl.zeros((BLOCK_N, 16), tl.float32)
        zacc = tl.zeros((BLOCK_N,), tl.float32)
        zacc_u = tl.zeros((BLOCK_N,), tl.float32)
        ss = tl.zeros((HALF,), tl.float32)
        xsum = tl.zeros((HALF,), tl.float32)
        s, z, su, zu = _row_affine(S, Z, n, nm, F_OFF, ONE, SWIGLU)
        b, bu = _step_rows(rows, rows_u, lo + j, nm, (lo + j) < hi, False, SWIGLU, PDL)
        acc, acc_u, zacc, zacc_u, ss, xsum = _w4_tc_step(
            X, A, XO, G, S, Z, pid, n, nm, F_OFF, n_groups, lo, hi, j, r16, b, bu, acc, acc_u, zacc, zacc_u, ss, xsum,
            K, GROUP, HAS_ADD, NORM, SWIGLU, EVEN, USE_ASM, FP16, PACK2)
        c = lo + HALF
        while c < hi:                                   # (a while loop: its bounds are the split's, at run time)
            b, bu = _step_rows(rows, rows_u, c + j, nm, (c + j) < hi, False, SWIGLU, False)
            acc, acc_u, zacc, zacc_u, ss, xsum = _w4_tc_step(
                X, A, XO, G, S, Z, pid, n, nm, F_OFF, n_groups, c, hi, j, r16, b, bu, acc, acc_u, zacc, zacc_u, ss,
                xsum, K, GROUP, HAS_ADD, NORM, SWIGLU, EVEN, USE_ASM, FP16, PACK2)
            c += HALF
        col0 = r16[None, :] == 0                                                            # x's column of the sums
        ys = tl.sum(tl.where(col0, acc, 0.0), axis=1)
        yu = tl.sum(tl.where(col0, acc_u, 0.0), axis=1)
        if SPLIT == 1:
            _w4_finish(Y, n, nm, s, z, su, zu, ys, yu, zacc, zacc_u, tl.sum(xsum, axis=0), OFF,
                       _inv_rms(ss, eps, K, NORM), ONE, SWIGLU)
        else:                                            # the last split finishes the rows
            last, ys, yu, r, xst = _split_last(WS, CNT, pid, tl.arange(0, BLOCK_N), nm, ys, yu, tl.sum(ss, axis=0),
                                               tl.sum(xsum, axis=0), eps, K, BLOCK_N, SPLIT, NORM, SWIGLU)
            if last:
                _w4_finish(Y, n, nm, s, z, su, zu, ys, yu, zacc, zacc_u, xst, OFF, r, ONE, SWIGLU)


# a GEMV_W4_CONFIGS tile's fifth element: the code layout, and whether the tensor-core kernel runs it; a sixth
# (tensor cores and quads, one group a row): the programs a row's K is split over
W4_KINDS = {0: ("pairs", False), 1: ("halves", False), 2: ("halves", True), 3: ("octets", False),
            4: ("halves", False),         # 4: halves with x in the codes' layout (_gemv_w4_kernel's X2D)
            5: ("quads", False)}          # 5: integer dot products, x in fixed point (_gemv_w4q_kernel)
_SPLIT_WS: dict = {}          # device -> (fp32 partial sums, int32 counters) of the split tensor-core and quads GEMVs


def _split_workspace(device: torch.device, blocks: int, block_n: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial sums for `blocks` row blocks of `split` splits, and counters (zero between calls), shared by
    every split GEMV on the device: each call leaves the counters zero, and the kernels of a step run one
    after another (a PDL launch waits before it writes)."""
    ws, cnt = _SPLIT_WS.get(device, (None, None))
    need = blocks * split * (2 * block_n + 2)
    if ws is None or ws.numel() < need or cnt.numel() < blocks:
        if ws is not None:                # a captured graph may still point at the old pair: kept alive
            _SPLIT_WS.setdefault("outgrown", []).append((ws, cnt))
        ws = torch.zeros(max(need, 1 << 16), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(blocks, 1 << 12), dtype=torch.int32, device=device)
        _SPLIT_WS[device] = ws, cnt
    return ws, cnt


def w4_kind(config: tuple[int, ...]) -> tuple[str, bool]:
    """(layout, tensor cores) of an int4 tile: pairs (triton_int4.pack), halves (pack_halves) or octets
    (pack_octets)."""
    return W4_KINDS[config[4] if len(config) > 4 else 0]


def pack_halves(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) in 0..15 -> (N, K / 2) uint8: k in the low nibble of byte k, k + K / 2 in its high one."""
    u = codes.to(torch.uint8)
    K = u.shape[1]
    return (u[:, :K // 2] | (u[:, K // 2:] << 4)).contiguous()


def pack_octets(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) in 0..15 -> (N, K / 8) int32: nibble j of word c (bits 4j..4j+3) holds k = c + j * K / 8."""
    N, K = codes.shape
    u = codes.to(torch.int64).view(N, 8, K // 8)
    words = sum(u[:, j] << (4 * j) for j in range(8))
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()


def pack_quads(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) in 0..15 -> (ceil(N / 4), K / 2) int32: row n's word c (its halves-layout bytes 4c..4c+3, as
    int32) at [n // 4, 4c + n % 4] -- four rows' word c side by side; rows past N (to a multiple of 4) zero."""
    N, K = codes.shape
    if K % 8:
        raise ValueError(f"pack_quads packs rows of a multiple of 8 codes (int32 words of 8 nibbles); got K = {K}")
    words = pack_halves(codes).view(torch.int32)                                  # (N, K / 8)
    pad = -N % 4
    if pad:
        words = torch.cat([words, words.new_zeros(pad, K // 8)])
    return words.view(-1, 4, K // 8).transpose(1, 2).reshape(-1, K // 2).contiguous()


def w4_pack(codes: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "quads":
        return pack_quads(codes)
    if layout == "octets":
        return pack_octets(codes)
    if layout == "halves":
        return pack_halves(codes)
    from afford.models.triton_int4 import pack
    return pack(codes)


def w4_block_k(K: int, group: int, want: int, layout: str = "pairs") -> int | None:
    """The step of a row's weights (a power of two <= want) for gemv_w4. One group a row (group == K): any,
    the last step masked where it runs past the row (octets: K / 8 words a row, steps of at least 8 words).
    Several (not octets): each nibble's K-tile inside one group -- pairs, BLOCK_K dividing K and the group;
    halves, BLOCK_K / 2 dividing K / 2 and the group (and the group dividing K / 2)."""
    if K % 2 or K < 32:
        return None
    if layout == "quads":
        return max(8, min(want, 8 << (K // 8 - 1).bit_length())) if K % 8 == 0 and group == K else None
    if layout == "octets":
        return max(64, min(want, 8 << (K // 8 - 1).bit_length())) if K % 8 == 0 and group == K else None
    if group == K:
        return min(want, 1 << (K - 1).bit_length())
    halves = layout == "halves"
    if halves and (K // 2) % group:
        return None
    b = want
    while b >= 32:
        if (not halves and K % b == 0 and group % b == 0) or \
                (halves and (K // 2) % (b // 2) == 0 and group % (b // 2) == 0):
            return b
        b //= 2
    return None


def w4_plan(K: int, group: int, config: tuple[int, ...], fp16: bool = False, asm: bool = True):
    """What gemv_w4 launches for rows of K weights in scale groups of `group` with this tile: (the kernel, its
    constexprs besides the fusion flags, the programs a row block's K is split over, the steps a program walks)
    -- None where the tile does not take these rows. fp16: 16-bit operands as fp16 (else bf16); asm: inline
    PTX (an NVIDIA card). benchmarks/gemv_sass.py compiles the same plans offline."""
    layout, tc = w4_kind(config)
    bn, want, warps = config[:3]
    split = config[5] if (tc or layout == "quads") and len(config) > 5 else 1
    bk = w4_block_k(K, group, want, layout)
    if bk is None or (tc and bn < 16) or (split > 1 and group != K) or (layout == "quads" and bn % 4):
        return None
    if layout == "quads":
        words, bc = K // 8, bk // 8
        wper = -(-(-(-words // split)) // bc) * bc          # word columns a split, whole steps
        split = -(-words // wper)                            # (no split left empty; a short last split's steps
                                                             # past the row are masked: EVEN off for all splits)
        if -(-wper // bc) > 512:             # a (row, word column)'s sum of q * ML, < 8 * 15 * 65536 a step: 32 bits
            return None
        return (_gemv_w4q_kernel, dict(K=K, BLOCK_C=bc, PRE=min(256 * warps, triton.next_power_of_2(K)),
                                       EVEN=split * wper == words, PREFETCH=config[3] > 1, USE_ASM=asm, SPLIT=split,
                                       WPER=wper), split, wper // bc)
    if layout == "octets":
        words = K // 8
        return (_gemv_w4o_kernel, dict(K=K, BLOCK_C=bk // 8, EVEN=words % (bk // 8) == 0, USE_ASM=asm), 1,
                -(-words // (bk // 8)))
    half = bk // 2
    if tc:
        ks = -(-(-(-(K // 2) // split)) // half) * half              # byte columns a split (the kernel's KS)
        return (_gemv_w4_tc_kernel, dict(K=K, GROUP=group, BLOCK_K=bk, SPLIT=split,
                                         EVEN=(K // 2) % half == 0 and ks * split == K // 2, USE_ASM=asm,
                                         FP16=fp16, PACK2=bn // warps >= 16), split, ks // half)
    halves = layout == "halves"
    x2d = len(config) > 4 and config[4] == 4
    return (_gemv_w4_kernel, dict(K=K, GROUP=group, HALVES=halves, X2D=x2d, BLOCK_K=bk,
                                  EVEN=(K // 2) % half == 0 if halves else K % bk == 0), 1,
            -(-(K // 2) // half) if halves else -(-K // bk))


def _rope_launch(rope: tuple | None, x: torch.Tensor, N: int, bn: int) -> tuple[dict, torch.Tensor | None]:
    """The ROPE arguments of _gemv_kernel / _gemv_w4_kernel, and the q output (1, H, D) they write instead of y.
    rope: (cos, sin, positions (1,), slots (1,), k_pool, v_pool, scratch, heads) -- rope_store's arguments."""
    if rope is None:
        return dict(COS=x, SIN=x, POS=x, SLOTS=x, KP=x, VP=x, scratch=0, stride_cos=0, stride_ks=0, stride_kh=0,
                    ROPE=False, RH=1, RKV=1, HALF=1), None
    cos, sin, positions, slots, k_pool, v_pool, scratch, heads = rope
    KV, D = k_pool.shape[1], k_pool.shape[2]
    if N != (heads + 2 * KV) * D or D % 2 or bn % 2 or k_pool.stride(2) != 1 or sin.stride(0) != cos.stride(0) \
            or cos.stride(1) != 1 or sin.stride(1) != 1 or positions.numel() != 1 or slots.numel() != 1 \
            or v_pool.shape != k_pool.shape or v_pool.stride() != k_pool.stride() or cos.shape[1] < D \
            or sin.shape != cos.shape:
        raise ValueError(f"a q|k|v GEMV with RoPE needs N = (heads + 2 K/V heads) x head dim ({heads}, {KV}, {D} -> "
                         f"{(heads + 2 * KV) * D}; got {N}), an even head dim and rows a program ({bn}), one "
                         f"position and slot, K and V pools of one shape and layout, and cos / sin tables of "
                         f"one shape, at least the head dim wide, with contiguous rows of one stride")
    q = torch.empty(1, heads, D, dtype=x.dtype, device=x.device)
    return dict(COS=cos, SIN=sin, POS=positions, SLOTS=slots, KP=k_pool, VP=v_pool, scratch=scratch,
                stride_cos=cos.stride(0), stride_ks=k_pool.stride(0), stride_kh=k_pool.stride(1), ROPE=True,
                RH=heads, RKV=KV, HALF=D // 2), q


def gemv_w4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
            config: tuple[int, ...], *, add: torch.Tensor | None = None, norm: torch.Tensor | None = None,
            eps: float = 0.0, swiglu: bool = False, rope: tuple | None = None, maxnreg: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """gemv() for int4 weights, w = (q - 8) * s + z: packed in the layout config's fifth element names
    (w4_kind: triton_int4.pack's pairs or pack_halves' halves, (N, K / 2) uint8; pack_octets' octets, (N, K / 8)
    int32, one group a row; pack_quads' quads, (ceil(N / 4), K / 2) int32, one group a row), scales / zeros
    (N, K / group) fp32. The tensor-core kernel (_gemv_w4_tc_kernel; halves, at least 16 rows a program) takes x
    as a bf16 operand for bf16 activations, fp16 for the others; quads (_gemv_w4q_kernel) takes x as fixed point
    to 2^-22 of its largest element. rope: as gemv's (the pairs and halves layouts, not the tensor cores).
    maxnreg: cap the kernel's registers a thread (ptxas; gemv_scaling.py's --maxnreg probe: fewer registers let
    more programs -- the next kernel's, under PDL -- share an SM)."""
    if x.shape[0] != 1 or x.dim() != 2:
        raise ValueError(f"gemv_w4 takes one row (1, K); got {tuple(x.shape)}")
    layout, tc = w4_kind(config)
    if rope is not None and (layout not in ("pairs", "halves") or tc or swiglu):
        raise ValueError(f"gemv_w4 with RoPE runs the pairs and halves layouts (not the tensor cores), no swiglu; "
                         f"got {config}")
    N, K = scales.shape[0], x.shape[1]
    bn, warps, stages = config[0], config[2], config[3]
    plan = w4_plan(K, group, config, fp16=x.dtype != torch.bfloat16, asm=nvidia(x))
    per_row = K // 8 if layout == "octets" else K // 2
    if plan is None or packed.shape[1] != per_row or K % group or tuple(scales.shape) != (N, K // group) \
            or packed.shape[0] != (-(-N // 4) if layout == "quads" else N) \
            or tuple(zeros.shape) != (N, K // group) or packed.stride(1) != 1 \
            or packed.dtype != (torch.int32 if layout in ("octets", "quads") else torch.uint8):
        raise ValueError(f"gemv_w4 ({layout}{', tensor cores' if tc else ''}) needs K ({K}) and the group ({group}) "
                         f"in steps of 32 (octets, quads and a split K: one group a row, K a multiple of 8 for "
                         f"octets and quads), packed ({'ceil(N / 4)' if layout == 'quads' else 'N'}, {per_row}) as "
                         f"w4_pack packs it with contiguous rows, scales / zeros (N, K / group) (and 16+ rows a "
                         f"program for the tensor cores, a multiple of 4 for quads); got {tuple(packed.shape)}, "
                         f"{tuple(scales.shape)}, {tuple(zeros.shape)}, {config}")
    kernel, cst, split, _ = plan
    x, scales, zeros = x.contiguous(), scales.contiguous(), zeros.contiguous()
    h = torch.empty_like(x) if add is not None else x
    F = N // 2 if swiglu else N
    rk, q = _rope_launch(rope, x, N, bn)             # with rope: the rotated q is the output
    y = torch.empty(1, F, dtype=x.dtype, device=x.device) if q is None else q
    a = add.contiguous() if add is not None else x
    g = norm.contiguous() if norm is not None else x
    cst.update(HAS_ADD=add is not None, NORM=norm is not None, SWIGLU=swiglu, BLOCK_N=bn, num_warps=warps,
               num_stages=stages, **pdl_args(x))
    if maxnreg:
        cst["maxnreg"] = maxnreg
    rows = (F, F, F * packed.stride(0), eps, packed.stride(0))          # N, F_OFF, UP_OFF, eps, stride_p
    if layout == "quads":
        if swiglu and F % 4:
            raise ValueError(f"gemv_w4 (quads) with swiglu needs the gate rows ({F}) in whole groups of 4; "
                             f"use another tile (GEMV_W4_CONFIGS) for this matrix")
        ws, cnt = _split_workspace(x.device, triton.cdiv(F, bn), bn, split) if split > 1 else (y, y)
        kernel[(triton.cdiv(F, bn), split)](x, a, h, g, packed, scales, zeros, y, ws, cnt, F, F,
                                            F // 4 * packed.stride(0), eps, packed.stride(0), **cst)
    elif layout == "octets":
        kernel[(triton.cdiv(F, bn),)](x, a, h, g, packed, scales, zeros, y, *rows, **cst)
    elif tc:
        ws, cnt = _split_workspace(x.device, triton.cdiv(F, bn), bn, split) if split > 1 else (y, y)
        kernel[(triton.cdiv(F, bn), split)](x, a, h, g, packed, scales, zeros, y, ws, cnt, *rows, scales.shape[1],
                                            **cst)
    else:
        kernel[(triton.cdiv(F, bn),)](x, a, h, g, packed, scales, zeros, y, *rows, scales.shape[1], **rk, **cst)
    return y, h


def gemv(x: torch.Tensor, w: torch.Tensor, config: tuple[int, int, int, int], *, add: torch.Tensor | None = None,
         norm: torch.Tensor | None = None, eps: float = 0.0, swiglu: bool = False, rope: tuple | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (1, K), w (N, K) contiguous rows -> (y, h): y (1, N) -- (1, N / 2) with swiglu -- and h = x + add
    (x itself without add), both in x's dtype. norm: RMSNorm's weight (K,) applied to h before the product.
    rope (a q|k|v product; rope_store's arguments (cos, sin, positions, slots, k_pool, v_pool, scratch, heads)):
    the product's q and k rotated, k and v stored into the pools, and y the rotated q (1, heads, D) -- what
    rope_store leaves from y, bit for bit, without y's round trip and the kernel."""
    if x.shape[0] != 1 or x.dim() != 2:
        raise ValueError(f"gemv takes one row (1, K); got {tuple(x.shape)}")
    N, K = w.shape
    if w.stride(1) != 1 or x.shape[1] != K:
        raise ValueError(f"gemv needs w (N, K) with contiguous rows and x (1, K); got {tuple(w.shape)}, {tuple(x.shape)}")
    x = x.contiguous()
    h = torch.empty_like(x) if add is not None else x
    F = N // 2 if swiglu else N
    bn, bk, warps, stages = config
    bk = min(bk, triton.next_power_of_2(K))
    if rope is not None and swiglu:
        raise ValueError("gemv: rope (a q|k|v product) and swiglu exclude each other")
    rk, q = _rope_launch(rope, x, N, bn)             # with rope: the rotated q is the output
    y = torch.empty(1, F, dtype=x.dtype, device=x.device) if q is None else q
    _gemv_kernel[(triton.cdiv(F, bn),)](
        x, add.contiguous() if add is not None else x, h, norm if norm is not None else x, w, y, F, F * w.stride(0),
        eps, w.stride(0), **rk, K=K, HAS_ADD=add is not None, NORM=norm is not None, SWIGLU=swiglu, BLOCK_N=bn,
        BLOCK_K=bk, EVEN_K=K % bk == 0, num_warps=warps, num_stages=stages, **pdl_args(x))
    return y, h
