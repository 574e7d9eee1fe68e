"""What the one-row GEMV kernels cost in instructions, measured without a GPU (issue #13's int4 goal).

Triton compiles each kernel of afford/models/triton_gemv.py here, on the CPU, for an sm_90 card (Triton's
own ptxas, then nvdisasm), with the 1.1 B Llama's shapes (q|k|v 2560 x 2048 with the add + norm fused,
o 2048 x 2048, gate|up 2 x 5632 x 2048 with add + norm + SwiGLU, down 2048 x 5632) and each tile the GPU
sweeps try (SWEEP_CONFIGS, W4_SWEEP_CONFIGS; and OFFLINE_W4, tiles the card no longer sweeps). From the SASS:
the instructions a thread executes (the loop body once per step after the first, which runs before the loop,
the rest once), times the threads of the grid, per weight; and what that is worth on an H200 if instruction
issue were the only limit (132 SMs x 4 schedulers x 32 lanes x 1.98 GHz: ~33 T thread-instructions/s)
beside the time the bytes take at the card's copy rate (4.2 TB/s, run 8).
A kernel whose issue time is near or above its measured time (gpu_decode.py's sweeps) is instruction-bound:
fewer instructions per weight is what makes it faster. "per SM": the same on the SMs the grid occupies (a grid
of fewer programs than SMs leaves SMs idle; each SM issues ceil(programs / 132) programs' instructions). Writes benchmarks/results/gemv_sass.json.

--pdl compiles them as programmatic dependent launch does (afford/models/triton_lib.py: griddepcontrol's
PREEXIT and ACQBULK, the first step's weights loaded before the wait; gemv_sass_pdl.json).

Usage: python benchmarks/gemv_sass.py [--roles qkv,gate_up] [--pdl] [--out DIR]   (needs triton; ~1.5 min on 2 cores)
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from afford.models import triton_gemv as tg  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import TINYLLAMA, matrix_roles  # noqa: E402

H200 = dict(sms=132, clock_ghz=1.98, copy_tb_s=4.2)
ROLES = matrix_roles(TINYLLAMA)
COMMON = {"X": "*bf16", "A": "*bf16", "XO": "*bf16", "G": "*bf16"}
# compiled here besides the card's sweep: the tensor-core and octets tiles it dropped after run 10 (each lost on
# every role there), so that their instruction counts stay beside the others'
OFFLINE_W4 = [(32, 512, 4, 1, 2), (64, 256, 4, 1, 2), (32, 512, 4, 1, 2, 2), (64, 256, 4, 1, 2, 4),
              (64, 512, 4, 1, 2, 4), (128, 256, 8, 1, 2, 4), (8, 1024, 4, 1, 3), (16, 512, 4, 1, 3),
              (8, 2048, 4, 1, 3), (4, 1024, 2, 1, 3), (16, 512, 4, 2, 3)]


def aligned(fn, sig, ints=("stride_p", "stride_w", "UP_OFF")) -> dict:
    """What a launch specializes: pointers 16-byte aligned, strides and offsets divisible by 16."""
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
            if t.startswith("*") or n in ints}


# the q|k|v GEMV's RoPE + K/V store arguments (_gemv_kernel, _gemv_w4_kernel): off unless a caller sets them
ROPE_SIG = dict(COS="*fp32", SIN="*fp32", POS="*i64", SLOTS="*i64", KP="*bf16", VP="*bf16", scratch="i32",
                stride_cos="i32", stride_ks="i32", stride_kh="i32")
NO_ROPE = dict(ROPE=False, RH=1, RKV=1, HALF=1)


def build(fn, sig: dict, constexprs: dict, warps: int, stages: int):
    if "ROPE" in fn.arg_names:                               # the kernels with the q|k|v RoPE epilogue
        sig = {**ROPE_SIG, **sig}
        constexprs = {**NO_ROPE, **constexprs}
    sig = dict(sig, **{k: "constexpr" for k in constexprs})
    sig = {k: sig[k] for k in fn.arg_names}                  # in the kernel's argument order
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned(fn, sig))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def sass(kernel) -> list[str]:
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout.splitlines()


def k_loop(lines: list[str]) -> tuple[list[str], tuple[int, int] | None]:
    """The SASS's instruction names in order, and where the K loop is in them (the first backward branch's
    [target, branch]; None without one)."""
    instr = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
    labels, body, loop = {}, [], None
    for line in lines:
        s = line.strip()
        if re.match(r"^\.L_x_\d+:", s):
            labels[s[:-1]] = len(body)
            continue
        m = instr.search(s)
        if not m:
            continue
        body.append(m.group(1))
        b = re.search(r"BRA\s+`\((\.L_x_\d+)\)", s)
        if b and b.group(1) in labels and labels[b.group(1)] < len(body) - 1 and loop is None:
            loop = (labels[b.group(1)], len(body))                       # a backward branch: the K loop
    return body, loop


def dynamic_counts(lines: list[str], steps: int) -> collections.Counter:
    """Instructions one thread executes over `steps` steps of K: the kernels do the first step before their loop
    (its weights load before PDL's wait), so the (one) loop's instructions run steps - 1 times, the others once."""
    body, loop = k_loop(lines)
    counts = collections.Counter(op for op in body if op not in ("NOP", "EXIT"))
    if loop is not None and steps > 2:
        for op in body[loop[0]:loop[1]]:
            if op not in ("NOP", "EXIT"):
                counts[op] += steps - 2
    return counts


def variants(N: int, K: int, fused: bool, swiglu: bool, pdl: bool = False):
    """(name, config, kernel fn, signature, constexprs, steps, rows a program) for every tile the GPU sweeps try
    (and OFFLINE_W4)."""
    F = N // 2 if swiglu else N
    flags = dict(HAS_ADD=fused, NORM=fused, SWIGLU=swiglu, PDL=pdl)
    for c in tg.SWEEP_CONFIGS:
        bn, bk = c[0], min(c[1], triton.next_power_of_2(K))
        sig = dict(COMMON, W="*bf16", Y="*bf16", N="i32", UP_OFF="i64", eps="fp32", stride_w="i32")
        yield ("bf16", c, tg._gemv_kernel, sig, dict(K=K, **flags, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0),
               -(-K // bk), bn, F)
    names = {tg._gemv_w4o_kernel: "int4 octets", tg._gemv_w4_tc_kernel: "int4 tensor cores",
             tg._gemv_w4q_kernel: "int4 quads"}
    for c in tg.W4_SWEEP_CONFIGS + OFFLINE_W4:
        fn, cst, split, steps = tg.w4_plan(K, K, c)            # what gemv_w4 launches, per-channel scales
        name = names.get(fn, f"int4 {tg.w4_kind(c)[0]}{' x2d' if cst.get('X2D') else ''}")
        yield (name, c, fn, w4_signature(fn), dict(cst, **flags, BLOCK_N=c[0]),
               steps, c[0], F)


def w4_signature(fn, dt: str = "bf16") -> dict:
    """The argument types of an int4 GEMV kernel (triton_gemv.w4_plan's) for activations of dtype dt."""
    sig = dict(dict.fromkeys(("X", "A", "XO", "G", "Y"), "*" + dt), S="*fp32", Z="*fp32", N="i32", F_OFF="i32",
               UP_OFF="i64", eps="fp32", stride_p="i32",
               P="*i32" if fn in (tg._gemv_w4o_kernel, tg._gemv_w4q_kernel) else "*u8")
    if fn not in (tg._gemv_w4o_kernel, tg._gemv_w4q_kernel):
        sig["n_groups"] = "i32"
    if fn in (tg._gemv_w4_tc_kernel, tg._gemv_w4q_kernel):
        sig.update(WS="*fp32", CNT="*i32")
    return sig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--roles", default=",".join(ROLES))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--pdl", action="store_true", help="the kernels as programmatic dependent launch compiles them "
                    "(afford/models/triton_lib.py); writes gemv_sass_pdl.json")
    a = ap.parse_args()
    t0 = time.perf_counter()
    issue_rate = H200["sms"] * 4 * 32 * H200["clock_ghz"] * 1e9            # thread-instructions per second
    rows = []
    for role in a.roles.split(","):
        N, K, fused, swiglu = ROLES[role]
        for kind, cfg, fn, sig, cst, steps, bn, F in variants(N, K, fused, swiglu, a.pdl):
            try:
                k = build(fn, sig, cst, cfg[2], cfg[3])
                ops = dynamic_counts(sass(k), steps)
            except Exception as e:                                       # a tile ptxas refuses
                rows.append(dict(role=role, kind=kind, config=list(cfg), error=f"{type(e).__name__}: {str(e)[:160]}"))
                continue
            per_thread = sum(ops.values())
            programs = -(-F // bn) * cst.get("SPLIT", 1)                      # (a sixth element: K split)
            threads = programs * cfg[2] * 32
            weights = N * K
            total = per_thread * threads
            code_bytes = weights * (2 if kind == "bf16" else 0.5)
            # one SM issues 4 warp-instructions a clock: a program of w warps takes w * per_thread / 4 clocks, and
            # an SM runs ceil(programs / SMs) of them -- the bound where the grid has fewer programs than SMs
            sm_clocks = -(-programs // H200["sms"]) * cfg[2] * per_thread / 4
            rows.append(dict(role=role, kind=kind, config=list(cfg), steps=steps, per_thread=per_thread,
                             programs=programs, sm_issue_us=sm_clocks / (H200["clock_ghz"] * 1e3),
                             per_weight=total / weights, issue_us=1e6 * total / issue_rate,
                             bytes_us=1e6 * code_bytes / (H200["copy_tb_s"] * 1e12),
                             spills=ops["LDL"] + ops["STL"], shared_ops=ops["LDS"] + ops["STS"] + ops["LDSM"],
                             mma=ops["HMMA"] + ops["HGMMA"], barriers=ops["BAR"], top=ops.most_common(8),
                             griddepcontrol=ops["ACQBULK"] + ops["PREEXIT"]))
            r = rows[-1]
            print(f"{role:8s} {kind:18s} {str(tuple(cfg)):22s} {r['per_weight']:6.2f} instr/weight  issue "
                  f"{r['issue_us']:6.2f} us (per SM {r['sm_issue_us']:6.2f}, {programs} programs)  bytes "
                  f"{r['bytes_us']:5.2f} us  spills {r['spills']}  barriers {r['barriers']}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"target": "sm_90 (Triton's ptxas, offline)", "triton": triton.__version__, "machine": H200,
           "rows": rows, "elapsed_s": time.perf_counter() - t0}
    (out / ("gemv_sass_pdl.json" if a.pdl else "gemv_sass.json")).write_text(json.dumps(res, indent=1))
    best = {}
    for r in rows:
        if "error" not in r:
            key = (r["role"], r["kind"])
            if key not in best or r["sm_issue_us"] < best[key]["sm_issue_us"]:
                best[key] = r
    print("\nleast per-SM issue time per role and kernel:")
    for (role, kind), r in sorted(best.items()):
        print(f"  {role:8s} {kind:18s} {tuple(r['config'])}: {r['per_weight']:.2f} instr/weight, issue {r['issue_us']:.2f} us "
              f"(per SM {r['sm_issue_us']:.2f}, {r['programs']} programs), bytes {r['bytes_us']:.2f} us")


if __name__ == "__main__":
    main()
